"""``ddjax experts``: the experts stage's driver (config + work directory in, files out).

Kept apart from :mod:`ddjax.experts` (the library: trajectories, forgetting counts) until the
experts module is reorganised; ``ddjax.cli`` runs :func:`run_experts`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ddjax import data as data_lib
from ddjax import experts as experts_lib
from ddjax.workdir import Workdir

EXPERT_SETTINGS = (
    "model",
    "num_experts",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "augment",
    "seed",
    "pool_mode",
    "experts_at_once",
    "test_every",
    "test_limit",
    "checkpoint_every",
)


def run_experts(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax experts``: MTT expert trajectories and forgetting scores in the work directory.

    The work directory is the experts directory (``ddjax.experts``): ``expert_NNNN/``,
    ``experts.json``, ``forgetting.npz`` beside ``config.json``, ``metrics.jsonl`` (one line
    per epoch and per finished group of experts) and ``results.json`` (the summary). Returns
    the experts' metadata.
    """
    dataset = data_lib.load_from_config(config.dataset)
    settings = {name: config[name] for name in EXPERT_SETTINGS}
    experts_lib.check_settings(dataset, model_overrides=None, **settings)
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

    meta = experts_lib.train_experts(dataset, out_dir=work.path, progress=True, log=log, **settings)
    summary = experts_lib.summary(meta)
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
