"""``ddjax quickstart``: the first run, every method on the bundled digits in one table.

Coresets (random, herding, k-center), MTT and DATM (5 experts, then trajectory matching) and
SRe2L (squeeze, recover, KD students) at IPC 1 and 10 on scikit-learn's 8x8 digits, each row
evaluated with ConvNet-3 networks; writes a picture per set, ``results.json`` and ``table.md``.
Each row runs the stage functions the CLI runs, with the configs under ``configs/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_collections

from ddjax import data as data_lib
from ddjax import select as select_lib
from ddjax import validate
from ddjax.config import load_config
from ddjax.distill.run import run_distill
from ddjax.evaluate import EvalSettings
from ddjax.experts.stage import run_experts
from ddjax.sre2l.recover import run_recover
from ddjax.sre2l.relabel import run_relabel
from ddjax.sre2l.squeeze import run_squeeze
from ddjax.synset import save_grid
from ddjax.workdir import Workdir

QUICKSTART_MODEL = {"width": 64}  # ConvNet-3 at width 64: 8x8 digits need no more


def quickstart(
    workdir: str = "runs/quickstart", epochs: int = 300, num_models: int = 5, distill: bool = True
) -> dict:
    """The first run: coresets, MTT and SRe2L on the bundled digits at IPC 1 and 10, in a table.

    Uses scikit-learn's digits (no download), MTT's evaluation protocol with
    ``epochs`` epochs (reduced from 1000 to fit a few CPU minutes) and lr 0.01
    (MTT rows: the learned lr), ``num_models`` ConvNet-3 networks of width 64 per
    set. With ``distill``, also trains 5 experts (``configs/experts/mtt.py:digits``)
    and distils IPC 1 and IPC 10 sets by MTT (``configs/distill/mtt.py:digits,ipc={1,10}``,
    started from the random rows' images) and an IPC 10 set by DATM
    (``configs/distill/datm.py:digits,ipc=10``: learned soft labels); their rows are the final
    sets' evaluations. It also squeezes a digits teacher, recovers an IPC 10 set from it and
    trains the students on the teacher's soft labels (SRe2L; ``configs/{squeeze,recover,
    relabel}/digits.py``). Writes one picture per set, ``results.json`` and ``table.md``;
    prints the table. Resumable: finished rows are not recomputed.
    """
    # The options, checked before any work (training the feature net alone takes a while).
    validate.count("--epochs", epochs)
    validate.count("--num-models", num_models)
    config = ml_collections.ConfigDict(
        {"stage": "quickstart", "epochs": epochs, "num_models": num_models, "dataset": "digits"}
    )
    work = Workdir(workdir, config, "quickstart")
    dataset = data_lib.load_dataset("digits")
    embedding = select_lib.embed(
        dataset, "trained", feature_epochs=20, model_overrides=QUICKSTART_MODEL, progress=True
    )
    # MTT's protocol with reduced epochs; lr: the set's learned lr, else 0.01.
    settings = EvalSettings(
        protocol="mtt", epochs=epochs, num_models=num_models, model_overrides=QUICKSTART_MODEL
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
            result = settings.evaluate(synset, dataset, "ConvNet", progress=True)
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
    ("mtt", 1, "configs/distill/mtt.py:digits,ipc=1"),
    ("mtt", 10, "configs/distill/mtt.py:digits,ipc=10"),
    ("datm", 10, "configs/distill/datm.py:digits,ipc=10"),
)


def _quickstart_mtt(work: Workdir, results: dict, epochs: int, num_models: int) -> None:
    """The quick start's trajectory-matching rows: digits experts, then MTT and DATM."""
    rows = results["rows"]
    if all(f"{method}_ipc{ipc}" in rows for method, ipc, _ in QUICKSTART_DISTILL):
        return
    experts_dir = work.file("experts")
    print("MTT/DATM: training 5 digits experts, then distilling IPC 1 and IPC 10 ...")
    run_experts(load_config("configs/experts/mtt.py:digits", ["test_every=20"]), str(experts_dir))
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
        outcome = run_distill(config, str(work.file(name)))
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
    rows = results["rows"]
    if "sre2l_ipc10" in rows:
        return
    print("SRe2L: squeezing a digits teacher, recovering IPC 10, training students by KD ...")
    squeezed = run_squeeze(
        load_config("configs/squeeze/sre2l.py:digits"), str(work.file("squeeze"))
    )
    teacher = str(work.file("squeeze") / "teacher")
    print(teacher_line(squeezed, work.file("squeeze")))
    recover = load_config("configs/recover/sre2l.py:digits", [f"teacher={teacher}", "ipc=10"])
    run_recover(recover, str(work.file("recover_ipc10")))
    relabel = load_config(
        "configs/relabel/sre2l.py:digits",
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
        "labels": "KD from the teacher (configs/relabel/sre2l.py:digits)",
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
            "cross-entropy and batch 128 as DATM does (configs/distill/datm.py:digits,ipc=10).",
        ]
    if "sre2l" in methods:
        lines += [
            "",
            "sre2l: images recovered from a BatchNorm teacher (ConvNet-BN, "
            "configs/squeeze/sre2l.py:digits); its students (the same ConvNet) learn the "
            "teacher's soft labels by KD (configs/relabel/sre2l.py:digits: AdamW, 200 epochs, "
            "T = 20), as SRe2L evaluates, not with the hard-label protocol of the other rows.",
        ]
    return "\n".join(lines) + "\n"


def teacher_line(teacher, workdir: str | Path) -> str:
    """The line ``ddjax squeeze`` prints after ``run_squeeze``'s own: where the teacher is."""
    accuracy = teacher.meta.get("extra", {}).get("test_accuracy")
    shown = f"; test accuracy {100 * accuracy:.2f} %" if accuracy is not None else ""
    return f"squeeze: teacher {teacher.meta['model']} in {Path(workdir) / 'teacher'}{shown}"
