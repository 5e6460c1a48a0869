"""The experts directory: settings, metadata, trajectories on disk, compatibility checks.

See :mod:`ddjax.experts` for the files. Everything here reads or writes that directory; the
training itself is :mod:`ddjax.experts.training`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ddjax import augment as augment_lib
from ddjax import checkpoint, distributed, train
from ddjax import models as models_lib
from ddjax.data import Dataset, StreamingDataset
from ddjax.errors import DDJaxError, check
from ddjax.workdir import write_json

FORMAT = 1
META_FILE = "experts.json"
FORGETTING_FILE = "forgetting.npz"
PARTIAL_DIR = "_partial"

#: Fields of ``experts.json`` that decide the trajectories. A run resumed into an existing
#: directory must agree on all of them; the others (num_experts, experts_at_once, pool_mode,
#: test_every, test_limit, checkpoint_every) may change between runs.
TRAINING_FIELDS = (
    "dataset",
    "zca",
    "mean",
    "std",
    "image_shape",
    "num_classes",
    "num_train",
    "train_labels_sha256",
    "model",
    "model_overrides",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "augment",
    "seed",
    "example_schedule",
)

Params = Any
Log = Callable[..., None]


# --------------------------------------------------------------------------------------------
# Settings and metadata
# --------------------------------------------------------------------------------------------


def check_settings(
    dataset: Dataset,
    *,
    model: str,
    model_overrides: dict | None,
    num_experts: int,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    augment: str,
    seed: int,
    pool_mode: str,
    experts_at_once: int,
    test_every: int,
    test_limit: int | None,
    checkpoint_every: int,
) -> nn.Module:
    """Validates the settings of :func:`train_experts`; returns the Flax model.

    Raises:
      DDJaxError: naming the first bad field, its value and what would be valid.
    """
    for field, value in (
        ("num_experts", num_experts),
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("experts_at_once", experts_at_once),
        ("test_every", test_every),
        ("checkpoint_every", checkpoint_every),
    ):
        _check_int(field, value, 1)
    if test_limit is not None:
        _check_int("test_limit", test_limit, 1)
    _check_int("seed", seed, 0)
    check(
        isinstance(lr, int | float) and math.isfinite(lr) and lr > 0,
        f"lr={lr!r} must be a positive number (MTT: 0.01)",
    )
    check(
        isinstance(momentum, int | float) and 0 <= momentum < 1,
        f"momentum={momentum!r} must be in [0, 1) (MTT: 0)",
    )
    check(
        isinstance(weight_decay, int | float) and weight_decay >= 0,
        f"weight_decay={weight_decay!r} must be >= 0 (MTT: 0)",
    )
    augment_lib.make_augment(augment)
    train.resolve_pool_mode(pool_mode)
    check(
        isinstance(model_overrides, dict | type(None)),
        f"model_overrides must be a dict, got {model_overrides!r}",
    )
    return models_lib.get_model(
        model, dataset.num_classes, dataset.image_shape, **(model_overrides or {})
    )


def _check_int(field: str, value: Any, minimum: int) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum
    check(ok, f"{field}={value!r} must be an integer >= {minimum}")


def _new_meta(dataset: Dataset, net, settings: dict) -> dict:
    """``experts.json`` for a new run (before any expert is complete)."""
    if isinstance(dataset, StreamingDataset):
        # A stream's labels are not read up front (a TFDS record is decoded to get its label):
        # the run is identified by its name and size.
        labels_hash, num_train = "stream", len(dataset.train)
    else:
        labels = np.ascontiguousarray(dataset.y_train)
        labels_hash, num_train = hashlib.sha256(labels.tobytes()).hexdigest(), len(labels)
    num_params = models_lib.count_params(models_lib.variable_shapes(net, dataset.image_shape))
    return {
        "format": FORMAT,
        "dataset": dataset.name,
        "zca": dataset.zca is not None,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
        "num_train": num_train,
        "train_labels_sha256": labels_hash[:16],
        "model": settings["model"],
        "model_overrides": dict(settings["model_overrides"] or {}),
        "num_params": num_params,
        **{k: settings[k] for k in ("epochs", "lr", "momentum", "weight_decay", "batch_size")},
        **{k: settings[k] for k in ("augment", "seed", "num_experts")},
        "completed": [],
        "experts": {},
    }


def read_meta(out_dir: str | os.PathLike) -> dict:
    """``out_dir/experts.json`` as a dict, with ``'path'`` (the directory) added.

    Raises:
      DDJaxError: if the directory holds no (readable) ``experts.json``.
    """
    file = Path(out_dir) / META_FILE
    check(
        file.is_file(),
        f"{out_dir} has no {META_FILE}: not an experts directory (create one with ddjax experts)",
    )
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DDJaxError(f"{file} cannot be read: {e}") from None
    check(
        isinstance(meta, dict) and meta.get("format") == FORMAT,
        f"{file} is not an experts.json of format {FORMAT}",
    )
    return {**meta, "path": str(out_dir)}


def completed(out_dir: str | os.PathLike) -> list[int]:
    """Indices of the experts whose trajectories are complete, sorted."""
    meta = read_meta(out_dir)
    return sorted(i for i in meta["completed"] if checkpoint.exists(expert_dir(out_dir, i)))


def expert_dir(out_dir: str | os.PathLike, index: int) -> Path:
    """The checkpoint directory of expert ``index``."""
    return Path(out_dir) / f"expert_{index:04d}"


def damage_remedy(out_dir: str | os.PathLike, index: int) -> str:
    """What to do about a damaged trajectory of expert ``index`` (ends the error message)."""
    return (
        f"remove {expert_dir(out_dir, index)} and re-run the ddjax experts command that made "
        f"{out_dir} (same config and --workdir) to train expert {index} again"
    )


def verify_trajectories(out_dir: str | os.PathLike, indices: Sequence[int]) -> None:
    """Checks that the trajectories of experts ``indices`` are intact, without loading them.

    Each checkpoint's files against the sizes and SHA-256s recorded when it was saved
    (:func:`ddjax.checkpoint.verify`): a stage runs this over every expert it will use before
    it writes anything, so that a damaged file is one line up front, not a failure hours in.

    Raises:
      DDJaxError: naming the damaged file and how to re-create the expert.
    """
    for index in indices:
        checkpoint.verify(expert_dir(out_dir, index), remedy=damage_remedy(out_dir, index))


def fingerprint(out_dir: str | os.PathLike, indices: Sequence[int]) -> str:
    """SHA-256 standing for the trajectories of experts ``indices`` (what a run used).

    Built from each checkpoint's record of its files' SHA-256s (:data:`ddjax.checkpoint
    .MANIFEST`, written when it was saved), so nothing of the trajectories is read; an expert
    saved before such records existed counts by its file sizes. An expert trained again with
    other values, or another set of experts, gives another fingerprint.
    """
    sha = hashlib.sha256()
    for index in indices:
        directory = Path(expert_dir(out_dir, index))
        record = directory / checkpoint.MANIFEST
        if record.is_file():
            content = record.read_bytes()
        else:
            sizes = sorted(
                (str(f.relative_to(directory)), f.stat().st_size)
                for f in directory.rglob("*")
                if f.is_file()
            )
            content = json.dumps(sizes).encode()
        sha.update(f"{index}\0".encode() + content + b"\0")
    return sha.hexdigest()


def _write_meta(out_dir: Path, meta: dict) -> None:
    write_json(out_dir / META_FILE, {k: v for k, v in meta.items() if k != "path"})


def _check_same_training(saved: dict, current: dict, out_dir: Path) -> None:
    for field in TRAINING_FIELDS:
        if saved.get(field) != current[field]:
            raise DDJaxError(
                f"{out_dir} holds experts trained with {field}={saved.get(field)!r}; this run "
                f"has {field}={current[field]!r} (use another out_dir or the same settings)"
            )


def check_compatible(
    meta: dict,
    *,
    dataset_name: str,
    zca: bool,
    model: str,
    model_overrides: dict | None,
    image_shape: Sequence[int],
    num_classes: int,
    min_epochs: int,
    min_epochs_reason: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Checks that experts (``read_meta(out_dir)``) can guide a distillation run.

    Args:
      meta: from :func:`read_meta`.
      dataset_name, zca, model, model_overrides, image_shape, num_classes: the run's.
      min_epochs: the epochs the run needs (MTT: ``max_start_epoch + expert_epochs``).
      min_epochs_reason: what needs them, for the message, e.g.
        ``'max_start_epoch + expert_epochs = 22'`` (default ``'this run'``).
      mean, std: the run's normalisation constants (``Dataset.mean``/``.std``); checked when
        given, since the same dataset name can be loaded with other constants (``folder:``
        data with ``normalisation='computed'`` or ``'tiny_imagenet'``).

    Raises:
      DDJaxError: one line naming the first mismatching field and both values, or saying that
        no expert is complete yet.
    """
    where = f"experts in {meta.get('path', 'the experts directory')}"
    mine = {
        "dataset": dataset_name,
        "model": model,
        "model_overrides": dict(model_overrides or {}),
        "image_shape": list(image_shape),
        "num_classes": num_classes,
    }
    check(
        meta["dataset"] == dataset_name,
        f"{where} were trained on dataset={meta['dataset']!r}, this run uses {dataset_name!r}",
    )
    if bool(meta["zca"]) != bool(zca):
        state = {True: "on", False: "off"}
        raise DDJaxError(
            f"{where} were trained with ZCA {state[bool(meta['zca'])]}, this run has ZCA "
            f"{state[bool(zca)]} (ZCA must match; set dataset.zca={bool(meta['zca'])})"
        )
    for field in ("model", "model_overrides", "image_shape", "num_classes"):
        check(
            meta[field] == mine[field],
            f"{where} were trained with {field}={meta[field]!r}, this run uses {mine[field]!r}",
        )
    for field, values in (("mean", mean), ("std", std)):
        if values is not None and not np.allclose(meta[field], values, rtol=1e-6, atol=1e-7):
            raise DDJaxError(
                f"{where} were trained on images normalised with {field}={meta[field]}, this "
                f"run uses {field}={[float(v) for v in values]} (dataset.normalisation must match)"
            )
    reason = min_epochs_reason or "this run"
    check(
        meta["epochs"] >= min_epochs,
        f"{reason} needs at least {min_epochs} epochs, {where} have {meta['epochs']}",
    )
    check(bool(meta["completed"]), f"{where}: none is complete yet (run ddjax experts first)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def trajectory_shapes(meta: dict) -> Params:
    """The ``params`` tree of one trajectory as ``jax.ShapeDtypeStruct`` (``[epochs+1, ...]``).

    The dtype is the model's (:func:`ddjax.models.float_dtype`): the float32 files load as
    float64 under ``jax_enable_x64``, the dtype distillation's state then has.
    """
    net = models_lib.get_model(
        meta["model"], meta["num_classes"], tuple(meta["image_shape"]), **meta["model_overrides"]
    )
    shapes = models_lib.variable_shapes(net, tuple(meta["image_shape"]))["params"]
    device = jax.sharding.SingleDeviceSharding(distributed.local_device())
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((meta["epochs"] + 1, *s.shape), s.dtype, sharding=device),
        shapes,
    )


def load_trajectory(out_dir: str | os.PathLike, index: int) -> Params:
    """Expert ``index``'s ``params`` with a leading epoch axis ``[epochs + 1, ...]`` (NumPy)."""
    return jax.tree.map(lambda x: x[0], load_trajectories(out_dir, [index]))


def load_trajectories(
    out_dir: str | os.PathLike, indices: Sequence[int], *, as_numpy: bool = True
) -> Params:
    """The ``params`` of several experts, stacked: leaves ``[len(indices), epochs + 1, ...]``.

    Experts are stacked in the order of ``indices`` (repeats allowed). Distillation loads a
    subset at a time to stay inside memory, as MTT loads one ``replay_buffer_*.pt`` at a time;
    only one expert more than the result is held while loading.

    Args:
      out_dir: an experts directory.
      indices: completed experts (see :func:`completed`).
      as_numpy: host NumPy arrays (default) or arrays on the default device.

    Returns:
      The ``params`` pytree (float32) of the model the experts were trained as.

    Raises:
      DDJaxError: an index that is not a completed expert (naming the completed ones).
    """
    meta = read_meta(out_dir)
    done = set(completed(out_dir))
    indices = [int(i) for i in indices]
    check(len(indices) >= 1, "load_trajectories: no expert indices given")
    for i in indices:
        check(
            i in done,
            f"expert {i} is not a completed expert in {out_dir} "
            f"(completed: {_ranges(sorted(done)) or 'none'})",
        )
    like = {"params": trajectory_shapes(meta)}
    stacked = jax.tree.map(lambda s: np.empty((len(indices), *s.shape), s.dtype), like["params"])
    for row, i in enumerate(indices):
        remedy = damage_remedy(out_dir, i)
        one = checkpoint.load_tree(expert_dir(out_dir, i), like, remedy=remedy)["params"]
        _put(stacked, row, one)
    return stacked if as_numpy else jax.device_put(stacked)


def forgetting_scores(out_dir: str | os.PathLike) -> np.ndarray:
    """Mean forgetting count over the completed experts, per train example (train order).

    Never-learned examples count ``epochs`` (see the module docstring); higher is harder.

    Returns:
      float32 ``(n_train,)``.
    """
    file = Path(out_dir) / FORGETTING_FILE
    check(file.is_file(), f"{out_dir} has no {FORGETTING_FILE} (no expert is complete yet)")
    with np.load(file) as saved:
        return saved["mean"].astype(np.float32)


def _put(out: Params, index, values: Params) -> None:
    """``out[index] = values`` leaf by leaf (NumPy buffers, in place)."""
    for buffer, value in zip(jax.tree.leaves(out), jax.tree.leaves(values), strict=True):
        buffer[index] = np.asarray(value)


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    parts, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def summary(meta: dict) -> dict:
    """Completed experts and their final test accuracy (mean, std over experts)."""
    finals = [meta["experts"][str(i)]["final_test_accuracy"] for i in meta["completed"]]
    return {
        "num_experts": meta["num_experts"],
        "completed": len(meta["completed"]),
        "epochs": meta["epochs"],
        "final_test_accuracy_mean": float(np.mean(finals)) if finals else None,
        "final_test_accuracy_std": float(np.std(finals)) if finals else None,
    }
