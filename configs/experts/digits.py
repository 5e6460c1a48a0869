r"""A small expert run on scikit-learn's bundled 8x8 digits: no download, about a minute on CPU.

  ddjax experts --config configs/experts/digits.py --workdir runs/experts_digits

MTT's recipe (SGD lr 0.01 without momentum or weight decay, DSA on every batch, params at init
and after every epoch) at a size that fits a laptop, with batch 64 instead of 256 (1,352 training
digits make only 6 steps of 256 per epoch, and such experts stay below 85 % test accuracy after 15
epochs, weaker than a network trained on 100 random digits): 5 experts of 40 epochs,
ConvNet-3 of width 64 (ConvNetW64), trained one after another on CPU (a few minutes). 40 epochs
so that IPC 10 can match later segments (start epochs up to 20, as DATM argues for larger IPC):
with 15-epoch experts (90 % test accuracy) MTT at IPC 10 did not beat 100 random digits; with
these (94 % on an H100) it does. About 12 MB per expert (41 snapshots x 75,530 params).

Fields: as configs/experts/cifar10.py.
"""

from ddjax.config import experts_config


def get_config():
    return experts_config(
        "digits",
        zca=False,
        model="ConvNetW64",
        num_experts=5,
        epochs=40,
        batch_size=64,
        experts_at_once=5,
    )
