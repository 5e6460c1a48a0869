r"""SRe2L recover on ImageNet-1K: the official ``recover.sh`` (224 px, IPC 50).

  ddjax recover --config configs/recover/imagenet.py \
      --config.teacher=runs/teacher_imagenet --workdir runs/recover_imagenet

Published values (``SRe2L/recover/recover.sh`` + ``data_synthesis.py``; research/sre2l.md §3.5):
batches of 100 distinct classes (10 per ipc index), 4,000 Adam(0.5, 0.9) iterations per batch at
lr 0.25 with the cosine policy, r_bn 0.01, first-BN multiplier 10, a shared RandomResizedCrop(224,
scale (0.08, 1)) + horizontal flip per iteration, roll offsets U{0..32}, JPEG q75 output.

The teacher is torchvision's pretrained ResNet-18 (SRe2L does not squeeze on ImageNet): import it
with ``ddjax.sre2l.teacher.import_torch_teacher(..., model_name='ResNet18BN',
model_overrides={'small_stem': False})`` and save it with ``save_teacher``. ``dataset.name`` is
left empty: recover reads no images, so the data contract (224 px, 1,000 classes, ImageNet
mean/std) comes from the teacher's ``teacher.json``. Set ``dataset.name`` to check the teacher
against data that ddjax can load.
Fields: ddjax.sre2l.recover.recover_config.
"""

from ddjax.sre2l.recover import recover_config


def get_config():
    config = recover_config(
        "",
        ipc=50,
        batch_size=100,
        iterations=4000,
        lr=0.25,
        r_bn=0.01,
        jitter=(0, 32),
        crop=True,
        flip=True,
    )
    return config
