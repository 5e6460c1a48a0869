r"""SRe2L recover on Tiny-ImageNet: the official ``recover_tiny.py`` (64 px, 200 classes, IPC 50).

  ddjax recover --config configs/recover/tiny_imagenet.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 \
      --config.teacher=runs/teacher_tiny_imagenet --workdir runs/recover_tiny_imagenet

Published values (``*small_dataset/recover_tiny.py``, research/sre2l.md §3.5): batches of 100
distinct classes (2 per ipc index), 4,000 Adam(0.5, 0.9) iterations at lr 0.1 with the cosine
policy, r_bn 1.0, first-BN multiplier 10, a shared RandomResizedCrop(64, scale (0.08, 1)) +
horizontal flip per iteration, roll offsets U{-4..4} (signed, unlike ImageNet and CIFAR), JPEG
q75 output. The teacher is the 50-epoch small-stem ResNet-18 squeezed on Tiny-ImageNet.

Normalisation: SRe2L's Tiny teacher uses Tiny-ImageNet's own statistics, which ddjax computes
from the train split (``dataset.normalisation='computed'``, ≈ mean (0.480, 0.448, 0.398), std
(0.230, 0.227, 0.226)); it must be the teacher's (checked against teacher.json).
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    return recover_config(
        "folder:data/tiny-imagenet-200",
        ipc=50,
        batch_size=100,
        iterations=4000,
        lr=0.1,
        r_bn=1.0,
        jitter=(-4, 4),
        crop=True,
        flip=True,
        normalisation="computed",
    )
