"""``ddjax teacher``: a PyTorch ``.pth`` file imported as an SRe2L teacher directory.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) does not squeeze on ImageNet-1K: its teacher is
torchvision's pretrained ResNet-18 (ResNet-50 in its ablations). This stage turns the user's
``.pth`` file (nothing is downloaded) into the teacher directory that ``ddjax recover`` and
``ddjax relabel`` read, with the data contract given by the config instead of a loaded dataset:
classes, image size and the published normalisation (``configs/teacher/torchvision.py``).

The work directory::

    WORKDIR/config.json     the resolved config (a re-run with another config is refused)
    WORKDIR/teacher/        the teacher (:func:`ddjax.sre2l.teacher.save_teacher`)
    WORKDIR/results.json    model, parameter count, source file and its SHA-256, contract

Everything is checked before the work directory is created: the config, that the file exists
and is readable, that it holds a state_dict, and that its keys and shapes are the model's (the
whole conversion runs first). Re-running the same command finds the finished teacher and only
reads it back; if the file has changed since, it is refused.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import ml_collections

from ddjax import models as models_lib
from ddjax import validate
from ddjax.data import NORMALISATION
from ddjax.errors import DDJaxError, check
from ddjax.sre2l import teacher as teacher_lib
from ddjax.sre2l.contract import DataContract
from ddjax.workdir import Workdir

__all__ = ["TEACHER_DIR", "run_teacher_import", "summary_line"]

TEACHER_DIR = "teacher"
_KEY_STYLES = ("torchvision", "mtt")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_config(config: ml_collections.ConfigDict) -> Path:
    """Field checks that need no file read; returns the state_dict path (not yet opened)."""
    check(
        bool(config.state_dict),
        "config.state_dict is empty; pass --config.state_dict=FILE.pth (e.g. torchvision's "
        "resnet18-f37072fd.pth)",
    )
    for field in ("num_classes", "image_size"):
        check(
            _positive_int(config[field]),
            f"config.{field}={config[field]!r} must be a positive integer",
        )
    check(
        config.normalisation in NORMALISATION,
        f"config.normalisation={config.normalisation!r} is not one of {sorted(NORMALISATION)}",
    )
    check(
        config.key_style in _KEY_STYLES,
        f"config.key_style={config.key_style!r} is not one of {list(_KEY_STYLES)}",
    )
    check(
        isinstance(config.dataset_name, str) and bool(config.dataset_name),
        f"config.dataset_name={config.dataset_name!r} must name the data the teacher is for "
        "(e.g. stream:imagenet2012)",
    )
    path = Path(config.state_dict).absolute()
    check(path.is_file(), f"config.state_dict={config.state_dict!r}: no such file ({path})")
    return path


def _contract(config: ml_collections.ConfigDict) -> DataContract:
    size = config.image_size
    return DataContract.named(
        config.dataset_name, (size, size, 3), config.num_classes, config.normalisation
    )


def _finished(workdir: str | Path, config: ml_collections.ConfigDict, sha256: str):
    """The teacher of an earlier run of this config, or None when there is none yet.

    Raises:
      DDJaxError: the work directory holds another config, or the same config imported from
        a file whose contents have changed since.
    """
    if not (Path(workdir) / "config.json").is_file():
        return None
    work = Workdir(workdir, config, "teacher")  # refuses another config; writes nothing
    results = work.results()
    if not results.get("teacher"):
        return None  # killed between the teacher and results.json: import again
    check(
        results.get("source_sha256") == sha256,
        f"workdir {workdir} holds a teacher imported from {results.get('source')} with SHA-256 "
        f"{results.get('source_sha256')}; that file now has {sha256}. Use a new --workdir",
    )
    return teacher_lib.load_teacher(work.file(TEACHER_DIR))


def run_teacher_import(config: ml_collections.ConfigDict, workdir: str | Path):
    """``ddjax teacher``: converts ``config.state_dict`` and saves it as ``workdir/teacher``.

    Args:
      config: from ``configs/teacher/torchvision.py:NETWORK``.
      workdir: the run's directory (see the module docstring for its files).

    Returns:
      The saved :class:`~ddjax.sre2l.teacher.Teacher`, read back with
      :func:`~ddjax.sre2l.teacher.load_teacher`.

    Raises:
      DDJaxError: a bad config value, a missing or unreadable file, a file that holds no
        state_dict or one of another network (its keys or shapes named), or a work directory of
        another config or source file; all before anything is written.
    """
    validate.check_config(config)
    path = _check_config(config)
    contract = _contract(config)
    overrides = config.model_overrides.to_dict()
    # The model alone first: an unknown name or setting is the config's fault, not the file's.
    models_lib.get_model(config.model, contract.num_classes, contract.image_shape, **overrides)
    try:
        sha256 = teacher_lib.file_sha256(path)
    except OSError as e:
        raise DDJaxError(f"config.state_dict={config.state_dict!r} cannot be read: {e}") from None
    done = _finished(workdir, config, sha256)
    if done is not None:
        return done

    try:
        imported = teacher_lib.import_torch_teacher(
            path,
            model_name=config.model,
            model_overrides=overrides,
            dataset=contract,
            key_style=config.key_style,
        )
    except DDJaxError as e:
        raise DDJaxError(
            f"config.state_dict={config.state_dict!r} is not a {config.model} state_dict: {e}"
        ) from None

    work = Workdir(workdir, config, "teacher")
    teacher_dir = work.file(TEACHER_DIR)
    teacher_lib.save_teacher(
        teacher_dir,
        model_name=config.model,
        model_overrides=overrides,
        variables=imported.variables,
        dataset=contract,
        extra=imported.meta["extra"],
    )
    work.save_results(
        {
            "teacher": str(teacher_dir),
            "model": config.model,
            "model_overrides": overrides,
            "num_params": imported.meta["num_params"],
            "source": str(path),
            "source_sha256": sha256,
            "dataset": contract.name,
            "num_classes": contract.num_classes,
            "image_shape": list(contract.image_shape),
            "normalisation": config.normalisation,
        }
    )
    return teacher_lib.load_teacher(teacher_dir)


def summary_line(teacher: teacher_lib.Teacher, workdir: str | Path) -> str:
    """The line ``ddjax teacher`` prints: where the teacher is and the command to run next."""
    teacher_dir = Path(workdir) / TEACHER_DIR
    source = Path(teacher.meta["extra"].get("file", "?")).name
    recover = (
        "ddjax recover --config configs/recover/sre2l.py:imagenet "
        f"--config.teacher={shlex.quote(str(teacher_dir))} --workdir runs/recover_imagenet"
    )
    return (
        f"teacher: {teacher.meta['model']} ({teacher.meta['num_params']:,} parameters) from "
        f"{source} in {teacher_dir}; next: {recover}"
    )
