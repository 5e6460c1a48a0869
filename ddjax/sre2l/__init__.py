"""SRe2L: Squeeze, Recover, Relabel (Yin, Xing & Shen, NeurIPS 2023), and its successors.

The pipeline, one module per stage (``research/sre2l.md``):

* :mod:`ddjax.sre2l.teacher`: the BatchNorm teacher on disk (save, load, check, PyTorch import).
* :mod:`ddjax.sre2l.squeeze`: train the teacher on the real data with the published recipes;
  :mod:`ddjax.sre2l.teacher_import`: or import a PyTorch one (torchvision's ImageNet ResNets).
* :mod:`ddjax.sre2l.crops`: torchvision-exact random-resized crops, flips and rolls under ``jit``.
* :mod:`ddjax.sre2l.contract`: the teacher's data contract (shape, classes, mean/std).
* :mod:`ddjax.sre2l.recover_step`: BN-statistics matching from noise -- the objective, the
  step, one batch's run; :mod:`ddjax.sre2l.recover` is the stage around it.
* :mod:`ddjax.sre2l.views`: the augmented views of relabel and KD (crops, flips, CutMix/MixUp,
  seeded batches, the labeller); :mod:`ddjax.sre2l.label_store`: FKD's stored soft labels,
  replayed exactly; :mod:`ddjax.sre2l.kd`: students trained on them;
  :mod:`ddjax.sre2l.relabel`: the stage.

Importing this package imports nothing heavy; import the submodules you need.
"""
