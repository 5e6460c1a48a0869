"""``ddjax experts``: the experts stage's driver (config + work directory in, files out).

The work directory is the experts directory (:mod:`ddjax.experts`). With
``config.example_schedule.name='pad'`` the experts train on PAD's easy-to-hard schedule of the
examples (:mod:`ddjax.distill.pad`), ranked by ``example_schedule.scores``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect

import ml_collections
import numpy as np

from ddjax import data as data_lib
from ddjax import difficulty, validate
from ddjax.distill import pad
from ddjax.errors import check
from ddjax.experts import store, training
from ddjax.workdir import Workdir

__all__ = ["EXPERT_SETTINGS", "SCHEDULES", "run_experts"]

#: The config fields that are the experts' settings: ``check_settings``' keyword arguments
#: (``model_overrides`` comes with a model name, never from a config).
EXPERT_SETTINGS = tuple(
    name
    for name, parameter in inspect.signature(store.check_settings).parameters.items()
    if parameter.kind is parameter.KEYWORD_ONLY and name != "model_overrides"
)
#: ``config.example_schedule.name`` → its settings class (``''``: every example every epoch).
SCHEDULES = {"pad": pad.ExampleSchedule}


def example_schedule(section: ml_collections.ConfigDict, dataset: data_lib.Dataset):
    """``(epoch_subset, description)`` of ``config.example_schedule`` (``(None, None)``: off).

    The examples of each class are ranked easiest first by the section's difficulty scores
    (a ``.npy``/``.npz`` file, or ``'forgetting'`` with ``scores_experts_dir``: the forgetting
    counts of earlier experts).

    Raises:
      DDJaxError: an unknown schedule, bad schedule settings or scores.
    """
    if not section.name:
        return None, None
    check(
        isinstance(dataset, data_lib.Dataset),
        f"config.example_schedule.name={section.name!r} orders the examples of an in-memory "
        "train set; a stream cannot follow it: unset it or name the dataset without 'stream:'",
    )
    check(
        section.name in SCHEDULES,
        f"config.example_schedule.name={section.name!r}: expected '' (all examples every "
        f"epoch) or one of {list(SCHEDULES)}",
    )
    fields = [field.name for field in dataclasses.fields(SCHEDULES[section.name])]
    schedule = SCHEDULES[section.name](**{name: section[name] for name in fields})
    schedule.validate()
    scores = difficulty.scores_from_source(
        section.scores,
        higher=section.scores_higher,
        train_labels=dataset.y_train,
        experts_dir=section.scores_experts_dir,
    )
    hardest_first = difficulty.rank_per_class(scores, dataset.y_train, dataset.num_classes)
    easiest_first = [order[::-1] for order in hardest_first]
    fingerprint = hashlib.sha256(np.ascontiguousarray(scores.values).tobytes()).hexdigest()
    description = {
        "name": section.name,
        **{name: section[name] for name in fields},
        "scores": scores.source,
        "scores_sha256": fingerprint[:16],
    }
    return (lambda epoch: pad.epoch_indices(epoch, easiest_first, schedule)), description


def run_experts(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax experts``: MTT expert trajectories and forgetting scores in the work directory.

    The work directory is the experts directory (``ddjax.experts``): ``expert_NNNN/``,
    ``experts.json``, ``forgetting.npz`` beside ``config.json``, ``metrics.jsonl`` (one line
    per epoch and per finished group of experts) and ``results.json`` (the summary). Returns
    the experts' metadata.
    """
    validate.check_config(config)
    dataset = data_lib.open_from_config(config.dataset, stage="experts")
    validate.check_test_split(dataset, "experts")
    settings = {name: config[name] for name in EXPERT_SETTINGS}
    store.check_settings(dataset, model_overrides=None, **settings)
    epoch_subset, description = example_schedule(config.example_schedule, dataset)
    work = Workdir(workdir, config, "experts")

    def log(**record) -> None:
        work.log(**record)
        if record["event"] == "experts_done":
            group, accuracy = record["experts"], 100 * np.asarray(record["final_test_accuracy"])
            names = f"{group[0]}-{group[-1]}" if len(group) > 1 else f"{group[0]}"
            print(
                f"  experts {names}: final test accuracy {accuracy.mean():.2f} ± "
                f"{accuracy.std():.2f} % ({record['seconds']:.0f} s)"
            )

    meta = training.train_experts(
        dataset,
        out_dir=work.path,
        progress=True,
        log=log,
        rewind=work.rewind,
        epoch_subset=epoch_subset,
        example_schedule=description,
        workers=config.dataset.workers,
        **settings,
    )
    summary = store.summary(meta)
    work.save_results(summary)
    accuracy = ""
    if summary["final_test_accuracy_mean"] is not None:
        accuracy = (
            f"; final test accuracy {100 * summary['final_test_accuracy_mean']:.2f} ± "
            f"{100 * summary['final_test_accuracy_std']:.2f} % (epoch {summary['epochs']})"
        )
    print(
        f"experts: {summary['completed']}/{summary['num_experts']} complete in {work.path} "
        f"({meta['model']}, {meta['epochs']} epochs){accuracy}"
    )
    return meta
