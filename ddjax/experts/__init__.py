"""Expert trajectories for trajectory matching, with forgetting statistics on the side.

MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022,
§3; ``buffer.py``) matches a student against *experts*: networks trained on the real data whose
parameters were saved at initialisation and after every epoch. This module trains them with
MTT's recipe (``research/trajectory_matching.md`` §1.4):

* ConvNet, SGD with lr 0.01, no momentum, no weight decay, no learning-rate decay;
* batch 256, DSA on every batch, cross-entropy, 50 epochs, 100 experts by default;
* the ``params`` at initialisation and after every epoch: ``epochs + 1`` snapshots;
* the test set is evaluated after every epoch (``test_every``), for the log only.

Plain SGD with a constant rate is deliberate: MTT's author found such trajectories "much easier
for our synthetic data to imitate" (MTT issue #8).

**Keys.** Expert ``i`` of seed ``s`` is initialised from ``init_key`` and trained with
``train_key``, where ``init_key, train_key = split(fold_in(key(s), i))``; epoch ``e`` shuffles
and augments with ``split(fold_in(train_key, e), 1)[0]``, the key :func:`ddjax.train.fit` gives
its one model. So expert ``i`` is exactly ``train.fit(init_state(model, tx, init_key), step,
x_train, y_train, train_key, epochs, batch_size)``, whichever experts it was trained beside
(``experts_at_once``) and however often the run was interrupted.

**Pools.** ``experts_at_once`` experts are trained side by side with the building blocks of
:mod:`ddjax.train`: one vmapped program on accelerators (the pool axis sharded over the devices
when there are several), one model after another on CPU (``pool_mode``, see
:func:`ddjax.train.resolve_pool_mode`).

**Forgetting events** (Toneva et al., "An Empirical Study of Example Forgetting during Deep
Neural Network Learning", ICLR 2019, §2): every time an example is in a minibatch, the train
step's own forward pass (on the augmented image, before the update) says whether it was
classified correctly; a *forgetting event* is correct at the previous presentation, incorrect
now. An epoch presents every example once, so an expert presents each example ``epochs``
times. Examples that are never classified correctly get the score ``epochs`` -- more than any
example that was learned can reach (at most ``epochs // 2`` events) -- so that, as in Toneva et
al. and SelMatch, unlearned examples rank as the most forgettable. No second forward pass is
made. SelMatch and the forgetting coreset reuse these scores.

**Files** (``out_dir``)::

    experts.json        settings, completed experts, per-epoch losses and test accuracies
    expert_0000/ ...    one Orbax checkpoint per expert: {'params': leaves [epochs + 1, ...]}
    forgetting.npz      per-expert forgetting counts [E_done, n_train] (train order) + sum/mean
    _partial/           the group in training: state, trajectory so far, forgetting state
                        (every ``checkpoint_every`` epochs; removed when the group completes)

A killed run continues with the group in ``_partial/`` from its last checkpoint, then with the
next unfinished experts, and gives bit-identical trajectories on CPU. Loading picks a subset
of experts (:func:`load_trajectories`), as MTT loads one buffer file at a time.

**Modules**: :mod:`~ddjax.experts.forgetting` (the events), :mod:`~ddjax.experts.store` (the
directory: metadata, trajectories, checks), :mod:`~ddjax.experts.training` (the groups, through
:func:`ddjax.train.train_epochs`), :mod:`~ddjax.experts.stage` (``ddjax experts``).
"""

from ddjax.experts.forgetting import (
    ForgettingState,
    forgetting_counts,
    forgetting_init,
    forgetting_update,
)
from ddjax.experts.store import (
    FORGETTING_FILE,
    FORMAT,
    META_FILE,
    PARTIAL_DIR,
    TRAINING_FIELDS,
    check_compatible,
    check_settings,
    completed,
    expert_dir,
    fingerprint,
    forgetting_scores,
    load_trajectories,
    load_trajectory,
    read_meta,
    summary,
    trajectory_shapes,
    verify_trajectories,
)
from ddjax.experts.training import epoch_key, expert_keys, train_experts

__all__ = [
    "FORGETTING_FILE",
    "FORMAT",
    "META_FILE",
    "PARTIAL_DIR",
    "TRAINING_FIELDS",
    "ForgettingState",
    "check_compatible",
    "check_settings",
    "completed",
    "epoch_key",
    "expert_dir",
    "expert_keys",
    "fingerprint",
    "forgetting_counts",
    "forgetting_init",
    "forgetting_scores",
    "forgetting_update",
    "load_trajectories",
    "load_trajectory",
    "read_meta",
    "summary",
    "train_experts",
    "trajectory_shapes",
    "verify_trajectories",
]
