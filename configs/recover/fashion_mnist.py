r"""SRe2L recover on Fashion-MNIST (28 px, grey, IPC 10): not published; ddjax's choice.

  ddjax recover --config configs/recover/fashion_mnist.py \
      --config.teacher=runs/teacher_fashion_mnist --workdir runs/recover_fashion_mnist

No SRe2L setting exists for Fashion-MNIST. ddjax follows the small-image (CIFAR) recipe: whole
images optimised without crop or flip (a flip changes shoes and garments little, and random
crops of 28-px images lose the object), roll offsets U{0..2} (CIFAR's 4 px scaled to 28 px),
1,000 Adam(0.5, 0.9) iterations at lr 0.25 with the cosine policy, r_bn 0.01, first-BN
multiplier 10, batches of all 10 classes, JPEG q75 output as published. IPC 10 matches the
accuracy benchmark's CPU protocol. All of these are ddjax's choices, not published values.
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    return recover_config(
        "fashion_mnist",
        ipc=10,
        batch_size=10,
        iterations=1000,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 2),
        crop=False,
        flip=False,
    )
