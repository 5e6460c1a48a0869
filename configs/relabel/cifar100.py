r"""SRe2L relabel on CIFAR-100: online KD as ``relabel_cifar.py`` does it (teacher in train mode).

  ddjax relabel --config configs/relabel/cifar100.py \
      --config.synset=runs/recover_cifar100/synset.npz \
      --config.teacher=runs/teacher_cifar100 --workdir runs/relabel_cifar100

Published values (VILA-Lab/SRe2L ``SRe2L/*small_dataset/relabel_cifar.py`` + ``.sh``,
research/sre2l.md §5.3): nothing is stored -- the squeezed teacher (small-stem ResNet-18, 200
epochs) labels every student batch online; students are the same modified torchvision
``resnet18`` (ddjax ``ResNet18BN``, torchvision init); AdamW lr 1e-3, weight decay 0.01 on
every parameter, ``CosineAnnealingLR(T_max=400)`` per epoch, 400 epochs, batch 128;
RandomCrop(32, padding 4) + horizontal flip, MixUp (α = 0.8) on every batch; KL at T = 30
without T². The script never puts the teacher in eval mode, so its BatchNorm layers normalise
each batch with that batch's statistics: reproduced (``recipe.teacher_mode='train'``); set
``--config.recipe.teacher_mode=eval`` for the running statistics. Reported ResNet-18 top-1 at
IPC 50: 49.4 (issue #10: 47.6 reproduced; CDA's settings give 51.4).

Normalisation: ddjax's ``cifar100`` constants, mean (0.4914, 0.4822, 0.4465) / std (0.2023,
0.1994, 0.2010) -- the ones this script uses.
Fields: ddjax.sre2l.relabel.relabel_config; recipe fields: ddjax.sre2l.kd.Recipe.
"""

from ddjax.sre2l.relabel import relabel_config


def get_config():
    return relabel_config(
        "cifar100",
        "cifar",
        labels="online",
        models=("ResNet18BN",),
        model_overrides={"conv_init": "torchvision"},
        seed=42,
    )
