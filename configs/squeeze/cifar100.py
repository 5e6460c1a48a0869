r"""SRe2L squeeze on CIFAR-100: the ResNet-18 teacher (Yin, Xing & Shen, NeurIPS 2023).

  ddjax squeeze --config configs/squeeze/cifar100.py --workdir runs/squeeze_cifar100

Source: VILA-Lab/SRe2L ``SRe2L/*small_dataset/squeeze_cifar.py`` with ``squeeze_cifar.sh``
(``--epochs 200``): torchvision ``resnet18(num_classes=100)`` with ``conv1 = Conv2d(3, 64, 3, 1,
1, bias=False)`` and no max-pool (ddjax ``ResNet18BN``, torchvision init), SGD lr 0.1, momentum
0.9, weight decay 5e-4 on every parameter, batch 128, ``CosineAnnealingLR(T_max=200)`` stepped
per epoch, ``RandomCrop(32, padding=4)`` + horizontal flip, normalisation mean (0.4914, 0.4822,
0.4465) / std (0.2023, 0.1994, 0.2010) (ddjax's ``cifar100`` constants). Published teacher:
78.72 % top-1 (``research/sre2l.md`` §2).

ddjax's choices: the test accuracy is logged every epoch (the script tests every 10th); a
resume point is saved every epoch.

Fields: dataset.{name,data_dir,zca,normalisation}, model, width, conv_init, epochs, batch_size,
lr, momentum, weight_decay, warmup_epochs, warmup_start_factor, augment (crop_flip | rrc_flip |
none), seed, test_every, test_limit, checkpoint_every, epoch_mode (auto | scan | loop); see
ddjax.sre2l.squeeze.SqueezeSettings.
"""

from ddjax.sre2l.squeeze import squeeze_config


def get_config():
    return squeeze_config(
        "cifar100",
        model="ResNet18BN",
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        augment="crop_flip",
    )
