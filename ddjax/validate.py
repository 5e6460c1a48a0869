"""Checks of a stage's whole input, run before its work directory is created.

Every stage's run function starts with :func:`check_config` (the config's values) and then
checks its inputs with the small shared checks below (synthetic sets, test splits, experts
against the run), all before :class:`ddjax.workdir.Workdir` writes anything. A refusal is one
:class:`ddjax.errors.DDJaxError` naming the field or file, the value and what would be valid;
the CLI prints it as one line and exits with code 2, leaving no work directory behind.

Config values are checked in the dtype they are used in: the optimising steps compute in
float32, so ``1e39`` (finite in float64, ``inf`` in float32) is refused like ``1e400``
(which Python parses as ``inf``). :data:`RULES` states, once for every stage, what each field
name means: learning rates are positive, counts are positive integers, probabilities lie in
[0, 1], momenta in [0, 1). A field a stage's config lacks is simply not checked.

Stale results: a stage records its inputs' fingerprints (SHA-256 of the files, or of the
arrays) in ``results.json['inputs']`` and, on a re-run, compares them (:func:`changed_inputs`):
``ddjax evaluate`` says which input changed and recomputes; ``ddjax recover`` and ``ddjax
relabel``, whose outputs mix with the old ones, refuse before touching the work directory
(:func:`check_workdir_inputs`).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from ddjax import loop
from ddjax.errors import DDJaxError, check

#: float32's largest finite value: the optimising steps compute in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The largest integer config value: seeds become JAX PRNG keys, counts step counters.
INT32_MAX = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite(field: str, value: Any) -> None:
    """A number that is finite in float32 (what the steps compute in).

    Each rule takes the name the message gives the value (``'config.lr_img'``, ``'--epochs'``).
    """
    check(_is_number(value), f"{field}={value!r} must be a number")
    check(
        math.isfinite(value) and abs(value) <= FLOAT32_MAX,
        f"{field}={value!r} is not finite in float32 (|value| <= {FLOAT32_MAX:.4g}), "
        "the dtype it is used in",
    )


def positive(field: str, value: Any) -> None:
    """A positive number, finite in float32 (learning rates, temperatures)."""
    check(
        _is_number(value) and math.isfinite(value) and 0 < value <= FLOAT32_MAX,
        f"{field}={value!r} must be a positive number, finite in float32 (<= {FLOAT32_MAX:.4g})",
    )


def non_negative(field: str, value: Any) -> None:
    """A number >= 0, finite in float32 (weight decay, loss multipliers)."""
    finite(field, value)
    check(value >= 0, f"{field}={value!r} must be >= 0")


def probability(field: str, value: Any) -> None:
    """A number in [0, 1] (fractions, window starts)."""
    finite(field, value)
    check(0 <= value <= 1, f"{field}={value!r} must be in [0, 1]")


def momentum(field: str, value: Any) -> None:
    """A momentum coefficient in [0, 1)."""
    finite(field, value)
    check(0 <= value < 1, f"{field}={value!r} must be in [0, 1)")


def count(field: str, value: Any) -> None:
    """A positive integer (sizes, epochs, iterations, numbers of models) that fits int32."""
    _integer(field, value, 1)


def index(field: str, value: Any) -> None:
    """An integer >= 0 (seeds, epochs that may be zero) that fits int32."""
    _integer(field, value, 0)


def _integer(field: str, value: Any, low: int) -> None:
    check(_is_int(value) and value >= low, f"{field}={value!r} must be an integer >= {low}")
    check(
        value <= INT32_MAX,
        f"{field}={value!r} must be <= {INT32_MAX} (int32: JAX's PRNG seeds and step counters)",
    )


def each(rule: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """``rule`` applied to every element of a tuple field."""

    def check_each(field: str, values: Any) -> None:
        for i, value in enumerate(values):
            rule(f"{field}[{i}]", value)

    return check_each


#: What a field name means, the same in every stage's config (``section.field`` for fields of
#: a section). Unset fields (``None``) and fields a config lacks are not checked.
RULES: dict[str, Callable[[str, Any], None]] = {
    # Learning rates (of images, labels, the learned lr, students, teachers, experts).
    **dict.fromkeys(
        ("lr", "lr_img", "lr_lr", "lr_teacher", "lr_y", "eval.lr", "recipe.lr"), positive
    ),
    # Sizes and lengths.
    **dict.fromkeys(
        (
            "ipc",
            "iterations",
            "epochs",
            "batch_size",
            "batch_syn",
            "num_experts",
            "experts_at_once",
            "experts_in_memory",
            "syn_steps",
            "expert_epochs",
            "max_start_epoch",
            "feature_epochs",
            "test_limit",
            "log_every",
            "keep_checkpoints",
            "num_classes",
            "image_size",
            "eval.num_models",
            "eval.epochs",
            "eval.batch_size",
            "kd.epochs",
            "kd.batch_size",
            "kd.accumulate",
            "recipe.epochs",
            "recipe.batch_size",
            "recipe.accumulate",
            "dataset.train_limit",
            "dataset.image_size",
        ),
        count,
    ),
    **dict.fromkeys(
        (
            "seed",
            "eval.seed",
            "kd.seed",
            "warmup_epochs",
            "recipe.warmup_epochs",
            "min_start_epoch",
        ),
        index,
    ),
    **dict.fromkeys(
        (
            "alpha",
            "warmup_start_factor",
            "recipe.warmup_start",
            "recipe.min_scale",
            "recipe.max_scale",
            "example_schedule.init_ratio",
            "example_schedule.rm_easy_ratio_first",
            "example_schedule.rm_easy_ratio_second",
        ),
        probability,
    ),
    # SelMatch's window start floor(ipc * beta) in the hardest-first ranking: beta >= 0 (it may
    # exceed 1 when a class has many more images than ipc; the data decides the upper end).
    "beta": non_negative,
    "betas": each(non_negative),
    "crop_scale": each(probability),
    **dict.fromkeys(("momentum", "momentum_y", "recipe.momentum"), momentum),
    **dict.fromkeys(
        (
            "weight_decay",
            "recipe.weight_decay",
            "r_bn",
            "first_bn_multiplier",
            "lr_floor",
            "threshold",
            "recipe.cutmix_alpha",
            "recipe.mixup_alpha",
        ),
        non_negative,
    ),
    "recipe.temperature": positive,
}


def _leaves(node: Mapping, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses, in one line, the first config value that is out of range or not finite.

    Every number anywhere in the config (also inside tuples) must be finite in float32; the
    fields named in :data:`RULES` must satisfy their rule. Run by every stage first, before any
    data is read or anything is written.

    Raises:
      DDJaxError: naming the field, its value and what would be valid.
    """
    for field, value in _leaves(config):
        rule = RULES.get(field)
        if rule is not None and value is not None:
            rule(f"config.{field}", value)  # each rule also requires a finite float32 value
            continue
        values = value if isinstance(value, tuple | list) else (value,)
        for i, item in enumerate(values):
            if _is_number(item) and not _is_int(item):
                finite(f"config.{field}" if value is item else f"config.{field}[{i}]", item)


# --------------------------------------------------------------------------------------------
# Inputs: synthetic sets, datasets, experts
# --------------------------------------------------------------------------------------------


def check_synset_values(
    images: np.ndarray, labels: np.ndarray, num_classes: int, source: str
) -> None:
    """Refuses a synthetic set that no stage can train on (``source`` names it).

    An empty set, non-finite pixels, hard labels outside ``0 .. num_classes - 1`` or not
    integers, and soft labels of another width than ``num_classes`` or not finite. The stored
    learning rate is checked where it is used (:func:`check_learning_rate`).
    """
    check(
        _is_int(num_classes) and num_classes >= 1,
        f"{source}: num_classes={num_classes!r} must be an integer >= 1",
    )
    check(len(labels) > 0 and images.shape[0] > 0, f"{source}: the synthetic set is empty")
    bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    check(bad == 0, f"{source}: {bad} of {np.size(images)} pixels are not finite (NaN or inf)")
    if labels.ndim == 1:
        check(
            np.issubdtype(labels.dtype, np.integer),
            f"{source}: hard labels must be integers, got dtype {labels.dtype}",
        )
        low, high = int(labels.min()), int(labels.max())
        check(
            0 <= low and high < num_classes,
            f"{source}: labels range over {low}..{high}, outside the classes 0..{num_classes - 1}",
        )
    else:
        check(
            labels.shape[1] == num_classes,
            f"{source}: soft labels have {labels.shape[1]} columns, the set has {num_classes} "
            "classes",
        )
        check(bool(np.all(np.isfinite(labels))), f"{source}: soft labels are not all finite")


def check_learning_rate(learning_rate: float, source: str) -> None:
    """Refuses a set's stored (learned) learning rate that training cannot use."""
    check(
        math.isfinite(learning_rate) and 0 < learning_rate <= FLOAT32_MAX,
        f"{source}: the stored learning rate {learning_rate!r} must be a positive number, "
        "finite in float32 (or set --config.eval.lr)",
    )


def check_fits(synset, dataset, source: str) -> None:
    """Refuses a set whose image shape or class count is not the dataset's."""
    shape = tuple(synset.images.shape[1:])
    check(
        shape == tuple(dataset.image_shape),
        f"{source}: images have shape {shape} but dataset {dataset.name!r} has "
        f"{tuple(dataset.image_shape)}",
    )
    check(
        synset.num_classes == dataset.num_classes,
        f"{source}: {synset.num_classes} classes, dataset {dataset.name!r} has "
        f"{dataset.num_classes}",
    )


def check_test_split(dataset, stage: str) -> None:
    """Refuses a dataset without test images where ``stage`` tests on them."""
    test = getattr(dataset, "y_test", None)
    if test is None:  # a stream: its test split is checked when it is opened
        return
    check(
        len(test) > 0,
        f"dataset {dataset.name!r} has no test images; {stage} tests on them (give x_test/y_test)",
    )


def check_experts_data(meta: dict, dataset) -> None:
    """Refuses experts trained on other training images than the run's (``train_limit``).

    ``experts.json`` records the number of training images and a hash of their labels; a
    distillation whose ``dataset.train_limit`` (or data) differs would match trajectories of
    other data.
    """
    where = f"experts in {meta.get('path', 'the experts directory')}"
    labels = np.ascontiguousarray(dataset.y_train)
    num_train = len(labels)
    if meta.get("num_train") is not None:
        check(
            meta["num_train"] == num_train,
            f"{where} were trained on {meta['num_train']} training images, this run has "
            f"{num_train} (config.dataset.train_limit must match the experts')",
        )
    digest = hashlib.sha256(labels.tobytes()).hexdigest()[:16]
    recorded = meta.get("train_labels_sha256")
    if recorded not in (None, "stream"):
        check(
            recorded == digest,
            f"{where} were trained on other training labels (sha256 {recorded}, this run's "
            f"{digest}): not the same dataset or train_limit",
        )


# --------------------------------------------------------------------------------------------
# Stale results
# --------------------------------------------------------------------------------------------


def digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (their relative names and contents).

    A synthetic folder (:mod:`ddjax.synfolder`: 50,000 JPEGs at ImageNet scale) is not read:
    its fingerprint over the SHA-256s recorded when its batches were written stands for it
    (every image read is checked against those).
    """
    path = Path(path)
    from ddjax import synfolder  # imports JAX: only when a folder is given

    if path.is_dir() and synfolder.is_synfolder(path):
        return "synfolder:" + synfolder.open_synfolder(path).fingerprint
    sha = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            sha.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()


def input_digests(inputs: Mapping[str, str | os.PathLike | None]) -> dict[str, str]:
    """``{name: SHA-256}`` of the given input paths (unset ones left out)."""
    return {name: digest(path) for name, path in inputs.items() if path}


def changed_inputs(results: dict, digests: Mapping[str, str]) -> list[str]:
    """The inputs whose digest differs from the one recorded in ``results['inputs']``.

    Results written before inputs were recorded (no ``'inputs'``) cannot be judged: nothing is
    reported, and the caller records the current digests.
    """
    recorded = results.get("inputs")
    if recorded is None:
        return []
    return sorted(name for name in digests if recorded.get(name) != digests[name])


def check_unchanged(results: dict, digests: Mapping[str, str], files: Mapping[str, Any]) -> None:
    """Refuses results computed from input files that have changed since.

    Args:
      results: the stage's ``results.json``.
      digests: the inputs' current :func:`input_digests`.
      files: ``{name: what the message calls it}`` (e.g. ``'config.synset runs/a/synset.npz'``).
    """
    changed = changed_inputs(results, digests)
    if changed:
        names = ", ".join(str(files[name]) for name in changed)
        raise DDJaxError(
            f"{names} changed since the results in this work directory were computed; "
            "use a new --workdir"
        )


def check_workdir_inputs(
    workdir: str | os.PathLike, digests: Mapping[str, str], names: Mapping[str, Any]
) -> None:
    """:func:`check_unchanged` against ``WORKDIR/results.json``, if there is one (run before
    :class:`ddjax.workdir.Workdir`, which creates the directory).

    Args:
      workdir: the run's work directory (it may not exist).
      digests: the inputs' current fingerprints, which the stage records in
        ``results['inputs']``.
      names: ``{name: what the message calls it}``.
    """
    file = Path(workdir) / "results.json"
    if file.is_file():
        check_unchanged(loop.read_json(file, what=f"the work directory {workdir}"), digests, names)
