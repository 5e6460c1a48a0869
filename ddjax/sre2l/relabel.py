"""``ddjax relabel``: SRe2L's relabel stage -- soft labels for a recovered set, then KD students.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) trains students on its recovered images with the
teacher's soft predictions on *augmented* views (``research/sre2l.md`` §4). On ImageNet-1K the
official code makes them once, offline, with FKD (``labels='stored'``:
:mod:`ddjax.sre2l.label_store`); on CIFAR and Tiny-ImageNet the published code runs the teacher
*online* instead, on the student's own augmented batch (``labels='online'``: nothing stored,
:func:`ddjax.sre2l.views.make_labeller` called afresh at every step). Either way the views are
those of :mod:`ddjax.sre2l.views` and the students are trained by :mod:`ddjax.sre2l.kd`.

This module is the stage: its driver (:func:`run_relabel`: config checks, work directory,
resume, results); the config's fields are ``configs/relabel/sre2l.py``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_collections

from ddjax import data as data_lib
from ddjax import models as models_lib
from ddjax import train, validate
from ddjax.errors import check
from ddjax.evaluate import EvalSettings
from ddjax.evaluate_stage import KDTrainer, evaluate_into
from ddjax.sre2l import kd, label_store
from ddjax.sre2l import teacher as teacher_lib
from ddjax.sre2l.contract import DataContract
from ddjax.sre2l.label_store import STORE_DIR, open_store, predict_storage, write_store
from ddjax.synfolder import SynFolder, is_synfolder, open_synfolder
from ddjax.synset import SyntheticSet, load_synset
from ddjax.workdir import Workdir

__all__ = ["run_relabel"]


def run_relabel(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """``ddjax relabel``: soft labels for a recovered set, then KD students trained on them.

    Reads the synthetic set (``config.synset``: a ``synset.npz``, :func:`ddjax.synset.load_synset`,
    or a synthetic folder of ``ddjax recover``'s ``output='folder'``, read one batch at a time:
    :func:`ddjax.synfolder.open_synfolder`) and the teacher
    (``config.teacher``, :func:`ddjax.sre2l.teacher.load_teacher`), checks both against the
    dataset, and writes into ``workdir``: ``config.json``, ``metrics.jsonl``, the store
    ``labels/`` (when ``config.labels == 'stored'``) and ``results.json`` with the storage size
    and, with ``config.evaluate``, one :class:`ddjax.evaluate.EvalResult` per student
    architecture (``ddjax.sre2l.kd.evaluate_kd``). The store's size is predicted
    (:func:`ddjax.sre2l.label_store.predict_storage`), printed and checked against the free disk
    space before anything is written. Re-running resumes: finished epochs of labels and
    finished architectures are not recomputed.

    Args:
      config: from ``configs/relabel/sre2l.py:DATASET``.
      workdir: the run's directory.
      progress: progress bars and one printed line per result.

    Returns:
      The contents of ``results.json``: per student architecture top-1 and (for more than 5
      classes) top-5 accuracy, and with ``config.eval.eval_every`` the tests during training
      (also logged as ``kd_eval`` events). A student killed in training resumes from its last
      checkpoint (``students/<MODEL>/``, every ``config.eval.checkpoint_every`` epochs).

    Raises:
      DDJaxError: bad config values, missing files, or a teacher/synset of other data.
    """
    validate.check_config(config)
    check(
        config.labels in ("stored", "online"),
        f"config.labels={config.labels!r} is not known; valid: ['stored', 'online']",
    )
    recipe = kd.recipe_from_config(config.recipe)
    # The students' fields, checked before anything is written (teacher and store come later).
    eval_every = config.eval.get("eval_every", 0)
    checkpoint_every = config.eval.get("checkpoint_every", 1)
    KDTrainer(None, recipe, None, config.seed, eval_every, checkpoint_every)
    check(
        bool(config.synset),
        "config.synset is empty; pass --config.synset=PATH/synset.npz (or a recovered folder, "
        "--config.synset=RECOVER_WORKDIR/synset)",
    )
    check(bool(config.teacher), "config.teacher is empty; pass --config.teacher=TEACHER_DIR")
    check(isinstance(config.seed, int), f"config.seed={config.seed!r} must be an integer")
    check(
        config.labels == "stored" or config.evaluate,
        "config.labels='online' stores nothing, so config.evaluate=False leaves nothing to do; "
        "set --config.evaluate=True or --config.labels=stored",
    )
    teacher = teacher_lib.load_teacher(config.teacher)
    if config.dataset.name:
        dataset = data_lib.open_from_config(config.dataset, stage="relabel")
        if config.evaluate:
            validate.check_test_split(dataset, "relabel (config.evaluate)")
        teacher_lib.check_teacher(teacher, dataset)
    else:
        check(
            not config.evaluate,
            "config.evaluate=True needs the test images: set config.dataset.name (or pass "
            "--config.evaluate=False to only write the labels)",
        )
        dataset = DataContract.of_teacher(teacher.meta)
    synset = _open_synset(config.synset)
    check(
        tuple(synset.images.shape[1:]) == tuple(dataset.image_shape)
        and synset.num_classes == dataset.num_classes,
        f"synthetic set {config.synset} has images {synset.images.shape[1:]} and "
        f"{synset.num_classes} classes; dataset {dataset.name!r} has {dataset.image_shape} and "
        f"{dataset.num_classes}",
    )
    model_overrides = config.eval.model_overrides.to_dict()
    if config.evaluate:
        check(len(config.eval.models) >= 1, "config.eval.models is empty; e.g. ResNet18BN")
        check(
            config.eval.num_models >= 1,
            f"config.eval.num_models={config.eval.num_models} must be at least 1",
        )
        for name in config.eval.models:
            models_lib.get_model(name, dataset.num_classes, dataset.image_shape, **model_overrides)
        train.resolve_pool_mode(config.eval.get("pool_mode", "auto"))
    predicted = None
    if config.labels == "stored":
        predicted = predict_storage(
            len(synset.labels), dataset.num_classes, recipe.batch_size, recipe.epochs
        )
        _check_free_space(workdir, predicted)
        if progress:
            print(
                f"relabel: {len(synset.labels)} images x {recipe.epochs} epochs of "
                f"{dataset.num_classes} fp16 logits: {_size(predicted)} of labels"
            )
    # The inputs' fingerprints, recorded with the results: a re-run on a set or teacher that
    # changed since is refused rather than resumed with labels and students of the old ones.
    inputs = {
        "synset": label_store.synset_fingerprint(synset),
        "teacher": label_store.teacher_fingerprint(teacher.model, teacher.variables),
    }
    names = {
        "synset": f"config.synset {config.synset}",
        "teacher": f"config.teacher {config.teacher}",
    }
    validate.check_workdir_inputs(workdir, inputs, names)
    work = Workdir(workdir, config, "relabel")
    results = work.results()
    if results.get("inputs") != inputs:
        results["inputs"] = inputs
        work.save_results(results)

    store = None
    if config.labels == "stored":
        summary = write_store(
            work.file(STORE_DIR),
            synset,
            teacher,
            dataset,
            spec=recipe.augment_spec(dataset),
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            seed=config.seed,
            teacher_mode=recipe.teacher_mode,
            progress=progress,
            log=work.log,
        )
        store = open_store(work.file(STORE_DIR))
        if progress:
            print(
                f"relabel: {summary['completed_epochs']} epochs of soft labels in {store.path} "
                f"({_size(summary['storage_bytes'])})"
            )
    else:
        summary = {"path": None, "epochs": recipe.epochs, "storage_bytes": 0, "index_bytes": 0}
    results["labels"] = {"mode": config.labels, **summary, "predicted_bytes": predicted}
    work.save_results(results)

    if config.evaluate:
        trainer = KDTrainer(teacher, recipe, store, config.seed, eval_every, checkpoint_every)
        settings = EvalSettings.from_config(config.eval)
        results["eval"] = evaluate_into(
            work, synset, dataset, settings, kd=trainer, progress=progress
        )
    return results


def _open_synset(path: str) -> SyntheticSet | SynFolder:
    """A ``synset.npz`` in memory, or a synthetic folder read batch by batch."""
    return open_synfolder(path) if is_synfolder(path) else load_synset(path)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.2f} MiB"


def _check_free_space(workdir: str, needed: int) -> None:
    """Refuses (before anything is written) a store that cannot fit on the work directory's disk.

    Epochs already on disk (a resumed run) count as free: their space is already taken.
    """
    path = Path(workdir).absolute()
    existing = path / STORE_DIR
    held = sum(f.stat().st_size for f in existing.glob("epoch_*.npz")) if existing.is_dir() else 0
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    check(
        needed - held <= free,
        f"the relabel store needs {_size(needed)} ({_size(needed - held)} still to write) but "
        f"{path} has {_size(free)} free; free space, pass a --workdir on a larger disk, or "
        "use --config.labels=online (no storage)",
    )
