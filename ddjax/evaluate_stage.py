"""``ddjax evaluate``: the one evaluation entry, :func:`evaluate_into`, and the stage around it.

A synthetic set is evaluated by one of two trainers, per architecture of ``config.eval.models``:

* the hard-label trainer (:func:`ddjax.evaluate.evaluate_synset`): K networks trained on the
  set's labels under ``config.eval.protocol`` (MTT, DSA, DC, SelMatch);
* the KD trainer (:func:`ddjax.sre2l.kd.evaluate_kd`, a :class:`KDTrainer`): K students learn a
  teacher's soft labels, stored by ``ddjax relabel`` or computed online (SRe2L's evaluation).

Every stage that evaluates a set (select, evaluate, distill's final cross-architecture table)
calls :func:`evaluate_into`, which keeps each architecture's result in the work directory's
``results.json`` as soon as it is known, so that a killed run resumes with the first
architecture without one.

This module sits above ``ddjax.evaluate`` rather than inside it because the KD trainer
(``ddjax.sre2l.kd``) itself builds on ``ddjax.evaluate`` (its ``EvalResult``).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections

from ddjax import data as data_lib
from ddjax import validate
from ddjax.errors import check
from ddjax.evaluate import EvalResult, EvalSettings
from ddjax.sre2l import kd as kd_lib
from ddjax.sre2l import label_store
from ddjax.sre2l import teacher as teacher_lib
from ddjax.synset import SyntheticSet, load_synset
from ddjax.workdir import Workdir

#: Where :func:`evaluate_into` keeps the KD students' resume points: ``WORKDIR/students/<MODEL>``.
STUDENTS_DIR = "students"


@dataclasses.dataclass(frozen=True)
class KDTrainer:
    """The KD trainer: students learn ``teacher``'s soft labels (SRe2L's evaluation).

    Attributes:
      teacher: a loaded teacher (``ddjax.sre2l.teacher.load_teacher``); ``None`` with a store.
      recipe: the students' :class:`ddjax.sre2l.kd.Recipe`.
      store: a ``ddjax relabel`` label store, or ``None`` for the online teacher.
      augment_seed: the batch-map and augmentation seed (FKD's ``--fkd-seed``).
      eval_every: also test the students every this many epochs (0: only at the end).
      checkpoint_every: with a work directory, save the students every this many epochs.
    """

    teacher: Any | None
    recipe: kd_lib.Recipe
    store: label_store.LabelStore | None
    augment_seed: int
    eval_every: int = 0
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for field, low in (("eval_every", 0), ("checkpoint_every", 1)):
            value = getattr(self, field)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{field}={value!r} must be an integer >= {low}",
            )

    def evaluate(
        self,
        synset: SyntheticSet,
        dataset: data_lib.Dataset,
        model: str,
        settings: EvalSettings,
        *,
        progress: bool,
        work: Workdir | None = None,
    ) -> EvalResult:
        """:func:`ddjax.sre2l.kd.evaluate_kd` of one architecture; with ``work``, the students
        resume from ``WORKDIR/students/<model>`` and their tests are logged to its metrics."""
        return kd_lib.evaluate_kd(
            synset,
            dataset,
            self.teacher,
            recipe=self.recipe,
            store=self.store,
            model=model,
            model_overrides=settings.model_overrides,
            num_models=settings.num_models,
            seed=settings.seed,
            augment_seed=self.augment_seed,
            pool_mode=settings.pool_mode,
            progress=progress,
            eval_every=self.eval_every,
            checkpoint_dir=None if work is None else work.file(STUDENTS_DIR) / model,
            checkpoint_every=self.checkpoint_every,
            log=None if work is None else work.log,
            # Events of an earlier input (before inputs_changed) are history, kept.
            rewind=None if work is None else functools.partial(work.rewind, since="inputs_changed"),
        )

    def describe(self) -> str:
        labels = "stored labels" if self.store is not None else "online teacher"
        return f"KD, {self.recipe.name} recipe, {labels}"


def evaluate_into(
    work: Workdir,
    synset: SyntheticSet,
    dataset: data_lib.Dataset,
    settings: EvalSettings | ml_collections.ConfigDict,
    name: str = "eval",
    *,
    kd: KDTrainer | None = None,
    progress: bool = True,
) -> dict:
    """Evaluates ``synset`` on every architecture of ``settings.models``, results in ``work``.

    Args:
      work: the run's work directory; results go to ``results.json[name][model]``.
      synset: the set to evaluate.
      dataset: the real data whose test split is used.
      settings: the ``eval`` section (an :class:`ddjax.evaluate.EvalSettings` or the config
        section itself), validated by the caller.
      name: the key in ``results.json`` (``'final'``: distill's cross-architecture table).
      kd: the KD trainer; ``None`` trains on the set's labels under ``settings.protocol``.
      progress: progress bars and one printed line per architecture.

    Returns:
      ``results.json[name]``: one :meth:`EvalResult.to_json` (plus ``seconds``) per model.
      Architectures already there are not recomputed; KD students killed in training resume
      from their last checkpoint (``WORKDIR/students/<MODEL>``).
    """
    settings = EvalSettings.from_config(settings)
    results = work.results()
    done = results.setdefault(name, {})
    for model in settings.models:
        if model in done:
            continue
        # An evaluation logged but not saved in results.json (killed in between) is redone.
        work.rewind(None, where={"event": "eval", "model": model}, since="inputs_changed")
        start = time.time()
        if kd is None:
            result = settings.evaluate(synset, dataset, model, progress=progress, log=work.log)
            how, tag = f"lr {result.learning_rate:g}, {result.lr_source}", {}
        else:
            result = kd.evaluate(synset, dataset, model, settings, progress=progress, work=work)
            how, tag = kd.describe(), {"kd": True}
            if result.top5 is not None:
                how += f"; top-5 {100 * result.top5_mean:.2f} %"
                tag["top5"] = result.top5_mean
        done[model] = {**result.to_json(), "seconds": round(time.time() - start, 1)}
        work.log(event="eval", model=model, mean=result.mean, std=result.std, **tag)
        work.save_results(results)
        if progress:
            print(f"{model}: {result.summary()} % ({how})")
    return done


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax evaluate``: ``config.synset`` evaluated on ``config.eval.models``.

    With ``config.kd.teacher`` the students learn the teacher's soft labels by KD (SRe2L's
    evaluation, :func:`ddjax.sre2l.kd.evaluate_kd`: stored labels from ``config.kd.store`` or
    the teacher online) instead of training on the set's labels with ``config.eval.protocol``.

    Every input is checked before the work directory is created (:mod:`ddjax.validate`). The
    SHA-256 of the input files (set, teacher, label store index) is kept in ``results.json``;
    a re-run after one of them changed says so and recomputes every architecture.
    """
    validate.check_config(config)
    check(bool(config.synset), "config.synset is empty; pass --config.synset=PATH/TO/synset.npz")
    dataset = data_lib.open_from_config(config.dataset, stage="evaluate")
    validate.check_test_split(dataset, "evaluate")
    synset = load_synset(config.synset)
    validate.check_fits(synset, dataset, f"config.synset={config.synset}")
    settings = EvalSettings.from_config(config.eval)
    kd_config = config.get("kd")
    kd = None
    inputs = {"synset": config.synset}
    if kd_config is not None and kd_config.teacher:
        kd = _kd_trainer(kd_config, dataset, synset)
        # The store's index names its labels' files and fingerprints: hashing it, not the
        # (possibly large) label files, tells a store made anew.
        store_index = Path(kd_config.store) / label_store.INDEX_FILE if kd_config.store else None
        inputs.update(teacher=kd_config.teacher, store=store_index)
        # The KD trainer ignores the protocol (the recipe replaces it).
        check(settings.num_models >= 1, f"config.eval.num_models={settings.num_models} < 1")
        settings.check_models(dataset)
    else:
        settings.validate(dataset, synset)
        if settings.get_protocol().lr is None and synset.learning_rate is not None:
            # The protocol trains with the set's learned lr (MTT's).
            validate.check_learning_rate(synset.learning_rate, f"config.synset={config.synset}")
    digests = validate.input_digests(inputs)
    work = Workdir(workdir, config, "evaluate")
    _forget_if_stale(work, digests, inputs)
    return evaluate_into(work, synset, dataset, settings, kd=kd)


def _forget_if_stale(work: Workdir, digests: dict, inputs: dict) -> None:
    """Drops results (and KD students) computed from input files that have changed since.

    ``results.json`` records the SHA-256 of every input file (the set, the teacher, the label
    store); a set replaced in place is evaluated anew instead of keeping the old numbers.
    """
    results = work.results()
    changed = validate.changed_inputs(results, digests)
    if changed:
        names = ", ".join(f"{n} {inputs[n]}" for n in changed)
        print(f"evaluate: {names} changed since the results in {work.path}; recomputing them")
        work.log(event="inputs_changed", inputs=changed)
        shutil.rmtree(work.file(STUDENTS_DIR), ignore_errors=True)
        results = {}
    if results.get("inputs") != digests:
        work.save_results({**results, "inputs": digests})


def _kd_trainer(
    kd_config: ml_collections.ConfigDict, dataset: data_lib.Dataset, synset: SyntheticSet
) -> KDTrainer:
    """``config.kd``'s trainer, its teacher (and label store) checked against the inputs."""
    teacher = teacher_lib.load_teacher(kd_config.teacher)
    teacher_lib.check_teacher(teacher, dataset)
    fields = ("epochs", "batch_size", "accumulate")
    overrides = {k: kd_config.get(k) for k in fields if kd_config.get(k) is not None}
    recipe = kd_lib.get_recipe(kd_config.recipe, **overrides)
    store = label_store.open_store(kd_config.store) if kd_config.store else None
    kd_lib.check_kd_inputs(synset, dataset, teacher, recipe, store)
    return KDTrainer(
        teacher,
        recipe,
        store,
        augment_seed=kd_config.seed,
        eval_every=kd_config.get("eval_every", 0),
        checkpoint_every=kd_config.get("checkpoint_every", 1),
    )
