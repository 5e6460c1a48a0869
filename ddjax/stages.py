"""The CLI's stages as Python functions: config + work directory in, files out.

Each ``run_<stage>(config, workdir)`` validates the config at the boundary,
calls the library functions (which work on arrays and know nothing of files)
and writes the work directory. Every function is also usable from a notebook.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

from ddjax import data as data_lib
from ddjax import evaluate as evaluate_lib
from ddjax import experts as experts_lib
from ddjax import models as models_lib
from ddjax import select as select_lib
from ddjax.errors import check
from ddjax.synset import SyntheticSet, load_synset, save_grid
from ddjax.workdir import Workdir


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """The dataset named by ``config.dataset``."""
    return data_lib.load_from_config(config.dataset)


def check_eval(
    eval_config: ml_collections.ConfigDict,
    dataset: data_lib.Dataset,
    synset: SyntheticSet | None = None,
) -> None:
    """Validates ``config.eval`` (and the set it will evaluate, if given) before any work is
    done (nothing half-written on bad input)."""
    protocol = evaluate_lib.get_protocol(
        eval_config.protocol,
        epochs=eval_config.epochs,
        batch_size=eval_config.batch_size,
        lr=eval_config.lr,
    )
    check(
        eval_config.num_models >= 1,
        f"config.eval.num_models={eval_config.num_models} must be at least 1",
    )
    check(len(eval_config.models) >= 1, "config.eval.models is empty; e.g. ConvNet,ResNet18")
    for name in eval_config.models:
        models_lib.get_model(name, dataset.num_classes, dataset.image_shape)
    if synset is not None and protocol.augment == "combined":
        evaluate_lib.num_distilled(synset)  # SelMatch's combined augmentation needs the split


def evaluate_into(
    workdir: Workdir,
    synset: SyntheticSet,
    dataset: data_lib.Dataset,
    eval_config: ml_collections.ConfigDict,
    key: str = "eval",
) -> dict:
    """Evaluates ``synset`` on every architecture of ``eval_config.models``.

    Results are written to ``results.json`` after each architecture, so a killed
    run continues with the first architecture that has no result yet.
    """
    results = workdir.results()
    done = results.setdefault(key, {})
    for model in eval_config.models:
        if model in done:
            continue
        start = time.time()
        result = evaluate_lib.evaluate_synset(
            synset,
            dataset,
            model=model,
            protocol=eval_config.protocol,
            num_models=eval_config.num_models,
            seed=eval_config.seed,
            epochs=eval_config.epochs,
            batch_size=eval_config.batch_size,
            lr=eval_config.lr,
            progress=True,
        )
        done[model] = {**result.to_json(), "seconds": round(time.time() - start, 1)}
        workdir.log(event="eval", model=model, mean=result.mean, std=result.std)
        workdir.save_results(results)
        print(f"{model}: {result.summary()} % (lr {result.learning_rate:g}, {result.lr_source})")
    return done


def run_select(config: ml_collections.ConfigDict, workdir: str) -> SyntheticSet:
    """``ddjax select``: a coreset saved as ``synset.npz`` + ``synset.png`` (then evaluated).

    Methods: random, herding, k-center, and the difficulty coresets (``forgetting``:
    hardest/easiest per class; ``window``: SelMatch's sliding window, β fixed or searched),
    see :func:`ddjax.select.select_from_config`.
    """
    check(
        config.method in select_lib.ALL_METHODS,
        f"config.method={config.method!r} is not a selection method; "
        f"valid: {list(select_lib.ALL_METHODS)}",
    )
    dataset = load_data(config)
    data_lib.check_ipc(dataset, config.ipc)
    if config.evaluate or tuple(config.get("betas", ())):
        check_eval(config.eval, dataset)
    if config.method in select_lib.DIFFICULTY_METHODS:
        # Read the scores now: a missing or mismatched scores file is refused before the
        # work directory is created.
        from ddjax import difficulty

        check("scores" in config, "config lacks the difficulty fields (select.difficulty_fields)")
        difficulty.scores_from_source(
            config.scores,
            higher=config.scores_higher,
            train_labels=dataset.y_train,
            experts_dir=config.experts_dir,
        )
    work = Workdir(workdir, config, "select")
    synset_file = work.file("synset.npz")
    if synset_file.exists():
        synset = load_synset(synset_file)
    else:
        synset = select_lib.select_from_config(dataset, config, progress=True)
        synset.save(synset_file)
        work.log(event="selected", method=config.method, ipc=config.ipc)
        if "window_search" in synset.meta:
            work.log(event="window_search", accuracy_by_beta=synset.meta["window_search"])
    save_grid(work.file("synset.png"), synset, dataset.to_pixels)
    print(f"{config.method} IPC {config.ipc}: {synset_file} ({len(synset.labels)} images)")
    if config.evaluate:
        evaluate_into(work, synset, dataset, config.eval)
    return synset


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax evaluate``: ``config.synset`` evaluated on ``config.eval.models``.

    With ``config.kd.teacher`` the students learn the teacher's soft labels by KD (SRe2L's
    evaluation, :func:`ddjax.sre2l.kd.evaluate_kd`: stored labels from ``config.kd.store`` or
    the teacher online) instead of training on the set's labels with ``config.eval.protocol``.
    """
    check(bool(config.synset), "config.synset is empty; pass --config.synset=PATH/TO/synset.npz")
    dataset = load_data(config)
    synset = load_synset(config.synset)
    kd_config = config.get("kd")
    if kd_config is not None and kd_config.teacher:
        return _evaluate_kd(config, workdir, synset, dataset)
    check_eval(config.eval, dataset, synset)
    work = Workdir(workdir, config, "evaluate")
    return evaluate_into(work, synset, dataset, config.eval)


def _evaluate_kd(config, workdir: str, synset: SyntheticSet, dataset) -> dict:
    """``ddjax evaluate`` with ``config.kd.teacher``: K students per model trained by KD."""
    from ddjax.sre2l import kd, relabel
    from ddjax.sre2l import teacher as teacher_lib

    teacher = teacher_lib.load_teacher(config.kd.teacher)
    teacher_lib.check_teacher(teacher, dataset)
    overrides = {k: config.kd[k] for k in ("epochs", "batch_size") if config.kd[k] is not None}
    recipe = kd.get_recipe(config.kd.recipe, **overrides)
    store = relabel.open_store(config.kd.store) if config.kd.store else None
    check(config.eval.num_models >= 1, f"config.eval.num_models={config.eval.num_models} < 1")
    for name in config.eval.models:
        models_lib.get_model(name, dataset.num_classes, dataset.image_shape)
    work = Workdir(workdir, config, "evaluate")
    return kd.evaluate_into(
        work,
        synset,
        dataset,
        teacher,
        recipe=recipe,
        store=store,
        models=config.eval.models,
        num_models=config.eval.num_models,
        seed=config.eval.seed,
        augment_seed=config.kd.seed,
    )


QUICKSTART_MODEL = {"width": 64}  # ConvNet-3 at width 64: 8x8 digits need no more


def quickstart(
    workdir: str = "runs/quickstart", epochs: int = 300, num_models: int = 5, distill: bool = True
) -> dict:
    """The first run: coresets, MTT and SRe2L on the bundled digits at IPC 1 and 10, in a table.

    Uses scikit-learn's digits (no download), MTT's evaluation protocol with
    ``epochs`` epochs (reduced from 1000 to fit a few CPU minutes) and lr 0.01
    (MTT rows: the learned lr), ``num_models`` ConvNet-3 networks of width 64 per
    set. With ``distill``, also trains 5 experts (``configs/experts/digits.py``)
    and distils IPC 1 and IPC 10 sets by MTT (``configs/distill/digits_ipc*.py``,
    started from the random rows' images) and an IPC 10 set by DATM
    (``configs/distill/datm_digits_ipc10.py``: learned soft labels); their rows are the final
    sets' evaluations. It also squeezes a digits teacher, recovers an IPC 10 set from it and
    trains the students on the teacher's soft labels (SRe2L; ``configs/{squeeze,recover,
    relabel}/digits.py``). Writes one picture per set, ``results.json`` and ``table.md``;
    prints the table. Resumable: finished rows are not recomputed.
    """
    config = ml_collections.ConfigDict(
        {"stage": "quickstart", "epochs": epochs, "num_models": num_models, "dataset": "digits"}
    )
    work = Workdir(workdir, config, "quickstart")
    dataset = data_lib.load_dataset("digits")
    embedding = select_lib.embed(
        dataset, "trained", feature_epochs=20, model_overrides=QUICKSTART_MODEL, progress=True
    )
    results = work.results()
    rows = results.setdefault("rows", {})
    for ipc in (1, 10):
        for method in select_lib.METHODS:
            name = f"{method}_ipc{ipc}"
            synset = select_lib.select(dataset, method, ipc, embedding=embedding)
            save_grid(work.file(f"{name}.png"), synset, dataset.to_pixels)
            if name in rows:
                continue
            result = evaluate_lib.evaluate_synset(
                synset,
                dataset,
                protocol="mtt",
                epochs=epochs,
                num_models=num_models,
                model_overrides=QUICKSTART_MODEL,
                progress=True,
            )
            rows[name] = {"method": method, "ipc": ipc, **result.to_json()}
            work.log(event="eval", name=name, mean=result.mean, std=result.std)
            work.save_results(results)
            print(f"  {method:8s} IPC {ipc:2d}: {result.summary()} %")
    if distill:
        _quickstart_mtt(work, results, epochs, num_models)
        _quickstart_sre2l(work, results, num_models)
    table = format_table(rows, dataset.name, epochs, num_models)
    Path(work.file("table.md")).write_text(table)
    print(table)
    print(f"pictures and results in {work.path}")
    return rows


#: The quick start's trajectory-matching rows: (method, IPC, config file).
QUICKSTART_DISTILL = (
    ("mtt", 1, "configs/distill/digits_ipc1.py"),
    ("mtt", 10, "configs/distill/digits_ipc10.py"),
    ("datm", 10, "configs/distill/datm_digits_ipc10.py"),
)


def _quickstart_mtt(work: Workdir, results: dict, epochs: int, num_models: int) -> None:
    """The quick start's trajectory-matching rows: digits experts, then MTT and DATM."""
    from ddjax.config import load_config
    from ddjax.distill.run import run_distill as distill

    rows = results["rows"]
    if all(f"{method}_ipc{ipc}" in rows for method, ipc, _ in QUICKSTART_DISTILL):
        return
    experts_dir = work.file("experts")
    print("MTT/DATM: training 5 digits experts, then distilling IPC 1 and IPC 10 ...")
    run_experts(load_config("configs/experts/digits.py", ["test_every=20"]), str(experts_dir))
    for method, ipc, config_file in QUICKSTART_DISTILL:
        name = f"{method}_ipc{ipc}"
        if name in rows:
            continue
        config = load_config(
            config_file,
            [
                f"experts_dir={experts_dir}",
                f"eval.epochs={epochs}",
                f"eval.num_models={num_models}",
            ],
        )
        config.unlock()
        config.eval_every = config.iterations  # evaluate the start and the final set only
        config.lock()
        outcome = distill(config, str(work.file(name)))
        final = outcome["evals"][str(config.iterations)]
        shutil.copyfile(work.file(name) / "synset.png", work.file(f"{name}.png"))
        rows[name] = {
            "method": method,
            "ipc": ipc,
            "mean": final["mean"],
            "std": final["std"],
            "accuracies": final["accuracies"],
            "learning_rate": final["learning_rate"],
            "iterations": config.iterations,
        }
        work.log(event="eval", name=name, mean=final["mean"], std=final["std"])
        work.save_results(results)
        shown = f"{100 * final['mean']:.2f} ± {100 * final['std']:.2f}"
        print(f"  {method:8s} IPC {ipc:2d}: {shown} %")


def _quickstart_sre2l(work: Workdir, results: dict, num_models: int) -> None:
    """The quick start's SRe2L row: squeeze a digits teacher, recover IPC 10, relabel + KD."""
    from ddjax.config import load_config

    rows = results["rows"]
    if "sre2l_ipc10" in rows:
        return
    print("SRe2L: squeezing a digits teacher, recovering IPC 10, training students by KD ...")
    run_squeeze(load_config("configs/squeeze/digits.py"), str(work.file("squeeze")))
    teacher = str(work.file("squeeze") / "teacher")
    recover = load_config("configs/recover/digits.py", [f"teacher={teacher}", "ipc=10"])
    run_recover(recover, str(work.file("recover_ipc10")))
    relabel = load_config(
        "configs/relabel/digits.py",
        [
            f"synset={work.file('recover_ipc10') / 'synset.npz'}",
            f"teacher={teacher}",
            f"eval.num_models={num_models}",
        ],
    )
    outcome = run_relabel(relabel, str(work.file("sre2l_ipc10")))
    result = outcome["eval"][relabel.eval.models[0]]
    shutil.copyfile(work.file("recover_ipc10") / "synset.png", work.file("sre2l_ipc10.png"))
    rows["sre2l_ipc10"] = {
        "method": "sre2l",
        "ipc": 10,
        "labels": "KD from the teacher (configs/relabel/digits.py)",
        **{k: result[k] for k in ("mean", "std", "accuracies")},
    }
    work.log(event="eval", name="sre2l_ipc10", mean=result["mean"], std=result["std"])
    work.save_results(results)
    print(f"  sre2l    IPC 10: {100 * result['mean']:.2f} ± {100 * result['std']:.2f} %")


def format_table(rows: dict, dataset: str, epochs: int, num_models: int) -> str:
    """A Markdown table: methods as rows, IPC as columns, mean ± std in percent."""
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    ipcs = sorted({r["ipc"] for r in rows.values()})
    lines = [
        f"Test accuracy (%) on {dataset}, ConvNet-3 (width 64), MTT protocol with {epochs} epochs, "
        f"mean ± std over {num_models} networks",
        "",
        "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
        "|---|" + "---|" * len(ipcs),
    ]
    for method in methods:
        cells = []
        for ipc in ipcs:
            row = rows.get(f"{method}_ipc{ipc}")
            cells.append(f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}" if row else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "datm" in methods:
        lines += [
            "",
            "datm: learned soft labels (initialised from the experts), evaluated with soft "
            "cross-entropy and batch 128 as DATM does (configs/distill/datm_digits_ipc10.py).",
        ]
    if "sre2l" in methods:
        lines += [
            "",
            "sre2l: images recovered from a BatchNorm teacher (ConvNet-BN, configs/squeeze/"
            "digits.py); its students (the same ConvNet) learn the teacher's soft labels by KD "
            "(configs/relabel/digits.py: AdamW, 200 epochs, T = 20), as SRe2L evaluates, not "
            "with the hard-label protocol of the other rows.",
        ]
    return "\n".join(lines) + "\n"


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


def run_distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax distill``: trajectory matching (:func:`ddjax.distill.run.run_distill`)."""
    from ddjax.distill.run import run_distill as run

    return run(config, workdir)


def run_squeeze(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax squeeze``: SRe2L's BatchNorm teacher (:func:`ddjax.sre2l.squeeze.run_squeeze`)."""
    from ddjax.sre2l.squeeze import run_squeeze as run

    teacher = run(config, workdir)
    accuracy = teacher.meta.get("extra", {}).get("test_accuracy")
    shown = f"; test accuracy {100 * accuracy:.2f} %" if accuracy is not None else ""
    print(f"squeeze: teacher {teacher.meta['model']} in {Path(workdir) / 'teacher'}{shown}")
    return teacher.meta


def run_recover(config: ml_collections.ConfigDict, workdir: str) -> SyntheticSet:
    """``ddjax recover``: SRe2L's images from the teacher's BN statistics
    (:func:`ddjax.sre2l.recover.run_recover`)."""
    from ddjax.sre2l.recover import run_recover as run

    return run(config, workdir)


def run_relabel(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``ddjax relabel``: SRe2L's soft labels and the students trained on them
    (:func:`ddjax.sre2l.relabel.run_relabel`)."""
    from ddjax.sre2l.relabel import run_relabel as run

    return run(config, workdir)
