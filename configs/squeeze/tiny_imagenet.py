r"""SRe2L squeeze on Tiny-ImageNet (64 px, 200 classes): the 50-epoch ResNet-18 teacher.

  ddjax squeeze --config configs/squeeze/tiny_imagenet.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 --workdir runs/squeeze_tiny

Source: zeyuanyin/tiny-imagenet ``script/train_rn18.sh`` (first command) with its
``classification/train.py`` (torchvision's reference recipe): torchvision ``resnet18`` with
``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`` and no max-pool, 200 classes (ddjax
``ResNet18BN``, torchvision init); SGD lr 0.2, momentum 0.9, weight decay 1e-4 on every
parameter, batch 256, 50 epochs; 5 epochs of linear warm-up from 0.01 x lr
(``LinearLR(start_factor=0.01)``) then ``CosineAnnealingLR(T_max=45)``, stepped per epoch;
per-image ``RandomResizedCrop(64)`` (scale (0.08, 1), ratio (3/4, 4/3)) + flip; no mixup,
cutmix or label smoothing. Published teacher: 59.57 % (50 epochs); SRe2L's released Tiny data
uses this 50-epoch teacher (longer-trained teachers recover worse data, SRe2L issues #4/#19).

ddjax's choices: SRe2L normalises with Tiny-ImageNet's own statistics, mean (0.4802, 0.4481,
0.3975) / std (0.2302, 0.2265, 0.2262); ddjax computes them from the train split it loads
(dataset.normalisation='computed'), which gives these values up to rounding. The data is the
original tiny-imagenet-200 folder (train/<wnid>/images; val/ with val_annotations.txt as the
test split). The crop is resampled bilinearly on the normalised array without antialiasing
(see ddjax.sre2l.squeeze).

Fields: as configs/squeeze/cifar100.py.
"""

from ddjax.sre2l.squeeze import squeeze_config


def get_config():
    config = squeeze_config(
        "folder:data/tiny-imagenet-200",
        model="ResNet18BN",
        epochs=50,
        batch_size=256,
        lr=0.2,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=5,
        warmup_start_factor=0.01,
        augment="rrc_flip",
    )
    config.dataset.normalisation = "computed"  # Tiny-ImageNet's own statistics, as SRe2L
    return config
