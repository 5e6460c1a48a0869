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

from ddjax.config import experts_config


def get_config():
    return experts_config("fashion_mnist", zca=False)
