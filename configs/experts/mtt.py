r"""MTT's expert trajectories (Cazenavette et al., CVPR 2022, ``buffer.py``) as one config family.

  ddjax experts --config configs/experts/mtt.py:digits --workdir runs/experts_digits
  ddjax experts --config configs/experts/mtt.py:cifar10 --workdir runs/experts_cifar10_zca

The argument picks a row of PUBLISHED: `DATASET`. Every row is buffer.py's recipe: ConvNet-3
experts (width 128, instance norm, avg-pool), 50 epochs each, SGD lr 0.01 without momentum or
weight decay, batch 256, DSA on every batch, cross-entropy; params saved at init and after every
epoch; 100 experts. Every field is overridable with --config.FIELD=VALUE (e.g. --config.epochs=15).

ZCA must match between the experts and the distillation run (configs/distill/*.py): ZCA and
non-ZCA experts are different experts, and ddjax refuses to mix them. Likewise the model.

Rows (storage = snapshots x params x 4 bytes; host memory while training: experts_at_once
trajectories):
* cifar10: ZCA on, as MTT's main CIFAR-10 settings (IPC 1 and 10; MTT's IPC 50 runs use
  --config.dataset.zca=False). About 65 MB per expert (51 snapshots x 320,010 params), 6.5 GB
  for 100; 650 MB of host memory at 10 at once.
* cifar100: ZCA on, as MTT's CIFAR-100 IPC 1 and 50 settings (IPC 10 uses
  --config.dataset.zca=False). MTT normalises CIFAR-100 with the CIFAR-10 statistics (only
  relevant without ZCA); ddjax.data does the same. About 103 MB per expert (51 x 504,420
  params), 10 GB for 100.
* fashion_mnist, mnist: not reported by MTT; its recipe unchanged (28 px inputs padded to 32 in
  the first conv, 317,706 params). No ZCA (DC/DSA/KIP/FRePo use none for grayscale data). About
  65 MB per expert, 6.5 GB for 100.
* tiny_imagenet (64 px, 200 classes): the original tiny-imagenet-200 folder (train/<wnid>/images,
  val/ with val_annotations.txt) from data/tiny-imagenet-200 (elsewhere:
  --config.dataset.name=folder:/data/tiny-imagenet-200), normalised with the ImageNet
  statistics as MTT (dataset.normalisation='tiny_imagenet'; a ddjax.data.NORMALISATION key, or
  'computed'). MTT uses ConvNetD4 at 64 px (4 blocks: 64 -> 4 px; 857,160 params) and no ZCA.
  About 175 MB per expert, 17.5 GB for 100; 875 MB of host memory at 5 at once.
* digits (scikit-learn's bundled 8x8 digits; not published): no download, a few minutes on CPU.
  MTT's recipe at a size that fits a laptop: 5 experts of 40 epochs, ConvNet-3 of width 64
  (ConvNetW64), trained side by side, batch 64 instead of 256 (1,352 training digits make only
  6 steps of 256 per epoch, and such experts stay below 85 % test accuracy after 15 epochs,
  weaker than a network trained on 100 random digits). 40 epochs so that IPC 10 can match later
  segments (start epochs up to 20, as DATM argues for larger IPC): with 15-epoch experts (90 %
  test accuracy) MTT at IPC 10 did not beat 100 random digits; with these (94 % on an H100) it
  does. About 12 MB per expert (41 snapshots x 75,530 params). The quick start uses this row.
"""

import ml_collections

from ddjax.config import dataset_arg, dataset_section

#: dataset -> what differs from buffer.py's defaults (experts_fields' keywords): ZCA, the model,
#: the folder a dataset is read from and its normalisation, and the digits row's smaller run.
PUBLISHED = {
    "cifar10": dict(zca=True),
    "cifar100": dict(zca=True),
    "fashion_mnist": dict(zca=False),
    "mnist": dict(zca=False),
    "tiny_imagenet": dict(zca=False, model="ConvNetD4", experts_at_once=5,
                          name="folder:data/tiny-imagenet-200", normalisation="tiny_imagenet"),
    "digits": dict(zca=False, model="ConvNetW64", num_experts=5, epochs=40, batch_size=64,
                   experts_at_once=5),
}  # fmt: skip


def experts_fields(
    dataset: str,
    *,
    zca: bool = False,
    model: str = "ConvNet",
    num_experts: int = 100,
    epochs: int = 50,
    batch_size: int = 256,
    experts_at_once: int = 10,
    name: str | None = None,
    normalisation: str | None = None,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax experts`` config; the defaults are MTT's ``buffer.py``."""
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(name or dataset, zca=zca)
    if normalisation is not None:
        config.dataset.normalisation = normalisation
    config.model = model  # a ddjax.models name; must be the distillation run's
    config.num_experts = num_experts
    config.epochs = epochs
    config.lr = 0.01
    config.momentum = 0.0
    config.weight_decay = 0.0
    config.batch_size = batch_size
    config.augment = "dsa"  # dsa | crop_flip | none
    config.seed = 0
    config.experts_at_once = experts_at_once  # trained side by side; does not change the results
    config.pool_mode = "auto"  # auto | vmap | loop
    config.test_every = 1
    config.test_limit = ml_collections.config_dict.placeholder(int)  # unset: all test images
    config.checkpoint_every = 5  # epochs between resume points
    # Which examples each epoch trains on: name '' (all, every epoch: MTT) | 'pad' (PAD's
    # easy-to-hard schedule, buffer_CL.py's published values below), ranked by difficulty
    # scores: a .npy/.npz file, or 'forgetting' with scores_experts_dir (earlier experts).
    config.example_schedule = ml_collections.ConfigDict(
        {
            "name": "",
            "scores": "",
            "scores_higher": "harder",  # harder (forgetting counts, EL2N, GraNd) | easier
            "scores_experts_dir": "",
            "init_ratio": 0.75,  # the easiest fraction at epoch 0
            "add_end_epoch": 20,  # all examples from this epoch
            "rm_epoch_first": 40,  # after it, the easiest rm_easy_ratio_first are dropped
            "rm_epoch_second": 60,  # after it, the easiest rm_easy_ratio_second are dropped
            "rm_easy_ratio_first": 0.1,
            "rm_easy_ratio_second": 0.2,
        }
    )
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset = dataset_arg(arg, PUBLISHED, "configs/experts/mtt.py")
    return experts_fields(dataset, **PUBLISHED[dataset])
