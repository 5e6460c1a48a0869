r"""SRe2L squeeze on CIFAR-10: the ResNet-18 teacher, with SRe2L's CIFAR-100 recipe.

  ddjax squeeze --config configs/squeeze/cifar10.py --workdir runs/squeeze_cifar10

Source: VILA-Lab/SRe2L ``SRe2L/*small_dataset/squeeze_cifar.py`` (written for CIFAR-100; the
repository has no separate CIFAR-10 script): torchvision ``resnet18`` with ``conv1 =
Conv2d(3, 64, 3, 1, 1, bias=False)`` and no max-pool (ddjax ``ResNet18BN``, torchvision init),
SGD lr 0.1, momentum 0.9, weight decay 5e-4 on every parameter, batch 128,
``CosineAnnealingLR(T_max=200)`` stepped per epoch, 200 epochs, ``RandomCrop(32, padding=4)`` +
flip, CIFAR normalisation (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010).

ddjax's choices: the same recipe with 10 classes (as the CIFAR-10 rows of later papers, e.g.
G-VBSM, use it); test accuracy logged every epoch; a resume point every epoch.

Fields: as configs/squeeze/cifar100.py.
"""

from ddjax.sre2l.squeeze import squeeze_config


def get_config():
    return squeeze_config(
        "cifar10",
        model="ResNet18BN",
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        augment="crop_flip",
    )
