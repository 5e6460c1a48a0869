r"""SRe2L recover on CIFAR-100: the official ``recover_cifar.sh`` (32 px, IPC 50).

  ddjax recover --config configs/recover/cifar100.py \
      --config.teacher=runs/teacher_cifar100 --workdir runs/recover_cifar100

Published values (``*small_dataset/recover_cifar.py/.sh``, research/sre2l.md §3.5): one batch of
all 100 classes per ipc index, 1,000 Adam(0.5, 0.9) iterations at lr 0.25 with the cosine policy,
r_bn 0.01, first-BN multiplier 10; no crop and no flip ("discard the Multi-crop Optimization and
optimize the whole image"), only roll offsets U{0..4}; JPEG q75 output. The teacher is the
200-epoch small-stem ResNet-18 squeezed on CIFAR-100 (CIFAR-10 statistics, as the reference).
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    return recover_config(
        "cifar100",
        ipc=50,
        batch_size=100,
        iterations=1000,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 4),
        crop=False,
        flip=False,
    )
