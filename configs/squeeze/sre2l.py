r"""SRe2L squeeze (Yin, Xing & Shen, NeurIPS 2023): the teacher recipes as one config family.

  ddjax squeeze --config configs/squeeze/sre2l.py:digits --workdir runs/squeeze_digits
  ddjax squeeze --config configs/squeeze/sre2l.py:cifar100 --workdir runs/squeeze_cifar100

The argument picks a row of PUBLISHED: `DATASET`. Every field is overridable with
--config.FIELD=VALUE; the fields are ddjax.sre2l.squeeze.SqueezeSettings' (model, width,
conv_init, epochs, batch_size, lr, momentum, weight_decay, warmup_epochs, warmup_start_factor,
augment: crop_flip | rrc_flip | none, seed, test_every, test_limit, checkpoint_every,
epoch_mode: auto | scan | loop) plus dataset.{name,data_dir,zca,normalisation}. ImageNet-1K has
no row: SRe2L does not squeeze on ImageNet (recover imports torchvision's ResNet-18 instead).

Rows (research/sre2l.md §2):
* cifar100 -- VILA-Lab/SRe2L ``SRe2L/*small_dataset/squeeze_cifar.py`` with ``squeeze_cifar.sh``
  (``--epochs 200``): torchvision ``resnet18(num_classes=100)`` with ``conv1 = Conv2d(3, 64, 3,
  1, 1, bias=False)`` and no max-pool (ddjax ``ResNet18BN``, torchvision init), SGD lr 0.1,
  momentum 0.9, weight decay 5e-4 on every parameter, batch 128, ``CosineAnnealingLR(T_max=200)``
  stepped per epoch, ``RandomCrop(32, padding=4)`` + horizontal flip, normalisation mean
  (0.4914, 0.4822, 0.4465) / std (0.2023, 0.1994, 0.2010) (ddjax's ``cifar100`` constants).
  Published teacher: 78.72 % top-1. ddjax's choices: the test accuracy is logged every epoch
  (the script tests every 10th); a resume point is saved every epoch.
* cifar10 -- the same recipe with 10 classes (the repository has no separate CIFAR-10 script;
  the CIFAR-10 rows of later papers, e.g. G-VBSM, use it), CIFAR normalisation.
* tiny_imagenet (64 px, 200 classes) -- zeyuanyin/tiny-imagenet ``script/train_rn18.sh`` (first
  command) with its ``classification/train.py`` (torchvision's reference recipe): the same
  small-stem ``resnet18``, 200 classes; SGD lr 0.2, momentum 0.9, weight decay 1e-4 on every
  parameter, batch 256, 50 epochs; 5 epochs of linear warm-up from 0.01 x lr
  (``LinearLR(start_factor=0.01)``) then ``CosineAnnealingLR(T_max=45)``, stepped per epoch;
  per-image ``RandomResizedCrop(64)`` (scale (0.08, 1), ratio (3/4, 4/3)) + flip; no mixup,
  cutmix or label smoothing. Published teacher: 59.57 % (50 epochs); SRe2L's released Tiny data
  uses this 50-epoch teacher (longer-trained teachers recover worse data, SRe2L issues #4/#19).
  SRe2L normalises with Tiny-ImageNet's own statistics, mean (0.4802, 0.4481, 0.3975) / std
  (0.2302, 0.2265, 0.2262); ddjax computes them from the train split it loads
  (dataset.normalisation='computed'), which gives these values up to rounding. The data is the
  original tiny-imagenet-200 folder (train/<wnid>/images; val/ with val_annotations.txt as the
  test split) from data/tiny-imagenet-200 (elsewhere:
  --config.dataset.name=folder:/data/tiny-imagenet-200). The crop is resampled bilinearly on
  the normalised array without antialiasing (see ddjax.sre2l.squeeze).
* fashion_mnist (28 px, 1 channel; not published) -- ddjax's choice: SRe2L's CIFAR recipe on the
  grey images (ResNet18BN, its first conv taking one channel; ``RandomCrop(28, padding=4)`` +
  flip) for 50 epochs instead of 200 (Fashion-MNIST converges much sooner, and SRe2L found that
  longer-trained teachers recover worse data). Normalisation: mean 0.2861 / std 0.3530, the
  DC/MTT constants.
* digits (scikit-learn's 8x8 digits; not published) -- ddjax's choice for the quick start, sized
  to finish in well under a minute on a 2-core CPU: a BatchNorm ConvNet-3 of width 32
  (``ConvNetBN``, 8 -> 4 -> 2 -> 1 px, PyTorch default init), SRe2L's CIFAR optimiser, batch 64
  (1,352 training digits), cosine over 30 epochs, no augmentation (a 4-px padded crop and a
  horizontal flip destroy 8-px digits: 91 % test accuracy with them). Measured (seed 0, jax
  0.10.2): 99.1 % test accuracy on the 445 test digits; about 20 s including compilation on an
  idle 2-core CPU, 11 s on one H100.
"""

from typing import Any

import ml_collections

from ddjax.config import dataset_arg, dataset_section
from ddjax.errors import check
from ddjax.sre2l import squeeze

#: dataset -> model, epochs, batch, SGD lr / momentum / weight decay, warm-up, augmentation;
#: plus where a dataset is read from and its normalisation where they are not the defaults.
PUBLISHED = {
    "cifar100": dict(model="ResNet18BN", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                     weight_decay=5e-4, augment="crop_flip"),
    "cifar10": dict(model="ResNet18BN", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                    weight_decay=5e-4, augment="crop_flip"),
    "tiny_imagenet": dict(model="ResNet18BN", epochs=50, batch_size=256, lr=0.2, momentum=0.9,
                          weight_decay=1e-4, warmup_epochs=5, warmup_start_factor=0.01,
                          augment="rrc_flip", name="folder:data/tiny-imagenet-200",
                          normalisation="computed"),
    "fashion_mnist": dict(model="ResNet18BN", epochs=50, batch_size=128, lr=0.1, momentum=0.9,
                          weight_decay=5e-4, augment="crop_flip"),
    "digits": dict(model="ConvNetBN", width=32, epochs=30, batch_size=64, lr=0.1, momentum=0.9,
                   weight_decay=5e-4, augment="none"),
}  # fmt: skip


def squeeze_fields(
    dataset: str, *, name: str | None = None, normalisation: str = "", **changes: Any
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax squeeze`` config (ddjax.sre2l.squeeze.SqueezeSettings').

    The defaults are SRe2L's CIFAR recipe (``squeeze_cifar.py``); ``changes`` replace any of
    the top-level fields (e.g. ``epochs=50``). ``name`` is ``dataset.name`` when it is not
    ``dataset``.

    Raises:
      DDJaxError: an unknown field, or ImageNet-1K (ddjax.sre2l.squeeze.check_squeezable).
    """
    squeeze.check_squeezable(name or dataset)
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(name or dataset)
    # A ddjax.data.NORMALISATION key or 'computed'; empty: the dataset's published constants.
    config.dataset.normalisation = normalisation
    config.model = "ResNet18BN"  # a ddjax.models name with BatchNorm
    config.width = ml_collections.config_dict.placeholder(int)  # unset: the model's own
    # ResNet-18's conv init; unset: 'torchvision' for ResNet-18 models (SRe2L's torchvision
    # network), PyTorch's default init for the others.
    config.conv_init = ml_collections.config_dict.placeholder(str)
    config.epochs = 200
    config.batch_size = 128
    config.lr = 0.1
    config.momentum = 0.9  # SGD
    config.weight_decay = 5e-4  # on every parameter, BatchNorm included
    config.warmup_epochs = 0  # linear warm-up epochs before the cosine
    config.warmup_start_factor = 0.01  # the warm-up's first factor (torchvision's lr_warmup_decay)
    config.augment = (
        "crop_flip"  # crop_flip (RandomCrop + flip) | rrc_flip (RandomResizedCrop) | none
    )
    config.seed = 0
    config.test_every = 1  # test accuracy every this many epochs and after the last
    config.test_limit = ml_collections.config_dict.placeholder(int)  # unset: all test images
    config.checkpoint_every = 1  # epochs between resume points
    config.epoch_mode = "auto"  # auto (loop on CPU, scan elsewhere) | scan | loop
    # Streams (dataset.name = stream:...): also a resume point every this many batches.
    config.checkpoint_every_batches = ml_collections.config_dict.placeholder(int)
    valid = sorted(field for field in config if field != "dataset")
    for field, value in changes.items():
        check(field in valid, f"squeeze_fields: unknown field {field!r}; valid: {valid}")
        config[field] = value
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset = dataset_arg(arg, PUBLISHED, "configs/squeeze/sre2l.py")
    return squeeze_fields(dataset, **PUBLISHED[dataset])
