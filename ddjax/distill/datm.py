"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024) on ddjax's MTT core.

"Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching" changes MTT
in four ways (``research/trajectory_matching.md`` §3.1; code ``NUS-HPC-AI-Lab/DATM``
``distill/DATM.py``), all of which are hooks of the :class:`DATM` plug-in on MTT's core step
(:mod:`ddjax.distill.core`):

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

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddjax import select as select_lib
from ddjax.data import Dataset
from ddjax.distill import soft_labels
from ddjax.distill.method import InitContext
from ddjax.distill.mtt import MTT
from ddjax.errors import check

__all__ = [
    "DATM",
    "INITS",
    "SCAN_BATCH_SIZE",
    "average_correct_logits",
    "initial_set",
    "label_optimizer",
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


# --------------------------------------------------------------------------------------------
# The plug-in
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DATM(MTT):
    """DATM's hooks on MTT: the matching range, learned label logits and the threshold.

    Attributes:
      min_start_epoch: T⁻ [``min_start_epoch``].
      current_max_start_epoch: T, the start epoch's bound at iteration 0 (sequential
        generation), or ``None`` for a fixed bound T⁺ [``current_max_start_epoch``].
      expansion_end_iteration: the iteration at which the bound reaches T⁺
        [``expansion_end_epoch``].
      lr_y: the label logits' learning rate [``lr_y``].
      momentum_y: their SGD momentum [``Momentum_y``].
      threshold: skip an update whose loss exceeds it, or ``None`` [``threshold``].
    """

    name: ClassVar[str] = "datm"
    float_labels: ClassVar[bool] = True
    inits: ClassVar[tuple[str, ...]] = INITS
    label_kinds: ClassVar[tuple[str, ...]] = ("learned",)
    #: DATM trains on softmax(y) of its learnable logits y (``SoftCrossEntropy``).
    label_transform: ClassVar[Callable] = staticmethod(soft_labels.label_probabilities)

    min_start_epoch: int = 0
    current_max_start_epoch: int | None = None
    expansion_end_iteration: int | None = None
    lr_y: float = 2.0
    momentum_y: float = 0.9
    threshold: float | None = None

    # ---------------------------------------------------------------- step hooks

    def draw_start_epoch(self, key, iteration, max_start_epoch):
        settings = dict(
            max_start_epoch=max_start_epoch,
            current_max_start_epoch=self.current_max_start_epoch,
            expansion_end_iteration=self.expansion_end_iteration,
        )
        bound = start_epoch_upper_bound(iteration, **settings)
        start_epoch = sample_start_epoch(
            key, iteration, min_start_epoch=self.min_start_epoch, **settings
        )
        return start_epoch, bound

    def label_optimizer(self) -> optax.GradientTransformation:
        return label_optimizer(self.lr_y, self.momentum_y)

    def within_bounds(self, loss):
        # DATM steps its optimisers only `if grand_loss <= threshold` (NaN fails it too).
        return loss <= self.threshold if self.threshold is not None else jnp.bool_(True)

    # ---------------------------------------------------------------- run hooks

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        t_min, t_max = config.min_start_epoch, config.max_start_epoch
        check(
            _is_int(t_min) and 0 <= t_min < t_max,
            f"config.min_start_epoch={t_min!r} must be an integer in [0, max_start_epoch="
            f"{t_max}) (the start epoch is drawn from min_start_epoch..upper bound - 1)",
        )
        current, end = config.current_max_start_epoch, config.expansion_end_iteration
        if current is None:
            check(
                end is None,
                f"config.expansion_end_iteration={end!r} is only used with sequential "
                "generation (set config.current_max_start_epoch too, or unset it)",
            )
        else:
            check(
                _is_int(current) and t_min < current <= t_max,
                f"config.current_max_start_epoch={current!r} must be an integer in "
                f"(min_start_epoch={t_min}, max_start_epoch={t_max}]",
            )
            check(
                _is_int(end) and end >= 1,
                f"config.expansion_end_iteration={end!r} must be a positive integer with "
                "sequential generation (config.current_max_start_epoch set)",
            )
        check(
            config.lr_y is not None and config.lr_y > 0,
            f"config.lr_y={config.lr_y!r} must be positive (the learned labels' learning rate)",
        )
        check(
            0 <= config.momentum_y < 1, f"config.momentum_y={config.momentum_y} must be in [0, 1)"
        )
        check(
            config.threshold is None or config.threshold > 0,
            f"config.threshold={config.threshold} must be positive (or unset: never skip)",
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> DATM:
        del num_classes
        return cls(**cls._fields_of(config))

    @staticmethod
    def _fields_of(config: ml_collections.ConfigDict) -> dict:
        return dict(
            min_start_epoch=config.min_start_epoch,
            current_max_start_epoch=config.current_max_start_epoch,
            expansion_end_iteration=config.expansion_end_iteration,
            lr_y=float(config.lr_y),
            momentum_y=float(config.momentum_y),
            threshold=None if config.threshold is None else float(config.threshold),
        )

    def initial_set(self, context: InitContext, key) -> tuple[np.ndarray, np.ndarray]:
        """DATM's images and label logits from the experts (:func:`initial_set`).

        The final snapshots are loaded one expert at a time, each once; DATM's "InitialAcc"
        (how many initial labels' arg-max is the image's class) is logged as an ``init``
        event.
        """
        del key
        config = context.config
        images, classes, label_logits = initial_set(
            context.dataset,
            config.ipc,
            config.init,
            model=context.model,
            final_params=context.final_params,
            num_experts=context.num_experts,
            label_expert=context.label_expert,
            seed=config.seed,
        )
        accuracy = float(np.mean(np.argmax(label_logits, axis=1) == classes))
        context.log(init=config.init, label_accuracy=accuracy, experts=context.num_experts)
        print(f"DATM init ({config.init}): initial labels' accuracy {100 * accuracy:.1f} %")
        return images, label_logits

    def saved_labels(self, labels: np.ndarray):
        """softmax(y) as the set's (N, C) labels, the logits y saved beside it."""
        logits = np.asarray(labels, np.float32)
        probabilities = np.asarray(soft_labels.label_probabilities(logits), np.float32)
        meta = {"labels": "softmax of the learned label logits (saved beside: *_label_logits.npy)"}
        return probabilities, {"label_logits": logits}, meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
