r"""SRe2L recover on scikit-learn's 8x8 digits (IPC 10): a small CPU configuration (not published).

  ddjax recover --config configs/recover/digits.py \
      --config.teacher=runs/teacher_digits --workdir runs/recover_digits

ddjax's choices, sized for a few CPU minutes: the CIFAR recipe (no crop, no flip: a flipped
digit is another symbol) with roll offsets U{0..1} (8-px images), 500 Adam(0.5, 0.9) iterations
at lr 0.25 with the cosine policy, r_bn 0.01, first-BN multiplier 10, batches of all 10
classes. No JPEG round trip (``jpeg_quality=0``): 8x8 blocks of grey digits would be mostly
compression artefacts, so the float images are kept.
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    return recover_config(
        "digits",
        ipc=10,
        batch_size=10,
        iterations=500,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 1),
        crop=False,
        flip=False,
        jpeg_quality=0,
    )
