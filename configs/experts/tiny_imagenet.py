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

import ml_collections

from ddjax.config import dataset_section


def get_config():
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section("folder:data/tiny-imagenet-200", zca=False)
    config.dataset.normalisation = "tiny_imagenet"
    config.model = "ConvNetD4"
    config.num_experts = 100
    config.epochs = 50
    config.lr = 0.01
    config.momentum = 0.0
    config.weight_decay = 0.0
    config.batch_size = 256
    config.augment = "dsa"
    config.seed = 0
    config.experts_at_once = 5
    config.pool_mode = "auto"
    config.test_every = 1
    config.test_limit = ml_collections.config_dict.placeholder(int)
    config.checkpoint_every = 5
    return config
