"""Coreset baselines: pick real images per class and return them as a synthetic set.

Every table in the distillation papers has these rows (DC, Zhao et al. 2021,
Table 1; MTT Table 1): a method is only interesting if it beats choosing real
images. The methods here return the same :class:`~ddjax.synset.SyntheticSet`
that distillation methods return, so one ``ddjax evaluate`` serves both.

* ``random``: ``ipc`` images per class drawn uniformly without replacement.
* ``herding``: per class, greedily add the image whose inclusion brings the
  mean feature of the chosen images closest to the class's mean feature
  (Welling 2009, as used for coresets by Rebuffi et al. 2017 and DC).
* ``kcenter``: per class, greedy k-center (Sener & Savarese 2018): start from the
  image nearest to the class mean, then repeatedly add the image farthest from
  everything chosen so far.

Herding and k-center work in a feature space. As in DC ("the features of a
ConvNet trained on the whole dataset"), the default embeds the images with a
ConvNet trained on the real training set for ``feature_epochs`` epochs
(``features='trained'``); ``'random'`` uses an untrained ConvNet and ``'pixels'``
the raw normalised pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import augment as augment_lib
from ddjax import models as models_lib
from ddjax import train
from ddjax.data import Dataset, check_ipc
from ddjax.errors import check
from ddjax.synset import SyntheticSet

METHODS = ("random", "herding", "kcenter")
FEATURES = ("trained", "random", "pixels")


def random_indices(labels: np.ndarray, num_classes: int, ipc: int, seed: int) -> np.ndarray:
    """``ipc`` indices per class, uniformly without replacement, class by class."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=ipc, replace=False) for c in range(num_classes)
    ]
    return np.concatenate(chosen)


def herding(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy herding: ``k`` row indices whose running mean tracks the mean of ``features``.

    At step ``t`` it picks ``argmin_i ||mu - (s + f_i) / (t + 1)||`` over unchosen
    rows, where ``s`` is the sum of the chosen features.
    """
    features = np.asarray(features, np.float64)
    mu = features.mean(0)
    chosen: list[int] = []
    total = np.zeros_like(mu)
    available = np.ones(len(features), bool)
    for t in range(k):
        dist = np.linalg.norm(mu[None] - (total[None] + features) / (t + 1), axis=1)
        dist[~available] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        total += features[i]
        available[i] = False
    return np.asarray(chosen, np.int64)


def kcenter(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center: the row nearest the mean, then the row farthest from those chosen."""
    features = np.asarray(features, np.float64)
    first = int(np.argmin(np.linalg.norm(features - features.mean(0), axis=1)))
    chosen = [first]
    min_dist = np.linalg.norm(features - features[first], axis=1)
    for _ in range(k - 1):
        i = int(np.argmax(min_dist))
        chosen.append(i)
        min_dist = np.minimum(min_dist, np.linalg.norm(features - features[i], axis=1))
    return np.asarray(chosen, np.int64)


def embed(
    dataset: Dataset,
    features: str = "trained",
    *,
    model: str = "ConvNet",
    feature_epochs: int = 5,
    seed: int = 0,
    model_overrides: dict | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Feature vectors of the training images, for herding and k-center.

    Args:
      dataset: the real dataset.
      features: ``'trained'`` (a ConvNet trained ``feature_epochs`` epochs on the
        training set with SGD lr 0.01, momentum 0.9, batch 256, DSA),
        ``'random'`` (the same net untrained) or ``'pixels'``.
      model: architecture of the embedding network.
      feature_epochs: training epochs for ``'trained'``.
      seed: initialisation and shuffling seed.
      model_overrides: architecture overrides (e.g. ``width``).
      progress: show a progress bar while training.

    Returns:
      ``(N_train, F)`` float32 features.
    """
    check(features in FEATURES, f"features={features!r} is not known; valid: {list(FEATURES)}")
    if features == "pixels":
        return dataset.x_train.reshape(len(dataset.x_train), -1)
    net = models_lib.get_model(
        model, dataset.num_classes, dataset.image_shape, **(model_overrides or {})
    )
    tx = train.sgd(0.01, momentum=0.9)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    state = train.init_pool(net, tx, init_key, dataset.image_shape, 1)
    if features == "trained":
        check(feature_epochs >= 1, f"feature_epochs={feature_epochs} must be at least 1")
        step = train.make_train_step(net, tx, augment_lib.make_augment("dsa"))
        state, _ = train.fit_pool(
            state,
            step,
            dataset.x_train,
            dataset.y_train,
            train_key,
            epochs=feature_epochs,
            batch_size=256,
            progress="feature net" if progress else None,
        )
    params = jax.tree.map(lambda x: x[0], state.params)
    batch_stats = jax.tree.map(lambda x: x[0], state.batch_stats)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}

    @jax.jit
    def apply(x):
        return net.apply(variables, x, train=False, features_only=True)

    out = [
        np.asarray(apply(jnp.asarray(x))) for x in np.array_split(dataset.x_train, _chunks(dataset))
    ]
    return np.concatenate(out).astype(np.float32)


def _chunks(dataset: Dataset, size: int = 1000) -> int:
    return max(1, -(-len(dataset.x_train) // size))


def select(
    dataset: Dataset,
    method: str,
    ipc: int,
    *,
    seed: int = 0,
    features: str = "trained",
    feature_epochs: int = 5,
    feature_model: str = "ConvNet",
    model_overrides: dict | None = None,
    embedding: np.ndarray | None = None,
    progress: bool = False,
) -> SyntheticSet:
    """Builds a coreset of ``ipc`` real images per class.

    Args:
      dataset: the real dataset.
      method: one of :data:`METHODS`.
      ipc: images per class.
      seed: seed for ``random`` and for the feature network.
      features, feature_epochs, feature_model, model_overrides: how herding and
        k-center embed the images (see :func:`embed`).
      embedding: precomputed ``(N_train, F)`` features (skips :func:`embed`).
      progress: show progress bars.

    Returns:
      A :class:`SyntheticSet` with hard labels, ordered class by class, and
      ``meta['indices']`` the chosen training indices.
    """
    check(method in METHODS, f"method={method!r} is not a selection method; valid: {list(METHODS)}")
    check(isinstance(ipc, int) and ipc >= 1, f"ipc={ipc!r} must be a positive integer")
    check_ipc(dataset, ipc)
    labels = dataset.y_train
    if method == "random":
        indices = random_indices(labels, dataset.num_classes, ipc, seed)
    else:
        if embedding is None:
            embedding = embed(
                dataset,
                features,
                model=feature_model,
                feature_epochs=feature_epochs,
                seed=seed,
                model_overrides=model_overrides,
                progress=progress,
            )
        check(
            len(embedding) == len(labels),
            f"embedding has {len(embedding)} rows, the training set {len(labels)} images",
        )
        pick = herding if method == "herding" else kcenter
        indices = np.concatenate(
            [
                np.flatnonzero(labels == c)[pick(embedding[labels == c], ipc)]
                for c in range(dataset.num_classes)
            ]
        )
    meta = {"method": method, "dataset": dataset.name, "ipc": ipc, "seed": seed}
    if method != "random":
        meta.update(features=features, feature_epochs=feature_epochs, feature_model=feature_model)
    meta["indices"] = indices.tolist()
    return SyntheticSet(
        images=dataset.x_train[indices].astype(np.float32),
        labels=labels[indices].astype(np.int32),
        num_classes=dataset.num_classes,
        learning_rate=None,
        meta=meta,
    )
