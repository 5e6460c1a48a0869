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
* ``forgetting``: per class, the ``ipc`` hardest (or easiest, ``end='easiest'``)
  examples by a difficulty score (:mod:`ddjax.difficulty`): the "Forgetting" rows of
  DC/MTT Table 1 (Toneva et al. 2019) with the experts' forgetting counts, or any
  external score such as C-scores with its direction stated.
* ``window``: SelMatch's selection-only sliding window (Lee & Chung 2024,
  ``eval.py --method window``): per class, ``s[ths : ths+ipc]`` of the hardest-first
  ranking ``s`` with ``ths = floor(ipc * beta)``. :func:`search_window` evaluates the
  windows of a grid of β (SelMatch's ``scripts/sliding_window``: β = 0, 0.1, ..., 0.9)
  and keeps the best.

Herding and k-center work in a feature space. As in DC ("the features of a
ConvNet trained on the whole dataset"), the default embeds the images with a
ConvNet trained on the real training set for ``feature_epochs`` epochs
(``features='trained'``); ``'random'`` uses an untrained ConvNet and ``'pixels'``
the raw normalised pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddjax import augment as augment_lib
from ddjax import data as data_lib
from ddjax import difficulty as difficulty_lib
from ddjax import models as models_lib
from ddjax import train, validate
from ddjax.data import Dataset, check_ipc
from ddjax.difficulty import DifficultyScores
from ddjax.errors import check
from ddjax.evaluate import EvalSettings
from ddjax.evaluate_stage import evaluate_into
from ddjax.synset import SyntheticSet, load_synset, save_grid
from ddjax.workdir import Workdir

#: Methods that need no difficulty scores (the quick start's rows).
METHODS = ("random", "herding", "kcenter")
#: Coresets from per-example difficulty scores (``scores`` argument / config fields).
DIFFICULTY_METHODS = ("forgetting", "window")
#: Every method :func:`select` accepts.
ALL_METHODS = METHODS + DIFFICULTY_METHODS
FEATURES = ("trained", "random", "pixels")
#: ``end`` of the ``forgetting`` method: which end of the per-class ranking is kept.
ENDS = ("hardest", "easiest")
#: SelMatch's β grid for the sliding-window search (``scripts/sliding_window``: seq 0 0.1 0.9).
SELMATCH_BETAS = tuple(round(0.1 * k, 1) for k in range(10))


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
    scores: DifficultyScores | None = None,
    end: str = "hardest",
    beta: float = 0.0,
    progress: bool = False,
) -> SyntheticSet:
    """Builds a coreset of ``ipc`` real images per class.

    Args:
      dataset: the real dataset.
      method: one of :data:`ALL_METHODS`.
      ipc: images per class.
      seed: seed for ``random`` and for the feature network.
      features, feature_epochs, feature_model, model_overrides: how herding and
        k-center embed the images (see :func:`embed`).
      embedding: precomputed ``(N_train, F)`` features (skips :func:`embed`).
      scores: per-example difficulty scores, required by ``forgetting`` and ``window``
        (:mod:`ddjax.difficulty`: the experts' forgetting counts or a scores file).
      end: ``forgetting``: keep the ``'hardest'`` (Toneva et al.'s most forgotten; MTT's
        "Forgetting" rows) or the ``'easiest'`` examples of each class.
      beta: ``window``: β, the window start ``floor(ipc * beta)`` in the hardest-first
        ranking (SelMatch).
      progress: show progress bars.

    Returns:
      A :class:`SyntheticSet` with hard labels, ordered class by class, and
      ``meta['indices']`` the chosen training indices. Difficulty coresets also record the
      scores' source and direction, ``end``/``beta`` and ``num_distilled=0`` (no distilled
      part: SelMatch's ``'combined'`` augmentation treats every image as selected).
    """
    check(
        method in ALL_METHODS,
        f"method={method!r} is not a selection method; valid: {list(ALL_METHODS)}",
    )
    check(isinstance(ipc, int) and ipc >= 1, f"ipc={ipc!r} must be a positive integer")
    check_ipc(dataset, ipc)
    labels = dataset.y_train
    meta = {"method": method, "dataset": dataset.name, "ipc": ipc, "seed": seed}
    if method in DIFFICULTY_METHODS:
        indices, extra = _difficulty_indices(dataset, method, ipc, scores, end, beta)
        meta.update(extra)
    elif method == "random":
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
        meta.update(features=features, feature_epochs=feature_epochs, feature_model=feature_model)
    meta["indices"] = indices.tolist()
    return SyntheticSet(
        images=dataset.x_train[indices].astype(np.float32),
        labels=labels[indices].astype(np.int32),
        num_classes=dataset.num_classes,
        learning_rate=None,
        meta=meta,
    )


def _difficulty_indices(
    dataset: Dataset,
    method: str,
    ipc: int,
    scores: DifficultyScores | None,
    end: str,
    beta: float,
) -> tuple[np.ndarray, dict]:
    """Train indices (class by class) and meta of a ``forgetting`` or ``window`` coreset."""
    check(
        isinstance(scores, DifficultyScores),
        f"method={method!r} needs per-example difficulty scores (scores=: the experts' "
        "forgetting counts or a scores file, see ddjax.difficulty)",
    )
    ranking = difficulty_lib.rank_per_class(scores, dataset.y_train, dataset.num_classes)
    meta = {"scores": scores.source, "scores_higher": scores.higher, "num_distilled": 0}
    if method == "forgetting":
        check(end in ENDS, f"end={end!r}: expected one of {list(ENDS)}")
        # The most extreme example first: hardest-first ranking, or its reverse.
        picked = [(s if end == "hardest" else s[::-1])[:ipc] for s in ranking]
        meta["end"] = end
        return np.concatenate(picked).astype(np.int64), meta
    split = difficulty_lib.window_split(ipc, 0.0, beta)
    selected, _ = difficulty_lib.window_indices(ranking, split)
    meta.update(beta=split.beta, window_start=split.start)
    return selected.reshape(-1), meta


@dataclasses.dataclass(frozen=True)
class WindowSearch:
    """The result of :func:`search_window`.

    Attributes:
      best_beta: the β whose window scored highest (the first of equals).
      accuracies: β -> the evaluation's score, in the order searched.
      synset: the best window's coreset (its meta holds the search under
        ``'window_search'``).
    """

    best_beta: float
    accuracies: dict[float, float]
    synset: SyntheticSet


def search_window(
    dataset: Dataset,
    scores: DifficultyScores,
    ipc: int,
    betas: Sequence[float] = SELMATCH_BETAS,
    *,
    evaluate: Callable[[SyntheticSet], float],
    progress: bool = False,
) -> WindowSearch:
    """SelMatch's sliding-window search: evaluate the selection-only window of every β.

    SelMatch chose its β by training evaluation networks on each window ``s[ths : ths+ipc]``
    for β in {0, 0.1, ..., 0.9} (``scripts/sliding_window/*.sh``: ``eval.py --method window
    --aug dsa`` with ResNet-18-BN) and reading off the best. Here every window is built first
    (so a β whose window does not fit is refused before any training), then ``evaluate`` is
    called once per β in the given order; the highest score wins, the first on ties.

    Args:
      dataset: the real dataset.
      scores: per-example difficulty scores.
      ipc: images per class.
      betas: the β grid (default SelMatch's).
      evaluate: ``synset -> score`` (e.g. the mean test accuracy of
        :func:`ddjax.evaluate.evaluate_synset` with protocol ``'selmatch_dsa'``); injected so
        that any protocol, or a stand-in in tests, can judge the windows.
      progress: print each β's score.

    Returns:
      A :class:`WindowSearch`.
    """
    betas = tuple(betas)
    check(len(betas) >= 1, "betas is empty: give at least one window start to search")
    check(len(set(betas)) == len(betas), f"betas={list(betas)} repeats a value; give each β once")
    windows = {beta: select(dataset, "window", ipc, scores=scores, beta=beta) for beta in betas}
    accuracies = {}
    for beta, synset in windows.items():
        accuracies[beta] = float(evaluate(synset))
        if progress:
            print(f"window beta={beta:g}: {accuracies[beta]:.4f}")
    best = max(betas, key=lambda b: (accuracies[b], -betas.index(b)))
    best_set = windows[best]
    meta = dict(best_set.meta, window_search={str(b): a for b, a in accuracies.items()})
    return WindowSearch(best, accuracies, dataclasses.replace(best_set, meta=meta))


def difficulty_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the difficulty-coreset fields to a ``ddjax select`` config (in place; idempotent).

    Fields (only those missing are added):

    * ``scores``: ``'forgetting'`` (the experts' forgetting counts, from ``experts_dir``) or a
      ``.npy``/``.npz`` file of per-example scores in the dataset's train order;
    * ``scores_higher``: ``'harder'`` (forgetting counts) or ``'easier'`` (C-scores);
    * ``experts_dir``: the ``ddjax experts`` directory for ``scores='forgetting'``;
    * ``end``: ``method='forgetting'``: ``'hardest'`` or ``'easiest'`` per class;
    * ``beta``: ``method='window'``: the window start relative to IPC;
    * ``betas``: ``method='window'``: if not empty, search these β with ``config.eval``
      (:func:`search_window`) instead of using ``beta``; SelMatch's grid is 0, 0.1, ..., 0.9.

    Returns:
      ``config``.
    """
    defaults = {
        "scores": "forgetting",
        "scores_higher": "harder",
        "experts_dir": "",
        "end": "hardest",
        "beta": 0.0,
        "betas": (),
    }
    for name, value in defaults.items():
        if name not in config:
            config[name] = value
    return config


def select_from_config(
    dataset: Dataset,
    config: ml_collections.ConfigDict,
    *,
    evaluate: Callable[[SyntheticSet], float] | None = None,
    progress: bool = False,
) -> SyntheticSet:
    """The coreset a ``ddjax select`` config asks for (what the ``select`` stage runs).

    Args:
      dataset: the real dataset (``config.dataset``).
      config: a select config (``ddjax.config.select_config``); the difficulty methods also
        need the fields of :func:`difficulty_fields`.
      evaluate: the window search's ``synset -> score``; default: the mean test accuracy
        under ``config.eval`` (first architecture of ``config.eval.models``).
      progress: progress bars.

    Returns:
      The coreset; a searched window has the per-β scores in ``meta['window_search']``.
    """
    method = config.method
    check_method(method)
    common = dict(seed=config.seed, progress=progress)
    if method not in DIFFICULTY_METHODS:
        return select(
            dataset,
            method,
            config.ipc,
            features=config.features,
            feature_epochs=config.feature_epochs,
            feature_model=config.feature_model,
            **common,
        )
    fields = ("scores", "scores_higher", "experts_dir", "end", "beta", "betas")
    missing = [field for field in fields if field not in config]
    check(
        not missing,
        f"config.method={method!r} needs the difficulty fields {missing} "
        "(ddjax.select.difficulty_fields adds them to a select config)",
    )
    scores = difficulty_lib.scores_from_source(
        config.scores,
        higher=config.scores_higher,
        train_labels=dataset.y_train,
        experts_dir=config.experts_dir,
    )
    betas = tuple(config.betas)
    if method == "forgetting" or not betas:
        return select(
            dataset, method, config.ipc, scores=scores, end=config.end, beta=config.beta, **common
        )
    if evaluate is None:
        evaluate = _accuracy_under(dataset, config.eval, progress)
    search = search_window(dataset, scores, config.ipc, betas, evaluate=evaluate, progress=progress)
    return search.synset


def check_method(method: str) -> None:
    """Refuses a ``config.method`` that is not a selection method, naming the valid ones."""
    check(
        method in ALL_METHODS,
        f"config.method={method!r} is not a selection method; valid: {list(ALL_METHODS)}",
    )


def _accuracy_under(dataset: Dataset, eval_config: ml_collections.ConfigDict, progress: bool):
    """``synset -> mean test accuracy`` under a config's ``eval`` section."""
    settings = EvalSettings.from_config(eval_config)

    def accuracy(synset: SyntheticSet) -> float:
        return settings.evaluate(synset, dataset, settings.models[0], progress=progress).mean

    return accuracy


def run_select(config: ml_collections.ConfigDict, workdir: str) -> SyntheticSet:
    """``ddjax select``: a coreset saved as ``synset.npz`` + ``synset.png`` (then evaluated).

    Methods: random, herding, k-center, and the difficulty coresets (``forgetting``:
    hardest/easiest per class; ``window``: SelMatch's sliding window, β fixed or searched),
    see :func:`select_from_config`. The config, the data, the ``eval`` section and the
    difficulty scores are checked before the work directory is written.
    """
    validate.check_config(config)
    check_method(config.method)
    dataset = data_lib.load_from_config(config.dataset, stage="select")
    check_ipc(dataset, config.ipc)
    settings = EvalSettings.from_config(config.eval)
    if config.evaluate or tuple(config.get("betas", ())):
        settings.validate(dataset)
        validate.check_test_split(dataset, "select (config.evaluate or config.betas)")
    if config.method in ("herding", "kcenter"):
        check(
            config.features in FEATURES,
            f"config.features={config.features!r} is not known; valid: {list(FEATURES)}",
        )
        if config.features != "pixels":
            models_lib.get_model(config.feature_model, dataset.num_classes, dataset.image_shape)
    if config.method in DIFFICULTY_METHODS:
        # Read the scores now: a missing or mismatched scores file is refused before the
        # work directory is created.
        check("scores" in config, "config lacks the difficulty fields (select.difficulty_fields)")
        scores = difficulty_lib.scores_from_source(
            config.scores,
            higher=config.scores_higher,
            train_labels=dataset.y_train,
            experts_dir=config.experts_dir,
        )
        if config.method == "window":
            # Every window the run takes (config.beta, or each of config.betas) must fit in
            # every class; ranking the scores costs nothing next to the search.
            betas = tuple(config.betas)
            check(
                len(set(betas)) == len(betas),
                f"config.betas={list(betas)} repeats a value; give each β once",
            )
            for beta in betas or (config.beta,):
                _difficulty_indices(dataset, "window", config.ipc, scores, config.end, beta)
    work = Workdir(workdir, config, "select")
    synset_file = work.file("synset.npz")
    if synset_file.exists():
        synset = load_synset(synset_file)
    else:
        synset = select_from_config(dataset, config, progress=True)
        synset.save(synset_file)
        work.log(event="selected", method=config.method, ipc=config.ipc)
        if "window_search" in synset.meta:
            work.log(event="window_search", accuracy_by_beta=synset.meta["window_search"])
    save_grid(work.file("synset.png"), synset, dataset.to_pixels)
    print(f"{config.method} IPC {config.ipc}: {synset_file} ({len(synset.labels)} images)")
    if config.evaluate:
        evaluate_into(work, synset, dataset, settings)
    return synset
