r"""SRe2L relabel on Tiny-ImageNet: online KD with the squeezed teacher (official train_kd.sh).

  ddjax relabel --config configs/relabel/tiny_imagenet.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 \
      --config.synset=runs/recover_tiny_imagenet/synset.npz \
      --config.teacher=runs/teacher_tiny_imagenet --workdir runs/relabel_tiny_imagenet

Published values (zeyuanyin/tiny-imagenet ``script/train_kd.sh`` + ``classification/
train_kd.py``, research/sre2l.md §5.2): nothing is stored -- the teacher (the 50-epoch
small-stem ResNet-18 squeeze checkpoint, eval mode) labels every student batch online;
students are the same modified torchvision ``resnet18`` (ddjax ``ResNet18BN``, torchvision
init); SGD lr 0.2, momentum 0.9, weight decay 1e-4 on every parameter, batch 256, 100 epochs,
5 epochs of linear warm-up from 0.01x then cosine, stepped per epoch; RandomResizedCrop(64) +
horizontal flip, no MixUp/CutMix; ``KLDivLoss(log_target=True)`` at T = 20 times T². Logged
top-1 with ResNet-18: 41.1 (IPC 50), 49.7 (IPC 100).

Normalisation: Tiny-ImageNet's own statistics (``dataset.normalisation='computed'``), as the
teacher's (checked against ``teacher.json``). ``--config.labels=stored`` writes FKD-style
labels instead (100 epochs x N x 200 fp16 logits; 449 MB at IPC 50 per LPLD's table).
Fields: ddjax.sre2l.relabel.relabel_config; recipe fields: ddjax.sre2l.kd.Recipe.
"""

from ddjax.sre2l.relabel import relabel_config


def get_config():
    return relabel_config(
        "folder:data/tiny-imagenet-200",
        "tiny_imagenet",
        labels="online",
        models=("ResNet18BN",),
        model_overrides={"conv_init": "torchvision"},
        normalisation="computed",
        seed=42,
    )
