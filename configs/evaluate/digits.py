r"""Evaluate a synthetic set on digits with MTT's protocol (Cazenavette et al. 2022).

  ddjax evaluate --config configs/evaluate/digits.py --config.synset=runs/x/synset.npz \
      --workdir runs/x_eval

Cross-architecture: --config.eval.models=ConvNet,ResNet18,VGG11,AlexNet
Other protocols: --config.eval.protocol=dsa (lr 0.01) or dc (lr 0.01, 300 epochs, no augmentation).
"""

from ddjax.config import evaluate_config


def get_config():
    return evaluate_config("digits")
