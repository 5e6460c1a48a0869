r"""Coreset selection on fashion_mnist, evaluated with MTT's protocol (5 ConvNets, 1000 epochs).

  ddjax select --config configs/select/fashion_mnist.py --config.method=herding --config.ipc=10 \
      --workdir runs/select_fashion_mnist_herding_10

Fields (ddjax.config.select_config): method (random | herding | kcenter), ipc, seed,
features (trained | random | pixels), feature_epochs, feature_model, evaluate, eval.*,
dataset.{name,data_dir,zca}.
"""

from ddjax.config import select_config


def get_config():
    return select_config("fashion_mnist")
