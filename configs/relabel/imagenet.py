r"""SRe2L relabel on ImageNet-1K: FKD soft labels stored for 300 epochs (official relabel.sh).

  ddjax relabel --config configs/relabel/imagenet.py \
      --config.synset=runs/recover_imagenet/synset.npz \
      --config.teacher=runs/teacher_imagenet --workdir runs/relabel_imagenet

Published values (VILA-Lab/SRe2L, research/sre2l.md §4-§5.1):

* labels -- ``SRe2L/relabel/relabel.sh`` (``generate_soft_label.py``): teacher = the recovery
  model (torchvision's pretrained ResNet-18) in eval mode, ``-b 1024 --epochs 300 --fkd-seed 42
  --input-size 224 --min-scale-crops 0.08 --max-scale-crops 1 --use-fp16 --mix-type cutmix``:
  per image a RandomResizedCrop box and a flip flag, per batch one CutMix (λ ~ Beta(1, 1)), the
  teacher's raw logits on the mixed batch in fp16;
* students -- ``SRe2L/validate/train_FKD.sh``: torchvision ``resnet18`` (ImageNet stem:
  ddjax ``ResNet18BN`` with ``small_stem=False``, torchvision init), AdamW lr 1e-3 and weight
  decay 0.01 on conv/linear kernels only, cosine per epoch over 300 epochs, batch 1024 (must
  equal the labels' batch size), KL at T = 20 without T², the stored views replayed.

Storage: 300 epochs x N images x (1000 fp16 logits + 16 B box + 1 B flip + 4 B partner) =
2,021 B per image and epoch, one file per epoch (FKD writes one file per batch): 28.2 GiB at
IPC 50, of which the logits are 27.9 GiB (LPLD's table: 28.33 GB).

``dataset.name`` is empty: relabelling reads no ImageNet images (the data contract -- 224 px,
1,000 classes, ImageNet mean/std -- is the teacher's ``teacher.json``), and ``evaluate`` is
off, because ddjax's in-memory datasets cannot hold ImageNet's validation set; train and score
students where ImageNet is available with ``ddjax.sre2l.kd.evaluate_kd`` and this store.
ddjax's deliberate differences from FKD (JAX random numbers, batches keyed by (seed, epoch),
float instead of JPEG-decoded crops) are listed in ``ddjax.sre2l.relabel``.
Fields: ddjax.sre2l.relabel.relabel_config; recipe fields: ddjax.sre2l.kd.Recipe.
"""

from ddjax.sre2l.relabel import relabel_config


def get_config():
    config = relabel_config(
        "",
        "imagenet",
        labels="stored",
        models=("ResNet18BN",),
        model_overrides={"small_stem": False, "conv_init": "torchvision"},
        seed=42,
    )
    config.evaluate = False
    return config
