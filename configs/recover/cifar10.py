r"""SRe2L recover on CIFAR-10 (32 px, IPC 50): CIFAR-100's published recipe, 10-class batches.

  ddjax recover --config configs/recover/cifar10.py \
      --config.teacher=runs/teacher_cifar10 --workdir runs/recover_cifar10

SRe2L publishes no CIFAR-10 setting (the CIFAR-10 numbers in the literature are G-VBSM's run of
SRe2L's code). ddjax's choice: everything as ``configs/recover/cifar100.py`` (1,000 iterations,
lr 0.25, r_bn 0.01, first-BN multiplier 10, no crop or flip, roll U{0..4}, JPEG q75) except the
batch size, 10 = all classes: the reference's loop over ``range(0, num_classes, batch_size)``
gives batches of 10 distinct classes anyway.
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    return recover_config(
        "cifar10",
        ipc=50,
        batch_size=10,
        iterations=1000,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 4),
        crop=False,
        flip=False,
    )
