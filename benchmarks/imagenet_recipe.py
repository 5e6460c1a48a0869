r"""The README's SRe2L ImageNet recipe, end to end, on a generated 1,000-class dataset.

Runs the recipe's commands as a user types them (``ddjax teacher`` -> ``ddjax recover`` ->
``ddjax relabel`` with KD students), with tiny budgets, on an ImageNet-layout folder of random
JPEGs (``train/nXXXXXXXX/*.JPEG``, ``val/...``; nothing is downloaded) and a ResNet-18
``state_dict`` at random initialisation written with torchvision's keys (what a user's
``resnet18-f37072fd.pth`` holds). ``ddjax recover`` is killed once with SIGKILL after its first
in-batch checkpoint and run again, which must resume and finish. Each stage's wall time and
what it wrote are reported.

  python benchmarks/imagenet_recipe.py --dir /tmp/ddjax-recipe              # 1,000 classes
  python benchmarks/imagenet_recipe.py --dir /tmp/r --classes 20 --size 64   # a quick check

Writes ``benchmarks/results/imagenet_recipe_<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402
from sre2l_scale import make_imagenet_like  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _random_torchvision_resnet18(path: Path, classes: int, size: int) -> Path:
    """A ResNet-18 ``state_dict`` with torchvision's keys, random weights, saved with torch."""
    import jax
    import numpy as np
    import torch

    from ddjax import models

    if path.exists():
        return path
    net = models.get_model("ResNet18BN", classes, (size, size, 3), small_stem=False)
    variables = models.init_variables(net, jax.random.key(0), (size, size, 3))
    state_dict = models.to_torch_state_dict(variables, net, key_style="torchvision")
    rng = np.random.default_rng(0)
    tensors = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name.endswith("running_var"):  # statistics unlike a fresh network's
            value = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif name.endswith("running_mean"):
            value = rng.normal(0, 0.1, value.shape).astype(np.float32)
        tensors[name] = torch.from_numpy(np.array(value, copy=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path


def _ddjax(*args: str, kill_when=None) -> dict:
    """Runs ``ddjax ARGS``; with ``kill_when()`` true, SIGKILLs it there (a killed run)."""
    command = [sys.executable, "-m", "ddjax.cli", *args]
    print("$ ddjax " + " ".join(args), flush=True)
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    killed = False
    while process.poll() is None:
        if kill_when is not None and kill_when():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = True
            break
        time.sleep(0.5)
    seconds = time.time() - start
    if not killed and process.returncode != 0:
        sys.exit(f"ddjax {args[0]} failed with exit code {process.returncode}")
    return {"seconds": round(seconds, 1), "killed": killed}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="where the data and runs go")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=2, help="recover iterations a batch")
    parser.add_argument("--batch", type=int, default=100, help="recover, relabel and KD batch")
    options = parser.parse_args()
    base = Path(options.dir).absolute()
    classes, size = options.classes, options.size
    data = make_imagenet_like(base / "imagenet_like", classes, train=1, val=1)
    pth = _random_torchvision_resnet18(base / "resnet18_random.pth", classes, size)
    runs = base / "runs"
    shape = [f"--config.num_classes={classes}", f"--config.image_size={size}"]
    stages = {}
    stages["teacher"] = _ddjax(
        "teacher", "--config", "configs/teacher/torchvision.py:resnet18",
        f"--config.state_dict={pth}", f"--config.dataset_name=stream:folder:{data}", *shape,
        "--workdir", str(runs / "teacher"),
    )  # fmt: skip
    teacher = runs / "teacher" / "teacher"
    recover = [
        "recover", "--config", "configs/recover/sre2l.py:imagenet",
        f"--config.teacher={teacher}", "--config.ipc=1",
        f"--config.iterations={options.iterations}", "--config.checkpoint_every=1",
        f"--config.batch_size={min(options.batch, classes)}",
        f"--config.jitter=(0, {32 * size // 224})", "--workdir", str(runs / "recover"),
    ]  # fmt: skip
    inflight = runs / "recover" / "inflight.npz"
    stages["recover (killed)"] = _ddjax(*recover, kill_when=inflight.exists)
    stages["recover (resumed)"] = _ddjax(*recover)
    stages["relabel + KD student"] = _ddjax(
        "relabel", "--config", "configs/relabel/sre2l.py:imagenet",
        f"--config.synset={runs / 'recover' / 'synset'}", f"--config.teacher={teacher}",
        f"--config.dataset.name=stream:folder:{data}", "--config.dataset.normalisation=imagenet",
        f"--config.dataset.image_size={size}", "--config.recipe.epochs=1",
        f"--config.recipe.batch_size={options.batch}", "--config.evaluate=True",
        "--config.eval.num_models=1",
        "--workdir", str(runs / "relabel"),
    )  # fmt: skip
    recover_results = json.loads((runs / "recover" / "results.json").read_text())
    events = [json.loads(line) for line in (runs / "recover" / "metrics.jsonl").open()]
    checkpoints = [(e["batch"], e["iteration"]) for e in events if e["event"] == "checkpoint"]
    resumed = (
        f"metrics.jsonl: {len(checkpoints)} in-batch checkpoints, "
        f"{len(checkpoints) - len(set(checkpoints))} repeated (the resumed run continued the "
        "killed batch from its checkpoint instead of redoing it)"
    )
    relabel_results = json.loads((runs / "relabel" / "results.json").read_text())
    report = {
        "environment": environment(),
        "settings": {
            "classes": classes,
            "size": size,
            "iterations": options.iterations,
            "batch": options.batch,
            "ipc": 1,
        },  # fmt: skip
        "stages": stages,
        "resume": resumed,
        "synset_bytes": _size(runs / "recover" / "synset"),
        "label_bytes": relabel_results["labels"]["storage_bytes"],
        "recover_summary": recover_results.get("summary"),
        "students": relabel_results.get("eval"),
    }
    platform = report["environment"]["device"].split(":")[0]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"imagenet_recipe_{platform}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"# The README's ImageNet recipe on generated data ({report['environment']['device']}, "
        f"{os.cpu_count()} cores)",
        "",
        f"{classes} classes at {size} px (1 train + 1 val JPEG a class), IPC 1, recover "
        f"{options.iterations} iterations a batch, 1 relabel/KD epoch, batch {options.batch}; "
        "recover killed with SIGKILL after its first in-batch checkpoint and resumed.",
        "",
        "| stage | wall time | killed |",
        "|---|---|---|",
        *(f"| {k} | {v['seconds']} s | {v['killed']} |" for k, v in stages.items()),
        "",
        f"Synthetic folder: {report['synset_bytes'] / 2**20:.1f} MiB; labels: "
        f"{report['label_bytes'] / 2**20:.1f} MiB. {resumed}. Students (random teacher, one "
        f"epoch: chance is expected): "
        + ", ".join(
            f"{m} top-1 {100 * r['mean']:.2f} %, top-5 {100 * r.get('top5_mean', 0):.2f} %"
            for m, r in (report["students"] or {}).items()
        )
        + ".",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
