"""Training: one pure step (:mod:`ddjax.train.step`), one epoch driver (:mod:`ddjax.train.driver`).

Everything that trains a network in ddjax -- evaluation of a synthetic set, expert
trajectories, the SRe2L teacher, KD students, feature extractors for coresets -- is
:func:`make_train_step` inside :func:`train_epochs`:

* ``step.py``: the pure step ``(state, images, labels, key) -> (state, loss)`` over a
  :class:`TrainState`, PyTorch-semantics :func:`sgd`, an epoch of in-memory data as one
  compiled program (:func:`make_epoch`, :func:`make_pool_epoch`, :func:`make_loop_epoch`),
  where a pool of models runs (:func:`resolve_pool_mode`) and test accuracy
  (:func:`pool_accuracy`; top-k too: :func:`scores_over`); gradient accumulation is an
  option of the step (``make_train_step(..., accumulate=A)``).
* ``driver.py``: :func:`train_epochs`, the one epoch loop (schedule, ``on_epoch``, pool
  placement, resume), over a :class:`BatchSource` (:class:`ArraySource` for arrays in
  memory); :func:`fit_pool` and :func:`fit` for arrays.
"""

from ddjax.train.driver import (
    ArraySource,
    Batch,
    BatchSource,
    EpochOutputs,
    fit,
    fit_pool,
    pool_epoch_keys,
    train_epochs,
)
from ddjax.train.step import (
    POOL_MODES,
    PoolScores,
    TrainState,
    accuracy_over,
    array_chunks,
    cross_entropy,
    init_pool,
    init_state,
    make_epoch,
    make_loop_epoch,
    make_pool_epoch,
    make_predict,
    make_train_step,
    micro_batch_sizes,
    pool_accuracy,
    resolve_pool_mode,
    scores_over,
    set_learning_rate,
    sgd,
)

__all__ = [
    "POOL_MODES",
    "ArraySource",
    "PoolScores",
    "Batch",
    "BatchSource",
    "EpochOutputs",
    "TrainState",
    "cross_entropy",
    "fit",
    "fit_pool",
    "init_pool",
    "init_state",
    "make_epoch",
    "make_loop_epoch",
    "make_pool_epoch",
    "make_predict",
    "make_train_step",
    "accuracy_over",
    "array_chunks",
    "micro_batch_sizes",
    "pool_accuracy",
    "pool_epoch_keys",
    "resolve_pool_mode",
    "scores_over",
    "set_learning_rate",
    "sgd",
    "train_epochs",
]
