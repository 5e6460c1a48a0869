"""SRe2L *squeeze*: train the BatchNorm teacher on the real data with the published recipe.

Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A
New Perspective", NeurIPS 2023. Squeeze is ordinary supervised training; what matters later is
the teacher's BatchNorm running statistics (recover matches them) and its predictions (relabel
distils them). The recipes reproduced here (``research/sre2l.md`` §2):

* **CIFAR-10/100** (``SRe2L/*small_dataset/squeeze_cifar.py``): torchvision ``resnet18`` with
  ``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`` and no max-pool (``ResNet18BN``), SGD lr 0.1,
  momentum 0.9, weight decay 5e-4 on *every* parameter (``optim.SGD(net.parameters(), ...)``:
  BN scales and biases are decayed too), batch 128, ``CosineAnnealingLR(T_max=epochs)``
  stepped once per epoch, 200 epochs, ``RandomCrop(32, padding=4)`` + horizontal flip,
  cross-entropy. The script is written for CIFAR-100; CIFAR-10 uses it with 10 classes.
* **Tiny-ImageNet** (``zeyuanyin/tiny-imagenet`` ``script/train_rn18.sh``, torchvision's
  reference ``train.py``): the same network with 200 classes, SGD lr 0.2, momentum 0.9,
  weight decay 1e-4 on every parameter (``norm_weight_decay`` unset), batch 256, 50 epochs,
  5 epochs of ``LinearLR(start_factor=0.01)`` warm-up then ``CosineAnnealingLR(T_max=45)``
  (``SequentialLR``), stepped per epoch; per-image ``RandomResizedCrop(64)`` + flip.
* **ImageNet-1K**: SRe2L does not squeeze; it uses torchvision's pretrained ResNet-18.
  Import it with ``ddjax teacher`` (:mod:`ddjax.sre2l.teacher_import`,
  ``configs/teacher/torchvision.py``); squeezing ImageNet is refused.

SGD has PyTorch's semantics (:func:`ddjax.train.sgd`: weight decay added to the gradient before
momentum, the first momentum buffer equal to the gradient). The learning rate of epoch ``e`` is
:func:`learning_rate`, set once before the epoch as PyTorch's per-epoch ``scheduler.step()``.

**Keys.** ``init_key, train_key = split(key(seed))``: the network is initialised from
``init_key`` (:func:`ddjax.models.init_variables`, PyTorch's/torchvision's init) and epoch
``e`` shuffles and augments with ``fold_in(train_key, e)``, so a run's numbers depend on the
seed only, never on where it was interrupted.

**Epochs** are one jitted program over the shuffled minibatches (:func:`ddjax.train.make_epoch`,
a ``lax.scan``; a smaller last batch is kept like ``DataLoader(drop_last=False)``) that
compiles once. On XLA:CPU convolutions inside a rolled loop run several times slower
(:func:`ddjax.train.resolve_pool_mode`), so ``epoch_mode='auto'`` runs the same epoch as a
Python loop of jitted steps there (:func:`ddjax.train.make_loop_epoch`). Both compute the
same steps from the same keys; XLA compiles them differently, so their results can differ in
the last bits (measured on digits: 98.9 % vs 99.1 % test accuracy after 20 epochs).

**Files** (the work directory of :func:`run_squeeze`)::

    config.json, metrics.jsonl    the resolved config; one line per epoch
    checkpoints/<epoch>/          Orbax: params, batch_stats, opt state, epoch, key, history
    teacher/                      the result (ddjax.sre2l.teacher), final test accuracy in extra
    results.json                  final numbers

A killed run restarts from the newest complete checkpoint and ends bit-identical (on CPU) to
an uninterrupted one.

Deliberate differences from the PyTorch scripts: random numbers come from JAX's PRNG; the test
accuracy is measured every ``test_every`` epochs (``squeeze_cifar.py`` every 10th and the last;
the number only goes to the log); Tiny-ImageNet's ``RandomResizedCrop`` resamples the
normalised array bilinearly without antialiasing (:mod:`ddjax.sre2l.crops`) where torchvision
resizes the PIL image (crops never exceed 64 px, so this is an upsampling in both; PIL's border
handling differs slightly); SRe2L replaces ``conv1`` after torchvision has initialised the
network, so its stem conv keeps PyTorch's default U(±1/√fan_in) init while ddjax's
``conv_init='torchvision'`` gives every conv torchvision's kaiming-normal init.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddjax import augment as augment_lib
from ddjax import checkpoint, distributed, guard, sharding, train, validate
from ddjax import data as data_lib
from ddjax import evaluate as evaluate_lib
from ddjax import models as models_lib
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import crops
from ddjax.sre2l import teacher as teacher_lib
from ddjax.workdir import Workdir

__all__ = [
    "AUGMENTATIONS",
    "EPOCH_MODES",
    "SqueezeResult",
    "SqueezeSettings",
    "check_settings",
    "check_squeezable",
    "learning_rate",
    "make_augment",
    "make_optimizer",
    "run_squeeze",
    "settings_from_config",
    "train_teacher",
]

AUGMENTATIONS = ("crop_flip", "rrc_flip", "none")
EPOCH_MODES = ("auto", "scan", "loop")
TEACHER_DIR = "teacher"
CHECKPOINT_DIR = "checkpoints"

# ImageNet-1K under the names ddjax's loaders would accept (TFDS 'imagenet2012', optionally
# with a TFDS config after '/'). Downsampled variants (TFDS 'imagenet_resized') are other data.
_IMAGENET = re.compile(r"(tfds:)?imagenet(2012|_?1k|-1k)?(/.*)?", re.IGNORECASE)

Log = Callable[..., None]

_NO_ZCA = "squeeze: dataset.zca must be False (SRe2L's teachers see mean/std-normalised images)"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SqueezeSettings:
    """How the teacher is trained; the defaults are SRe2L's CIFAR recipe (``squeeze_cifar.py``).

    Attributes:
      model: a :func:`ddjax.models.get_model` name with BatchNorm (``ResNet18BN``,
        ``ConvNetBN``, ``ConvNetD4BN``, ``ResNet18BN_AP``, ``VGG11BN``).
      width: the model's ``width`` (``None``: the model's own, 64 for ResNet-18).
      conv_init: ResNet-18's conv initialisation (``None``: ``'torchvision'`` for ResNet-18
        models, as SRe2L's torchvision network; other models keep PyTorch's default init).
      epochs: training epochs (CIFAR 200, Tiny-ImageNet 50).
      batch_size: minibatch size (CIFAR 128, Tiny-ImageNet 256).
      lr: base learning rate (CIFAR 0.1, Tiny-ImageNet 0.2).
      momentum: SGD momentum (0.9).
      weight_decay: on every parameter, BN included (CIFAR 5e-4, Tiny-ImageNet 1e-4).
      warmup_epochs: linear warm-up epochs before the cosine (CIFAR 0, Tiny-ImageNet 5).
      warmup_start_factor: the warm-up's first factor (torchvision's ``lr_warmup_decay``, 0.01).
      augment: ``'crop_flip'`` (RandomCrop(size, padding=4) + flip, CIFAR), ``'rrc_flip'``
        (RandomResizedCrop(size) + flip, Tiny-ImageNet) or ``'none'``.
      seed: all randomness derives from it.
      test_every: test accuracy every this many epochs and after the last.
      test_limit: test on the first this many test images (``None``: all).
      checkpoint_every: save a resume point every this many epochs and after the last.
      epoch_mode: ``'scan'``, ``'loop'`` or ``'auto'`` (loop on CPU, scan elsewhere).
      checkpoint_every_batches: a streamed dataset only: also save a resume point every this
        many batches inside an epoch (an ImageNet epoch is hours); ``None``: per epoch only.
    """

    model: str = "ResNet18BN"
    width: int | None = None
    conv_init: str | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.01
    augment: str = "crop_flip"
    seed: int = 0
    test_every: int = 1
    test_limit: int | None = None
    checkpoint_every: int = 1
    epoch_mode: str = "auto"
    checkpoint_every_batches: int | None = None

    def model_overrides(self) -> dict[str, Any]:
        """The model fields these settings change (what the teacher records)."""
        overrides: dict[str, Any] = {}
        if self.width is not None:
            overrides["width"] = self.width
        conv_init = self.conv_init
        if conv_init is None and self.model.startswith("ResNet18"):
            conv_init = "torchvision"  # SRe2L's teacher is torchvision's resnet18
        if conv_init is not None:
            overrides["conv_init"] = conv_init
        return overrides


SETTING_FIELDS = tuple(field.name for field in dataclasses.fields(SqueezeSettings))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


def check_squeezable(dataset_name: str) -> None:
    """Refuses ImageNet-1K: SRe2L's ImageNet teacher is torchvision's pretrained ResNet-18.

    Raises:
      DDJaxError: for ImageNet-1K names, pointing to the import path.
    """
    if _IMAGENET.fullmatch(str(dataset_name)):
        raise DDJaxError(
            f"dataset {dataset_name!r}: SRe2L does not squeeze ImageNet-1K, it uses torchvision's "
            "pretrained resnet18 (IMAGENET1K_V1); import its .pth with ddjax teacher --config "
            "configs/teacher/torchvision.py:resnet18 --config.state_dict=FILE --workdir DIR "
            "(in Python: ddjax.sre2l.teacher.import_torch_teacher)"
        )


def check_settings(settings: SqueezeSettings, dataset: data_lib.Dataset) -> nn.Module:
    """Validates squeeze settings against the data; returns the Flax model.

    Raises:
      DDJaxError: one line naming the first bad field, its value and what is valid.
    """
    check(
        isinstance(settings, SqueezeSettings),
        f"settings must be SqueezeSettings, got {type(settings).__name__}",
    )
    check_squeezable(dataset.name)
    check(getattr(dataset, "zca", None) is None, _NO_ZCA)
    streamed = isinstance(dataset, data_lib.StreamingDataset)
    if streamed:
        check(
            settings.augment == "none",
            f"augment={settings.augment!r}: a stream is cropped and flipped by its pipeline "
            "(RandomResizedCrop + flip); set --config.augment=none",
        )
        check(
            settings.test_limit is None,
            "test_limit: a stream's test split is read whole; unset config.test_limit",
        )
        devices = jax.device_count()
        check(
            settings.batch_size % devices == 0,
            f"batch_size={settings.batch_size} must be divisible by the {devices} devices "
            "(a streamed batch is split over all of them)",
        )
    every = settings.checkpoint_every_batches
    check(
        every is None or (streamed and _is_int(every) and every >= 1),
        f"checkpoint_every_batches={every!r} must be a positive integer, and only for a "
        "streamed dataset (stream:NAME); unset it",
    )
    for field, minimum in (
        ("epochs", 1),
        ("batch_size", 1),
        ("test_every", 1),
        ("checkpoint_every", 1),
        ("seed", 0),
        ("warmup_epochs", 0),
    ):
        value = getattr(settings, field)
        check(
            _is_int(value) and value >= minimum,
            f"{field}={value!r} must be an integer >= {minimum}",
        )
    for field in ("test_limit", "width"):
        value = getattr(settings, field)
        check(
            value is None or (_is_int(value) and value >= 1),
            f"{field}={value!r} must be a positive integer or unset",
        )
    lr = settings.lr
    check(
        _is_number(lr) and math.isfinite(lr) and lr > 0,
        f"lr={lr!r} must be a positive number (SRe2L: 0.1 CIFAR, 0.2 Tiny-ImageNet)",
    )
    check(
        _is_number(settings.momentum) and 0 <= settings.momentum < 1,
        f"momentum={settings.momentum!r} must be in [0, 1) (SRe2L: 0.9)",
    )
    check(
        _is_number(settings.weight_decay)
        and math.isfinite(settings.weight_decay)
        and settings.weight_decay >= 0,
        f"weight_decay={settings.weight_decay!r} must be >= 0 (SRe2L: 5e-4 CIFAR, 1e-4 Tiny)",
    )
    check(
        settings.warmup_epochs < settings.epochs,
        f"warmup_epochs={settings.warmup_epochs} must be smaller than epochs={settings.epochs}",
    )
    factor = settings.warmup_start_factor
    check(
        _is_number(factor) and 0 < factor <= 1,
        f"warmup_start_factor={factor!r} must be in (0, 1] (torchvision: 0.01)",
    )
    check(
        settings.augment in AUGMENTATIONS,
        f"augment={settings.augment!r} is not known; valid: {list(AUGMENTATIONS)}",
    )
    check(
        settings.epoch_mode in EPOCH_MODES,
        f"epoch_mode={settings.epoch_mode!r} is not known; valid: {list(EPOCH_MODES)}",
    )
    check(
        settings.conv_init in (None, "pytorch", "torchvision"),
        f"conv_init={settings.conv_init!r} must be 'torchvision', 'pytorch' or unset",
    )
    model = models_lib.get_model(
        settings.model, dataset.num_classes, dataset.image_shape, **settings.model_overrides()
    )
    shapes = models_lib.variable_shapes(model, dataset.image_shape)
    check(
        bool(jax.tree.leaves(shapes.get("batch_stats", {}))),
        f"model={settings.model!r}: squeeze needs a BatchNorm model (recover matches its BN "
        "statistics); use ResNet18BN, ConvNetBN, ConvNetD4BN, ResNet18BN_AP or VGG11BN",
    )
    return model


# --------------------------------------------------------------------------------------------
# Recipe pieces: schedule, optimiser, augmentation
# --------------------------------------------------------------------------------------------


def learning_rate(
    epoch: int,
    *,
    base_lr: float,
    epochs: int,
    warmup_epochs: int = 0,
    warmup_start_factor: float = 0.01,
) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under PyTorch's per-epoch schedulers.

    Without warm-up, ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` (``squeeze_cifar.py``)::

        lr(e) = base_lr · (1 + cos(π e / epochs)) / 2

    With ``W = warmup_epochs > 0``, torchvision's reference recipe (Tiny-ImageNet):
    ``SequentialLR([LinearLR(start_factor=s, total_iters=W), CosineAnnealingLR(T_max=epochs -
    W)], milestones=[W])``::

        lr(e) = base_lr · (s + (1 − s) e / W)                       for e < W
        lr(e) = base_lr · (1 + cos(π (e − W) / (epochs − W))) / 2   for e ≥ W

    These closed forms equal PyTorch's recursive updates (up to float rounding).

    Args:
      epoch: the epoch about to run, ``0 <= epoch < epochs``.
      base_lr: the optimiser's initial learning rate.
      epochs: total epochs.
      warmup_epochs: ``W`` (0: no warm-up).
      warmup_start_factor: ``s``, torchvision's ``lr_warmup_decay``.

    Returns:
      The learning rate as a Python float.
    """
    if epoch < warmup_epochs:
        factor = warmup_start_factor + (1.0 - warmup_start_factor) * epoch / warmup_epochs
        return base_lr * factor
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(settings: SqueezeSettings):
    """SGD with PyTorch semantics, weight decay on every parameter (BN scales and biases too).

    Both SRe2L scripts hand all parameters to one SGD group (``optim.SGD(net.parameters())``;
    torchvision's ``set_weight_decay`` with ``norm_weight_decay=None``), so nothing is masked.
    The learning rate is a hyper-parameter of the state (:func:`ddjax.train.set_learning_rate`).
    """
    return train.sgd(settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def make_augment(name: str, dataset: data_lib.Dataset) -> Callable[[jax.Array, jax.Array], Any]:
    """The per-image training augmentation ``(key, images) -> images`` of a squeeze recipe.

    Only ``dataset.mean``, ``dataset.std`` and ``dataset.image_shape`` are read.

    * ``'crop_flip'``: torchvision ``RandomCrop(size, padding=4)`` + ``RandomHorizontalFlip``
      applied to the *pixels*, i.e. the padding is black before normalisation, which is
      ``-mean/std`` per channel in the normalised space ddjax trains in
      (:func:`ddjax.augment.crop_flip` pads with zeros, so the images are shifted by that
      value around it).
    * ``'rrc_flip'``: per image ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3),
      bilinear) + ``RandomHorizontalFlip``, from :mod:`ddjax.sre2l.crops`.
    * ``'none'``: the images unchanged.
    """
    check(name in AUGMENTATIONS, f"augment={name!r} is not known; valid: {list(AUGMENTATIONS)}")
    if name == "none":
        return lambda key, images: images
    if name == "crop_flip":
        black = -np.asarray(dataset.mean, np.float32) / np.asarray(dataset.std, np.float32)

        def crop_flip(key: jax.Array, images: jax.Array) -> jax.Array:
            return augment_lib.crop_flip(key, images - black) + black

        return crop_flip
    height, width = dataset.image_shape[:2]

    def rrc_flip(key: jax.Array, images: jax.Array) -> jax.Array:
        box_key, flip_key = jax.random.split(key)
        boxes = crops.rrc_boxes(box_key, images.shape[0], height, width)
        resized = crops.resized_crop(images, boxes, height, width)
        return crops.flip(resized, jax.random.bernoulli(flip_key, 0.5, (images.shape[0],)))

    return rrc_flip


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class SqueezeResult(NamedTuple):
    """A trained teacher and its per-epoch numbers.

    Attributes:
      variables: ``{'params': ..., 'batch_stats': ...}``.
      train_loss: ``(epochs,)`` mean training loss of each epoch.
      train_accuracy: ``(epochs,)`` accuracy of each epoch's own forward passes (augmented
        images, before each update).
      test_accuracy: ``(epochs,)`` eval-mode test accuracy (NaN where not tested).
    """

    variables: dict
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray


class _DataSpace(NamedTuple):
    """What the training programs need to know about the data (hashable, for the cache)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]


# Cached on everything they close over, so that a run resumed in the same process (or a
# second teacher with the same recipe) reuses the step, and with it the compiled epoch
# (``ddjax.train.train_epochs`` caches its programs on the step).
@functools.lru_cache(maxsize=8)
def _programs(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    augment: str,
    space: _DataSpace,
):
    """``(tx, step)``: the optimiser and the train step (with per-example correctness)."""
    tx = train.sgd(lr, momentum=momentum, weight_decay=weight_decay)
    step = train.make_train_step(model, tx, make_augment(augment, space), with_correct=True)
    return tx, step


def _empty_history(epochs: int) -> dict[str, np.ndarray]:
    nan = np.full((epochs,), np.nan, np.float32)
    return {"train_loss": nan.copy(), "train_accuracy": nan.copy(), "test_accuracy": nan.copy()}


def train_teacher(
    dataset: data_lib.Dataset | data_lib.StreamingDataset,
    settings: SqueezeSettings,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    log: Log | None = None,
    rewind: Callable[..., Any] | None = None,
    workers: int = 0,
    _stop_after_epochs: int | None = None,
) -> SqueezeResult | None:
    """Trains a BatchNorm teacher on ``dataset``'s train split (the squeeze stage).

    In memory, the train split is reshuffled every epoch (:class:`ddjax.train.ArraySource`)
    on this process's device. A stream (``stream:NAME``) is read by its grain pipeline
    (RandomResizedCrop + flip, ``workers`` worker processes): data parallel over every device
    of every process, each process reading its share of each batch, with resume points inside
    epochs every ``settings.checkpoint_every_batches`` batches; its train accuracy is not
    recorded (NaN) and its whole test split is scored.

    One model, :func:`ddjax.train.train_epochs` over the shuffled train split; ``epoch_mode``
    ``'scan'`` is the driver's ``'vmap'`` placement (for one model: the epoch as one compiled
    program), ``'auto'`` is decided by :func:`ddjax.train.resolve_pool_mode`.

    Args:
      dataset: the real data (mean/std-normalised, no ZCA).
      settings: the recipe (:class:`SqueezeSettings`; see the module docstring).
      checkpoint_dir: where resume points are kept (``None``: none). A run restarts from the
        newest complete one, which must come from the same settings and data.
      progress: a progress bar over epochs (silent when stderr is not a terminal).
      log: called as ``log(event='squeeze_epoch', epoch=..., lr=..., train_loss=...,
        train_accuracy=..., [test_accuracy=...])`` after every epoch, e.g. ``Workdir.log``.
      rewind: called as ``rewind(epochs_done, key='epoch', where={'event': 'squeeze_epoch'})``
        once the checkpoint is restored, e.g. ``Workdir.rewind``: drops the epochs logged
        after it, which are trained and logged again.
      _stop_after_epochs: testing hook: return ``None`` (as if killed) after this many epochs
        of this call.

    Returns:
      The :class:`SqueezeResult` (``None`` only when stopped by the testing hook).

    Raises:
      DDJaxError: bad settings (:func:`check_settings`) or a checkpoint of another run.
    """
    model = check_settings(settings, dataset)
    epochs = settings.epochs
    space = _DataSpace(tuple(dataset.mean), tuple(dataset.std), dataset.image_shape)
    tx, step = _programs(
        model, settings.lr, settings.momentum, settings.weight_decay, settings.augment, space
    )
    init_key, train_key = jax.random.split(jax.random.key(settings.seed))
    # The key goes into the checkpoint with the history: a resumed run continues with it.
    record = {"key": np.asarray(jax.random.key_data(train_key)), "history": _empty_history(epochs)}
    variables = models_lib.init_variables(model, init_key, dataset.image_shape)
    params = variables["params"]
    state = train.TrainState(params, variables["batch_stats"], tx.init(params))
    # Committed to the device, as restored checkpoints are: jit specialises on committed
    # inputs, so a fresh and a resumed run share one compiled epoch.
    streamed = isinstance(dataset, data_lib.StreamingDataset)
    if streamed:
        # Data parallel: the model on every device of every process, each batch split over
        # them (BatchNorm statistics of the whole batch, as one device would compute them).
        mesh = sharding.make_mesh(pool=1, data=jax.device_count())
        state = sharding.replicate(state, mesh)
        source = data_lib.StreamSource(
            dataset, settings.batch_size, seed=settings.seed, worker_count=workers, mesh=mesh
        )
    else:
        state = jax.device_put(state, distributed.local_device())
        source = train.ArraySource(
            jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train), settings.batch_size
        )
        limit = settings.test_limit or len(dataset.y_test)
        test_set = dataclasses.replace(
            dataset, x_test=dataset.x_test[:limit], y_test=dataset.y_test[:limit]
        )

    def lr_at(epoch: int) -> float:
        return learning_rate(
            epoch,
            base_lr=settings.lr,
            epochs=epochs,
            warmup_epochs=settings.warmup_epochs,
            warmup_start_factor=settings.warmup_start_factor,
        )

    def on_epoch(epoch: int, state: train.TrainState, outputs: train.EpochOutputs) -> dict:
        history = record["history"]
        loss = float(outputs.loss)
        # A stream reports no per-example outputs: its train accuracy stays NaN.
        accuracy = np.nan if outputs.per_example is None else float(np.mean(outputs.per_example))
        history["train_loss"][epoch], history["train_accuracy"][epoch] = loss, accuracy
        fields = {
            "lr": lr_at(epoch),
            "train_loss": guard.finite_or_none(loss),  # null: an update of the epoch was skipped
            "train_accuracy": guard.finite_or_none(accuracy),
        }
        postfix = {"loss": f"{loss:.4f}"}
        if (epoch + 1) % settings.test_every == 0 or epoch + 1 == epochs:
            pool = jax.tree.map(lambda x: x[None], state)  # a pool of one, scored as it is
            tested, _ = evaluate_lib.pool_test_accuracy(
                model,
                pool,
                dataset if streamed else test_set,
                pool_mode="vmap" if streamed else "loop",
            )
            history["test_accuracy"][epoch] = fields["test_accuracy"] = float(tested[0])
            postfix["acc"] = f"{tested[0]:.4f}"
        if log is not None:
            log(event="squeeze_epoch", epoch=epoch + 1, **fields)
        return postfix

    saves = checkpoint.Checkpoints(checkpoint_dir, keep=1) if checkpoint_dir else None
    try:
        result = train.train_epochs(
            state,
            step,
            source,
            epochs=epochs,
            epoch_keys=lambda epoch: jax.random.fold_in(
                jax.random.wrap_key_data(jnp.asarray(record["key"])), epoch
            )[None],
            pool=False,
            pool_mode={"scan": "vmap"}.get(settings.epoch_mode, settings.epoch_mode),
            lr_schedule=lr_at,
            on_epoch=on_epoch,
            record=record,
            checkpoints=saves,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_every_batches=settings.checkpoint_every_batches if saves else None,
            progress=f"squeeze {settings.model}" if progress else None,
            stop_after_epochs=_stop_after_epochs,
            on_resume=None
            if rewind is None
            else lambda done: rewind(done, key="epoch", where={"event": "squeeze_epoch"}),
            log=log,
            stage="squeeze",
        )
    finally:
        if saves is not None:
            saves.close()
        if streamed:
            source.close()
    if result is None:
        return None
    state, _ = result
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    history = record["history"]
    return SqueezeResult(variables, *(history[k] for k in SqueezeResult._fields[1:]))


# --------------------------------------------------------------------------------------------
# Config and the stage driver
# --------------------------------------------------------------------------------------------


def settings_from_config(config: ml_collections.ConfigDict) -> SqueezeSettings:
    """The :class:`SqueezeSettings` of a squeeze config (not yet validated against data)."""
    missing = [name for name in SETTING_FIELDS if name not in config]
    check(
        not missing,
        f"squeeze config lacks the field(s) {missing}; build it with configs/squeeze/sre2l.py",
    )
    return SqueezeSettings(**{name: config[name] for name in SETTING_FIELDS})


def run_squeeze(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    _stop_after_epochs: int | None = None,
) -> teacher_lib.Teacher | None:
    """``ddjax squeeze``: trains the teacher and saves it as ``workdir/teacher``.

    Validates the config before touching the work directory, trains (resuming from
    ``workdir/checkpoints``), writes the teacher with the final test accuracy in its
    ``extra``, then ``results.json``. A work directory that already holds the finished teacher
    returns it without training.

    Args:
      config: from ``configs/squeeze/sre2l.py:DATASET``.
      workdir: the run's directory (see the module docstring for its files).
      progress: a progress bar over epochs.
      _stop_after_epochs: testing hook (see :func:`train_teacher`); returns ``None`` then.

    Returns:
      The saved teacher, as :func:`ddjax.sre2l.teacher.load_teacher` reads it (``None`` only
      when the private testing hook stopped the run).

    Raises:
      DDJaxError: bad config values, ImageNet-1K, or a work directory of another config.
    """
    validate.check_config(config)
    check_squeezable(config.dataset.name)
    check(not config.dataset.zca, _NO_ZCA)  # before loading: a ZCA fit is not free
    settings = settings_from_config(config)
    dataset = data_lib.open_from_config(config.dataset, stage="squeeze")
    check_settings(settings, dataset)
    validate.check_test_split(dataset, "squeeze")
    work = Workdir(workdir, config, "squeeze")
    teacher_dir = work.file(TEACHER_DIR)
    if (teacher_dir / teacher_lib.META_FILE).is_file() and work.results().get("teacher"):
        return teacher_lib.load_teacher(teacher_dir)

    start = time.time()
    result = train_teacher(
        dataset,
        settings,
        checkpoint_dir=work.file(CHECKPOINT_DIR),
        progress=progress,
        log=work.log,
        rewind=work.rewind,
        workers=config.dataset.workers,
        _stop_after_epochs=_stop_after_epochs,
    )
    if result is None:
        return None
    final = float(result.test_accuracy[-1])
    summary = {
        "test_accuracy": final,
        "train_loss": guard.finite_or_none(result.train_loss[-1]),
        "train_accuracy": guard.finite_or_none(result.train_accuracy[-1]),
        "epochs": settings.epochs,
        "model": settings.model,
        "model_overrides": settings.model_overrides(),
        "seed": settings.seed,
    }
    teacher_lib.save_teacher(
        teacher_dir,
        model_name=settings.model,
        model_overrides=settings.model_overrides(),
        variables=result.variables,
        dataset=dataset,
        extra=summary,
    )
    tested = np.flatnonzero(~np.isnan(result.test_accuracy))
    work.save_results(
        {
            **summary,
            "teacher": str(teacher_dir),
            "test_accuracy_by_epoch": {str(e + 1): float(result.test_accuracy[e]) for e in tested},
            "seconds_this_session": round(time.time() - start, 1),
        }
    )
    work.log(event="squeeze_done", test_accuracy=final, teacher=str(teacher_dir))
    if progress:
        print(
            f"squeeze: {settings.model} on {dataset.name}, {settings.epochs} epochs, test "
            f"accuracy {100 * final:.2f} % -> {teacher_dir}"
        )
    return teacher_lib.load_teacher(teacher_dir)
