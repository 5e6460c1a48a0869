r"""Squeeze on Fashion-MNIST (28 px, 1 channel): a ddjax recipe, not a published one.

  ddjax squeeze --config configs/squeeze/fashion_mnist.py --workdir runs/squeeze_fmnist

SRe2L publishes no Fashion-MNIST teacher. ddjax's choice: SRe2L's CIFAR recipe
(``squeeze_cifar.py``) on the grey images -- ResNet-18 with the small stem (ddjax
``ResNet18BN``, its first conv taking one channel, torchvision init), SGD lr 0.1, momentum 0.9,
weight decay 5e-4 on every parameter, batch 128, cosine annealing stepped per epoch,
``RandomCrop(28, padding=4)`` + flip -- for 50 epochs instead of 200 (Fashion-MNIST converges
much sooner, and SRe2L found that longer-trained teachers recover worse data). Normalisation:
mean 0.2861 / std 0.3530, the DC/MTT constants.

Fields: as configs/squeeze/cifar100.py.
"""

from ddjax.sre2l.squeeze import squeeze_config


def get_config():
    return squeeze_config(
        "fashion_mnist",
        model="ResNet18BN",
        epochs=50,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        augment="crop_flip",
    )
