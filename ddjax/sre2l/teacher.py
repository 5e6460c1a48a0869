"""The SRe2L teacher on disk: a BatchNorm network, its running statistics and its data contract.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) recovers images by matching a *squeezed* teacher's
BatchNorm running statistics, then relabels them with the same teacher's soft predictions
(``research/sre2l.md`` §2-§4). Everything after squeeze therefore needs three things from the
teacher: the architecture, the ``params`` and ``batch_stats`` collections, and the exact data
space it was trained in (dataset, image shape, classes, mean/std or ZCA). A teacher directory
holds all three::

    PATH/variables/       Orbax tree {'params': ..., 'batch_stats': ...}
    PATH/teacher.json     model name and overrides, dataset contract, extra numbers

:func:`save_teacher` writes both into a temporary directory and renames it into place, so a
killed save never leaves a directory that :func:`load_teacher` would take for a teacher.
:func:`check_teacher` refuses to use a teacher with data it was not trained on (recovering with
a CIFAR-100 teacher from CIFAR-10 images, or a ZCA teacher from plain ones, fails silently
otherwise). :func:`import_torch_teacher` brings in a PyTorch-trained network: SRe2L's own
CIFAR/Tiny-ImageNet squeeze checkpoints (torchvision ``resnet18`` with ``conv1 =
Conv2d(3, 64, 3, 1, 1, bias=False)`` and no max-pool) or torchvision's pretrained ImageNet
ResNet-18, which is SRe2L's ImageNet-1K teacher (squeeze is not re-run on ImageNet). The data
contract of an imported teacher is either a loaded dataset or a
:class:`~ddjax.sre2l.contract.DataContract` of the published facts (classes, image shape,
mean/std); ``ddjax teacher`` (:mod:`ddjax.sre2l.teacher_import`) does the ImageNet import from the
command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax import checkpoint, distributed, guard, loop
from ddjax import models as models_lib
from ddjax.data import Dataset
from ddjax.errors import DDJaxError, check
from ddjax.sre2l.contract import DataContract
from ddjax.workdir import write_json

__all__ = [
    "META_FILE",
    "VARIABLES_DIR",
    "Teacher",
    "check_teacher",
    "file_sha256",
    "has_batchnorm",
    "import_torch_teacher",
    "load_teacher",
    "save_teacher",
]

FORMAT = 1
META_FILE = "teacher.json"
VARIABLES_DIR = "variables"

# Keys under which PyTorch training scripts nest the model's state_dict in their checkpoints:
# SRe2L's squeeze_cifar.py ('state_dict'), torchvision's reference train.py used for the
# Tiny-ImageNet teacher ('model'), kuangliu/pytorch-cifar ('net').
_NESTED_STATE_DICT_KEYS = ("state_dict", "model", "net")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained network with its variables and the data contract it was trained under.

    Attributes:
      model: the Flax module (``ddjax.models``), built from ``meta['model']`` and
        ``meta['model_overrides']``.
      variables: ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only for BatchNorm
        models); apply in eval mode with ``model.apply(variables, images, train=False)``.
      meta: the contents of ``teacher.json`` (see :func:`save_teacher`), plus ``'path'`` when
        loaded from disk.
    """

    model: nn.Module
    variables: dict
    meta: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images the teacher takes."""
        height, width, channels = self.meta["image_shape"]
        return int(height), int(width), int(channels)

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        return int(self.meta["num_classes"])


def has_batchnorm(variables: Mapping[str, Any]) -> bool:
    """Whether ``variables`` hold BatchNorm running statistics (what SRe2L's recover matches).

    Args:
      variables: a model's variables dict.

    Returns:
      True if there is a non-empty ``'batch_stats'`` collection.
    """
    return bool(jax.tree.leaves(variables.get("batch_stats", {})))


def _zca_fingerprint(dataset: Dataset | DataContract) -> str | None:
    """A short hash of the ZCA whitening matrix: two ZCA fits agree only if these agree."""
    if dataset.zca is None:
        return None
    whiten = np.ascontiguousarray(np.asarray(dataset.zca.whiten, np.float32))
    return hashlib.sha256(whiten.tobytes()).hexdigest()[:16]


def _build_model(model_name: str, overrides: Mapping[str, Any] | None, dataset_meta: dict):
    check(
        isinstance(overrides, Mapping | type(None)),
        f"model_overrides must be a dict of model fields, got {overrides!r}",
    )
    return models_lib.get_model(
        model_name,
        int(dataset_meta["num_classes"]),
        tuple(int(s) for s in dataset_meta["image_shape"]),
        **dict(overrides or {}),
    )


def _meta(
    model_name: str,
    model_overrides: Mapping[str, Any] | None,
    model: nn.Module,
    dataset: Dataset | DataContract,
    extra: Mapping[str, Any] | None,
) -> dict:
    """``teacher.json`` for a model trained (or imported) on ``dataset``."""
    shapes = models_lib.variable_shapes(model, dataset.image_shape)
    meta = {
        "format": FORMAT,
        "model": model_name,
        "model_overrides": dict(model_overrides or {}),
        "batchnorm": bool(jax.tree.leaves(shapes.get("batch_stats", {}))),
        "num_params": models_lib.count_params(shapes),
        "dataset": dataset.name,
        "zca": dataset.zca is not None,
        "zca_sha256": _zca_fingerprint(dataset),
        # How pixels in [0, 1] were mapped to the teacher's input space.
        "normalisation": "zca" if dataset.zca is not None else "mean_std",
        "mean": [float(m) for m in dataset.mean],
        "std": [float(s) for s in dataset.std],
        "image_shape": [int(s) for s in dataset.image_shape],
        "num_classes": int(dataset.num_classes),
        "extra": dict(extra or {}),
    }
    # Round-trip through JSON now, so that a value JSON cannot hold fails before any file is
    # written and the in-memory meta equals what load_teacher will read back.
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise DDJaxError(f"teacher extra must be JSON-serialisable: {e}") from None


def _check_variables(
    variables: Any, model: nn.Module, model_name: str, image_shape, what: str
) -> dict:
    """Checks ``variables`` against the model's own shapes; returns them as a plain dict."""
    check(isinstance(variables, Mapping), f"{what} must be a dict of collections")
    expected = models_lib.variable_shapes(model, image_shape)
    variables = {name: variables[name] for name in expected if name in variables}
    missing = sorted(set(expected) - set(variables))
    check(not missing, f"{what} lack the collection(s) {missing} that {model_name} has")
    got_def = jax.tree.structure(variables)
    want_def = jax.tree.structure(expected)
    check(
        got_def == want_def,
        f"{what} do not have the layers of {model_name}: {got_def} vs {want_def}",
    )
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(expected), strict=True
    ):
        shape = tuple(np.shape(got))
        check(
            shape == tuple(want.shape),
            f"{what}{jax.tree_util.keystr(path)} has shape {shape}, expected "
            f"{tuple(want.shape)} for {model_name} at image_shape {tuple(image_shape)}",
        )
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


def save_teacher(
    path: str | os.PathLike,
    *,
    model_name: str,
    model_overrides: dict,
    variables: Mapping[str, Any],
    dataset: Dataset | DataContract,
    extra: dict | None = None,
) -> None:
    """Writes a teacher directory: Orbax ``variables/`` and ``teacher.json``, atomically.

    ``teacher.json`` records ``model`` and ``model_overrides`` (to rebuild the module with
    :func:`ddjax.models.get_model`), ``dataset`` (the source name), ``zca`` and ``zca_sha256``
    (a hash of the whitening matrix), ``normalisation`` (``'zca'`` or ``'mean_std'``), ``mean``,
    ``std``, ``image_shape``, ``num_classes``, ``batchnorm``, ``num_params`` and ``extra``
    (e.g. ``{'test_accuracy': 0.78}``). An existing teacher at ``path`` is replaced. Variables
    are stored as float32 (float64 ones, from an import under ``jax_enable_x64``, are rounded).

    The files are written into a hidden sibling directory that is renamed to ``path`` only when
    complete; a kill leaves either the old teacher, the new one, or none -- never half of one.

    Args:
      path: the teacher directory.
      model_name: a :func:`ddjax.models.get_model` name, e.g. ``'ResNet18BN'``.
      model_overrides: model fields replacing the name's settings, e.g.
        ``{'conv_init': 'torchvision'}``.
      variables: ``{'params': ..., 'batch_stats': ...}`` of that model.
      dataset: the data the teacher was trained on, or its
        :class:`~ddjax.sre2l.contract.DataContract` (its name, shape, classes and mean/std
        are recorded).
      extra: JSON-serialisable numbers to keep beside (e.g. the final test accuracy).

    Raises:
      DDJaxError: unknown model, variables that do not fit it or are not finite (NaN or
        inf: a teacher is never saved so), or a non-JSON ``extra``.
    """
    dataset_meta = {"num_classes": dataset.num_classes, "image_shape": dataset.image_shape}
    model = _build_model(model_name, model_overrides, dataset_meta)
    variables = _check_variables(
        variables, model, model_name, dataset.image_shape, "teacher variables"
    )
    guard.check_finite(
        variables, f"the teacher for {path}", "it is not saved (see ddjax.guard); train again"
    )
    meta = _meta(model_name, model_overrides, model, dataset, extra)

    def write(staging: Path) -> None:
        checkpoint.save_tree(staging / VARIABLES_DIR, variables)
        write_json(staging / META_FILE, meta)

    # The whole teacher replaces an old one at once (variables and teacher.json together).
    checkpoint.replace_directory(path, write)


def _read_meta(path: Path) -> dict:
    file = path / META_FILE
    check(
        path.is_dir() and file.is_file(),
        f"{path} is not a ddjax teacher (no {META_FILE}); train one with ddjax squeeze or "
        "import a PyTorch one with ddjax teacher (or ddjax.sre2l.teacher.import_torch_teacher)",
    )
    meta = loop.read_json(file, what="the teacher")
    required = ("model", "model_overrides", "dataset", "zca", "mean", "std", "image_shape")
    missing = [k for k in (*required, "num_classes") if not isinstance(meta, dict) or k not in meta]
    check(
        isinstance(meta, dict) and meta.get("format") == FORMAT and not missing,
        f"{file} is not a teacher.json of format {FORMAT} (missing {missing or ['format']})",
    )
    return meta


def load_teacher(path: str | os.PathLike) -> Teacher:
    """Reads a teacher directory written by :func:`save_teacher`.

    Args:
      path: the teacher directory.

    Returns:
      The :class:`Teacher`, its variables on the default device, ``meta['path']`` set.

    Raises:
      DDJaxError: a missing directory or ``teacher.json``, a corrupt or incomplete
        ``variables/`` checkpoint, variables that do not fit the recorded model, or
        variables with a NaN or inf (recover, relabel and KD refuse such a teacher before
        their work directory exists).
    """
    path = Path(path).absolute()
    meta = _read_meta(path)
    model = _build_model(meta["model"], meta["model_overrides"], meta)
    image_shape = tuple(int(s) for s in meta["image_shape"])
    device = jax.sharding.SingleDeviceSharding(distributed.local_device())
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        models_lib.variable_shapes(model, image_shape),
    )
    variables_dir = path / VARIABLES_DIR
    # An imported teacher records its source file; a squeezed one was made by ddjax squeeze.
    source = meta.get("extra", {}).get("file") if isinstance(meta.get("extra"), dict) else None
    remedy = f"re-create the teacher {path} with the command that made it " + (
        f"(ddjax teacher, from {source})" if source else "(ddjax squeeze or ddjax teacher)"
    )
    check(
        checkpoint.exists(variables_dir),
        f"{variables_dir} is not a complete checkpoint; the teacher at {path} is corrupt: {remedy}",
    )
    try:
        variables = checkpoint.load_tree(variables_dir, abstract, remedy=remedy)
    except DDJaxError:
        raise
    except (OSError, RuntimeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DDJaxError(
            f"teacher variables in {variables_dir} cannot be read ({message}); {remedy}"
        ) from None
    guard.check_finite(
        variables,
        f"teacher {path}",
        "it cannot be used; re-create it (ddjax squeeze, e.g. with a smaller lr)",
    )
    return Teacher(model=model, variables=dict(variables), meta={**meta, "path": str(path)})


def check_teacher(teacher: Teacher, dataset: Dataset | DataContract) -> None:
    """Checks that ``teacher`` was trained on ``dataset``'s data space.

    Compared: dataset name, ZCA (on/off and the whitening matrix), image shape, number of
    classes and the mean/std normalisation constants.

    Args:
      teacher: from :func:`load_teacher`, :func:`import_torch_teacher` or squeeze.
      dataset: the data a stage is about to use with the teacher (a loaded or streamed
        dataset, or a :class:`~ddjax.sre2l.contract.DataContract`).

    Raises:
      DDJaxError: one line naming the first field that differs and both values.
    """
    meta = teacher.meta
    where = f"teacher {meta['path']}" if meta.get("path") else "the teacher"
    check(
        meta["dataset"] == dataset.name,
        f"{where} was trained on dataset={meta['dataset']!r}, this run uses {dataset.name!r}",
    )
    zca = dataset.zca is not None
    if bool(meta["zca"]) != zca:
        state = {True: "on", False: "off"}
        raise DDJaxError(
            f"{where} was trained with ZCA {state[bool(meta['zca'])]}, this run has ZCA "
            f"{state[zca]} (set dataset.zca={bool(meta['zca'])})"
        )
    fingerprint = _zca_fingerprint(dataset)
    check(
        meta.get("zca_sha256") == fingerprint,
        f"{where} was trained with a different ZCA fit (whitening hash "
        f"{meta.get('zca_sha256')} vs {fingerprint}); use the same train split and zca_eps",
    )
    for field, mine in (
        ("image_shape", list(dataset.image_shape)),
        ("num_classes", dataset.num_classes),
    ):
        check(
            meta[field] == mine,
            f"{where} takes {field}={meta[field]!r}, this run's data has {mine!r}",
        )
    for field, values in (("mean", dataset.mean), ("std", dataset.std)):
        if not np.allclose(meta[field], values, rtol=1e-6, atol=1e-7):
            raise DDJaxError(
                f"{where} was trained on images normalised with {field}={meta[field]}, this run "
                f"uses {field}={[float(v) for v in values]} (dataset.normalisation must match)"
            )


def _load_torch_file(path: Path) -> Any:
    check(path.is_file(), f"PyTorch checkpoint {path} does not exist")
    try:
        import torch
    except ImportError:
        raise DDJaxError(
            f"reading {path} needs PyTorch (pip install torch); or pass the state_dict itself "
            "as a dict of numpy arrays"
        ) from None
    try:
        # weights_only: never run pickled code from a checkpoint. torchvision's reference
        # train.py (the Tiny-ImageNet teacher) also pickles its argparse.Namespace of options.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DDJaxError(f"cannot read PyTorch checkpoint {path}: {message}") from None


def _unwrap_state_dict(loaded: Any, where: str) -> Mapping[str, Any]:
    """The state_dict inside a training checkpoint (``{'state_dict': ...}`` etc.), or itself."""
    check(isinstance(loaded, Mapping), f"{where} holds a {type(loaded).__name__}, not a state_dict")
    for key in _NESTED_STATE_DICT_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return loaded[key]
    return loaded


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks: what identifies a source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def import_torch_teacher(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    *,
    model_name: str,
    model_overrides: Mapping[str, Any] | None,
    dataset: Dataset | DataContract,
    key_style: str = "torchvision",
    dtype: Any = None,
) -> Teacher:
    """Converts a PyTorch-trained network into a :class:`Teacher` (not saved; see below).

    SRe2L's teachers are PyTorch networks: for CIFAR and Tiny-ImageNet a torchvision
    ``resnet18`` with the small-image stem (``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``,
    ``maxpool = Identity``), which is ``ResNet18BN`` with ``key_style='torchvision'`` (pass
    ``model_overrides={'conv_init': 'torchvision'}`` to record torchvision's initialisation);
    for ImageNet-1K torchvision's pretrained ``resnet18`` itself (``ResNet18BN`` with
    ``small_stem=False``; ``ddjax teacher --config configs/teacher/torchvision.py:resnet18``
    does this import). Weights, biases and the BatchNorm ``running_mean``/``running_var``
    are imported exactly (:func:`ddjax.models.from_torch_state_dict`: OIHW -> HWIO, a
    ``module.`` prefix from ``DataParallel`` removed, ``num_batches_tracked`` ignored), so the
    eval-mode logits and the BN targets of recover equal PyTorch's. The images the teacher
    sees must be normalised as in its training (``dataset``'s constants are recorded and
    later checked by :func:`check_teacher`); ddjax does not verify that against the file.

    ImageNet needs no loaded dataset, only its facts::

        contract = DataContract.named("stream:imagenet2012", (224, 224, 3), 1000, "imagenet")
        teacher = import_torch_teacher(
            "resnet18.pth",
            model_name="ResNet18BN",
            model_overrides={"small_stem": False, "conv_init": "torchvision"},
            dataset=contract,
        )

    Save the result with ``save_teacher(path, model_name=..., model_overrides=...,
    variables=teacher.variables, dataset=dataset, extra=teacher.meta['extra'])``; then
    ``DataContract.of_teacher(load_teacher(path).meta)`` equals ``contract``.

    Args:
      state_dict_or_path: a ``state_dict`` (tensors or numpy arrays), or a ``.pth``/``.pt``
        file holding one, possibly nested in a training checkpoint under ``'state_dict'``
        (SRe2L's ``squeeze_cifar.py``), ``'model'`` (torchvision's reference ``train.py``) or
        ``'net'``. Files are read with ``torch.load(weights_only=True)``.
      model_name: a :func:`ddjax.models.get_model` name, e.g. ``'ResNet18BN'``.
      model_overrides: model fields replacing the name's settings.
      dataset: the data the teacher is for: a loaded dataset, or a
        :class:`~ddjax.sre2l.contract.DataContract` (name, image shape, classes, mean/std).
        It fixes classes and image shape, and its contract is recorded in ``meta``.
      key_style: ``'torchvision'`` (``downsample``/``fc``) or ``'mtt'`` (MTT's networks).
      dtype: the variables' dtype, ``'float32'`` or ``'float64'``; ``None``: the tensors' own
        (float64 from a ``net.double()`` state_dict, kept when ``jax_enable_x64`` is on; float32
        otherwise). See :func:`ddjax.models.from_torch_state_dict`.

    Returns:
      The :class:`Teacher`; ``meta['extra']`` records the source (``'file'`` and its
      ``'sha256'`` when read from a file).

    Raises:
      DDJaxError: a missing or unreadable file, missing/unexpected keys, or tensors whose
        shapes do not fit the model (named in the message).
    """
    source: dict[str, Any] = {"source": "pytorch", "key_style": key_style}
    if isinstance(state_dict_or_path, str | os.PathLike):
        path = Path(state_dict_or_path)
        state_dict = _unwrap_state_dict(_load_torch_file(path), f"PyTorch checkpoint {path}")
        source["file"] = str(path.absolute())
        source["sha256"] = file_sha256(path)
    else:
        state_dict = _unwrap_state_dict(state_dict_or_path, "state_dict_or_path")
    dataset_meta = {"num_classes": dataset.num_classes, "image_shape": dataset.image_shape}
    model = _build_model(model_name, model_overrides, dataset_meta)
    variables = models_lib.from_torch_state_dict(
        state_dict, model, dataset.image_shape, key_style=key_style, dtype=dtype
    )
    meta = _meta(model_name, model_overrides, model, dataset, source)
    return Teacher(model=model, variables=variables, meta=meta)
