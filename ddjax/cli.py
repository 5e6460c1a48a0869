"""The ``ddjax`` command: one sub-command per pipeline stage.

  ddjax quickstart                       # digits: coresets, MTT, DATM, SRe2L; table
  ddjax select   --config configs/select/fashion_mnist.py --config.ipc=10 --workdir runs/a
  ddjax evaluate --config configs/evaluate/fashion_mnist.py --config.synset=runs/a/synset.npz \\
                 --workdir runs/a_eval
  ddjax experts  --config configs/experts/mtt.py:digits --workdir runs/experts_digits
  ddjax distill  --config configs/distill/mtt.py:digits,ipc=10 \\
                 --config.experts_dir=runs/experts_digits --workdir runs/mtt_digits
  ddjax squeeze  --config configs/squeeze/sre2l.py:digits --workdir runs/squeeze_digits
  ddjax teacher  --config configs/teacher/torchvision.py:resnet18 \\
                 --config.state_dict=resnet18-f37072fd.pth --workdir runs/teacher_resnet18
  ddjax recover  --config configs/recover/sre2l.py:digits \\
                 --config.teacher=runs/squeeze_digits/teacher --workdir runs/recover_digits
  ddjax relabel  --config configs/relabel/sre2l.py:digits \\
                 --config.synset=runs/recover_digits/synset.npz \\
                 --config.teacher=runs/squeeze_digits/teacher --workdir runs/relabel_digits

Every stage takes ``--config FILE`` (a ``get_config()`` file under ``configs/``),
any number of ``--config.field=value`` overrides and ``--workdir DIR``. Bad input
ends with a one-line ``ddjax: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from ddjax import xla
from ddjax.errors import DDJaxError

#: Each stage's function, as ``"module:function"``. This table is the one place the CLI imports
#: ddjax's stages: they are imported when their stage runs, because importing JAX and the
#: models takes seconds and ``ddjax --help`` should not wait for it.
STAGES = {
    "quickstart": "ddjax.quickstart:quickstart",
    "select": "ddjax.select:run_select",
    "evaluate": "ddjax.evaluate_stage:run_evaluate",
    "experts": "ddjax.experts.stage:run_experts",
    "distill": "ddjax.distill.run:run_distill",
    "squeeze": "ddjax.sre2l.squeeze:run_squeeze",
    "teacher": "ddjax.sre2l.teacher_import:run_teacher_import",
    "recover": "ddjax.sre2l.recover:run_recover",
    "relabel": "ddjax.sre2l.relabel:run_relabel",
}
LOAD_CONFIG = "ddjax.config:load_config"
LAUNCH = "ddjax.distributed:Launch"
CHECK_WORKDIR = "ddjax.workdir:check_path"
INITIALIZE = "ddjax.distributed:initialize"
#: The line printed after a stage that makes a teacher: where it is (the quick start prints
#: squeeze's too; ``ddjax teacher`` adds the recover command to run next).
SUMMARY_LINES = {
    "squeeze": "ddjax.quickstart:teacher_line",
    "teacher": "ddjax.sre2l.teacher_import:summary_line",
}
AVAILABLE = ", ".join(STAGES)

# Stages of the pipeline that later ddjax versions add. They are listed in
# --help so the pipeline is visible, and refused with a clear message.
PLANNED = {
    "bench": "run the benchmarks in benchmarks/",
}

DESCRIPTION = """\
ddjax: dataset distillation in JAX.

Pipeline:  data -> select (coresets) / experts -> distill / squeeze (or teacher) -> recover
           -> relabel -> synthetic set (.npz + .png) -> evaluate -> results.json

Each stage reads a config file (ml_collections get_config(), see configs/) and
writes into --workdir: config.json, metrics.jsonl, results.json, pictures.
Re-running a stage on the same workdir with the same config resumes it.
"""


def _add_common(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        required=default_config is None,
        help="config file with get_config(), or FILE.py:ARG for a config family such as "
        "configs/distill/mtt.py:cifar10,ipc=10 (default: %(default)s); override any field with "
        "--config.FIELD=VALUE, e.g. --config.ipc=10 --config.eval.epochs=300",
    )
    parser.add_argument(
        "--workdir", required=True, help="run directory (created; resumed if it exists)"
    )
    group = parser.add_argument_group(
        "multi-process runs",
        "Run the same command once per process (one per host, or several on one machine); "
        "all processes' devices form one mesh, each process reads its share of the data and "
        "process 0 writes the outputs. --coordinator auto uses jax.distributed's cluster "
        "auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU, or the JAX_COORDINATOR_ADDRESS "
        "environment).",
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address and a free port, the same in every process (or 'auto')",
    )
    group.add_argument("--num_processes", type=int, metavar="P", help="number of processes")
    group.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0 .. P-1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddjax", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")

    quick = sub.add_parser(
        "quickstart",
        help="coresets, MTT, DATM and SRe2L on the bundled digits at IPC 1 and 10; prints a table",
        description="Builds IPC 1 and IPC 10 sets of scikit-learn's bundled digits with random, "
        "herding and k-center selection, with MTT (digits experts, then trajectory matching from "
        "the random sets), DATM at IPC 10 and SRe2L at IPC 10 (squeeze, recover, KD "
        "students), evaluates each with K ConvNets (MTT protocol, reduced epochs; KD for "
        "SRe2L), prints a table (mean ± std) and writes image grids. Needs no download. "
        "Default: a fast table (ConvNet width 32, 2 experts, short runs, 3 networks x 100 "
        "epochs per set; a few minutes on 2 CPU cores); --full: the configs' own budgets "
        "(about an hour). --no-distill keeps only the coresets. Resumable; compiled programs "
        "are cached in WORKDIR/jax_cache.",
    )
    quick.add_argument(
        "--workdir",
        default=None,
        help="output directory (default: runs/quickstart, with --full runs/quickstart_full)",
    )
    quick.add_argument(
        "--full",
        action="store_true",
        help="the published table: the digits configs as they are (5 experts of 40 epochs, "
        "MTT N = 20 for 100-200 iterations, width 64, 5 networks x 300 epochs per set); "
        "about an hour on 2 CPU cores instead of a few minutes",
    )
    quick.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="evaluation epochs (default: 100, with --full 300)",
    )
    quick.add_argument(
        "--num-models",
        type=int,
        default=None,
        help="networks per set (default: 3, with --full 5)",
    )
    quick.add_argument(
        "--no-distill",
        action="store_true",
        help="coresets only: skip the MTT, DATM and SRe2L rows (most of the time)",
    )

    select = sub.add_parser(
        "select",
        help="coresets (random, herding, k-center, forgetting, sliding window) -> synthetic set",
        description="Selects IPC real images per class (config.method: random | herding | "
        "kcenter | forgetting (hardest or easiest per class by difficulty scores) | window "
        "(SelMatch's sliding window; config.betas searches β)), saves WORKDIR/synset.npz and "
        "synset.png, and (config.evaluate) evaluates it. Difficulty scores: config.scores = "
        "forgetting (the counts of config.experts_dir) or a .npy/.npz file (C-scores: "
        "config.scores_higher=easier).",
    )
    _add_common(select, "configs/select/digits.py")

    evaluate = sub.add_parser(
        "evaluate",
        help="train K fresh networks on a synthetic set and test them",
        description="Evaluates config.synset with config.eval.protocol (mtt: SGD momentum 0.9, "
        "wd 5e-4, learned lr, x0.1 at half, DSA, batch 256) on every architecture in "
        "config.eval.models; writes WORKDIR/results.json.",
    )
    _add_common(evaluate, "configs/evaluate/digits.py")

    experts = sub.add_parser(
        "experts",
        help="train expert trajectories for trajectory matching (MTT), with forgetting scores",
        description="Trains config.num_experts networks on the real data with MTT's recipe "
        "(config.model, SGD lr 0.01 without momentum, batch 256, DSA, config.epochs epochs) and "
        "saves each one's params at init and after every epoch as one Orbax checkpoint "
        "WORKDIR/expert_NNNN/ (leading epoch axis), the settings and test accuracies in "
        "WORKDIR/experts.json, and per-example forgetting counts (Toneva et al. 2019) in "
        "WORKDIR/forgetting.npz for selection. config.experts_at_once experts train side by "
        "side (vmap on GPU/TPU, one after another on CPU). A killed run resumes from its last "
        "checkpoint (every config.checkpoint_every epochs) with identical results. The "
        "distillation run must use the same dataset, ZCA setting and model.",
    )
    _add_common(experts, "configs/experts/mtt.py:digits")

    distill = sub.add_parser(
        "distill",
        help="trajectory matching (MTT): learn the synthetic images from expert trajectories",
        description="MTT (Cazenavette et al. 2022) from the experts in config.experts_dir "
        "(`ddjax experts`, same dataset, ZCA setting and model): each iteration starts a student "
        "at a random expert epoch t < config.max_start_epoch, trains it config.syn_steps SGD "
        "steps on the synthetic images (DSA, learnable lr), and moves images and lr (SGD "
        "momentum 0.5, config.lr_img / config.lr_lr) to bring it to the expert's epoch "
        "t + config.expert_epochs. Gradient: config.mode = remat (exact, memory flat in the "
        "steps; default) | unroll (exact, MTT's memory) | tesla (TESLA's estimator). Every "
        "config.eval_every iterations the set is evaluated with config.eval (MTT protocol, "
        "learned lr) and the best is kept. Writes WORKDIR/synset.npz, synset_best.npz, PNG "
        "grids, curves.png, results.json; checkpoints every config.checkpoint_every "
        "iterations, and a re-run resumes. config.method = mtt | datm (learned soft labels, "
        "difficulty-aligned start epochs, loss threshold) | selmatch (sliding-window "
        "selection, only the easier part of each class learned) | pad (DATM matching the "
        "deeper layers only); config.soft_labels=tesla is TESLA's label assignment. Configs "
        "with the published hyper-parameters, one family per method: "
        "configs/distill/{mtt,datm,selmatch,pad}.py:DATASET,ipc=K (e.g. mtt.py:cifar10,ipc=10).",
    )
    _add_common(distill, "configs/distill/mtt.py:digits,ipc=10")

    squeeze = sub.add_parser(
        "squeeze",
        help="SRe2L squeeze: train the BatchNorm teacher on the real data",
        description="Trains config.model (ResNet18BN with the small-image stem, or ConvNetBN) "
        "on the real training split with SRe2L's per-dataset recipe (SGD, cosine schedule, "
        "crop/flip), logs test accuracy per epoch, checkpoints every epoch (a re-run resumes) "
        "and saves WORKDIR/teacher (Orbax params + batch_stats, teacher.json). ImageNet-1K "
        "uses torchvision's pretrained ResNet-18: import it with `ddjax teacher`.",
    )
    _add_common(squeeze, "configs/squeeze/sre2l.py:digits")

    teacher = sub.add_parser(
        "teacher",
        help="SRe2L teacher from PyTorch: import torchvision's ImageNet ResNet-18/50 (.pth)",
        description="Converts the PyTorch state_dict in config.state_dict (a .pth file, e.g. "
        "torchvision's pretrained resnet18; nothing is downloaded) into a teacher directory "
        "for recover and relabel: config.model with config.model_overrides, the data "
        "contract config.num_classes, config.image_size and config.normalisation, recorded "
        "for config.dataset_name. The file, its keys and shapes are checked before WORKDIR "
        "is created. Writes WORKDIR/teacher (Orbax params + batch_stats, teacher.json) and "
        "results.json (model, parameter count, source file and SHA-256); a re-run reports "
        "the teacher already there. Configs: configs/teacher/torchvision.py:{resnet18,resnet50}.",
    )
    _add_common(teacher, "configs/teacher/torchvision.py:resnet18")

    recover = sub.add_parser(
        "recover",
        help="SRe2L recover: synthesise images that match the teacher's BN statistics",
        description="Optimises images from Gaussian noise (Adam 0.5/0.9, cosine lr) so that "
        "the teacher's per-layer batch statistics (BN inputs: mean, biased variance) match its "
        "running statistics, plus cross-entropy on the target class, with the batch-shared "
        "random-resized-crop/flip/roll of SRe2L and per-channel clipping. config.teacher is a "
        "`ddjax squeeze` or `ddjax teacher` teacher directory. Each finished batch is saved (a "
        "re-run resumes); writes WORKDIR/synset.npz and synset.png.",
    )
    _add_common(recover, "configs/recover/sre2l.py:digits")

    relabel = sub.add_parser(
        "relabel",
        help="SRe2L relabel: FKD soft labels from the teacher, and students trained on them",
        description="Stores, per epoch, the crops, flips, mix parameters and the teacher's "
        "fp16 logits for config.synset (one file per epoch, replayable exactly), or uses the "
        "teacher online (config.mode), then trains config.eval.num_models students with the "
        "KL loss at temperature T (SRe2L's recipes) and tests them. Writes WORKDIR/labels/ "
        "and results.json.",
    )
    _add_common(relabel, "configs/relabel/sre2l.py:digits")

    for name, text in PLANNED.items():
        sub.add_parser(name, help=f"{text} (not available in this version)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = build_parser()
    if not rest:
        parser.print_help()
        return 2
    if rest[0] in PLANNED:
        print(
            f"ddjax: error: stage {rest[0]!r} ({PLANNED[rest[0]]}) is not implemented in "
            f"this version of ddjax; available: {AVAILABLE}",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(rest)
    if args.stage is None:
        parser.print_help()
        return 2
    try:
        xla.check_environment()
        if args.stage == "quickstart":
            check_no_overrides(overrides, "quickstart")
            resolve(STAGES["quickstart"])(
                args.workdir,
                epochs=args.epochs,
                num_models=args.num_models,
                distill=not args.no_distill,
                full=args.full,
            )
        else:
            launch = resolve(LAUNCH)(args.coordinator, args.num_processes, args.process_id)
            resolve(CHECK_WORKDIR)(args.workdir)
            config = resolve(LOAD_CONFIG)(args.config, overrides)
            resolve(INITIALIZE)(launch)
            outcome = resolve(STAGES[args.stage])(config, args.workdir)
            if args.stage in SUMMARY_LINES:
                print(resolve(SUMMARY_LINES[args.stage])(outcome, args.workdir))
    except DDJaxError as e:
        print(f"ddjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddjax: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def resolve(target: str) -> Callable:
    """The function named by ``"module:function"`` (its module imported now)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def check_no_overrides(overrides: Sequence[str], stage: str) -> None:
    if overrides:
        raise DDJaxError(f"{stage} takes no --config overrides (got --config.{overrides[0]})")


if __name__ == "__main__":
    sys.exit(main())
