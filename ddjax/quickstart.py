"""``ddjax quickstart``: the first run, every method on the bundled digits in one table.

Coresets (random, herding, k-center), MTT and DATM (experts, then trajectory matching) and
SRe2L (squeeze, recover, KD students) at IPC 1 and 10 on scikit-learn's 8x8 digits, each row
evaluated with ConvNet-3 networks; writes a picture per set, ``results.json`` and ``table.md``.
Each row runs the stage functions the CLI runs, with the configs under ``configs/``, at one of
two budgets (:data:`BUDGETS`): ``fast`` (the default, a few minutes on 2 CPU cores) shrinks
those configs' run lengths and widths; ``full`` runs them as they are (about an hour).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from ddjax import data as data_lib
from ddjax import select as select_lib
from ddjax import validate
from ddjax.config import load_config
from ddjax.distill.run import run_distill
from ddjax.errors import check
from ddjax.evaluate import EvalSettings
from ddjax.experts.stage import run_experts
from ddjax.sre2l.recover import run_recover
from ddjax.sre2l.relabel import run_relabel
from ddjax.sre2l.squeeze import run_squeeze
from ddjax.synset import save_grid
from ddjax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Budget:
    """One quick-start table's sizes: what each row changes in its ``configs/`` file.

    Attributes:
      name: ``'fast'`` | ``'full'`` (``--full``).
      epochs, num_models: the evaluation's epochs (MTT's protocol, ``epochs + 1`` run) and
        networks per set; ``--epochs`` / ``--num-models`` replace them.
      width: the ConvNet-3 width of every network: evaluation, feature net, experts,
        students (MTT's networks are ``ConvNetW{width}``).
      feature_epochs: training epochs of herding's and k-center's feature net.
      experts: field -> value changes of ``configs/experts/mtt.py:digits``.
      distill: (method, IPC) -> changes of that row's ``configs/distill/*.py`` config.
      squeeze, recover, relabel: changes of ``configs/{squeeze,recover,relabel}/sre2l.py:digits``.
    """

    name: str
    epochs: int
    num_models: int
    width: int
    feature_epochs: int
    experts: dict[str, Any]
    distill: dict[tuple[str, int], dict[str, Any]]
    squeeze: dict[str, Any]
    recover: dict[str, Any]
    relabel: dict[str, Any]


#: ``--full``: the configs as they are (the README's published table; about an hour on 2 cores).
FULL = Budget(
    name="full",
    epochs=300,
    num_models=5,
    width=64,
    feature_epochs=20,
    experts={"test_every": 20},
    distill={("mtt", 1): {}, ("mtt", 10): {}, ("datm", 10): {}},
    squeeze={},
    recover={},
    relabel={},
)

#: The default: the same rows at sizes that fit a few minutes on 2 CPU cores (measured in
#: the README). Width 32 (a quarter of width 64's convolution work) for every network; 2
#: experts of 22 epochs (T+ + M at IPC 10); trajectory matching with N = 10 in a rolled loop:
#: on XLA:CPU the unrolled IPC 10 step compiled in 180 s at N = 20 (width 64) against 26 s
#: rolled, at 4.5 against 5.2 s per iteration, and at IPC 1 (N = 10) in 76 s against 21 s
#: at 0.13 against 0.22 s, so over these short runs the rolled loop wins end to end. 100
#: evaluation epochs on 3 networks: an evaluation costs a few CPU seconds once its programs
#: are in the compilation cache, most of it training.
FAST = Budget(
    name="fast",
    epochs=100,
    num_models=3,
    width=32,
    feature_epochs=10,
    experts={"model": "ConvNetW32", "num_experts": 2, "epochs": 22, "test_every": 22},
    distill={
        ("mtt", 1): {"model": "ConvNetW32", "loop": "rolled", "iterations": 100},
        ("mtt", 10): {"model": "ConvNetW32", "loop": "rolled", "syn_steps": 10, "iterations": 50},
        ("datm", 10): {
            "model": "ConvNetW32",
            "loop": "rolled",
            "syn_steps": 10,
            "iterations": 30,
            "expansion_end_iteration": 30,
        },
    },
    squeeze={"epochs": 15},
    recover={"iterations": 200},
    relabel={"recipe.epochs": 100, "eval.model_overrides.width": 32},
)

BUDGETS = {budget.name: budget for budget in (FAST, FULL)}
#: Each budget's default ``--workdir``: two tables never share a directory by default.
DEFAULT_WORKDIRS = {"fast": "runs/quickstart", "full": "runs/quickstart_full"}


@contextlib.contextmanager
def persistent_compilation_cache(directory: Path) -> Iterator[None]:
    """JAX's persistent compilation cache in ``directory`` while the quick start runs.

    Every evaluation compiles its training step anew (a fresh closure), and the rows share
    shapes: from the second row on, XLA's programs come from the cache (an IPC 10 evaluation
    then costs ~3 CPU s instead of ~11), and a re-run compiles nothing. Every program is
    cached (no minimum compile time or size); keys do not depend on the directory, so a
    cache copied from another workdir is used too. The previous settings are restored after.
    """
    options = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
        # The default puts XLA's own caches under the directory, which makes the directory's
        # path part of every key: a copied cache or another --workdir would never hit.
        "jax_persistent_cache_enable_xla_caches": "none",
    }
    before = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache reads its directory once: make it read ours
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def quickstart(
    workdir: str | None = None,
    epochs: int | None = None,
    num_models: int | None = None,
    distill: bool = True,
    full: bool = False,
) -> dict:
    """The first run: coresets, MTT and SRe2L on the bundled digits at IPC 1 and 10, in a table.

    Uses scikit-learn's digits (no download) and MTT's evaluation protocol with lr 0.01 (MTT
    rows: the learned lr) at the budget's sizes (:data:`FAST`, or :data:`FULL` with
    ``full``: 300 epochs instead of MTT's 1000, 5 ConvNet-3 networks of width 64 per set).
    With ``distill``, also trains the digits experts (``configs/experts/mtt.py:digits``)
    and distils IPC 1 and IPC 10 sets by MTT (``configs/distill/mtt.py:digits,ipc={1,10}``,
    started from random real images) and an IPC 10 set by DATM
    (``configs/distill/datm.py:digits,ipc=10``: learned soft labels); their rows are the final
    sets' evaluations. It also squeezes a digits teacher, recovers an IPC 10 set from it and
    trains the students on the teacher's soft labels (SRe2L; ``configs/{squeeze,recover,
    relabel}/sre2l.py:digits``). Writes one picture per set, ``results.json`` and ``table.md``;
    prints the table. Resumable: finished rows are not recomputed; the workdir records the
    budget, and one of the other budget is refused (``--full``'s default workdir is its own).
    Compiled programs are cached in ``WORKDIR/jax_cache`` (:func:`persistent_compilation_cache`).
    """
    # The options, checked before any work (training the feature net alone takes a while).
    budget = FULL if full else FAST
    epochs = budget.epochs if epochs is None else epochs
    num_models = budget.num_models if num_models is None else num_models
    validate.count("--epochs", epochs)
    validate.count("--num-models", num_models)
    check(
        workdir is None or bool(str(workdir)),
        f"--workdir is empty; give a directory (default: {DEFAULT_WORKDIRS[budget.name]})",
    )
    config = ml_collections.ConfigDict(
        {
            "stage": "quickstart",
            "budget": budget.name,
            "epochs": epochs,
            "num_models": num_models,
            "dataset": "digits",
        }
    )
    work = Workdir(workdir or DEFAULT_WORKDIRS[budget.name], config, "quickstart")
    with persistent_compilation_cache(work.file("jax_cache")):
        return _quickstart(work, budget, epochs, num_models, distill)


def _quickstart(work: Workdir, budget: Budget, epochs: int, num_models: int, distill: bool):
    """:func:`quickstart`'s rows, after its checks."""
    width = {"width": budget.width}
    dataset = data_lib.load_dataset("digits")
    embedding = select_lib.embed(
        dataset,
        "trained",
        feature_epochs=budget.feature_epochs,
        model_overrides=width,
        progress=True,
    )
    # MTT's protocol with reduced epochs; lr: the set's learned lr, else 0.01. The same seed
    # as the distill rows' evaluations: row i's network k starts from the same weights.
    settings = EvalSettings(
        protocol="mtt", epochs=epochs, num_models=num_models, model_overrides=width
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
        _quickstart_mtt(work, results, budget, epochs, num_models)
        _quickstart_sre2l(work, results, budget, num_models)
    table = format_table(rows, dataset.name, epochs, num_models, budget)
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


def budget_config(config_file: str, changes: dict[str, Any]) -> ml_collections.ConfigDict:
    """``config_file``'s config with a budget's ``changes`` (dotted field -> value)."""
    config = load_config(config_file)
    config.unlock()
    config.update_from_flattened_dict(changes)
    config.lock()
    return config


def _quickstart_mtt(
    work: Workdir, results: dict, budget: Budget, epochs: int, num_models: int
) -> None:
    """The quick start's trajectory-matching rows: digits experts, then MTT and DATM."""
    rows = results["rows"]
    if all(f"{method}_ipc{ipc}" in rows for method, ipc, _ in QUICKSTART_DISTILL):
        return
    experts_dir = work.file("experts")
    experts = budget_config("configs/experts/mtt.py:digits", budget.experts)
    print(
        f"MTT/DATM: training {experts.num_experts} digits experts, then distilling IPC 1 and "
        "IPC 10 ..."
    )
    run_experts(experts, str(experts_dir))
    for method, ipc, config_file in QUICKSTART_DISTILL:
        name = f"{method}_ipc{ipc}"
        if name in rows:
            continue
        changes = {
            "experts_dir": str(experts_dir),
            "eval.epochs": epochs,
            "eval.num_models": num_models,
            **budget.distill[(method, ipc)],
        }
        config = budget_config(config_file, changes)
        config.unlock()
        config.eval.models = (config.model,)  # the experts' width, as the coreset rows'
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


def _quickstart_sre2l(work: Workdir, results: dict, budget: Budget, num_models: int) -> None:
    """The quick start's SRe2L row: squeeze a digits teacher, recover IPC 10, relabel + KD."""
    rows = results["rows"]
    if "sre2l_ipc10" in rows:
        return
    print("SRe2L: squeezing a digits teacher, recovering IPC 10, training students by KD ...")
    squeezed = run_squeeze(
        budget_config("configs/squeeze/sre2l.py:digits", budget.squeeze),
        str(work.file("squeeze")),
    )
    teacher = str(work.file("squeeze") / "teacher")
    print(teacher_line(squeezed, work.file("squeeze")))
    recover = budget_config(
        "configs/recover/sre2l.py:digits", {"teacher": teacher, "ipc": 10, **budget.recover}
    )
    run_recover(recover, str(work.file("recover_ipc10")))
    relabel = budget_config(
        "configs/relabel/sre2l.py:digits",
        {
            "synset": str(work.file("recover_ipc10") / "synset.npz"),
            "teacher": teacher,
            "eval.num_models": num_models,
            **budget.relabel,
        },
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


def format_table(
    rows: dict, dataset: str, epochs: int, num_models: int, budget: Budget = FULL
) -> str:
    """A Markdown table: methods as rows, IPC as columns, mean ± std in percent."""
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    ipcs = sorted({r["ipc"] for r in rows.values()})
    lines = [
        f"Test accuracy (%) on {dataset}, ConvNet-3 (width {budget.width}), MTT protocol with "
        f"{epochs} epochs, mean ± std over {num_models} networks ({budget.name} budget)",
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
        kd_epochs = budget.relabel.get("recipe.epochs", 200)  # the config's 200 unless changed
        lines += [
            "",
            "sre2l: images recovered from a BatchNorm teacher (ConvNet-BN, "
            "configs/squeeze/sre2l.py:digits); its students (the same ConvNet) learn the "
            f"teacher's soft labels by KD (configs/relabel/sre2l.py:digits: AdamW, {kd_epochs} "
            "epochs, T = 20), as SRe2L evaluates, not with the hard-label protocol of the "
            "other rows.",
        ]
    return "\n".join(lines) + "\n"


def teacher_line(teacher, workdir: str | Path) -> str:
    """The line ``ddjax squeeze`` prints after ``run_squeeze``'s own: where the teacher is."""
    accuracy = teacher.meta.get("extra", {}).get("test_accuracy")
    shown = f"; test accuracy {100 * accuracy:.2f} %" if accuracy is not None else ""
    return f"squeeze: teacher {teacher.meta['model']} in {Path(workdir) / 'teacher'}{shown}"
