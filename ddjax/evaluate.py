"""Evaluating a synthetic set the way the papers do.

A synthetic set is judged by training K freshly initialised networks on it and
testing them on the real test set. The protocols reproduce the published ones:

* ``mtt`` -- MTT's ``evaluate_synset`` (Cazenavette et al. 2022, utils.py):
  SGD momentum 0.9, weight decay 5e-4, lr = the set's learned lr, batch 256,
  DSA on every batch, ``epochs + 1`` epochs in all with the lr multiplied by
  0.1 (and the optimiser, hence its momentum, re-created) once epoch index
  ``epochs // 2 + 1`` has finished; test accuracy once, at the end.
* ``dsa`` -- the DC/DSA repository's protocol (Zhao & Bilen 2021): the same
  schedule with a fixed lr of 0.01 and DSA, 1000 epochs.
* ``dc`` -- the DC protocol (Zhao et al. 2021): fixed lr 0.01, 300 epochs, no
  augmentation (DC augments only MNIST, with its own 'crop_scale_rotate'
  pipeline, which ddjax does not implement -- asking for it is an error).
* ``selmatch`` -- SelMatch's ``utils.evaluate_synset`` (Lee & Chung 2024; brief
  §4.4): fixed lr 0.1, SGD momentum 0.9, weight decay 5e-4,
  ``CosineAnnealingLR(T_max=epochs, eta_min=0.01 * lr)`` stepped after every
  epoch (eta_min = 0.001), batch 128, ``epochs + 1`` epochs, and the
  ``'combined'`` augmentation: DSA for the distilled images, RandomCrop(padding
  4) + RandomHorizontalFlip for the selected real ones (the split is read from
  the set's ``meta['num_distilled']``). SelMatch evaluates on ResNet-18-BN
  (``model='ResNet18BN'``) and scales the epochs with the IPC
  (:func:`selmatch_epochs`).
* ``selmatch_dsa`` -- the same with DSA on every batch, as SelMatch's
  sliding-window scripts evaluate selection-only windows (``eval.py --aug dsa``).

The K networks are trained at once by ``vmap`` (and sharded over the mesh's
``pool`` axis on several devices); results are mean ± std over K plus the
per-class accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import augment as augment_lib
from ddjax import data as data_lib
from ddjax import guard, sharding, train
from ddjax import models as models_lib
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.synset import SyntheticSet


@dataclasses.dataclass(frozen=True)
class Protocol:
    """An evaluation protocol.

    Attributes:
      name: registry name.
      epochs: ``Epoch`` in the reference code; ``epochs + 1`` epochs are run.
      lr: fixed learning rate, or ``None`` for the synthetic set's learned one.
      default_lr: used when ``lr`` is ``None`` and the set has no learned rate
        (coresets): MTT's ``lr_teacher`` default, 0.01.
      batch_size: training minibatch size.
      momentum, weight_decay: SGD settings (PyTorch semantics).
      augment: ``'dsa'``, ``'crop_flip'`` or ``'none'`` on every training batch, or
        ``'combined'`` (SelMatch: DSA per distilled image, crop+flip per selected image;
        needs the set's ``meta['num_distilled']``).
      schedule: ``'step'`` (MTT/DC: ×0.1 once, optimiser re-created) or ``'cosine'``
        (SelMatch: ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr_factor * lr)`` stepped
        once per epoch, one optimiser throughout).
      min_lr_factor: ``'cosine'`` only: ``eta_min`` as a fraction of the learning rate
        (SelMatch: ``lr_net * 0.01``).
      dsa_strategy: the DSA groups of ``'dsa'`` and ``'combined'`` (all six in every
        published protocol; fewer compile faster in tests).
    """

    name: str
    epochs: int
    lr: float | None
    default_lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "dsa"
    schedule: str = "step"
    min_lr_factor: float = 0.01
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY

    def lr_schedule(self, lr: float):
        """``epoch -> lr`` for epoch indices ``0 .. epochs``.

        ``'step'``: ×0.1 after epoch index ``epochs // 2 + 1`` (MTT/DC ``lr_schedule``).
        ``'cosine'``: PyTorch's ``CosineAnnealingLR`` with ``T_max = epochs``, stepped after
        every epoch, in closed form: epoch ``e`` trains with
        ``eta_min + (lr - eta_min) * (1 + cos(pi * e / epochs)) / 2``, so the last epoch
        (``e = epochs``) uses ``eta_min``.
        """
        if self.schedule == "cosine":
            eta_min = lr * self.min_lr_factor

            def cosine(epoch: int) -> float:
                return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2

            return cosine
        decay_after = self.epochs // 2 + 1

        def schedule(epoch: int) -> float:
            return lr if epoch <= decay_after else lr * 0.1

        return schedule

    @property
    def total_epochs(self) -> int:
        """Epochs actually run: the reference loops ``for ep in range(Epoch + 1)``."""
        return self.epochs + 1

    @property
    def reset_epochs(self) -> tuple[int, ...]:
        """Epochs at whose start the reference re-creates its optimiser (momentum reset).

        The step schedule re-creates it at the decay; the cosine schedule keeps one.
        """
        if self.schedule == "cosine":
            return ()
        return (self.epochs // 2 + 2,)


#: Protocol augmentations: those of ``ddjax.augment.make_augment`` plus SelMatch's combined one.
AUGMENTS = ("dsa", "crop_flip", "none", "combined")
SCHEDULES = ("step", "cosine")

PROTOCOLS = {
    "mtt": Protocol("mtt", epochs=1000, lr=None),
    "dsa": Protocol("dsa", epochs=1000, lr=0.01),
    "dc": Protocol("dc", epochs=300, lr=0.01, augment="none"),
    # SelMatch's evaluate_synset; epochs: its argparse default, scale with selmatch_epochs.
    "selmatch": Protocol(
        "selmatch", epochs=500, lr=0.1, batch_size=128, schedule="cosine", augment="combined"
    ),
    "selmatch_dsa": Protocol(
        "selmatch_dsa", epochs=500, lr=0.1, batch_size=128, schedule="cosine", augment="dsa"
    ),
}


def selmatch_epochs(ipc: int, images_per_class: int) -> int:
    """SelMatch's evaluation epochs for a set of ``ipc`` out of ``images_per_class`` per class.

    SelMatch keeps the number of evaluation iterations roughly constant across ratios:
    1000/500/250/167 epochs at 5/10/20/30 % of CIFAR (``scripts/eval``: ``epoch_eval_train``),
    500/250 at 10/20 % of Tiny-ImageNet, i.e. ``round(50 / ratio)``. Below 5 % (no published
    setting) ddjax caps it at 1000, the 5 % value and MTT's evaluation length: a deliberate
    choice, since ``50 / ratio`` would grow without bound (30,000 epochs for Fashion-MNIST
    at IPC 10).

    Args:
      ipc: images per class of the set.
      images_per_class: real training images per class.

    Returns:
      The ``epochs`` of the ``'selmatch'`` protocol.
    """
    check(
        1 <= ipc <= images_per_class,
        f"selmatch_epochs: ipc={ipc} must be in [1, images_per_class={images_per_class}]",
    )
    return min(1000, round(50 * images_per_class / ipc))


def get_protocol(name: str, **overrides) -> Protocol:
    """Looks up a protocol and applies overrides (``epochs``, ``lr``, ``batch_size``, ...)."""
    check(name in PROTOCOLS, f"protocol={name!r} is not known; valid: {sorted(PROTOCOLS)}")
    fields = {f.name for f in dataclasses.fields(Protocol)}
    unknown = set(overrides) - fields
    check(not unknown, f"unknown protocol settings {sorted(unknown)}; valid: {sorted(fields)}")
    # None means "the protocol's own value" (an unset config field), never "unset it".
    overrides = {k: v for k, v in overrides.items() if v is not None}
    protocol = dataclasses.replace(PROTOCOLS[name], **overrides)
    check_protocol(protocol)
    return protocol


def check_protocol(protocol: Protocol) -> None:
    """Raises a one-line ``DDJaxError`` naming the first invalid protocol setting."""
    check(protocol.epochs >= 1, f"epochs={protocol.epochs} must be at least 1")
    check(protocol.batch_size >= 1, f"batch_size={protocol.batch_size} must be at least 1")
    check(
        protocol.augment in AUGMENTS,
        f"augment={protocol.augment!r}: expected one of {', '.join(map(repr, AUGMENTS))}",
    )
    check(
        protocol.schedule in SCHEDULES,
        f"schedule={protocol.schedule!r}: expected one of {', '.join(map(repr, SCHEDULES))}",
    )
    check(
        0.0 <= protocol.min_lr_factor <= 1.0,
        f"min_lr_factor={protocol.min_lr_factor} must be in [0, 1] (eta_min / lr)",
    )
    augment_lib.parse_strategy(protocol.dsa_strategy)


#: k of the top-k accuracy that KD students report besides top-1: top-5, for datasets of
#: more than 5 classes (with 5 or fewer every class is among the top 5; nothing is reported).
TOP_K = 5


def pool_test_scores(
    net, state, dataset, *, pool_mode: str = "auto", batch_size: int = 500, top5: bool = False
) -> train.PoolScores:
    """Top-1 (overall and per class) and, with ``top5``, top-5 accuracy of a pool on the test split.

    ``dataset`` is in memory (:class:`ddjax.data.Dataset`) or a stream
    (:class:`ddjax.data.StreamingDataset`, read in batches of ``batch_size`` through its eval
    transform: resize, centre crop). The top-5 accuracy is ``None`` without ``top5`` and for
    datasets of at most :data:`TOP_K` classes.
    """
    top_k = TOP_K if top5 and dataset.num_classes > TOP_K else None
    if isinstance(dataset, data_lib.StreamingDataset):
        chunks = data_lib.streaming.test_chunks(dataset, batch_size)
    else:
        chunks = train.array_chunks(dataset.x_test, dataset.y_test, batch_size)
    return train.scores_over(net, state, chunks, dataset.num_classes, pool_mode, top_k)


def pool_test_accuracy(net, state, dataset, *, pool_mode: str = "auto", batch_size: int = 500):
    """``(accuracy (K,), per_class (K, C))`` of a pool on ``dataset``'s test split.

    :func:`pool_test_scores` without top-5.
    """
    scores = pool_test_scores(net, state, dataset, pool_mode=pool_mode, batch_size=batch_size)
    return scores.accuracy, scores.per_class


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Accuracies of K networks trained on one synthetic set.

    Attributes:
      model: architecture name.
      accuracies: ``(K,)`` test accuracy of each network, in [0, 1].
      per_class: ``(K, C)`` test accuracy per class.
      learning_rate: the learning rate the networks were trained with.
      lr_source: ``'fixed'`` (protocol), ``'learned'`` (the set's) or ``'default'``.
      final_train_loss: ``(K,)`` training loss in the last epoch.
      top5: ``(K,)`` top-5 test accuracy, where measured (KD students, more than
        :data:`TOP_K` classes); else ``None``.
      by_epoch: test scores during training, where measured (KD students with
        ``eval_every``): ``{epoch (1-based): {'top1': [K], 'top5': [K]}}``; else ``None``.
    """

    model: str
    accuracies: np.ndarray
    per_class: np.ndarray
    learning_rate: float
    lr_source: str
    final_train_loss: np.ndarray
    top5: np.ndarray | None = None
    by_epoch: dict[int, dict[str, list[float]]] | None = None

    @classmethod
    def of_pool(
        cls, net, state, dataset: Dataset, *, model: str, lr: float, lr_source: str, history,
        pool_mode: str = "auto", top5: bool = False,
    ) -> EvalResult:  # fmt: skip
        """The test accuracy of a trained pool of networks (any trainer: hard labels, KD).

        A streamed dataset's test split is read batch by batch (eval transform), never whole.
        ``top5``: also the top-5 accuracy (:func:`pool_test_scores`).
        """
        scores = pool_test_scores(net, state, dataset, pool_mode=pool_mode, top5=top5)
        return cls(
            model=model,
            accuracies=scores.accuracy,
            per_class=scores.per_class,
            learning_rate=float(lr),
            lr_source=lr_source,
            final_train_loss=history[-1],
            top5=scores.top_k,
        )

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    @property
    def top5_mean(self) -> float | None:
        return None if self.top5 is None else float(np.mean(self.top5))

    def summary(self) -> str:
        """``'73.81 ± 0.52'`` in percent."""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"

    def to_json(self) -> dict:
        """The result for ``results.json``; ``top5``/``top5_mean`` and ``by_epoch`` (epochs as
        strings) only where measured."""
        out = {
            "model": self.model,
            "mean": self.mean,
            "std": self.std,
            "accuracies": self.accuracies.tolist(),
            "per_class_mean": self.per_class.mean(0).tolist(),
            "learning_rate": self.learning_rate,
            "lr_source": self.lr_source,
            # null: a network whose last epoch had a skipped update (ddjax.guard).
            "final_train_loss": guard.finite_or_none(self.final_train_loss),
        }
        if self.top5 is not None:
            out["top5"] = self.top5.tolist()
            out["top5_mean"] = self.top5_mean
        if self.by_epoch is not None:
            out["by_epoch"] = {str(epoch): scores for epoch, scores in self.by_epoch.items()}
        return out


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """A config's ``eval`` section as one frozen value: how a synthetic set is evaluated.

    Read once at a stage's boundary (:meth:`from_config`), checked before the work directory is
    written (:meth:`validate`) and passed down whole, so no caller unpacks the section field by
    field. ``epochs``, ``batch_size`` and ``lr`` left ``None`` mean the protocol's own values.

    Attributes:
      protocol: a name from :data:`PROTOCOLS` (the hard-label trainer's; the KD trainer uses its
        recipe instead).
      models: the architectures, one result each (a cross-architecture table when several).
      num_models: K networks per architecture.
      epochs: the protocol's ``epochs`` (``epochs + 1`` are run), or ``None``.
      batch_size: the protocol's batch size, or ``None``.
      lr: a fixed learning rate, or ``None`` (mtt: the set's learned lr, else 0.01).
      seed: network ``i`` is initialised and trained with keys derived from ``(seed, i)``.
      model_overrides: architecture fields for every model (e.g. ``{'width': 64}``).
      pool_mode: how the K networks share the device (``ddjax.train.resolve_pool_mode``).
    """

    protocol: str = "mtt"
    models: tuple[str, ...] = ("ConvNet",)
    num_models: int = 5
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    model_overrides: dict | None = None
    pool_mode: str = "auto"

    @classmethod
    def from_config(cls, section) -> EvalSettings:
        """The settings of a config's ``eval`` section (``ddjax.config.eval_section``).

        A section without some field (e.g. ``ddjax relabel``'s, which has no protocol) keeps
        that field's default; an :class:`EvalSettings` is returned as it is.
        """
        if isinstance(section, EvalSettings):
            return section
        values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
        if "models" in values:
            values["models"] = tuple(values["models"])
        overrides = values.get("model_overrides")
        if overrides is not None:
            # A ConfigDict section (``ddjax relabel``'s) becomes a plain dict.
            values["model_overrides"] = (
                overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
            )
        return cls(**values)

    def get_protocol(self) -> Protocol:
        """The protocol with this section's ``epochs``, ``batch_size`` and ``lr`` applied."""
        return get_protocol(
            self.protocol, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr
        )

    def validate(self, dataset: Dataset, synset: SyntheticSet | None = None) -> None:
        """Checks the settings (and the set they will evaluate, if given) against ``dataset``.

        Raises:
          DDJaxError: one line naming the first bad ``config.eval`` field (unknown protocol or
            architecture, ``num_models < 1``, no models) or a set that the protocol's
            ``'combined'`` augmentation cannot split.
        """
        protocol = self.get_protocol()
        check(
            self.num_models >= 1,
            f"config.eval.num_models={self.num_models} must be at least 1",
        )
        check(len(self.models) >= 1, "config.eval.models is empty; e.g. ConvNet,ResNet18")
        self.check_models(dataset)
        if synset is not None and protocol.augment == "combined":
            num_distilled(synset)  # SelMatch's combined augmentation needs the split

    def check_models(self, dataset: Dataset) -> None:
        """Builds every architecture once: an unknown name is refused with the valid ones."""
        for name in self.models:
            models_lib.get_model(
                name, dataset.num_classes, dataset.image_shape, **(self.model_overrides or {})
            )

    def evaluate(
        self,
        synset: SyntheticSet,
        dataset: Dataset,
        model: str,
        *,
        progress: bool = False,
        log: Callable[..., None] | None = None,
        **protocol_overrides,
    ) -> EvalResult:
        """:func:`evaluate_synset` of ``synset`` on ``model`` under these settings.

        ``protocol_overrides`` replace protocol fields beyond the section's (e.g. SelMatch's
        ``dsa_strategy``); ``log`` receives the skipped-update records (:mod:`ddjax.guard`).
        """
        overrides = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        return evaluate_synset(
            synset,
            dataset,
            model=model,
            protocol=self.protocol,
            num_models=self.num_models,
            seed=self.seed,
            model_overrides=self.model_overrides,
            progress=progress,
            pool_mode=self.pool_mode,
            log=log,
            **{**overrides, **protocol_overrides},
        )


def check_set_fits(synset: SyntheticSet, dataset: Dataset, num_models: int) -> None:
    """Refuses (one line) a set whose image shape or classes are not the dataset's.

    Shared by every trainer of synthetic sets (hard labels here, KD in ``ddjax.sre2l.kd``).
    """
    check(num_models >= 1, f"num_models={num_models} must be at least 1")
    check(
        synset.images.shape[1:] == dataset.image_shape,
        f"synthetic images have shape {synset.images.shape[1:]} but dataset "
        f"{dataset.name!r} has {dataset.image_shape}",
    )
    check(
        synset.num_classes == dataset.num_classes,
        f"synthetic set has {synset.num_classes} classes, dataset {dataset.name!r} has "
        f"{dataset.num_classes}",
    )


def evaluate_synset(
    synset: SyntheticSet,
    dataset: Dataset,
    *,
    model: str = "ConvNet",
    protocol: str | Protocol = "mtt",
    num_models: int = 5,
    seed: int = 0,
    model_overrides: dict | None = None,
    progress: bool = False,
    pool_mode: str = "auto",
    log: Callable[..., None] | None = None,
    **protocol_overrides,
) -> EvalResult:
    """Trains ``num_models`` fresh networks on ``synset`` and tests them on ``dataset``.

    Args:
      synset: the synthetic set (images in ``dataset``'s normalised space).
      dataset: the real dataset whose test split is used.
      model: architecture name (``ddjax.models.get_model``).
      protocol: a name from :data:`PROTOCOLS` or a :class:`Protocol`. The ``'combined'``
        augmentation (protocol ``'selmatch'``) reads the number of leading distilled images
        from ``synset.meta['num_distilled']`` (:func:`num_distilled`).
      num_models: K, the networks trained at once by ``vmap``.
      seed: network ``i`` is initialised and trained with keys derived from
        ``(seed, i)``; the same seed gives the same accuracies.
      model_overrides: keyword overrides for the architecture (e.g. ``width``).
      progress: show a progress bar over epochs.
      pool_mode: how the K networks share the device: ``'vmap'``, ``'loop'`` or
        ``'auto'`` (vmap on accelerators, one after another on CPU; see
        ``ddjax.train.resolve_pool_mode``). The results are the same.
      log: receives the ``skipped`` records of updates the guard refused (e.g.
        ``Workdir.log``; :func:`ddjax.train.train_epochs`); a network that skips every
        update of an epoch stops the evaluation with a ``DDJaxError``.
      **protocol_overrides: e.g. ``epochs=300``, ``lr=0.01``, ``batch_size=128``,
        ``dsa_strategy='crop_flip'``.

    Returns:
      An :class:`EvalResult`.
    """
    if isinstance(protocol, str):
        protocol = get_protocol(protocol, **protocol_overrides)
    elif protocol_overrides:
        protocol = dataclasses.replace(protocol, **protocol_overrides)
    check_protocol(protocol)
    check_set_fits(synset, dataset, num_models)
    if protocol.name == "dc" and dataset.name == "mnist":
        raise DDJaxError(
            "protocol='dc' on mnist needs DC's crop_scale_rotate augmentation, which ddjax "
            "does not implement; use protocol='dsa'"
        )
    if protocol.lr is not None:
        lr, lr_source = protocol.lr, "fixed"
    elif synset.learning_rate is not None:
        lr, lr_source = synset.learning_rate, "learned"
    else:
        lr, lr_source = protocol.default_lr, "default"

    net = models_lib.get_model(
        model, dataset.num_classes, dataset.image_shape, **(model_overrides or {})
    )
    tx = train.sgd(lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    labels = np.asarray(synset.labels)
    if protocol.augment == "combined":
        step = make_combined_train_step(net, tx, dataset.num_classes, protocol.dsa_strategy)
        labels = tag_distilled(labels, num_distilled(synset), dataset.num_classes)
    else:
        augment = augment_lib.make_augment(protocol.augment, protocol.dsa_strategy)
        step = train.make_train_step(net, tx, None if protocol.augment == "none" else augment)

    mesh = sharding.pool_mesh(num_models)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    state = train.init_pool(net, tx, init_key, dataset.image_shape, num_models, mesh)
    images = sharding.replicate(np.asarray(synset.images, np.float32), mesh)
    labels = sharding.replicate(labels, mesh)
    state, history = train.fit_pool(
        state,
        step,
        images,
        labels,
        train_key,
        epochs=protocol.total_epochs,
        batch_size=protocol.batch_size,
        lr_schedule=protocol.lr_schedule(lr),
        reset_optimizer_at=protocol.reset_epochs,
        tx=tx,
        progress=f"eval {model}" if progress else None,
        pool_mode=pool_mode,
        log=log,
        stage=f"evaluation of {model}",
    )
    return EvalResult.of_pool(
        net, state, dataset, model=model, lr=lr, lr_source=lr_source, history=history,
        pool_mode=pool_mode,
    )  # fmt: skip


def num_distilled(synset: SyntheticSet) -> int:
    """How many leading images of a SelMatch set are distilled (``meta['num_distilled']``).

    SelMatch stores its set as ``cat(distilled, selected)`` with ``cpc * C`` distilled images
    first; the ``'combined'`` augmentation needs that count.

    Raises:
      DDJaxError: if the meta has no valid count.
    """
    value = synset.meta.get("num_distilled")
    count = len(synset.images)
    check(
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value <= count,
        f"augment='combined' needs the set's meta['num_distilled'] (an integer in [0, {count}]: "
        f"its leading distilled images; SelMatch sets record it), got {value!r}; for a set "
        "without a distilled part use protocol 'selmatch_dsa'",
    )
    return int(value)


def tag_distilled(labels: np.ndarray, num_distilled: int, num_classes: int) -> np.ndarray:
    """Labels that carry each image's "distilled" flag through the shuffled epochs.

    :func:`ddjax.train.fit_pool` shuffles images and labels together and hands a step only
    the minibatch, so the flag travels inside the labels: hard labels become
    ``label + num_classes`` for the first ``num_distilled`` images, soft labels ``(N, C)``
    get a last column of 1.0 (distilled) or 0.0. :func:`make_combined_train_step` undoes it.

    Args:
      labels: ``(N,)`` class indices or ``(N, C)`` probabilities.
      num_distilled: the number of leading distilled images.
      num_classes: C.

    Returns:
      ``(N,)`` int32 or ``(N, C + 1)`` float32 tagged labels.
    """
    labels = np.asarray(labels)
    flags = np.arange(len(labels)) < num_distilled
    if labels.ndim == 1:
        return (labels.astype(np.int32) + num_classes * flags).astype(np.int32)
    return np.concatenate([labels, flags[:, None]], axis=1).astype(np.float32)


def _untag(tagged: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """``(labels, is_distilled)`` from :func:`tag_distilled`'s labels."""
    if tagged.ndim == 1:
        return tagged % num_classes, tagged >= num_classes
    return tagged[:, :-1], tagged[:, -1] > 0.5


def combined_augment(
    key: jax.Array,
    images: jax.Array,
    is_distilled: jax.Array,
    strategy: str = augment_lib.DEFAULT_STRATEGY,
    params: augment_lib.DSAParams = augment_lib.DEFAULT_PARAMS,
) -> jax.Array:
    """SelMatch's ``'combined'`` augmentation of a shuffled minibatch.

    SelMatch's ``CombinedTensorDataset.__getitem__`` augments each image on its own: a
    distilled image gets ``DiffAugment`` of a batch of one (its own DSA group and
    parameters), a selected real image ``RandomCrop(size, padding=4)`` +
    ``RandomHorizontalFlip``. Here the minibatch is already drawn, so every image gets both
    and ``is_distilled`` picks one; the keys follow :func:`ddjax.augment.combined`:
    ``key_distilled, key_rest = split(key)``, image ``i``'s DSA uses
    ``split(key_distilled, B)[i]`` and the crop+flip draws are ``crop_flip(key_rest, images)``.

    Args:
      key: PRNG key.
      images: ``[B, H, W, C]`` minibatch.
      is_distilled: ``[B]`` bool, True for distilled images.
      strategy: DSA groups (SelMatch: all six).
      params: DSA magnitudes.

    Returns:
      The augmented minibatch.
    """
    key_distilled, key_rest = jax.random.split(key)
    keys = jax.random.split(key_distilled, images.shape[0])

    def dsa_one(image_key: jax.Array, image: jax.Array) -> jax.Array:
        return augment_lib.dsa(image_key, image[None], strategy, params)[0]

    with_dsa = jax.vmap(dsa_one)(keys, images)
    simple = augment_lib.crop_flip(key_rest, images)
    return jnp.where(is_distilled[:, None, None, None], with_dsa, simple)


def make_combined_train_step(
    model,
    tx,
    num_classes: int,
    strategy: str = augment_lib.DEFAULT_STRATEGY,
    params: augment_lib.DSAParams = augment_lib.DEFAULT_PARAMS,
):
    """The train step of the ``'combined'`` protocols: labels tagged by :func:`tag_distilled`.

    ``step(state, images, tagged_labels, key)`` untags the labels, applies
    :func:`combined_augment` with ``key`` and takes :func:`ddjax.train.make_train_step`'s
    un-augmented step on the result, so it is that step on the augmented minibatch.
    """
    augment_lib.parse_strategy(strategy)
    plain = train.make_train_step(model, tx, None)

    def step(state: train.TrainState, images: jax.Array, tagged: jax.Array, key: jax.Array):
        labels, is_distilled = _untag(tagged, num_classes)
        images = combined_augment(key, images, is_distilled, strategy, params)
        return plain(state, images, labels, key)

    return step


def evaluate_cross_arch(
    synset: SyntheticSet,
    dataset: Dataset,
    models: Sequence[str] = ("ConvNet", "ResNet18", "VGG11", "AlexNet"),
    **kwargs,
) -> dict[str, EvalResult]:
    """Evaluates one synthetic set on several architectures (the papers' cross-architecture table).

    Args:
      synset, dataset: as in :func:`evaluate_synset`.
      models: architecture names.
      **kwargs: passed to :func:`evaluate_synset` (protocol, num_models, seed, epochs...).
    """
    return {name: evaluate_synset(synset, dataset, model=name, **kwargs) for name in models}
