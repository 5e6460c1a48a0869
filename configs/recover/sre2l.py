r"""SRe2L recover (Yin, Xing & Shen, NeurIPS 2023): the recover recipes as one config family.

  ddjax recover --config configs/recover/sre2l.py:digits \
      --config.teacher=runs/squeeze_digits/teacher --workdir runs/recover_digits
  ddjax recover --config configs/recover/sre2l.py:cifar100 \
      --config.teacher=runs/teacher_cifar100 --workdir runs/recover_cifar100

The argument picks a row of PUBLISHED: `DATASET` (the recipe does not depend on the IPC; each
row's ipc is the published run's, change it with --config.ipc=K). ``teacher`` is left empty and
must be given (--config.teacher=PATH). Every field is overridable with --config.FIELD=VALUE.
All rows use Adam(0.5, 0.9) with the cosine policy and a first-BN multiplier of 10; JPEG q75
output (SRe2L's saved JPEGs) unless stated.

Output: the imagenet and tiny_imagenet rows write each finished batch at once as JPEG files,
``WORKDIR/synset/CCC/III.jpg`` (``output='folder'``: SRe2L's format, an ImageNet-layout
folder; ``--config.jpeg_quality=0`` writes lossless PNG files instead), and checkpoint the batch
in progress every 500 iterations (``checkpoint_every``; a kill loses at most 500 of a batch's
4,000). The small-image rows keep ``output='npz'`` (``synset.npz``, held in memory) and no
in-batch checkpoints (their batches take seconds).

Rows (research/sre2l.md §3.5):
* imagenet (224 px, IPC 50) -- the official ``SRe2L/recover/recover.sh`` + ``data_synthesis.py``:
  batches of 100 distinct classes (10 per ipc index), 4,000 iterations per batch at lr 0.25,
  r_bn 0.01, a shared RandomResizedCrop(224, scale (0.08, 1)) + horizontal flip per iteration,
  roll offsets U{0..32}. The teacher is torchvision's pretrained ResNet-18 (SRe2L does not
  squeeze on ImageNet): import its ``.pth`` with ``ddjax teacher --config
  configs/teacher/torchvision.py:resnet18 --config.state_dict=resnet18-f37072fd.pth --workdir
  runs/teacher_resnet18`` and pass ``--config.teacher=runs/teacher_resnet18/teacher``.
  ``dataset.name`` is left empty: recover reads no images, so the data contract (224 px, 1,000
  classes, ImageNet mean/std) comes from the teacher's ``teacher.json``. Set ``dataset.name``
  (e.g. ``stream:imagenet2012``, the name ``ddjax teacher`` records) to check the teacher
  against data ddjax can read.
* tiny_imagenet (64 px, 200 classes, IPC 50) -- the official ``*small_dataset/recover_tiny.py``:
  batches of 100 distinct classes (2 per ipc index), 4,000 iterations at lr 0.1, r_bn 1.0, a
  shared RandomResizedCrop(64, scale (0.08, 1)) + horizontal flip per iteration, roll offsets
  U{-4..4} (signed, unlike ImageNet and CIFAR). The teacher is the 50-epoch small-stem ResNet-18
  squeezed on Tiny-ImageNet. SRe2L's Tiny teacher uses Tiny-ImageNet's own statistics, which
  ddjax computes from the train split (``dataset.normalisation='computed'``, ≈ mean (0.480,
  0.448, 0.398), std (0.230, 0.227, 0.226)); it must be the teacher's (checked against
  teacher.json). Read from data/tiny-imagenet-200 (elsewhere:
  --config.dataset.name=folder:/data/tiny-imagenet-200).
* cifar100 (32 px, IPC 50) -- the official ``*small_dataset/recover_cifar.py/.sh``: one batch of
  all 100 classes per ipc index, 1,000 iterations at lr 0.25, r_bn 0.01; no crop and no flip
  ("discard the Multi-crop Optimization and optimize the whole image"), only roll offsets
  U{0..4}. The teacher is the 200-epoch small-stem ResNet-18 squeezed on CIFAR-100 (CIFAR-10
  statistics, as the reference).
* cifar10 (32 px, IPC 50; not published by SRe2L: the CIFAR-10 numbers in the literature are
  G-VBSM's run of SRe2L's code) -- ddjax's choice: everything as cifar100 except the batch
  size, 10 = all classes: the reference's loop over ``range(0, num_classes, batch_size)`` gives
  batches of 10 distinct classes anyway.
* fashion_mnist (28 px, grey, IPC 10; not published) -- ddjax's choices following the
  small-image (CIFAR) recipe: whole images optimised without crop or flip (a flip changes shoes
  and garments little, and random crops of 28-px images lose the object), roll offsets U{0..2}
  (CIFAR's 4 px scaled to 28 px), 1,000 iterations at lr 0.25, r_bn 0.01, batches of all 10
  classes, JPEG q75 as published. IPC 10 matches the accuracy benchmark's CPU protocol.
* digits (8x8, IPC 10; not published) -- ddjax's choices, sized for a few CPU minutes: the CIFAR
  recipe (no crop, no flip: a flipped digit is another symbol) with roll offsets U{0..1} (8-px
  images), 500 iterations at lr 0.25, r_bn 0.01, batches of all 10 classes. No JPEG round trip
  (``jpeg_quality=0``): 8x8 blocks of grey digits would be mostly compression artefacts, so the
  float images are kept.
"""

import ml_collections

from ddjax.config import dataset_arg, dataset_section
from ddjax.sre2l import crops

#: dataset -> IPC, batch, iterations, lr, r_bn, roll-offset range, crop, flip (and JPEG quality,
#: data folder, normalisation, output and in-batch checkpoints where they are not the
#: defaults). name '' = no images.
PUBLISHED = {
    "imagenet": dict(name="", ipc=50, batch_size=100, iterations=4000, lr=0.25, r_bn=0.01,
                     jitter=(0, 32), crop=True, flip=True, output="folder",
                     checkpoint_every=500),
    "tiny_imagenet": dict(name="folder:data/tiny-imagenet-200", ipc=50, batch_size=100,
                          iterations=4000, lr=0.1, r_bn=1.0, jitter=(-4, 4), crop=True,
                          flip=True, normalisation="computed", output="folder",
                          checkpoint_every=500),
    "cifar100": dict(ipc=50, batch_size=100, iterations=1000, lr=0.25, r_bn=0.01,
                     jitter=(0, 4), crop=False, flip=False),
    "cifar10": dict(ipc=50, batch_size=10, iterations=1000, lr=0.25, r_bn=0.01, jitter=(0, 4),
                    crop=False, flip=False),
    "fashion_mnist": dict(ipc=10, batch_size=10, iterations=1000, lr=0.25, r_bn=0.01,
                          jitter=(0, 2), crop=False, flip=False),
    "digits": dict(ipc=10, batch_size=10, iterations=500, lr=0.25, r_bn=0.01, jitter=(0, 1),
                   crop=False, flip=False, jpeg_quality=0),
}  # fmt: skip


def recover_fields(
    dataset: str,
    *,
    ipc: int,
    batch_size: int,
    iterations: int,
    lr: float,
    r_bn: float,
    jitter: tuple[int, int],
    crop: bool,
    flip: bool,
    crop_scale: tuple[float, float] = crops.DEFAULT_SCALE,
    first_bn_multiplier: float = 10.0,
    jpeg_quality: int = 75,
    normalisation: str = "",
    name: str | None = None,
    output: str = "npz",
    checkpoint_every: int = 0,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax recover`` config: SRe2L's recover hyper-parameters.

    ``name`` is ``dataset.name`` when it is not ``dataset``; an empty one means: read no images
    and take the data contract (shape, classes, mean/std) from the teacher (ImageNet); a name
    loads the data and checks the teacher against it.
    """
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(dataset if name is None else name)
    # A ddjax.data.NORMALISATION key or 'computed'; empty: the dataset's default. Must be the
    # teacher's (checked against teacher.json).
    config.dataset.normalisation = normalisation
    config.teacher = ""  # a teacher directory (ddjax squeeze or ddjax teacher)
    config.ipc = ipc
    config.batching = "distinct_classes"  # distinct_classes (SRe2L) | class_wise (LPLD)
    config.batch_size = batch_size
    config.iterations = iterations
    config.lr = lr
    config.r_bn = r_bn
    config.first_bn_multiplier = first_bn_multiplier
    config.crop = crop  # shared RandomResizedCrop per iteration ("multi-crop")
    config.crop_scale = tuple(crop_scale)
    config.flip = flip
    config.jitter = tuple(jitter)  # inclusive roll-offset range per axis
    # 75: SRe2L's saved JPEGs; 0: no JPEG (output='npz': float images; 'folder': PNG files)
    config.jpeg_quality = jpeg_quality
    # 'npz': float batch files, then synset.npz (in memory); 'folder': each finished batch
    # written at once as WORKDIR/synset/CCC/III.jpg (ImageNet layout), the set never in memory
    config.output = output
    config.checkpoint_every = checkpoint_every  # in-batch checkpoint every K iterations (0: off)
    config.shard_batch = True  # split each batch over all devices (data axis)
    config.seed = 0
    config.log_every = 100
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset = dataset_arg(arg, PUBLISHED, "configs/recover/sre2l.py")
    return recover_fields(dataset, **PUBLISHED[dataset])
