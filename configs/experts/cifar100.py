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

from ddjax.config import experts_config


def get_config():
    return experts_config("cifar100", zca=True)
