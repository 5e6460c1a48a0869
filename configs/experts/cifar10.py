r"""MTT expert trajectories on CIFAR-10 (Cazenavette et al. 2022, buffer.py defaults).

  ddjax experts --config configs/experts/cifar10.py --workdir runs/experts_cifar10

100 ConvNet-3 experts (width 128, instance norm, avg-pool), 50 epochs each, SGD lr 0.01 without
momentum or weight decay, batch 256, DSA on every batch; params saved at init and after every
epoch. ZCA whitening is on, as in MTT's main CIFAR-10 settings (IPC 1 and 10; MTT's IPC 50 runs
use --config.dataset.zca=False). ZCA must match between the experts and the distillation run:
ZCA and non-ZCA experts are different experts (ddjax refuses to mix them).

Storage: about 65 MB per expert (51 snapshots x 320,010 params x 4 bytes), 6.5 GB for 100.
Host memory while training: experts_at_once trajectories (650 MB at 10).

Fields: dataset.{name,data_dir,zca}, model (a ddjax.models name), num_experts, epochs, lr,
momentum, weight_decay, batch_size, augment (dsa | crop_flip | none), seed, experts_at_once
(trained side by side; does not change the results), pool_mode (auto | vmap | loop),
test_every, test_limit (first N test images; unset: all), checkpoint_every (epochs between
resume points).
"""

import ml_collections

from ddjax.config import dataset_section


def get_config():
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section("cifar10", zca=True)
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
