r"""End-to-end accuracy table on Fashion-MNIST beside the published numbers.

Runs ``ddjax select`` (with evaluation) for each method x IPC into
``--root/<method>_<ipc>`` work directories -- re-running resumes, and finished
cells are not recomputed -- then writes ``benchmarks/results/accuracy_<dataset>.{json,md}``.

  # A reduced protocol that fits a 2-core CPU (the default):
  python benchmarks/accuracy.py --methods random --ipc 1 10 50 --epochs 100 --num-models 2
  # The full protocol (MTT: 1000 epochs, 5 networks), for a GPU:
  python benchmarks/accuracy.py --methods random herding kcenter --epochs 1000 --num-models 5

Published numbers: DC (Zhao et al. 2021) Table 1, as collected in
../shared/research/trajectory_matching.md §5.4 (marked [R] there: recalled, not
checked against the PDF).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import environment

from ddjax import stages
from ddjax.config import load_config

RESULTS = Path(__file__).resolve().parent / "results"

PUBLISHED = {
    "fashion_mnist": {
        "random": {1: "51.4 ± 3.8", 10: "73.8 ± 0.7", 50: "82.5 ± 0.7"},
        "herding": {1: "67.0 ± 1.9", 10: "71.1 ± 0.7", 50: "71.9 ± 0.8"},
        "kcenter": {1: "66.9 ± 1.8", 10: "54.7 ± 1.5", 50: "68.3 ± 0.8"},
    }
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--methods", nargs="+", default=["random"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--epochs", type=int, default=100, help="the protocol's Epoch")
    parser.add_argument("--num-models", type=int, default=2)
    parser.add_argument("--root", default="runs/accuracy")
    args = parser.parse_args()

    rows = []
    for method in args.methods:
        for ipc in args.ipc:
            config = load_config(
                f"configs/select/{args.dataset}.py",
                [
                    f"method={method}",
                    f"ipc={ipc}",
                    f"eval.epochs={args.epochs}",
                    f"eval.num_models={args.num_models}",
                ],
            )
            workdir = Path(args.root) / f"{args.dataset}_{method}_{ipc}"
            stages.run_select(config, str(workdir))
            result = json.loads((workdir / "results.json").read_text())["eval"]["ConvNet"]
            published = PUBLISHED.get(args.dataset, {}).get(method, {}).get(ipc, "–")
            rows.append({"method": method, "ipc": ipc, **result, "published": published})

    protocol = (
        f"MTT protocol reduced to {args.epochs} epochs (+1), lr 0.01, SGD momentum 0.9, "
        f"wd 5e-4, DSA, batch 256, lr x0.1 after epoch {args.epochs // 2 + 1}; "
        f"{args.num_models} ConvNet-3 networks per cell; full test set"
    )
    report = {
        "benchmark": "accuracy",
        "dataset": args.dataset,
        "protocol": protocol,
        "environment": environment(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"accuracy_{args.dataset}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    lines = [
        f"# Accuracy on {args.dataset}",
        "",
        f"Device: {env['device']} ({env['cpu_count']} cores), jax {env['jax']}.",
        f"Protocol: {protocol}.",
        "Published: DC (Zhao et al. 2021) Table 1 (ConvNet, 1000-epoch DC/DSA protocol).",
        "",
        "| method | IPC | ddjax (%) | published (%) | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ipc']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
            f"{r['published']} | {r.get('seconds', '–')} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
