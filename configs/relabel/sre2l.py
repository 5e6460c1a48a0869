r"""SRe2L relabel (Yin, Xing & Shen, NeurIPS 2023): soft labels and KD students as one family.

  ddjax relabel --config configs/relabel/sre2l.py:digits \
      --config.synset=runs/recover_digits/synset.npz \
      --config.teacher=runs/squeeze_digits/teacher --workdir runs/relabel_digits
  ddjax relabel --config configs/relabel/sre2l.py:cifar100 \
      --config.synset=runs/recover_cifar100/synset.npz \
      --config.teacher=runs/teacher_cifar100 --workdir runs/relabel_cifar100

The argument picks a row of PUBLISHED: `DATASET`. A row names a ddjax.sre2l.kd recipe, whose
fields are all copied into config.recipe (ddjax.sre2l.kd.Recipe) so the resolved config shows
every hyper-parameter, and the row's changes to it. ``labels``: stored (FKD-style files) |
online (the teacher labels every student batch; nothing stored). synset and teacher are left
empty and must be given. Every field is overridable with --config.FIELD=VALUE. The students are
checkpointed (``config.eval.checkpoint_every``, ddjax's choice) every epoch on ImageNet and every
5 (Tiny-ImageNet), 10 (CIFAR-100) or 50 (digits, Fashion-MNIST) epochs elsewhere, where an
epoch takes seconds and a save each epoch would cost more than a killed run repeats.

Rows (research/sre2l.md §4-§5.3):
* imagenet -- FKD soft labels stored for 300 epochs (official relabel.sh). Labels:
  ``SRe2L/relabel/relabel.sh`` (``generate_soft_label.py``): teacher = the recovery model
  (torchvision's pretrained ResNet-18) in eval mode, ``-b 1024 --epochs 300 --fkd-seed 42
  --input-size 224 --min-scale-crops 0.08 --max-scale-crops 1 --use-fp16 --mix-type cutmix``:
  per image a RandomResizedCrop box and a flip flag, per batch one CutMix (λ ~ Beta(1, 1)), the
  teacher's raw logits on the mixed batch in fp16. Students: ``SRe2L/validate/train_FKD.sh``:
  torchvision ``resnet18`` (ImageNet stem: ddjax ``ResNet18BN`` with ``small_stem=False``,
  torchvision init), AdamW lr 1e-3 and weight decay 0.01 on conv/linear kernels only, cosine per
  epoch over 300 epochs, batch 1024 (must equal the labels' batch size), KL at T = 20 without
  T², the stored views replayed. Storage: 300 epochs x N images x (1000 fp16 logits + 16 B box +
  1 B flip + 4 B partner) = 2,021 B per image and epoch, one file per epoch (FKD writes one file
  per batch): 28.2 GiB at IPC 50, of which the logits are 27.9 GiB (LPLD's table: 28.33 GB).
  ``dataset.name`` is empty: relabelling reads no ImageNet images (the data contract -- 224 px,
  1,000 classes, ImageNet mean/std -- is the teacher's ``teacher.json``), and ``evaluate`` is
  off. To train and score the students in the same run, stream ImageNet's val split
  (``--config.dataset.name=stream:folder:/data/imagenet --config.dataset.normalisation=imagenet
  --config.evaluate=True``: resize 256, centre crop 224; top-1 and top-5); ResNet-50/101
  students with ``--config.eval.models=ResNet18BN,ResNet50BN,ResNet101BN`` (the row's
  ``small_stem=False``, ``conv_init='torchvision'`` apply to each: torchvision's networks);
  ``--config.eval.num_models=1`` trains each data parallel over every device and host,
  ``--config.recipe.accumulate=A`` cuts each batch of 1024 into A micro-batches for smaller
  devices, ``--config.eval.eval_every=K`` tests every K epochs; students resume per epoch.
  ddjax's deliberate differences from FKD (JAX random numbers, batches keyed by (seed, epoch),
  float instead of JPEG-decoded crops) are listed in ``ddjax.sre2l.relabel``.
* tiny_imagenet -- online KD with the squeezed teacher (zeyuanyin/tiny-imagenet
  ``script/train_kd.sh`` + ``classification/train_kd.py``): nothing is stored -- the teacher
  (the 50-epoch small-stem ResNet-18 squeeze checkpoint, eval mode) labels every student batch;
  students are the same modified torchvision ``resnet18`` (ddjax ``ResNet18BN``, torchvision
  init); SGD lr 0.2, momentum 0.9, weight decay 1e-4 on every parameter, batch 256, 100 epochs,
  5 epochs of linear warm-up from 0.01x then cosine, stepped per epoch; RandomResizedCrop(64) +
  horizontal flip, no MixUp/CutMix; ``KLDivLoss(log_target=True)`` at T = 20 times T². Logged
  top-1 with ResNet-18: 41.1 (IPC 50), 49.7 (IPC 100). Normalisation: Tiny-ImageNet's own
  statistics (``dataset.normalisation='computed'``), as the teacher's (checked against
  ``teacher.json``). ``--config.labels=stored`` writes FKD-style labels instead (100 epochs x N
  x 200 fp16 logits; 449 MB at IPC 50 per LPLD's table). Read from data/tiny-imagenet-200
  (elsewhere: --config.dataset.name=folder:/data/tiny-imagenet-200).
* cifar100 -- online KD as ``relabel_cifar.py`` does it (VILA-Lab/SRe2L
  ``SRe2L/*small_dataset/relabel_cifar.py`` + ``.sh``): nothing is stored -- the squeezed
  teacher (small-stem ResNet-18, 200 epochs) labels every student batch; students are the same
  modified torchvision ``resnet18`` (ddjax ``ResNet18BN``, torchvision init); AdamW lr 1e-3,
  weight decay 0.01 on every parameter, ``CosineAnnealingLR(T_max=400)`` per epoch, 400 epochs,
  batch 128; RandomCrop(32, padding 4) + horizontal flip, MixUp (α = 0.8) on every batch; KL at
  T = 30 without T². The script never puts the teacher in eval mode, so its BatchNorm layers
  normalise each batch with that batch's statistics: reproduced (``recipe.teacher_mode=
  'train'``); set ``--config.recipe.teacher_mode=eval`` for the running statistics. Reported
  ResNet-18 top-1 at IPC 50: 49.4 (issue #10: 47.6 reproduced; CDA's settings give 51.4).
  Normalisation: ddjax's ``cifar100`` constants, mean (0.4914, 0.4822, 0.4465) / std (0.2023,
  0.1994, 0.2010) -- the ones this script uses.
* digits (8x8, IPC 10; not published) -- FKD-style stored labels, ddjax's choices sized for a
  minute or two on a 2-core CPU. The structure is ImageNet's: labels stored for every epoch
  (200 epochs x 100 images x 10 fp16 logits with their crops and mixes: 1.2 MB), the teacher
  (configs/squeeze/sre2l.py:digits, ConvNetBN) in eval mode, AdamW with weight decay 0.01 on
  kernels only, cosine per epoch, CutMix on every batch, KL at T = 20 without T². Changed for
  8-px digits: RandomResizedCrop with scale (0.5, 1) (FKD's 0.08 leaves a pixel or two of a
  digit) and no horizontal flip (a flipped digit is another symbol), batch 50 (two steps per
  epoch), 200 epochs at lr 0.01 (lr 1e-3 leaves the students far from converged). Students:
  MTT's ConvNet-3 at width 64, the quick start's. Measured on the set from
  configs/recover/sre2l.py:digits (teacher 99.1 %): 95.1 ± 0.6 % test accuracy over 5 students,
  91 s in all (relabel 7 s) on a busy 2-core CPU, compilation included. Alternatives tried (2
  students, online labels): T = 4, 94.7; lr 1e-3 for 100 epochs, 67; no mix with a 1-px
  RandomCrop, 89.1; 100 epochs, 90.1.
* fashion_mnist (28 px, grey, IPC 10; not published) -- stored labels; ddjax carries over the
  recipe it validated on digits, which keeps ImageNet's structure: labels stored for every
  epoch (300 epochs x 100 images x 10 fp16 logits, under 2 MB), the teacher
  (configs/squeeze/sre2l.py:fashion_mnist, small-stem ResNet-18) in eval mode, AdamW with
  weight decay 0.01 on kernels only, cosine per epoch, CutMix on every batch, KL at T = 20
  without T², RandomResizedCrop with scale (0.5, 1) (FKD's 0.08 crops away most of a 28-px
  garment), batch 50, lr 0.01. Unlike digits, horizontal flips are kept (a mirrored garment is
  the same garment; DSA flips Fashion-MNIST too) and 300 epochs are run. Students: MTT's
  ConvNet-3 (width 128), the network of the Fashion-MNIST tables in
  research/trajectory_matching.md. These values have not been tuned on Fashion-MNIST.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from ddjax.config import dataset_arg, dataset_section
from ddjax.sre2l import kd

#: dataset -> the kd recipe and the row's changes to it, stored | online labels, the students
#: (architectures and their fields), and the data folder / normalisation where not the default.
#: name '' = no images (the teacher's data contract).
PUBLISHED = {
    "imagenet": dict(name="", recipe="imagenet", labels="stored", models=("ResNet18BN",),
                     model_overrides={"small_stem": False, "conv_init": "torchvision"},
                     evaluate=False),
    "tiny_imagenet": dict(name="folder:data/tiny-imagenet-200", recipe="tiny_imagenet",
                          labels="online", models=("ResNet18BN",),
                          model_overrides={"conv_init": "torchvision"},
                          normalisation="computed", checkpoint_every=5),
    "cifar100": dict(recipe="cifar", labels="online", models=("ResNet18BN",),
                     model_overrides={"conv_init": "torchvision"}, checkpoint_every=10),
    "digits": dict(recipe="imagenet", labels="stored", models=("ConvNet",),
                   model_overrides={"width": 64}, epochs=200, batch_size=50, lr=0.01,
                   min_scale=0.5, flip=False, checkpoint_every=50),
    "fashion_mnist": dict(recipe="imagenet", labels="stored", models=("ConvNet",),
                          model_overrides={"width": 128}, epochs=300, batch_size=50, lr=0.01,
                          min_scale=0.5, flip=True, checkpoint_every=50),
}  # fmt: skip


def relabel_fields(
    dataset: str,
    recipe: str,
    *,
    labels: str = "stored",
    models: tuple[str, ...] = ("ResNet18BN",),
    model_overrides: Mapping[str, Any] | None = None,
    normalisation: str = "",
    seed: int = 42,
    evaluate: bool = True,
    checkpoint_every: int = 1,
    **recipe_changes: Any,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax relabel`` config.

    Args:
      dataset: ``config.dataset.name``; empty: no images are loaded and the data contract
        (shape, classes, mean/std) is the teacher's (``teacher.json``), which is enough for
        stored labels but not for evaluating students (``evaluate`` must be False).
      recipe: a ``ddjax.sre2l.kd`` recipe name; all its fields are copied into
        ``config.recipe``.
      labels: ``'stored'`` (FKD) or ``'online'`` (teacher at every step; nothing stored).
      models: student architectures evaluated after relabelling.
      model_overrides: student fields for every architecture in ``models`` (e.g.
        ``{'conv_init': 'torchvision'}``); keys set here can be overridden on the command line.
      normalisation: ``config.dataset.normalisation`` (a ``ddjax.data.NORMALISATION`` key or
        ``'computed'``; empty: the source's own). Must be the teacher's.
      seed: the batch-map and augmentation seed (FKD ``--fkd-seed 42``).
      evaluate: train students on the labels right away.
      checkpoint_every: save the students every this many epochs (``config.eval``); 1 for
        ImageNet's long epochs, more where an epoch takes seconds and a save would dominate.
      **recipe_changes: recipe fields that replace the preset's (e.g. ``epochs=100``).
    """
    config = ml_collections.ConfigDict()
    # name empty: the teacher's data contract, no images (stored labels only). SRe2L works in
    # mean/std-normalised space (no ZCA).
    config.dataset = dataset_section(dataset)
    config.dataset.normalisation = normalisation
    config.synset = ""  # the recovered synthetic set (.npz from ddjax recover)
    config.teacher = ""  # the teacher directory (from ddjax squeeze or ddjax teacher)
    config.labels = labels  # stored (FKD files) | online (teacher at every student step)
    config.seed = seed  # image->batch map and augmentation draws
    recipe_fields = dataclasses.asdict(kd.get_recipe(recipe, **recipe_changes))
    config.recipe = ml_collections.ConfigDict(recipe_fields)  # ddjax.sre2l.kd.Recipe fields
    config.evaluate = evaluate  # train students on the labels right away
    config.eval = ml_collections.ConfigDict(
        {
            "models": models,  # student architectures
            "num_models": 5,  # K students per architecture
            "seed": 0,  # student initialisation
            "model_overrides": ml_collections.ConfigDict(dict(model_overrides or {})),
            "pool_mode": "auto",  # auto | vmap | loop (num_models=1: data parallel instead)
            "eval_every": 0,  # also test (top-1, top-5) every this many epochs; 0: at the end
            "checkpoint_every": checkpoint_every,  # students' resume points, in epochs
        }
    )
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset = dataset_arg(arg, PUBLISHED, "configs/relabel/sre2l.py")
    row = dict(PUBLISHED[dataset])
    return relabel_fields(row.pop("name", dataset), row.pop("recipe"), **row)
