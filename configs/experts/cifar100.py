r"""MTT expert trajectories on CIFAR-100 (Cazenavette et al. 2022, buffer.py defaults).

  ddjax experts --config configs/experts/cifar100.py --workdir runs/experts_cifar100

100 ConvNet-3 experts, 50 epochs each, SGD lr 0.01 without momentum or weight decay, batch 256,
DSA on every batch; params saved at init and after every epoch. ZCA whitening is on, as in MTT's
CIFAR-100 IPC 1 and 50 settings (IPC 10 uses --config.dataset.zca=False). ZCA must match between
the experts and the distillation run. MTT normalises CIFAR-100 with the CIFAR-10 statistics
(only relevant without ZCA); ddjax.data does the same.

Storage: about 103 MB per expert (51 x 504,420 params x 4 bytes), 10 GB for 100.

Fields: as configs/experts/cifar10.py.
"""

import ml_collections

from ddjax.config import dataset_section


def get_config():
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section("cifar100", zca=True)
    config.model = "ConvNet"
    config.num_experts = 100
    config.epochs = 50
    config.lr = 0.01
    config.momentum = 0.0
    config.weight_decay = 0.0
    config.batch_size = 256
    config.augment = "dsa"
    config.seed = 0
    config.experts_at_once = 10
    config.pool_mode = "auto"
    config.test_every = 1
    config.test_limit = ml_collections.config_dict.placeholder(int)
    config.checkpoint_every = 5
    return config
