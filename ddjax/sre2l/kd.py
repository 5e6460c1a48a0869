"""SRe2L's post-training: students trained on the synthetic set with the teacher's soft labels.

After relabelling, SRe2L (Yin, Xing & Shen, NeurIPS 2023) trains a fresh network on the recovered
images against the teacher's soft predictions at temperature T, with a KL loss, on the same
augmented views the predictions were made for (``research/sre2l.md`` §5). The published scripts
differ per dataset, and each is a named :class:`Recipe` here (:data:`RECIPES`):

* ``'imagenet'`` -- ``SRe2L/validate/train_FKD.py`` + ``train_FKD.sh``: AdamW (lr 1e-3, weight
  decay 0.01 only on parameters named ``weight`` with ndim > 1, i.e. conv and linear kernels),
  ``LambdaLR(0.5·(1 + cos(π·epoch/300)))`` stepped per epoch, 300 epochs, batch 1024, KL at
  T = 20 *without* the T² factor (commented out in the script), views replayed from the stored
  FKD labels: RandomResizedCrop (0.08, 1) + flip + CutMix.
* ``'tiny_imagenet'`` -- ``zeyuanyin/tiny-imagenet`` ``train_kd.py`` + ``train_kd.sh``: SGD
  (lr 0.2, momentum 0.9, weight decay 1e-4 on all parameters), 100 epochs, batch 256, 5 epochs
  of ``LinearLR(start_factor=0.01)`` warm-up then ``CosineAnnealingLR(T_max=95)``, per epoch;
  RandomResizedCrop(64) + flip, no mix; ``KLDivLoss(log_target=True)`` at T = 20 *times T²*;
  teacher online in eval mode.
* ``'cifar'`` -- ``SRe2L/*small_dataset/relabel_cifar.py`` + ``.sh``: AdamW (lr 1e-3, weight
  decay 0.01 on all parameters), ``CosineAnnealingLR(T_max=epochs)`` per epoch, 400 epochs,
  batch 128, RandomCrop(32, padding 4) + flip, MixUp (α = 0.8) on every batch, KL at T = 30
  without T², and the teacher *in train mode* (the script never calls ``.eval()`` on it, so its
  BatchNorm layers normalise with each batch's statistics): ``teacher_mode='train'``, a field
  like any other, defaults to the published behaviour.

Every field can be overridden (``get_recipe('imagenet', epochs=50, batch_size=128)``).

**Label sources.** With a relabel store (``ddjax.sre2l.label_store``), every epoch replays the
stored batches: the same images, crops, flips and mixes, and the stored fp16 logits (FKD's
``fkd_load`` mode; the batch size must equal the store's, as FKD asserts). Without one, the
teacher labels each batch online from the same seeded batch map and the same per-batch keys as
the store would have used (:func:`ddjax.sre2l.views.make_labeller`), so online KD with the
store's seed trains on the same views and on the fp32 logits that the store holds in fp16.

**K students at once.** All K students see the same batches and the same labels, and differ
only in their initialisation; one teacher forward serves all of them. (Running the published
scripts K times would also redraw the augmentation per run in the online case; sharing it is
ddjax's choice, made so that the teacher's cost does not grow with K.) The students are trained
by ``vmap`` on accelerators and one after another on CPU (``ddjax.train.resolve_pool_mode``),
with :func:`ddjax.train.make_train_step` as the step, and scored like
:func:`ddjax.evaluate.evaluate_synset` (the same :class:`ddjax.evaluate.EvalResult`).

**At ImageNet scale** (ResNet-18/50/101 students, batch 1024, 300 epochs): one student
(``num_models=1``) is trained data parallel over every device of every process, each batch
split over them (:func:`train_kd`); ``Recipe.accumulate`` cuts every batch into micro-batches
whose gradients are summed before one update, for devices on which 1024 images do not fit;
students are checkpointed every epoch and resume (``checkpoint_dir``); they are scored with
top-1 and top-5 accuracy, every ``eval_every`` epochs and at the end. The test split is the
dataset's own: in memory as it is, a stream (``stream:`` datasets, e.g. ImageNet's val folder)
through its eval transform, torchvision's Resize(256)/CenterCrop(224) at 224 px.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import checkpoint, sharding, train
from ddjax import models as models_lib
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.evaluate import EvalResult, check_set_fits, pool_test_scores
from ddjax.sre2l import label_store
from ddjax.sre2l import views as views_lib
from ddjax.sre2l.contract import DataContract
from ddjax.synfolder import FolderImages
from ddjax.synset import SyntheticSet

__all__ = [
    "OPTIMIZERS",
    "RECIPES",
    "Recipe",
    "evaluate_kd",
    "get_recipe",
    "kd_loss",
    "online_batches",
    "recipe_from_config",
    "stored_batches",
    "train_kd",
    "ViewSource",
    "data_mesh",
]

Array = jax.Array
Batches = Callable[[int], Iterator[tuple[Array, Array]]]

OPTIMIZERS = ("adamw", "sgd")
DECAYS = ("kernels", "all")


def kd_loss(
    student_logits: Array, teacher_logits: Array, temperature: float, *, t_squared: bool
) -> Array:
    """Knowledge-distillation loss: ``KL(batchmean)(log_softmax(s/T), softmax(t/T))``.

    PyTorch's ``nn.KLDivLoss(reduction='batchmean')(log_softmax(s/T), softmax(t/T))`` =
    ``Σ_i Σ_c p_t·(log p_t − log p_s) / B`` (FKD's ``train_FKD.py``, ``relabel_cifar.py``);
    Tiny-ImageNet's ``train_kd.py`` computes the same KL from log-targets and multiplies it by
    T² (Hinton et al. 2015), selected by ``t_squared``. Teacher logits may be fp16 (stored
    labels); they are converted to the student's precision first (float32, as FKD does; float64
    for a float64 student).

    Args:
      student_logits: ``(B, C)``.
      teacher_logits: ``(B, C)`` raw logits.
      temperature: T.
      t_squared: multiply by T².

    Returns:
      The scalar loss.
    """
    teacher_logits = jnp.asarray(
        teacher_logits, jnp.promote_types(student_logits.dtype, jnp.float32)
    )
    log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    loss = jnp.sum(p_teacher * (log_p_teacher - log_p_student)) / student_logits.shape[0]
    return loss * temperature**2 if t_squared else loss


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One published way of training a student on SRe2L data (see the module docstring).

    Attributes:
      name: the preset it came from.
      epochs: training epochs (at most the store's epochs when labels are stored).
      batch_size: images per step (must equal a store's batch size).
      optimizer: ``'adamw'`` (PyTorch ``AdamW``, betas (0.9, 0.999), eps 1e-8) or ``'sgd'``
        (PyTorch ``SGD``, weight decay added to the gradient before momentum).
      lr: base learning rate.
      weight_decay: AdamW's decoupled decay or SGD's L2 coefficient.
      decay: which parameters are decayed: ``'kernels'`` (ndim > 1, FKD's ``get_parameters``)
        or ``'all'``.
      momentum: SGD momentum (unused by AdamW).
      warmup_epochs: epochs of ``LinearLR`` warm-up before the cosine (0: none).
      warmup_start: ``LinearLR``'s ``start_factor`` (torchvision's ``--lr-warmup-decay``).
      temperature: KD temperature T.
      t_squared: multiply the KL by T² (Tiny-ImageNet's script).
      crop, min_scale, max_scale, padding, flip, mix, cutmix_alpha, mixup_alpha: the views,
        see :class:`ddjax.sre2l.views.AugmentSpec`.
      teacher_mode: ``'eval'`` or ``'train'`` (CIFAR's quirk; online labels only -- a store
        records the mode its logits were made in, and must match).
      accumulate: gradient accumulation, ``A`` micro-batches per optimiser step (1: none),
        for devices on which a whole batch does not fit: each batch of ``batch_size`` is cut
        into micro-batches of ``ceil(batch_size / A)`` whose weighted gradients are summed
        before one update (:func:`ddjax.train.make_train_step`). The KD loss is a batch mean,
        so the update is the whole batch's -- except that BatchNorm students normalise each
        micro-batch with its own statistics, as PyTorch does when it accumulates. Not a
        published hyper-parameter: the batch (and so the labels' batches) stays ``batch_size``.
    """

    name: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    decay: str
    momentum: float = 0.9
    warmup_epochs: int = 0
    warmup_start: float = 0.01
    temperature: float = 20.0
    t_squared: bool = False
    crop: str = "rrc"
    min_scale: float = 0.08
    max_scale: float = 1.0
    padding: int = 4
    flip: bool = True
    mix: str = "cutmix"
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8
    teacher_mode: str = "eval"
    accumulate: int = 1

    def __post_init__(self) -> None:
        for field in ("epochs", "batch_size", "accumulate"):
            value = getattr(self, field)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"recipe {field}={value!r} must be a positive integer",
            )
        check(
            self.optimizer in OPTIMIZERS,
            f"recipe optimizer={self.optimizer!r} is not known; valid: {list(OPTIMIZERS)}",
        )
        check(
            self.decay in DECAYS, f"recipe decay={self.decay!r} is not known; valid: {list(DECAYS)}"
        )
        for field, low in (("lr", 0.0), ("temperature", 0.0)):
            value = getattr(self, field)
            check(_number(value) and value > low, f"recipe {field}={value!r} must be > {low}")
        for field in ("weight_decay", "momentum"):
            value = getattr(self, field)
            check(_number(value) and value >= 0, f"recipe {field}={value!r} must be >= 0")
        check(
            isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs < self.epochs,
            f"recipe warmup_epochs={self.warmup_epochs!r} must be an integer in "
            f"[0, epochs={self.epochs})",
        )
        check(
            _number(self.warmup_start) and 0 < self.warmup_start <= 1,
            f"recipe warmup_start={self.warmup_start!r} must be in (0, 1]",
        )
        check(
            isinstance(self.t_squared, bool), f"recipe t_squared={self.t_squared!r} must be a bool"
        )
        check(
            self.teacher_mode in views_lib.TEACHER_MODES,
            f"recipe teacher_mode={self.teacher_mode!r} is not known; valid: "
            f"{list(views_lib.TEACHER_MODES)}",
        )
        check(
            self.accumulate <= self.batch_size,
            f"recipe accumulate={self.accumulate} must be at most batch_size={self.batch_size} "
            "(micro-batches per step)",
        )
        self.augment_spec()  # validates the augmentation fields

    def augment_spec(self, dataset: Dataset | DataContract | None = None) -> views_lib.AugmentSpec:
        """The views as an :class:`ddjax.sre2l.views.AugmentSpec` (fill from ``dataset``)."""
        return views_lib.AugmentSpec(
            **{field: getattr(self, field) for field in views_lib.VIEW_FIELDS},
            fill=views_lib.padding_fill(dataset) if dataset is not None else (),
        )

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0-based), schedules stepped once per epoch.

        ``lr·(s + (1 − s)·epoch/W)`` for the ``W`` warm-up epochs (``LinearLR``), then
        ``lr·½(1 + cos(π·(epoch − W)/(epochs − W)))`` (``CosineAnnealingLR`` with
        ``eta_min=0``; with ``W = 0`` also FKD's ``LambdaLR``).
        """
        warmup = self.warmup_epochs
        if epoch < warmup:
            return self.lr * (self.warmup_start + (1.0 - self.warmup_start) * epoch / warmup)
        progress = (epoch - warmup) / (self.epochs - warmup)
        return self.lr * 0.5 * (1.0 + float(np.cos(np.pi * progress)))

    def make_optimizer(self) -> optax.GradientTransformation:
        """The optax optimiser, learning rate injected (``opt_state.hyperparams``).

        PyTorch's ``AdamW`` is optax's ``adamw`` (``p -= lr·(m̂/(√v̂ + eps) + wd·p)``); PyTorch's
        ``SGD`` is weight decay added to the gradient, then ``trace`` momentum.
        """
        mask = _kernels if self.decay == "kernels" else None
        if self.optimizer == "adamw":
            factory = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
            return factory(
                learning_rate=self.lr,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=self.weight_decay,
                mask=mask,
            )
        factory = optax.inject_hyperparams(_sgd, static_args=("momentum", "weight_decay", "mask"))
        return factory(
            learning_rate=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            mask=mask,
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


def _kernels(params: Any) -> Any:
    """FKD's decay mask: only tensors with more than one dimension (conv and linear kernels)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(learning_rate, momentum: float, weight_decay: float, mask):
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*parts)


RECIPES: dict[str, Recipe] = {
    "imagenet": Recipe(
        name="imagenet",
        epochs=300,
        batch_size=1024,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        decay="kernels",
        temperature=20.0,
        t_squared=False,
        crop="rrc",
        flip=True,
        mix="cutmix",
        teacher_mode="eval",
    ),
    "tiny_imagenet": Recipe(
        name="tiny_imagenet",
        epochs=100,
        batch_size=256,
        optimizer="sgd",
        lr=0.2,
        weight_decay=1e-4,
        decay="all",
        momentum=0.9,
        warmup_epochs=5,
        warmup_start=0.01,
        temperature=20.0,
        t_squared=True,
        crop="rrc",
        flip=True,
        mix="none",
        teacher_mode="eval",
    ),
    "cifar": Recipe(
        name="cifar",
        epochs=400,
        batch_size=128,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        decay="all",
        temperature=30.0,
        t_squared=False,
        crop="random_crop",
        padding=4,
        flip=True,
        mix="mixup",
        mixup_alpha=0.8,
        teacher_mode="train",
    ),
}


def get_recipe(recipe: str | Recipe, **overrides: Any) -> Recipe:
    """A preset of :data:`RECIPES` (or a given :class:`Recipe`) with fields replaced.

    ``None`` values mean "keep the recipe's" (an unset config field). Unknown fields and invalid
    values are refused with a message naming them.
    """
    if isinstance(recipe, str):
        check(recipe in RECIPES, f"recipe={recipe!r} is not known; valid: {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    check(isinstance(recipe, Recipe), f"recipe must be a name or a Recipe, got {recipe!r}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    check(not unknown, f"unknown recipe settings {unknown}; valid: {sorted(fields)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(recipe, **overrides)


def recipe_from_config(section: Mapping[str, Any]) -> Recipe:
    """The :class:`Recipe` of a config's ``recipe`` section (``name`` + every field)."""
    values = dict(section.items() if hasattr(section, "items") else section)
    check("name" in values, "config.recipe has no name; e.g. 'imagenet'")
    name = values.pop("name")
    return get_recipe(name, **values)


# --------------------------------------------------------------------------------------------
# Label sources: (views, teacher logits) for every batch of an epoch
# --------------------------------------------------------------------------------------------


def stored_batches(store: label_store.LabelStore, images: Any) -> Batches:
    """Batches replayed from a relabel store (FKD's ``fkd_load``).

    Args:
      store: an opened store.
      images: the synthetic set's images (the ones the store was made from): an array, or a
        synthetic folder's lazy images (each batch's files are read when it is replayed).

    Returns:
      ``batches(epoch)`` yielding ``(views, logits)``: the stored augmentation re-applied
      (:func:`ddjax.sre2l.label_store.augmented_batch`) and the stored fp16 logits as float32.
    """
    augment = views_lib.augmenter(store.spec)
    images = _on_device(images)

    def batches(epoch: int) -> Iterator[tuple[Array, Array]]:
        for batch in label_store.replay(store, epoch):
            views = augment(views_lib.gather(images, batch.indices), batch.augment)
            yield views, jnp.asarray(batch.logits, jnp.float32)

    return batches


def online_batches(
    teacher: Any,
    images: Any,
    spec: views_lib.AugmentSpec,
    *,
    teacher_mode: str,
    batch_size: int,
    seed: int,
) -> Batches:
    """Batches labelled by the teacher as they are drawn (online KD; nothing stored).

    The batch map and the per-batch keys are those of a store with the same ``seed``
    (:func:`ddjax.sre2l.views.batch_map`, :func:`~ddjax.sre2l.views.batch_key`), and the
    labelling function is the one :func:`ddjax.sre2l.label_store.write_store` uses.

    Args:
      teacher: a ``ddjax.sre2l.teacher.Teacher``.
      images: the synthetic images.
      spec: the views.
      teacher_mode: ``'eval'`` or ``'train'``.
      batch_size: images per batch.
      seed: the augmentation seed.

    Returns:
      ``batches(epoch)`` yielding ``(views, fp32 logits)``.
    """
    label = views_lib.make_labeller(teacher.model, spec, teacher_mode)
    variables = jax.tree.map(jnp.asarray, dict(teacher.variables))
    images = _on_device(images)

    def batches(epoch: int) -> Iterator[tuple[Array, Array]]:
        yield from views_lib.iterate_online(label, variables, images, batch_size, seed, epoch)

    return batches


def _on_device(images: Any) -> Any:
    """An in-memory set's images on the device, once; a folder's stay lazy (read per batch)."""
    return images if isinstance(images, FolderImages) else jnp.asarray(images, jnp.float32)


# --------------------------------------------------------------------------------------------
# Training K students
# --------------------------------------------------------------------------------------------


class ViewSource:
    """KD's batches as a :class:`ddjax.train.BatchSource`: views and teacher logits.

    Wraps :func:`stored_batches` or :func:`online_batches`. The batches of an epoch are fixed
    by the store (or the augmentation seed), not by a model's key, so every student of a pool
    trains on the same ones (``per_model = False``), drawn -- and labelled online -- once per
    epoch. The step augments nothing (the views come augmented), so its key is a constant.

    With a ``mesh`` (one student trained data parallel), every batch is placed split over the
    mesh's ``data`` axis (:func:`ddjax.sharding.shard_batch`: replicated when the axis does not
    divide it), as a global array when the mesh spans processes.
    """

    per_model = False

    def __init__(self, batches: Batches, mesh: jax.sharding.Mesh | None = None):
        self.batches, self.mesh = batches, mesh
        self.unused_key = jax.random.key(0)
        if mesh is not None:
            self.unused_key = sharding.replicate(self.unused_key, mesh)

    def epoch_batches(self, epoch: int, key: Array | None = None) -> Iterator[train.Batch]:
        for views, logits in self.batches(epoch):
            if self.mesh is not None:
                views, logits = sharding.shard_batch((views, logits), self.mesh)
            yield views, logits, self.unused_key


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
    """The ``data`` mesh of one student: the most devices that split ``batch_size`` evenly.

    :func:`ddjax.sharding.even_devices` (the same number in every process); when no such
    count exists (a batch size the processes cannot share) every device, each batch then
    replicated (:func:`ddjax.sharding.shard_batch`).
    """
    devices = sharding.even_devices(batch_size) or jax.devices()
    return sharding.make_mesh(pool=1, data=len(devices), devices=devices)


OnEpoch = Callable[[int, train.TrainState], dict | None]


def train_kd(
    model: nn.Module,
    recipe: Recipe,
    batches: Batches,
    *,
    image_shape: tuple[int, int, int],
    num_models: int = 1,
    seed: int = 0,
    pool_mode: str = "auto",
    progress: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    on_epoch: OnEpoch | None = None,
    record: dict | None = None,
    on_resume: Callable[[int], None] | None = None,
    log: Callable[..., None] | None = None,
    _stop_after_epochs: int | None = None,
) -> tuple[train.TrainState, np.ndarray] | None:
    """Trains ``num_models`` students with the KD loss on the views and logits of ``batches``.

    :func:`ddjax.train.train_epochs` over a :class:`ViewSource`: per epoch the learning rate
    :meth:`Recipe.lr_at`, then one step per batch of ``batches(epoch)`` with
    :func:`ddjax.train.make_train_step` and :func:`kd_loss` (students in train mode; their
    BatchNorm statistics are updated as in PyTorch; ``recipe.accumulate`` micro-batches per
    step). The step is compiled once per batch shape (the learning rate is injected, not
    baked in).

    **Placement.** One student (``num_models=1``) is trained *data parallel*: its state is
    replicated over a ``data`` mesh of every device of every process (:func:`data_mesh`) and
    every batch -- views and teacher logits -- is split over it; jit on the global arrays
    makes the loss, the gradient and the BatchNorm statistics those of the whole batch, so
    the result does not depend on the number of devices beyond float rounding (squeeze's
    mechanism). The views are made (and labelled online) whole in every process before
    they are split. K > 1 students form a pool: ``'vmap'`` trains it as one program, its
    model axis sharded over the devices' ``pool`` mesh axis; ``'loop'`` trains the students
    one after another.

    **Precision.** Students train in JAX's default float precision: float32, or float64
    under ``jax_enable_x64`` (the parameters are cast after initialisation).

    **Resume.** With ``checkpoint_dir``, the students, the loss history and ``record`` are
    saved after every ``checkpoint_every``-th epoch and after the last
    (:class:`ddjax.checkpoint.Checkpoints`, the newest kept); a call that finds a checkpoint
    continues after it and ends bit-identical (on CPU) to an uninterrupted run.

    Args:
      model: the student architecture.
      recipe: optimiser, schedule, temperature, accumulation.
      batches: :func:`stored_batches` or :func:`online_batches`.
      image_shape: ``(H, W, C)``.
      num_models: K students; student ``i`` is initialised (PyTorch's default init, as every
        ddjax model) from ``split(split(key(seed, impl='rbg'))[0], K)[i]``. ddjax's evaluation
        uses threefry keys; the ``rbg`` ones give the same distribution and compile the
        initialisation several times faster on XLA:CPU (``ddjax.models.init_variables``).
      seed: the students' seed.
      pool_mode: ``'vmap'``, ``'loop'`` or ``'auto'`` (:func:`ddjax.train.resolve_pool_mode`;
        K > 1 only).
      progress: description for a progress bar over epochs (``None``: none).
      checkpoint_dir: where resume points go (``None``: none).
      checkpoint_every: save every this many epochs (and after the last).
      on_epoch: ``on_epoch(epoch, state)`` after every epoch, the state pool-stacked (K = 1
        too); it may update ``record`` and return a dict for the progress bar.
      record: host arrays kept with the checkpoints and restored in place on resume; the
        key ``'train_loss'`` is this function's.
      on_resume: ``on_resume(epochs_done)`` once the checkpoint is restored (0: none was);
        see :func:`ddjax.train.train_epochs`.
      log: receives the ``skipped`` records of updates the guard refused (e.g.
        ``Workdir.log``; :func:`ddjax.train.train_epochs`).
      _stop_after_epochs: testing hook: return ``None`` (as if killed) after this many epochs
        of this call.

    Returns:
      The pool-stacked trained :class:`ddjax.train.TrainState` and the mean loss per epoch
      ``(epochs, K)`` (resumed epochs included); ``None`` when stopped by the testing hook.
    """
    check(num_models >= 1, f"num_models={num_models} must be at least 1")
    check(
        isinstance(checkpoint_every, int) and checkpoint_every >= 1,
        f"checkpoint_every={checkpoint_every!r} must be a positive integer",
    )
    tx, step = _steps(model, recipe)
    init_key, _ = jax.random.split(jax.random.key(seed, impl="rbg"))
    dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
    data_parallel = num_models == 1
    if data_parallel:
        # Initialised as student 0 of a pool, so that K = 1 and K > 1 start alike.
        mesh = data_mesh(recipe.batch_size)
        one = train.init_pool(model, tx, init_key, image_shape, 1, dtype=dtype)
        state = sharding.replicate(jax.tree.map(lambda x: x[0], one), mesh)
        source = ViewSource(batches, mesh)
    else:
        vmapped = train.resolve_pool_mode(pool_mode) == "vmap"
        mesh = sharding.pool_mesh(num_models) if vmapped else None
        state = train.init_pool(model, tx, init_key, image_shape, num_models, mesh, dtype)
        source = ViewSource(batches)
    record = {} if record is None else record
    record["train_loss"] = np.full((recipe.epochs, num_models), np.nan, np.float32)

    def each_epoch(epoch: int, state: train.TrainState, outputs: train.EpochOutputs):
        record["train_loss"][epoch] = np.reshape(outputs.loss, (num_models,))
        if on_epoch is None:
            return None
        return on_epoch(epoch, _as_pool(state) if data_parallel else state)

    saves = checkpoint.Checkpoints(checkpoint_dir, keep=1) if checkpoint_dir else None
    try:
        result = train.train_epochs(
            state,
            step,
            source,
            epochs=recipe.epochs,
            pool=not data_parallel,
            pool_mode=pool_mode,
            lr_schedule=recipe.lr_at,
            on_epoch=each_epoch,
            record=record,
            checkpoints=saves,
            checkpoint_every=checkpoint_every,
            progress=progress,
            stop_after_epochs=_stop_after_epochs,
            on_resume=on_resume,
            log=log,
            stage="KD students",
        )
    finally:
        if saves is not None:
            saves.close()
    if result is None:
        return None
    state, _ = result
    return (_as_pool(state) if data_parallel else state), record["train_loss"].copy()


def _as_pool(state: train.TrainState) -> train.TrainState:
    """One model's state as a pool of one (a leading axis of size 1), where it lives."""
    return jax.tree.map(lambda x: x[None], state)


@functools.lru_cache(maxsize=16)
def _steps(model: nn.Module, recipe: Recipe):
    """``(tx, step)`` of a student and recipe, built once per process.

    :func:`ddjax.train.train_epochs` compiles per step object, so one step per (model,
    recipe) compiles once however many runs use it. Only the optimiser, the loss and the
    accumulation depend on the recipe, but the recipe is the natural (hashable) cache key.
    """
    tx = recipe.make_optimizer()
    loss_fn = functools.partial(kd_loss, temperature=recipe.temperature, t_squared=recipe.t_squared)
    return tx, train.make_train_step(model, tx, None, loss_fn, accumulate=recipe.accumulate)


def evaluate_kd(
    synset: SyntheticSet,
    dataset: Dataset,
    teacher: Any | None,
    *,
    recipe: str | Recipe,
    store: label_store.LabelStore | str | Path | None = None,
    model: str = "ResNet18BN",
    model_overrides: dict | None = None,
    num_models: int = 5,
    seed: int = 0,
    augment_seed: int | None = None,
    pool_mode: str = "auto",
    progress: bool = False,
    eval_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    log: Callable[..., None] | None = None,
    rewind: Callable[..., Any] | None = None,
    **overrides: Any,
) -> EvalResult:
    """SRe2L's evaluation: K students trained by KD on ``synset``, tested on ``dataset``.

    The students are scored on the test split -- in memory as it is, a stream through its
    eval transform (resize to ``round(size·256/224)``, centre crop ``size``: 256 → 224 on
    ImageNet) batch by batch -- with top-1 and, for more than five classes
    (:data:`ddjax.evaluate.TOP_K`), top-5 accuracy (:func:`ddjax.evaluate.pool_test_scores`),
    at the end and every ``eval_every`` epochs.

    Args:
      synset: the recovered synthetic set (its hard labels are not used: the loss is KD only,
        as in every published SRe2L script).
      dataset: the real dataset (its test split scores the students).
      teacher: a ``ddjax.sre2l.teacher.Teacher``; needed for online labels; with a store it is
        only compared with the one the store was made with (``None`` skips that check).
      recipe: a name of :data:`RECIPES` or a :class:`Recipe`.
      store: a relabel store (or its directory) for stored labels; ``None`` for online KD.
      model: student architecture (``ddjax.models.get_model``).
      model_overrides: student fields, e.g. ``{'width': 16}``.
      num_models: K (1: one student, data parallel over every device; see :func:`train_kd`).
      seed: students' initialisation seed (see :func:`train_kd`).
      augment_seed: the batch-map/augmentation seed of online labels (default: ``seed``); the
        store's seed with a store. Online KD with a store's seed draws the store's batches.
      pool_mode: ``'vmap'``, ``'loop'`` or ``'auto'``.
      progress: progress bar over epochs.
      eval_every: also score the students after every this many epochs (0: only at the end);
        each such score, and the final one, is logged as ``log(event='kd_eval', model=...,
        epoch=..., top1=..., top5=...)`` (means over the K students) and kept in the
        result's ``by_epoch``.
      checkpoint_dir: resume points of the students (see :func:`train_kd`); a re-run with
        the same arguments continues from the newest.
      checkpoint_every: save them every this many epochs (and after the last).
      log: e.g. ``Workdir.log`` (``None``: nothing logged).
      rewind: e.g. ``Workdir.rewind``: called once the students' checkpoint is restored, to
        drop this model's ``kd_eval`` events logged after it (they are redone).
      **overrides: recipe fields, e.g. ``epochs=100``, ``batch_size=256``, ``temperature=4``.

    Returns:
      A :class:`ddjax.evaluate.EvalResult` (``lr_source='fixed'``: the recipe's base rate).

    Raises:
      DDJaxError: mismatched shapes or classes, a store made for another synthetic set, teacher
        or dataset, a batch size or augmentation that differs from the store's, or epochs the
        store does not hold.
    """
    recipe = get_recipe(recipe, **overrides)
    check_set_fits(synset, dataset, num_models)
    check(
        isinstance(eval_every, int) and not isinstance(eval_every, bool) and eval_every >= 0,
        f"eval_every={eval_every!r} must be an integer >= 0 (0: only at the end)",
    )
    spec = recipe.augment_spec(dataset)
    if store is not None and not isinstance(store, label_store.LabelStore):
        store = label_store.open_store(store)
    check_kd_inputs(synset, dataset, teacher, recipe, store)
    if store is not None:
        batches = stored_batches(store, synset.images)
    else:
        batches = online_batches(
            teacher,
            synset.images,
            spec,
            teacher_mode=recipe.teacher_mode,
            batch_size=recipe.batch_size,
            seed=seed if augment_seed is None else augment_seed,
        )
    net = models_lib.get_model(
        model, dataset.num_classes, dataset.image_shape, **(model_overrides or {})
    )
    # One student lives on a data mesh, scored as a vmapped pool of one wherever it is.
    scoring_mode = "vmap" if num_models == 1 else pool_mode
    tested = np.full((recipe.epochs, num_models), np.nan, np.float32)
    record = {"top1": tested, "top5": tested.copy()}

    def report(epoch: int, top1: np.ndarray, top5: np.ndarray | None) -> dict:
        record["top1"][epoch] = top1
        if top5 is not None:
            record["top5"][epoch] = top5
        means = {"top1": float(np.mean(top1))}
        if top5 is not None:
            means["top5"] = float(np.mean(top5))
        if log is not None:
            log(event="kd_eval", model=model, epoch=epoch + 1, **means)
        return {name: f"{value:.4f}" for name, value in means.items()}

    def resumed(epochs_done: int) -> None:
        # The last epoch is scored after training, so after its checkpoint: a run resumed
        # there scores it again.
        where = {"event": "kd_eval", "model": model}
        rewind(min(epochs_done, recipe.epochs - 1), key="epoch", where=where)

    def on_epoch(epoch: int, state: train.TrainState) -> dict | None:
        if not eval_every or (epoch + 1) % eval_every or epoch + 1 == recipe.epochs:
            return None  # the last epoch is scored below, once
        scores = pool_test_scores(net, state, dataset, pool_mode=scoring_mode, top5=True)
        return report(epoch, scores.accuracy, scores.top_k)

    state, history = train_kd(
        net,
        recipe,
        batches,
        image_shape=dataset.image_shape,
        num_models=num_models,
        seed=seed,
        pool_mode=pool_mode,
        progress=f"kd {model}" if progress else None,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        on_epoch=on_epoch,
        record=record,
        on_resume=None if rewind is None else resumed,
        log=log,
    )
    result = EvalResult.of_pool(
        net, state, dataset, model=model, lr=recipe.lr, lr_source="fixed", history=history,
        pool_mode=scoring_mode, top5=True,
    )  # fmt: skip
    if not eval_every:
        return result
    report(recipe.epochs - 1, result.accuracies, result.top5)
    by_epoch = {}
    for epoch in np.flatnonzero(~np.isnan(record["top1"][:, 0])):
        scores = {"top1": record["top1"][epoch].tolist()}
        if result.top5 is not None:
            scores["top5"] = record["top5"][epoch].tolist()
        by_epoch[int(epoch) + 1] = scores
    return dataclasses.replace(result, by_epoch=by_epoch)


def check_kd_inputs(
    synset: SyntheticSet,
    dataset: Dataset,
    teacher: Any | None,
    recipe: Recipe,
    store: label_store.LabelStore | None,
) -> None:
    """Refuses KD inputs that do not go together (a stage runs this before its work directory).

    Raises:
      DDJaxError: a store made for another set, teacher or dataset, or whose batch size, views
        or epochs differ from the recipe's; without a store, no teacher or one of other data.
    """
    if store is not None:
        label_store.check_store(store, synset=synset, teacher=teacher, dataset=dataset)
        _check_recipe_fits_store(recipe, recipe.augment_spec(dataset), store)
    else:
        check(teacher is not None, "online KD needs a teacher (or pass store= for stored labels)")
        views_lib.check_teacher_fits(teacher, dataset)


def _check_recipe_fits_store(
    recipe: Recipe, spec: views_lib.AugmentSpec, store: label_store.LabelStore
) -> None:
    """Stored labels are replayed as they are: batch size, views and epochs must agree."""
    check(
        recipe.batch_size == store.batch_size,
        f"batch_size={recipe.batch_size} differs from the relabel store's batch size "
        f"{store.batch_size} ({store.path}); stored labels are replayed batch by batch, so train "
        f"with batch_size={store.batch_size}",
    )
    stored = store.spec
    for field in views_lib.VIEW_FIELDS:
        mine, theirs = getattr(spec, field), getattr(stored, field)
        check(
            mine == theirs,
            f"recipe {recipe.name!r} has {field}={mine!r} but the relabel store {store.path} was "
            f"made with {field}={theirs!r}; pass {field}={theirs!r} (stored views are replayed)",
        )
    check(
        recipe.teacher_mode == store.teacher_mode,
        f"recipe {recipe.name!r} has teacher_mode={recipe.teacher_mode!r} but the relabel store "
        f"{store.path} holds logits of the teacher in {store.teacher_mode!r} mode",
    )
    missing = [e for e in range(recipe.epochs) if e not in set(store.completed_epochs)]
    if missing:
        raise DDJaxError(
            f"epochs={recipe.epochs} needs labels for epochs 0-{recipe.epochs - 1}, but the "
            f"relabel store {store.describe()} lacks {len(missing)} of them (first: epoch "
            f"{missing[0]}); re-run relabel or train fewer epochs"
        )
