r"""Coreset selection on mnist, evaluated with MTT's protocol.

  ddjax select --config configs/select/mnist.py --config.method=herding --config.ipc=10 \
      --workdir runs/select_mnist_herding_10

Methods: random | herding | kcenter (ddjax.select). Herding and k-center embed
the images with a ConvNet trained for `feature_epochs` epochs on the real data
(DC's "trained ConvNet" features); set features=random or pixels to skip that.
"""

from ml_collections import ConfigDict

from ddjax.config import dataset_section, eval_section


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.dataset = dataset_section("mnist")
    config.method = "random"
    config.ipc = 10
    config.seed = 0
    config.features = "trained"
    config.feature_epochs = 5
    config.feature_model = "ConvNet"
    config.evaluate = True  # evaluate the coreset right away (config.eval)
    config.eval = eval_section()
    return config
