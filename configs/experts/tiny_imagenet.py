r"""MTT expert trajectories on Tiny-ImageNet (64 px, 200 classes; Cazenavette et al. 2022).

  ddjax experts --config configs/experts/tiny_imagenet.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 --workdir runs/experts_tiny

The data is the original tiny-imagenet-200 folder (train/<wnid>/images, val/ with
val_annotations.txt), normalised with the ImageNet statistics as MTT does
(dataset.normalisation='tiny_imagenet'). MTT uses ConvNetD4 at 64 px (4 blocks: 64 -> 4 px;
857,160 params) and no ZCA for Tiny; ZCA must match between the experts and the distillation.

100 experts, 50 epochs each, SGD lr 0.01 without momentum or weight decay, batch 256, DSA.
Storage: about 175 MB per expert, 17.5 GB for 100; host memory while training: experts_at_once
trajectories (875 MB at 5).

Fields: as configs/experts/cifar10.py, plus dataset.normalisation (a ddjax.data.NORMALISATION
key, or 'computed').
"""

from ddjax.config import experts_config


def get_config():
    config = experts_config(
        "folder:data/tiny-imagenet-200", zca=False, model="ConvNetD4", experts_at_once=5
    )
    config.dataset.normalisation = "tiny_imagenet"  # ImageNet statistics, as MTT
    return config
