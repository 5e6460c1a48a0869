r"""Coreset selection on mnist, evaluated with MTT's protocol (5 ConvNets, 1000 epochs).

  ddjax select --config configs/select/mnist.py --config.method=herding --config.ipc=10 \
      --workdir runs/select_mnist_herding_10

  # SelMatch's sliding window over the experts' forgetting counts, β searched over SelMatch's
  # grid with its window-evaluation protocol (ResNet-18-BN, lr 0.1 cosine, DSA):
  ddjax select --config configs/select/mnist.py --config.method=window --config.ipc=10 \
      --config.experts_dir=runs/experts_mnist \
      --config.betas=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 \
      --config.eval.protocol=selmatch_dsa --config.eval.models=ResNet18BN \
      --workdir runs/select_mnist_window_10

Fields (ddjax.config.select_config): method (random | herding | kcenter | forgetting | window),
ipc, seed, features (trained | random | pixels), feature_epochs, feature_model, evaluate, eval.*,
dataset.{name,data_dir,zca}; for forgetting and window (ddjax.select.difficulty_fields): scores
('forgetting': the forgetting counts of experts_dir, or a .npy/.npz file of per-example scores),
scores_higher (harder | easier: C-scores are higher for easier examples), experts_dir, end
(forgetting: hardest | easiest per class), beta (window start floor(ipc * beta)), betas (window:
search these β with config.eval and keep the best; empty: use beta).
"""

from ddjax.config import select_config
from ddjax.select import difficulty_fields


def get_config():
    return difficulty_fields(select_config("mnist"))
