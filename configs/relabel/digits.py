r"""SRe2L relabel on scikit-learn's 8x8 digits (IPC 10): FKD-style stored labels, small CPU recipe.

  ddjax relabel --config configs/relabel/digits.py \
      --config.synset=runs/recover_digits/synset.npz \
      --config.teacher=runs/teacher_digits --workdir runs/relabel_digits

Not published; ddjax's choices, sized for a minute or two on a 2-core CPU. The structure is
ImageNet's (``configs/relabel/imagenet.py``): labels stored for every epoch (200 epochs x 100
images x 10 fp16 logits with their crops and mixes: 1.2 MB), the teacher
(``configs/squeeze/digits.py``, ConvNetBN) in eval mode, AdamW with weight decay 0.01 on
kernels only, cosine per epoch, CutMix on every batch, KL at T = 20 without T². Changed for
8-px digits: RandomResizedCrop with scale (0.5, 1) (FKD's 0.08 leaves a pixel or two of a
digit) and no horizontal flip (a flipped digit is another symbol), batch 50 (two steps per
epoch), 200 epochs at lr 0.01 (lr 1e-3 leaves the students far from converged). Students:
MTT's ConvNet-3 at width 64, the quick start's.

Measured on the set from ``configs/recover/digits.py`` (teacher 99.1 %): 95.1 ± 0.6 % test
accuracy over 5 students, 91 s in all (relabel 7 s) on a busy 2-core CPU, compilation
included. Alternatives tried (2 students, online labels): T = 4, 94.7; lr 1e-3 for 100
epochs, 67; no mix with a 1-px RandomCrop, 89.1; 100 epochs, 90.1.
Fields: ddjax.sre2l.relabel.relabel_config; recipe fields: ddjax.sre2l.kd.Recipe.
"""

from ddjax.sre2l.relabel import relabel_config


def get_config():
    return relabel_config(
        "digits",
        "imagenet",
        labels="stored",
        models=("ConvNet",),
        model_overrides={"width": 64},
        seed=42,
        epochs=200,
        batch_size=50,
        lr=0.01,
        min_scale=0.5,
        flip=False,
    )
