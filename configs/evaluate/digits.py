r"""Evaluate a synthetic set on digits with MTT's protocol (Cazenavette et al. 2022).

  ddjax evaluate --config configs/evaluate/digits.py --config.synset=runs/x/synset.npz \
      --workdir runs/x_eval

Cross-architecture: --config.eval.models=ConvNet,ResNet18,VGG11,AlexNet
Other protocols: --config.eval.protocol=dsa (lr 0.01) or dc (lr 0.01, 300 epochs, no augmentation).
"""

from ml_collections import ConfigDict

from ddjax.config import dataset_section, eval_section


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.dataset = dataset_section("digits")
    config.synset = ""  # path to a synthetic set (.npz written by select/distill)
    config.eval = eval_section()
    return config
