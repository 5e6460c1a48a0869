"""SRe2L: Squeeze, Recover, Relabel (Yin, Xing & Shen, NeurIPS 2023), and its successors.

The pipeline, one module per stage (``research/sre2l.md``):

* :mod:`ddjax.sre2l.teacher`: the BatchNorm teacher on disk (save, load, check, PyTorch import).
* :mod:`ddjax.sre2l.squeeze`: train the teacher on the real data with the published recipes.
* :mod:`ddjax.sre2l.crops`: torchvision-exact random-resized crops, flips and rolls under ``jit``.
* recover (BN-statistics matching from noise) and relabel (FKD soft labels) build on these.

Importing this package imports nothing heavy; import the submodules you need.
"""
