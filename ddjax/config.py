"""Config files and command-line overrides.

A config is an ``ml_collections.ConfigDict`` returned by ``get_config(arg)`` in a
Python file under ``configs/`` (big_vision style: one file per stage and method family,
``configs/STAGE/FAMILY.py:ARG``, whose commented table holds the published hyper-parameters
and whose ``ARG`` picks a row, e.g. ``distill/mtt.py:cifar10,ipc=10``,
``squeeze/sre2l.py:cifar100``). Any field can be overridden from the command line with
``--config.field=value`` or ``--config.section.field=value``; values are parsed
as Python literals and must keep the field's type (ints are accepted for float
fields). Unknown fields and wrong types are rejected with a message naming the
field and listing what is valid.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from ddjax.errors import DDJaxError, check

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_path(path: str) -> Path:
    """Finds a config file: as given, or relative to the repository's ``configs/``."""
    candidates = (
        Path(path),
        CONFIG_DIR.parent / path,
        CONFIG_DIR / path,
        CONFIG_DIR / f"{path}.py",
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DDJaxError(
        f"config file {path!r} not found (looked in the current directory and {CONFIG_DIR})"
    )


def split_spec(spec: str) -> tuple[str, str | None]:
    """Splits a config spec into the file and the family argument.

    ``'configs/distill/mtt.py:cifar10,ipc=10'`` → ``('configs/distill/mtt.py', 'cifar10,ipc=10')``.
    The part after ``.py:`` is the argument of ``get_config(arg)`` (big_vision's convention);
    without it ``get_config()`` is called with no argument.
    """
    path, sep, arg = spec.partition(".py:")
    return (path + ".py", arg) if sep else (spec, None)


def import_config(path: str):
    """Imports a config file as a module (so one family file can build on another's fields)."""
    file = resolve_path(path)
    spec = importlib.util.spec_from_file_location(f"ddjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report it in one line
        raise DDJaxError(f"config file {file} failed to load: {type(e).__name__}: {e}") from None
    check(hasattr(module, "get_config"), f"config file {file} has no get_config() function")
    return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` (or ``get_config(arg)``) and applies ``--config.key=value`` overrides.

    Args:
      spec: a ``.py`` file defining ``get_config()``, or ``FILE.py:ARG`` for a config family
        whose ``get_config(arg)`` picks a row of its table (e.g. ``distill/mtt.py:cifar10,ipc=10``).
      overrides: ``"key=value"`` strings (the part after ``--config.``).

    Returns:
      The config, locked (no new fields can be added by mistake).
    """
    path, arg = split_spec(spec)
    module = import_config(path)
    file = resolve_path(path)
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except DDJaxError:
        raise
    except Exception as e:  # user code: one line, never a traceback
        hint = " (a config family: add :ARG, see its docstring)" if arg is None else ""
        raise DDJaxError(
            f"config file {file}: get_config({'' if arg is None else repr(arg)}) failed: "
            f"{type(e).__name__}: {e}{hint}"
        ) from None
    check(
        isinstance(config, ml_collections.ConfigDict),
        f"get_config() in {file} must return an ml_collections.ConfigDict",
    )
    for item in overrides:
        apply_override(config, item)
    config.lock()
    return config


def family_arg(arg: str, table: dict, file: str) -> tuple[str, int]:
    """Parses a family argument ``'DATASET,ipc=K'`` against a table keyed by ``(dataset, ipc)``.

    Raises:
      DDJaxError: a malformed argument or a row the table does not have (listing them).
    """
    rows = ", ".join(f"{d},ipc={k}" for d, k in table)
    dataset, _, rest = arg.partition(",")
    key, _, value = rest.partition("=")
    check(
        key.strip() == "ipc" and value.strip().isdigit(),
        f"{file}: argument {arg!r} must look like DATASET,ipc=K; rows: {rows}",
    )
    row = (dataset.strip(), int(value))
    check(row in table, f"{file}: no published row {arg!r}; rows: {rows}")
    return row


def dataset_arg(arg: str, table: dict, file: str) -> str:
    """Parses a family argument ``'DATASET'`` against a table keyed by dataset name.

    Raises:
      DDJaxError: a row the table does not have (listing them).
    """
    dataset = arg.strip()
    check(dataset in table, f"{file}: no published row {arg!r}; rows: {', '.join(table)}")
    return dataset


def parse_value(text: str):
    """Parses an override value as a Python literal; bare words stay strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies one ``key.sub=value`` override in place."""
    check("=" in item, f"override {item!r} must look like --config.field=value")
    key, text = item.split("=", 1)
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        fields = sorted(node.keys())
        check(
            part in node,
            f"--config.{key}: unknown field {'.'.join(parts[: depth + 1])!r}; valid here: {fields}",
        )
        if depth < len(parts) - 1:
            node = node[part]
            check(
                isinstance(node, ml_collections.ConfigDict),
                f"--config.{key}: {'.'.join(parts[: depth + 1])!r} is not a section",
            )
    value = parse_value(text)
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        example = sorted(current.keys())[0] if len(current) else "FIELD"
        raise DDJaxError(
            f"--config.{key}={text!r}: {key!r} is a section, not a value; set its fields, e.g. "
            f"--config.{key}.{example}=..."
        )
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = tuple(v for v in value.split(",") if v)
    if isinstance(current, str) and not isinstance(value, str):
        value = text  # e.g. --config.dataset.name=123 stays the string '123'
    if isinstance(current, bool) and isinstance(value, str):
        value = {"true": True, "false": False}.get(value.lower(), value)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise DDJaxError(
            f"--config.{key}={text!r}: expected {type(current).__name__} "
            f"(current value {current!r}); {e}"
        ) from None


def to_json(config: ml_collections.ConfigDict) -> str:
    """Canonical JSON of a config (the resolved config saved in the work directory)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between two config dicts (for resume checks).

    A field missing on one side and unset (``None``) on the other is not a difference, so that
    a run saved before an optional field existed still resumes.
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if _unset(a) and _unset(b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _unset(value) -> bool:
    return value is None or (isinstance(value, str) and value == "<missing>")


# Shared sections, so that config files only state what is specific to them.


def dataset_section(name: str, zca: bool = False) -> ml_collections.ConfigDict:
    """``config.dataset``: which data (``ddjax.data.load_dataset``) and where it lives."""
    return ml_collections.ConfigDict(
        {
            "name": name,  # fashion_mnist, mnist, digits, cifar10, ..., folder:PATH, npz:PATH
            "data_dir": "",  # empty: the default locations (Debian package, TFDS)
            "zca": zca,  # ZCA whitening as MTT (eps 0.1, fitted on the train set)
            # A ddjax.data.NORMALISATION key or 'computed'; empty: the dataset's published one.
            "normalisation": "",
            # Keep only this many train images, balanced over the classes (reduced runs).
            "train_limit": ml_collections.config_dict.placeholder(int),
            # Streams only (stream:NAME): the side of the square crops (unset: 224), and the
            # grain worker processes that decode and crop in each process.
            "image_size": ml_collections.config_dict.placeholder(int),
            "workers": 0,
        }
    )


def eval_section(
    protocol: str = "mtt",
    epochs: int = 1000,
    num_models: int = 5,
    models: tuple[str, ...] = ("ConvNet",),
) -> ml_collections.ConfigDict:
    """``config.eval``: how a synthetic set is evaluated (``ddjax.evaluate``)."""
    return ml_collections.ConfigDict(
        {
            "protocol": protocol,  # mtt | dsa | dc
            "models": models,  # architectures (cross-architecture table when several)
            "num_models": num_models,  # K networks per architecture, trained by vmap
            "epochs": epochs,  # the reference's Epoch (epochs + 1 are run)
            "batch_size": 256,
            # Fixed learning rate; unset means the protocol's (mtt: the learned lr, else 0.01).
            "lr": ml_collections.config_dict.placeholder(float),
            "seed": 0,
        }
    )


def select_config(dataset: str) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax select`` config (``configs/select/<dataset>.py``)."""
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(dataset)
    config.method = "random"  # random | herding | kcenter
    config.ipc = 10
    config.seed = 0
    # Herding/k-center embed the images with a ConvNet trained `feature_epochs` epochs on the
    # real data (DC's "trained ConvNet" features); 'random' (untrained) and 'pixels' skip that.
    config.features = "trained"
    config.feature_epochs = 5
    config.feature_model = "ConvNet"
    config.evaluate = True  # evaluate the coreset right away with config.eval
    config.eval = eval_section()
    return config


def evaluate_config(dataset: str) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax evaluate`` config (``configs/evaluate/<dataset>.py``)."""
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(dataset)
    config.synset = ""  # path to a synthetic set (.npz written by select/distill)
    config.eval = eval_section()
    # SRe2L-style evaluation: with a teacher, students learn its soft labels by KD
    # (ddjax.sre2l.kd) instead of the set's labels under config.eval.protocol.
    config.kd = ml_collections.ConfigDict(
        {
            "teacher": "",  # a teacher directory (ddjax squeeze); empty: no KD
            "store": "",  # a `ddjax relabel` label store (WORKDIR/labels); empty: online teacher
            "recipe": "imagenet",  # a ddjax.sre2l.kd recipe: imagenet | tiny_imagenet | cifar
            "epochs": ml_collections.config_dict.placeholder(int),  # unset: the recipe's
            "batch_size": ml_collections.config_dict.placeholder(int),  # unset: the recipe's
            # Gradient accumulation: micro-batches per step (unset: the recipe's, 1).
            "accumulate": ml_collections.config_dict.placeholder(int),
            "seed": 42,  # online labels: batch-map and augmentation seed (FKD's)
            "eval_every": 0,  # also test the students every this many epochs (0: at the end)
            "checkpoint_every": 1,  # students' resume points (WORKDIR/students/<MODEL>)
        }
    )
    return config
