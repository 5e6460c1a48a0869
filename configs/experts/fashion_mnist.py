r"""Expert trajectories on Fashion-MNIST with MTT's recipe (Cazenavette et al. 2022, buffer.py).

  ddjax experts --config configs/experts/fashion_mnist.py --workdir runs/experts_fashion_mnist

MTT does not report Fashion-MNIST; this applies its expert recipe unchanged: 100 ConvNet-3 experts
(28 px inputs padded to 32 in the first conv, 317,706 params), 50 epochs each, SGD lr 0.01
without momentum or weight decay, batch 256, DSA on every batch; params saved at init and after
every epoch. No ZCA (DC/DSA/KIP/FRePo use none for grayscale data); ZCA must match between the
experts and the distillation run.

Storage: about 65 MB per expert, 6.5 GB for 100.

Fields: as configs/experts/cifar10.py.
"""

import ml_collections

from ddjax.config import dataset_section


def get_config():
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section("fashion_mnist", zca=False)
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
