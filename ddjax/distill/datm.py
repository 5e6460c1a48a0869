"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024) on ddjax's MTT core.

"Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching" changes MTT
in four ways (``research/trajectory_matching.md`` §3.1; code ``NUS-HPC-AI-Lab/DATM``
``distill/DATM.py``), all of which are options of :mod:`ddjax.distill.mtt`'s one step:

1. **Matching range** [T⁻, T⁺]: the start epoch is drawn from {T⁻, …, UpperBound − 1}
   (``np.random.randint(min_start_epoch, Upper_Bound)``) instead of {0, …, T⁺ − 1}; small IPC
   match early (easy) trajectory segments, large IPC late (hard) ones.
2. **Sequential generation**: UpperBound = min(T⁺, T + ⌊(T⁺ − T)·it / expansion_end⌋) grows
   from T (``current_max_start_epoch``) to T⁺ over ``expansion_end`` outer iterations
   (:func:`start_epoch_upper_bound`); off, UpperBound = T⁺. Here the bound is computed inside
   the jitted step from the state's iteration counter, so a growing bound never recompiles.
3. **Learnable soft labels**: the state's labels are logits y; the inner loop trains on
   softmax(y) with ``SoftCrossEntropy`` (:func:`ddjax.distill.soft_labels.soft_cross_entropy`),
   and y is learned by the matching loss's gradient with SGD(``lr_y``, momentum 0.9, PyTorch
   semantics: :func:`label_optimizer`). y is initialised from the experts
   (:func:`initial_set`): ``'samples_predicted_correctly'`` or ``'real'``.
4. **Loss threshold**: the image, learning-rate and label optimisers step only if
   L ≤ ``threshold``; otherwise the iteration is skipped (DATM logs it as "falts").

DATM's evaluation is MTT's protocol with soft cross-entropy and batch 128: a DATM set is saved
with labels softmax(y) as (N, C) probabilities, and :func:`ddjax.train.cross_entropy` with
probability targets is exactly ``SoftCrossEntropy`` on y.

Deliberate differences from the release:

* **Experts.** DATM reuses FTD's experts (``buffer_FTD.py``: GSAM flat-minima training, 100
  epochs, ZCA). ddjax's experts are MTT's plain-SGD experts (``ddjax experts``); train them
  for 100 epochs (``--config.epochs=100``) to match DATM's lengths.
* **Initialisation when too few images are classified correctly**: the release loops forever
  (or fails to index) when no expert classifies ``ipc`` images of a class correctly; ddjax
  raises a one-line error.
* **Randomness** is JAX's/NumPy's with explicit seeds (DATM seeds its global generators with 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import augment as augment_lib
from ddjax.data import Dataset
from ddjax.distill import matching, soft_labels
from ddjax.errors import check

__all__ = [
    "INITS",
    "SCAN_BATCH_SIZE",
    "average_correct_logits",
    "initial_set",
    "label_optimizer",
    "match_loss_and_grads_with_label_logits",
    "match_loss_with_label_logits",
    "sample_start_epoch",
    "select_correctly_predicted",
    "start_epoch_upper_bound",
]

Array = jax.Array
Params = Any

#: DATM's ``pix_init`` choices that define the labels too (noise has no DATM label init).
INITS = ("samples_predicted_correctly", "real")
#: DATM scans each class's shuffled real images in batches of 256.
SCAN_BATCH_SIZE = 256


# --------------------------------------------------------------------------------------------
# The matching range and sequential generation
# --------------------------------------------------------------------------------------------


def start_epoch_upper_bound(
    iteration: Array | int,
    *,
    max_start_epoch: int,
    current_max_start_epoch: int | None = None,
    expansion_end_iteration: int | None = None,
) -> Array:
    """DATM's UpperBound of the start epoch at outer iteration ``iteration`` (pure, jittable).

    Sequential generation (Guo et al. 2024, §4.2; ``DATM.py``)::

        UpperBound = min(T⁺, T + int((T⁺ − T) · it / expansion_end_epoch))

    with T = ``current_max_start_epoch``, T⁺ = ``max_start_epoch``, ``it`` the 0-based outer
    iteration and ``expansion_end_epoch`` a number of outer iterations (DATM's name; ddjax
    calls it ``expansion_end_iteration``). ``int`` of the non-negative quotient is the floor,
    computed here in integers. Without sequential generation (``current_max_start_epoch=None``)
    UpperBound = T⁺.

    Args:
      iteration: the outer iteration(s), an int or an int array of any shape.
      max_start_epoch: T⁺.
      current_max_start_epoch: T, the bound at iteration 0, or ``None`` for no sequential
        generation.
      expansion_end_iteration: the iteration at which the bound reaches T⁺ (required with T).

    Returns:
      int32 array shaped like ``iteration``.
    """
    iteration = jnp.asarray(iteration, jnp.int32)
    if current_max_start_epoch is None:
        return jnp.full(iteration.shape, max_start_epoch, jnp.int32)
    check(
        expansion_end_iteration is not None and expansion_end_iteration >= 1,
        f"expansion_end_iteration={expansion_end_iteration!r} must be a positive integer with "
        "current_max_start_epoch set (sequential generation)",
    )
    span = max_start_epoch - current_max_start_epoch
    grown = current_max_start_epoch + (span * iteration) // expansion_end_iteration
    return jnp.minimum(grown, max_start_epoch).astype(jnp.int32)


def sample_start_epoch(
    key: Array,
    iteration: Array | int,
    *,
    min_start_epoch: int,
    max_start_epoch: int,
    current_max_start_epoch: int | None = None,
    expansion_end_iteration: int | None = None,
) -> Array:
    """t ~ U{T⁻, …, UpperBound − 1} (DATM's ``np.random.randint(min_start_epoch, Upper_Bound)``).

    With ``min_start_epoch=0`` and no sequential generation this is MTT's draw t ~ U{0, …,
    T⁺ − 1} (the same numbers for the same key). The bound is a traced function of
    ``iteration``, so calling this in a jitted step compiles once for every iteration.

    Args:
      key: PRNG key.
      iteration: the 0-based outer iteration (a scalar).
      min_start_epoch: T⁻.
      max_start_epoch, current_max_start_epoch, expansion_end_iteration: see
        :func:`start_epoch_upper_bound`.

    Returns:
      The start epoch, an int32 scalar.
    """
    upper = start_epoch_upper_bound(
        iteration,
        max_start_epoch=max_start_epoch,
        current_max_start_epoch=current_max_start_epoch,
        expansion_end_iteration=expansion_end_iteration,
    )
    return jax.random.randint(key, (), min_start_epoch, upper, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Learnable soft labels
# --------------------------------------------------------------------------------------------


def label_optimizer(lr_y: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """DATM's ``torch.optim.SGD([label_syn], lr=lr_y, momentum=Momentum_y)`` (momentum 0.9).

    optax's ``sgd`` keeps ``buf = momentum · buf + g`` from zero, PyTorch's first step sets
    ``buf = g``: the same buffer; the update is ``−lr_y · buf``.
    """
    return optax.sgd(lr_y, momentum=momentum or None)


def match_loss_with_label_logits(
    images: Array,
    label_logits: Array,
    inner_lr: Array | float,
    start_params: Params,
    target_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    *,
    model: nn.Module,
    augment_key: Array | None = None,
    mode: str = "remat",
    remat_every: int | None = None,
    loop: matching.Loop = "unrolled",
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Array:
    """MTT's matching loss with DATM's learnable labels: targets softmax(y) of logits y.

    The inner loop's loss is the masked mean of Σ_k −softmax(y_j)_k log_softmax(f(A(x_j)))_k
    over the minibatch, i.e. DATM's ``SoftCrossEntropy`` (Guo et al. 2024, ``DATM.py``);
    everything else is :func:`ddjax.distill.matching.match_loss` (same arguments, with
    ``label_logits`` ``[M, num_classes]`` in place of the labels).

    The gradient w.r.t. y is softmax's Jacobian applied to the gradient w.r.t. the
    probabilities. In ``mode='tesla'`` the latter is TESLA's per-step VJP w.r.t. the labels
    of each minibatch (``DATM_tesla.py`` differentiates its ``total_term`` w.r.t. the logit
    slices through ``SoftCrossEntropy``); the Jacobian is linear and depends on y only, so
    applying it after summing over the steps gives the same gradient.
    """
    check(
        jnp.ndim(label_logits) == 2 and jnp.issubdtype(jnp.result_type(label_logits), jnp.floating),
        f"label_logits must be float [num_images, num_classes], got shape "
        f"{tuple(jnp.shape(label_logits))} and dtype {jnp.result_type(label_logits)}",
    )
    return matching.match_loss(
        images,
        soft_labels.label_probabilities(label_logits),
        inner_lr,
        start_params,
        target_params,
        batch_indices,
        batch_mask,
        model=model,
        augment_key=augment_key,
        mode=mode,
        remat_every=remat_every,
        loop=loop,
        dsa_strategy=dsa_strategy,
        batch_sharding=batch_sharding,
    )


@functools.partial(
    jax.jit,
    static_argnames=("model", "mode", "remat_every", "loop", "dsa_strategy", "batch_sharding"),
)
def match_loss_and_grads_with_label_logits(
    images: Array,
    label_logits: Array,
    inner_lr: Array | float,
    start_params: Params,
    target_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    *,
    model: nn.Module,
    augment_key: Array | None = None,
    mode: str = "remat",
    remat_every: int | None = None,
    loop: matching.Loop = "unrolled",
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[Array, matching.MatchGrads]:
    """:func:`match_loss_with_label_logits` and its gradients w.r.t. images, y and α, jitted.

    Like :func:`ddjax.distill.matching.match_loss_and_grads` (the configuration is static;
    inside a larger jitted step the inner ``jit`` is inlined).

    Returns:
      ``(loss, MatchGrads(images, inner_lr, labels))`` with ``labels`` the gradient w.r.t.
      the label logits ``[M, num_classes]``.
    """
    inner_lr = jnp.asarray(inner_lr)
    if not jnp.issubdtype(inner_lr.dtype, jnp.floating):
        inner_lr = inner_lr.astype(jnp.result_type(float))

    def loss_fn(images: Array, label_logits: Array, inner_lr: Array) -> Array:
        return match_loss_with_label_logits(
            images,
            label_logits,
            inner_lr,
            start_params,
            target_params,
            batch_indices,
            batch_mask,
            model=model,
            augment_key=augment_key,
            mode=mode,
            remat_every=remat_every,
            loop=loop,
            dsa_strategy=dsa_strategy,
            batch_sharding=batch_sharding,
        )

    loss, (image_grads, label_grads, lr_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
        images, label_logits, inner_lr
    )
    return loss, matching.MatchGrads(image_grads, lr_grad, label_grads)


# --------------------------------------------------------------------------------------------
# Initialisation from the experts
# --------------------------------------------------------------------------------------------


def select_correctly_predicted(
    labels: np.ndarray,
    num_classes: int,
    ipc: int,
    predict: Callable[[int, np.ndarray], np.ndarray],
    num_experts: int,
    seed: int = 0,
) -> np.ndarray:
    """DATM's ``pix_init='samples_predicted_correctly'`` image choice (``DATM.py``).

    For each class c in order: shuffle the class's real images (one NumPy generator seeded
    with ``seed``, classes drawn in turn, as DATM's ``get_images(c, all)`` shuffles with the
    global generator); scan them in that order, in batches of :data:`SCAN_BATCH_SIZE`, with
    expert 0's final snapshot and keep the images it classifies as c, until ``ipc`` are kept.
    If the scan ends with fewer, DATM moves on to the next expert (``cur += 1``) and scans the
    same order again, adding images that expert classifies correctly and that were not kept
    yet; ddjax does the same through experts 1, 2, … and raises when every expert has been
    tried (the release would loop forever). Images are kept in the order they were found
    (DATM's ``list(set(index))`` reorders them; the order has no effect on the method).

    Args:
      labels: int ``[n_train]`` class of every real image.
      num_classes: number of classes.
      ipc: images to keep per class.
      predict: ``predict(expert, indices) -> logits [len(indices), num_classes]``: the
        final-snapshot logits of expert number ``expert`` (0 is the one DATM scans with first)
        on the real images ``indices``.
      num_experts: how many experts ``predict`` knows.
      seed: the shuffling seed.

    Returns:
      int64 ``[num_classes · ipc]`` indices of real images, class by class.

    Raises:
      DDJaxError: if a class has fewer than ``ipc`` images that some expert classifies
        correctly.
    """
    check(num_experts >= 1, "samples_predicted_correctly needs at least one expert")
    rng = np.random.default_rng(seed)
    chosen_per_class = []
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        chosen: list[int] = []
        taken: set[int] = set()
        for expert in range(num_experts):
            for begin in range(0, len(order), SCAN_BATCH_SIZE):
                batch = order[begin : begin + SCAN_BATCH_SIZE]
                predicted = np.argmax(predict(expert, batch), axis=-1)
                for index in batch[predicted == c]:
                    if len(chosen) < ipc and int(index) not in taken:
                        chosen.append(int(index))
                        taken.add(int(index))
                if len(chosen) == ipc:
                    break
            if len(chosen) == ipc:
                break
        check(
            len(chosen) == ipc,
            f"init='samples_predicted_correctly': only {len(chosen)} of the {len(order)} train "
            f"images of class {c} are classified correctly by the final snapshot of any of the "
            f"{num_experts} experts, ipc={ipc} needs {ipc} (use init='real')",
        )
        chosen_per_class.append(np.asarray(chosen, np.int64))
    return np.concatenate(chosen_per_class)


def average_correct_logits(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """DATM's label initialisation: per image, the mean logits of the experts that are right.

    ``DATM.py`` ("only sum correct predicted logits"): every expert's final snapshot labels
    the initial images; an expert counts for an image when its arg-max is the image's class;
    the initial label logits are the sum of the counting experts' logits divided by their
    number.

    Args:
      logits: ``[E, N, num_classes]``, expert e's logits on image n.
      classes: int ``[N]``, each image's class.

    Returns:
      float32 ``[N, num_classes]`` label logits.

    Raises:
      DDJaxError: if some image is classified correctly by no expert (DATM would divide by
        zero; cannot happen for images chosen by :func:`select_correctly_predicted` with the
        same experts).
    """
    logits = np.asarray(logits, np.float64)
    classes = np.asarray(classes)
    check(
        logits.ndim == 3 and logits.shape[1] == classes.shape[0],
        f"logits must be [experts, {classes.shape[0]}, classes], got shape {logits.shape}",
    )
    correct = np.argmax(logits, axis=-1) == classes[None, :]
    counts = correct.sum(axis=0)
    missing = np.flatnonzero(counts == 0)
    check(
        missing.size == 0,
        f"image {missing[:1].tolist()} (class {classes[missing[:1]].tolist()}) is classified "
        f"correctly by none of the {logits.shape[0]} experts: no label to average",
    )
    summed = np.sum(logits * correct[..., None], axis=0)
    return (summed / counts[:, None]).astype(np.float32)


def initial_set(
    dataset: Dataset,
    ipc: int,
    init: str,
    *,
    model: nn.Module,
    final_params: Callable[[int], Params],
    num_experts: int,
    label_expert: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DATM's initial images and label logits from the real data and the experts.

    * ``'samples_predicted_correctly'``: images by :func:`select_correctly_predicted`
      (scanning with expert 0, then 1, …), labels by :func:`average_correct_logits` over all
      ``num_experts`` experts' final snapshots (DATM iterates over every expert of every buffer
      file, ``Label_Model_Timestamp = -1``).
    * ``'real'``: ``ipc`` random real images per class (the same images as MTT's real init
      with this seed, :func:`ddjax.select.random_indices`) and, as labels, the logits of one
      expert's final snapshot (DATM: ``buffer[0][-1]``, the first expert of the first buffer
      file it loads; here expert ``label_expert``).

    Every expert network runs in eval mode (:func:`ddjax.distill.soft_labels.expert_logits`).

    Args:
      dataset: the real data.
      ipc: images per class.
      init: one of :data:`INITS`.
      model: the experts' architecture.
      final_params: ``final_params(e)`` is expert e's ``params`` after its last epoch.
      num_experts: experts 0 … num_experts − 1 are available.
      label_expert: the expert whose logits label a ``'real'`` init.
      seed: the seed of the image choice.

    Returns:
      ``(images [C·IPC, H, W, C], classes [C·IPC], label_logits [C·IPC, C])``, class by class.

    Raises:
      DDJaxError: unknown ``init``, or too few correctly classified images.
    """
    from ddjax import select as select_lib  # the coreset module (imported late: a sibling stage)

    check(init in INITS, f"config.init={init!r} for DATM: expected one of {list(INITS)}")
    check(
        0 <= label_expert < num_experts,
        f"label_expert={label_expert} is not one of the {num_experts} experts",
    )

    def predict(expert: int, indices: np.ndarray) -> np.ndarray:
        return soft_labels.predict_in_batches(
            model, final_params(expert), dataset.x_train[indices], SCAN_BATCH_SIZE
        )

    if init == "real":
        indices = select_lib.random_indices(dataset.y_train, dataset.num_classes, ipc, seed)
        return (
            dataset.x_train[indices].astype(np.float32),
            dataset.y_train[indices].astype(np.int32),
            predict(label_expert, indices),
        )
    indices = select_correctly_predicted(
        dataset.y_train, dataset.num_classes, ipc, predict, num_experts, seed
    )
    classes = dataset.y_train[indices].astype(np.int32)
    logits = np.stack([predict(e, indices) for e in range(num_experts)])
    return (
        dataset.x_train[indices].astype(np.float32),
        classes,
        average_correct_logits(logits, classes),
    )
