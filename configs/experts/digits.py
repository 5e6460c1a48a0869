r"""A small expert run on scikit-learn's bundled 8x8 digits: no download, about a minute on CPU.

  ddjax experts --config configs/experts/digits.py --workdir runs/experts_digits

MTT's recipe (SGD lr 0.01 without momentum or weight decay, batch 256, DSA on every batch,
params at init and after every epoch) at a size that fits a laptop: 5 experts of 15 epochs,
ConvNet-3 of width 64 (ConvNetW64), trained one after another on CPU. About 5 MB per expert
(16 snapshots x 75,530 params).

Fields: as configs/experts/cifar10.py.
"""

import ml_collections

from ddjax.config import dataset_section


def get_config():
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section("digits", zca=False)
    config.model = "ConvNetW64"
    config.num_experts = 5
    config.epochs = 15
    config.lr = 0.01
    config.momentum = 0.0
    config.weight_decay = 0.0
    config.batch_size = 256
    config.augment = "dsa"
    config.seed = 0
    config.experts_at_once = 5
    config.pool_mode = "auto"
    config.test_every = 1
    config.test_limit = ml_collections.config_dict.placeholder(int)
    config.checkpoint_every = 5
    return config
