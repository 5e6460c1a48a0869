"""SRe2L end to end: squeeze, recover at several IPCs, KD evaluation, random selection beside it.

    python benchmarks/sre2l_accuracy.py --dataset fashion_mnist --ipc 10 50 \\
        --teacher-epochs 5 --recover-iterations 500 --kd-epochs 300

Pipeline (ddjax's stages, as the CLI runs them): ``squeeze`` trains the BatchNorm teacher
(``configs/squeeze/sre2l.py:<dataset>`` with the overrides below), ``recover`` synthesises IPC
images per class from its BN statistics (``configs/recover/sre2l.py:<dataset>``), and each set is
evaluated by K students trained with SRe2L's KD loss against the teacher run online
(``kd.evaluate_kd`` with the recipe and students of ``configs/relabel/sre2l.py:<dataset>``;
online labels equal stored ones up to fp16 rounding, see tests/test_kd.py). **Random selection
under the same protocol**: IPC random real training images per class, relabelled by the same
teacher and trained with the same KD recipe (the only difference is where the images come from);
and, for reference, the same random images trained on their hard labels with MTT's protocol
(``evaluate_synset``, lr 0.01, ``--hard-epochs`` epochs, the same students). Writes
``benchmarks/results/sre2l_<dataset>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import environment  # noqa: E402
from ddjax import data as data_lib  # noqa: E402
from ddjax import evaluate as evaluate_lib  # noqa: E402
from ddjax import select as select_lib  # noqa: E402
from ddjax.config import load_config  # noqa: E402
from ddjax.sre2l import kd  # noqa: E402
from ddjax.sre2l.recover import run_recover  # noqa: E402
from ddjax.sre2l.squeeze import run_squeeze  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--teacher-model", default="ConvNetBN")
    parser.add_argument("--teacher-width", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--recover-iterations", type=int, default=500)
    parser.add_argument("--student", default=None, help="default: the relabel config's")
    parser.add_argument("--student-width", type=int, default=None)
    parser.add_argument("--kd-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--num-models", type=int, default=3)
    parser.add_argument("--hard-epochs", type=int, default=300)
    parser.add_argument("--root", default="runs/sre2l_accuracy")
    parser.add_argument("--out-suffix", default="")
    args = parser.parse_args()

    env = environment()
    root = Path(args.root) / args.dataset
    data_override = [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    started = time.time()
    squeeze = load_config(
        f"configs/squeeze/sre2l.py:{args.dataset}",
        [
            *data_override,
            f"model={args.teacher_model}",
            f"width={args.teacher_width}",
            f"epochs={args.teacher_epochs}",
        ],
    )
    teacher = run_squeeze(squeeze, str(root / "squeeze"))
    teacher_accuracy = teacher.meta["extra"]["test_accuracy"]
    print(f"teacher: {100 * teacher_accuracy:.2f} % ({time.time() - started:.0f} s)", flush=True)
    dataset = data_lib.load_dataset(args.dataset, data_dir=args.data_dir or None)
    relabel = load_config(f"configs/relabel/sre2l.py:{args.dataset}", data_override)
    recipe = kd.recipe_from_config(relabel.recipe)
    if args.kd_epochs:
        recipe = kd.get_recipe(recipe, epochs=args.kd_epochs)
    overrides = dict(relabel.eval.model_overrides)
    if args.student_width:
        overrides["width"] = args.student_width
    student = {"model": args.student or relabel.eval.models[0], "model_overrides": overrides}
    args.recipe = dataclasses.asdict(recipe)
    args.student = student

    rows = []
    device = "gpu" if env["device"].startswith("gpu") else "cpu"
    name = f"sre2l_{args.dataset}_{device}{args.out_suffix}"

    def save() -> dict:
        report = {
            "environment": env,
            "settings": vars(args),
            "teacher_test_accuracy": teacher_accuracy,
            "rows": rows,
            "seconds": time.time() - started,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(report))
        return report

    for ipc in args.ipc:
        recover = load_config(
            f"configs/recover/sre2l.py:{args.dataset}",
            [
                *data_override,
                f"teacher={root / 'squeeze' / 'teacher'}",
                f"ipc={ipc}",
                f"iterations={args.recover_iterations}",
            ],
        )
        t = time.time()
        synsets = {"sre2l": run_recover(recover, str(root / f"recover_ipc{ipc}"), progress=False)}
        recover_seconds = time.time() - t
        synsets["random"] = select_lib.select(dataset, "random", ipc)
        for method, synset in synsets.items():
            t = time.time()
            result = kd.evaluate_kd(
                synset,
                dataset,
                teacher,
                recipe=recipe,
                num_models=args.num_models,
                seed=1,
                **student,
            )
            row = {"method": method, "ipc": ipc, "labels": "KD (online teacher)"}
            row.update(result.to_json(), seconds=time.time() - t)
            if method == "sre2l":
                row["recover_seconds"] = recover_seconds
            rows.append(row)
            save()
            print(f"{method} IPC {ipc} KD: {result.summary()} %", flush=True)
        t = time.time()
        hard = evaluate_lib.evaluate_synset(
            synsets["random"],
            dataset,
            protocol="mtt",
            epochs=args.hard_epochs,
            num_models=args.num_models,
            seed=1,
            **student,
        )
        row = {"method": "random", "ipc": ipc, "labels": "hard (MTT protocol)"}
        row.update(hard.to_json(), seconds=time.time() - t)
        rows.append(row)
        save()
        print(f"random IPC {ipc} hard labels: {hard.summary()} %", flush=True)
    print(markdown(save()))


def markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    r = s["recipe"]
    lines = [
        f"# SRe2L on {s['dataset']} ({env['device']}, jax {env['jax']})",
        "",
        f"Teacher {s['teacher_model']} (width {s['teacher_width']}) squeezed "
        f"{s['teacher_epochs']} epochs: {100 * report['teacher_test_accuracy']:.2f} % test "
        f"accuracy. Recover: configs/recover/sre2l.py:{s['dataset']} with "
        f"{s['recover_iterations']} iterations per batch. Students: {s['num_models']} x "
        f"{s['student']['model']} {s['student']['model_overrides']}, KD recipe of "
        f"configs/relabel/sre2l.py:{s['dataset']} ({r['optimizer']} lr {r['lr']}, {r['epochs']} "
        f"epochs, batch {r['batch_size']}, T = {r['temperature']}, crop {r['crop']}, mix "
        f"{r['mix']}), teacher online. Hard-label row: MTT protocol, {s['hard_epochs']} "
        f"epochs, lr 0.01, same students. Total {report['seconds'] / 60:.1f} min.",
        "",
        "| method | labels | " + " | ".join(f"IPC {i}" for i in s["ipc"]) + " |",
        "|---|---|" + "---|" * len(s["ipc"]),
    ]
    keys = list(dict.fromkeys((r["method"], r["labels"]) for r in report["rows"]))
    for method, labels in keys:
        cells = []
        for ipc in s["ipc"]:
            match = [
                r
                for r in report["rows"]
                if (r["method"], r["labels"], r["ipc"]) == (method, labels, ipc)
            ]
            cells.append(
                f"{100 * match[0]['mean']:.2f} ± {100 * match[0]['std']:.2f}" if match else "–"
            )
        lines.append(f"| {method} | {labels} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
