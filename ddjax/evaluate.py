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

The K networks are trained at once by ``vmap`` (and sharded over the mesh's
``pool`` axis on several devices); results are mean ± std over K plus the
per-class accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from ddjax import augment as augment_lib
from ddjax import models as models_lib
from ddjax import sharding, train
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
      augment: ``'dsa'``, ``'crop_flip'`` or ``'none'`` on every training batch.
    """

    name: str
    epochs: int
    lr: float | None
    default_lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "dsa"

    def lr_schedule(self, lr: float):
        """``epoch -> lr``: ×0.1 after epoch index ``epochs // 2 + 1`` (MTT/DC ``lr_schedule``)."""
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
        """Epochs at whose start the reference re-creates its optimiser (momentum reset)."""
        return (self.epochs // 2 + 2,)


PROTOCOLS = {
    "mtt": Protocol("mtt", epochs=1000, lr=None),
    "dsa": Protocol("dsa", epochs=1000, lr=0.01),
    "dc": Protocol("dc", epochs=300, lr=0.01, augment="none"),
}


def get_protocol(name: str, **overrides) -> Protocol:
    """Looks up a protocol and applies overrides (``epochs``, ``lr``, ``batch_size``, ...)."""
    check(name in PROTOCOLS, f"protocol={name!r} is not known; valid: {sorted(PROTOCOLS)}")
    fields = {f.name for f in dataclasses.fields(Protocol)}
    unknown = set(overrides) - fields
    check(not unknown, f"unknown protocol settings {sorted(unknown)}; valid: {sorted(fields)}")
    # None means "the protocol's own value" (an unset config field), never "unset it".
    overrides = {k: v for k, v in overrides.items() if v is not None}
    protocol = dataclasses.replace(PROTOCOLS[name], **overrides)
    check(protocol.epochs >= 1, f"epochs={protocol.epochs} must be at least 1")
    check(protocol.batch_size >= 1, f"batch_size={protocol.batch_size} must be at least 1")
    augment_lib.make_augment(protocol.augment)  # validates the name
    return protocol


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
    """

    model: str
    accuracies: np.ndarray
    per_class: np.ndarray
    learning_rate: float
    lr_source: str
    final_train_loss: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def summary(self) -> str:
        """``'73.81 ± 0.52'`` in percent."""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "mean": self.mean,
            "std": self.std,
            "accuracies": self.accuracies.tolist(),
            "per_class_mean": self.per_class.mean(0).tolist(),
            "learning_rate": self.learning_rate,
            "lr_source": self.lr_source,
            "final_train_loss": self.final_train_loss.tolist(),
        }


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
    **protocol_overrides,
) -> EvalResult:
    """Trains ``num_models`` fresh networks on ``synset`` and tests them on ``dataset``.

    Args:
      synset: the synthetic set (images in ``dataset``'s normalised space).
      dataset: the real dataset whose test split is used.
      model: architecture name (``ddjax.models.get_model``).
      protocol: a name from :data:`PROTOCOLS` or a :class:`Protocol`.
      num_models: K, the networks trained at once by ``vmap``.
      seed: network ``i`` is initialised and trained with keys derived from
        ``(seed, i)``; the same seed gives the same accuracies.
      model_overrides: keyword overrides for the architecture (e.g. ``width``).
      progress: show a progress bar over epochs.
      pool_mode: how the K networks share the device: ``'vmap'``, ``'loop'`` or
        ``'auto'`` (vmap on accelerators, one after another on CPU; see
        ``ddjax.train.resolve_pool_mode``). The results are the same.
      **protocol_overrides: e.g. ``epochs=300``, ``lr=0.01``, ``batch_size=128``.

    Returns:
      An :class:`EvalResult`.
    """
    if isinstance(protocol, str):
        protocol = get_protocol(protocol, **protocol_overrides)
    elif protocol_overrides:
        protocol = dataclasses.replace(protocol, **protocol_overrides)
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
    augment = augment_lib.make_augment(protocol.augment)
    step = train.make_train_step(net, tx, None if protocol.augment == "none" else augment)

    mesh = sharding.pool_mesh(num_models)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    state = train.init_pool(net, tx, init_key, dataset.image_shape, num_models, mesh)
    images = sharding.replicate(np.asarray(synset.images, np.float32), mesh)
    labels = sharding.replicate(np.asarray(synset.labels), mesh)
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
    )
    accuracy, per_class = train.pool_accuracy(
        net, state, dataset.x_test, dataset.y_test, dataset.num_classes, pool_mode=pool_mode
    )
    return EvalResult(
        model=model,
        accuracies=accuracy,
        per_class=per_class,
        learning_rate=float(lr),
        lr_source=lr_source,
        final_train_loss=history[-1],
    )


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
