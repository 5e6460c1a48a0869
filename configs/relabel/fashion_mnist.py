r"""SRe2L relabel on Fashion-MNIST (28 px, grey, IPC 10): stored labels; ddjax's choices.

  ddjax relabel --config configs/relabel/fashion_mnist.py \
      --config.synset=runs/recover_fashion_mnist/synset.npz \
      --config.teacher=runs/teacher_fashion_mnist --workdir runs/relabel_fashion_mnist

SRe2L publishes nothing for Fashion-MNIST. ddjax carries over the recipe it validated on
digits (``configs/relabel/digits.py``), which keeps ImageNet's structure: FKD-style labels
stored for every epoch (300 epochs x 100 images x 10 fp16 logits, under 2 MB), the teacher
(``configs/squeeze/fashion_mnist.py``, small-stem ResNet-18) in eval mode, AdamW with weight
decay 0.01 on kernels only, cosine per epoch, CutMix on every batch, KL at T = 20 without T²,
RandomResizedCrop with scale (0.5, 1) (FKD's 0.08 crops away most of a 28-px garment),
batch 50, lr 0.01. Unlike digits, horizontal flips are kept (a mirrored garment is the same
garment; DSA flips Fashion-MNIST too) and 300 epochs are run. Students: MTT's ConvNet-3
(width 128), the network of the Fashion-MNIST tables in research/trajectory_matching.md.
These values have not been tuned on Fashion-MNIST.
Fields: ddjax.sre2l.relabel.relabel_config; recipe fields: ddjax.sre2l.kd.Recipe.
"""

from ddjax.sre2l.relabel import relabel_config


def get_config():
    return relabel_config(
        "fashion_mnist",
        "imagenet",
        labels="stored",
        models=("ConvNet",),
        model_overrides={"width": 128},
        seed=42,
        epochs=300,
        batch_size=50,
        lr=0.01,
        min_scale=0.5,
        flip=True,
    )
