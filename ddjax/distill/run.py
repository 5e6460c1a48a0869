"""``ddjax distill``: an MTT run in a work directory -- configs, evaluation, checkpoints, resume.

A run reads expert trajectories (``ddjax experts``), initialises the synthetic set (real
images of each class, or noise), and repeats :func:`ddjax.distill.mtt.make_distill_step`'s
step for ``iterations`` iterations. Every ``eval_every`` iterations (and at the end) K fresh
networks are trained on the current set with the MTT protocol and the *learned* step size;
the best mean accuracy so far is tracked and its set saved, as MTT does. The work directory::

    WORKDIR/config.json            the resolved config (resume refuses a different one)
    WORKDIR/metrics.jsonl          loss, α, start epoch, skipped updates, evaluations
    WORKDIR/checkpoints/<step>/    Orbax checkpoints of the state (the last `keep` kept)
    WORKDIR/synset.npz, .png       the latest set
    WORKDIR/synset_best.npz, .png  the best-evaluated set
    WORKDIR/grids/iter_<it>.png    the set at every evaluation
    WORKDIR/curves.png             loss and accuracy curves
    WORKDIR/results.json           evaluations, best, final cross-architecture results

Re-running the same command resumes from the newest complete checkpoint; the result is the
same synthetic set as an uninterrupted run (the expert order is a function of the iteration
and all other randomness comes from the checkpointed key).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from ddjax import checkpoint as checkpoint_lib
from ddjax import data as data_lib
from ddjax import evaluate as evaluate_lib
from ddjax import models as models_lib
from ddjax import select as select_lib
from ddjax import sharding
from ddjax.config import dataset_section, eval_section
from ddjax.distill import mtt
from ddjax.errors import DDJaxError, check
from ddjax.synset import SyntheticSet, save_grid
from ddjax.workdir import Workdir

__all__ = ["METHODS", "distill_config", "run_distill", "step_config"]

METHODS = ("mtt",)
#: Variants built on the same core that later ddjax versions add (refused with a message).
PLANNED_METHODS = {
    "datm": "DATM (difficulty-aligned range, soft labels)",
    "selmatch": "SelMatch (selection init + partial update)",
    "tesla": "TESLA's soft-label assignment (the TESLA *gradient* is config.mode='tesla')",
}


def distill_config(
    dataset: str,
    ipc: int,
    *,
    syn_steps: int,
    expert_epochs: int,
    max_start_epoch: int,
    lr_img: float,
    lr_lr: float,
    lr_teacher: float,
    batch_syn: int | None = None,
    zca: bool = False,
    model: str = "ConvNet",
    iterations: int = 5000,
    eval_every: int = 100,
    eval_epochs: int = 1000,
    num_eval: int = 5,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax distill`` config (``configs/distill/<dataset>_ipc<k>.py``).

    Arguments are MTT's hyper-parameters (brief §1.8), named as MTT's arguments.
    """
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(dataset, zca=zca)
    config.method = "mtt"
    config.model = model  # the student; must be the experts' architecture
    config.experts_dir = ""  # a `ddjax experts` work directory (required)
    config.experts_in_memory = 10  # experts loaded at once (MTT: one buffer file of 10)
    config.ipc = ipc
    config.init = "real"  # real (random real images per class) | noise
    config.iterations = iterations
    config.syn_steps = syn_steps  # N
    config.expert_epochs = expert_epochs  # M
    config.max_start_epoch = max_start_epoch  # T+ (start epoch drawn from 0..T+-1)
    config.batch_syn = ml_collections.config_dict.placeholder(int)  # None: all images
    config.batch_syn = batch_syn
    config.lr_img = lr_img
    config.lr_lr = lr_lr
    config.lr_teacher = lr_teacher  # initial learnable step size alpha
    config.momentum = 0.5  # outer SGD momentum (images and alpha)
    config.mode = "remat"  # remat | unroll | tesla
    config.remat_every = ml_collections.config_dict.placeholder(int)
    # auto: unrolled on CPU (XLA:CPU runs rolled loops of conv steps slowly), rolled elsewhere
    # (compile time independent of N); or unrolled | rolled | a chunk length such as '5'.
    config.loop = "auto"
    config.dsa = True
    config.dsa_strategy = "color_crop_cutout_flip_scale_rotate"
    config.lr_floor = ml_collections.config_dict.placeholder(float)  # alpha >= lr_floor
    config.shard_batch = True  # split the inner minibatch over all devices (data axis)
    config.seed = 0
    config.eval_every = eval_every
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    config.log_every = 10
    config.eval = eval_section(epochs=eval_epochs, num_models=num_eval, models=(model,))
    return config


def step_config(config: ml_collections.ConfigDict) -> mtt.StepConfig:
    """The :class:`~ddjax.distill.mtt.StepConfig` of a distill config."""
    loop = config.loop
    if loop == "auto":
        loop = "unrolled" if jax.default_backend() == "cpu" else "rolled"
    elif isinstance(loop, str) and loop.isdigit():
        loop = int(loop)
    return mtt.StepConfig(
        syn_steps=config.syn_steps,
        expert_epochs=config.expert_epochs,
        max_start_epoch=config.max_start_epoch,
        batch_syn=config.batch_syn,
        lr_img=float(config.lr_img),
        lr_lr=float(config.lr_lr),
        momentum=float(config.momentum),
        mode=config.mode,
        remat_every=config.remat_every,
        loop=loop,
        dsa=config.dsa,
        dsa_strategy=config.dsa_strategy,
        lr_floor=config.lr_floor,
    )


def _check_config(config: ml_collections.ConfigDict) -> None:
    method = config.method
    if method in PLANNED_METHODS:
        raise DDJaxError(
            f"config.method={method!r} ({PLANNED_METHODS[method]}) is not implemented in this "
            f"version of ddjax; available: {list(METHODS)}"
        )
    check(method in METHODS, f"config.method={method!r} is not known; valid: {list(METHODS)}")
    check(config.init in ("real", "noise"), f"config.init={config.init!r}: expected real | noise")
    check(
        bool(config.experts_dir),
        "config.experts_dir is empty; pass --config.experts_dir=WORKDIR_OF_DDJAX_EXPERTS",
    )
    for name in ("iterations", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        value = config[name]
        check(isinstance(value, int) and value >= 1, f"config.{name}={value!r} must be >= 1")
    check(config.lr_teacher > 0, f"config.lr_teacher={config.lr_teacher} must be positive")


def _experts_api():
    from ddjax import experts  # the experts stage (imported late: it is a sibling stage)

    return experts


def run_distill(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    compiler_options: dict | None = None,
    _stop_at: int | None = None,
) -> dict:
    """``ddjax distill``: runs (or resumes) an MTT distillation in ``workdir``.

    Args:
      config: a :func:`distill_config` config.
      workdir: the run directory.
      progress: show a progress bar (silent when not a terminal).
      compiler_options: XLA compiler options for the distill step (tests compile fast).
      _stop_at: for tests: return after this many iterations as if the process were killed
        there (no final evaluation, nothing saved beyond the periodic checkpoints).

    Returns:
      ``results.json``'s content.
    """
    _check_config(config)
    settings = step_config(config)
    settings.validate(0)
    experts = _experts_api()
    dataset = load_dataset(config)
    data_lib.check_ipc(dataset, config.ipc)
    meta = experts.read_meta(config.experts_dir)
    done = experts.completed(config.experts_dir)
    check(bool(done), f"{config.experts_dir} holds no finished expert trajectory yet")
    experts.check_compatible(
        meta,
        dataset_name=dataset.name,
        zca=config.dataset.zca,
        model=config.model,
        model_overrides=None,
        image_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        min_epochs=config.max_start_epoch + config.expert_epochs,
        min_epochs_reason=(
            f"max_start_epoch + expert_epochs = {config.max_start_epoch} + {config.expert_epochs}"
        ),
        mean=dataset.mean,
        std=dataset.std,
    )
    num_images = dataset.num_classes * config.ipc
    settings.validate(num_images, num_snapshots=int(meta["epochs"]) + 1)
    model = models_lib.get_model(config.model, dataset.num_classes, dataset.image_shape)
    for name in config.eval.models:
        models_lib.get_model(name, dataset.num_classes, dataset.image_shape)
    evaluate_lib.get_protocol(config.eval.protocol, epochs=config.eval.epochs)

    work = Workdir(workdir, config, "distill")
    mesh, batch_sharding = _mesh(config)
    state = _initial_state(config, dataset, settings)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
    checkpoints = checkpoint_lib.Checkpoints(work.file("checkpoints"), keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None:
        state = checkpoints.restore(latest, state)
        print(f"resuming {work.path} at iteration {latest}")
    step_fn = mtt.make_distill_step(
        model, settings, batch_sharding=batch_sharding, compiler_options=compiler_options
    )
    schedule = mtt.ExpertSchedule(
        len(done), min(config.experts_in_memory, len(done)), seed=config.seed
    )
    num_snapshots = config.max_start_epoch + config.expert_epochs + 1

    results = work.results()
    results.setdefault("evals", {})
    loaded, trajectories = None, None
    iteration = int(state.step)
    stop = config.iterations if _stop_at is None else min(_stop_at, config.iterations)
    bar = tqdm(
        total=config.iterations,
        initial=iteration,
        desc="distill",
        disable=None if progress else True,
    )
    window = _Window(iteration)  # seconds per iteration since the last log, without evaluations
    while iteration < stop:
        if iteration % config.eval_every == 0:
            _evaluate(work, results, state, dataset, config, iteration, bar)
            window.reset(iteration)
        subset_id, members, within = schedule.subset(iteration)
        if subset_id != loaded:
            trajectories = _load_subset(
                experts, config.experts_dir, done, members, schedule.subset_size, num_snapshots
            )
            if mesh is not None:
                trajectories = sharding.replicate(trajectories, mesh)
            loaded = subset_id
        state, metrics = step_fn(state, trajectories, jnp.asarray(within, jnp.int32))
        iteration += 1
        metrics = jax.device_get(metrics)
        if metrics["skipped"]:
            work.log(event="skipped", iteration=iteration, loss=float(metrics["loss"]))
            tqdm.write(f"iteration {iteration}: non-finite loss/gradient/lr; update skipped")
        if iteration % config.log_every == 0 or iteration == stop:
            seconds = window.seconds_per_iteration(iteration)
            window.reset(iteration)
            work.log(
                event="step",
                iteration=iteration,
                loss=float(metrics["loss"]),
                inner_lr=float(metrics["inner_lr"]),
                start_epoch=int(metrics["start_epoch"]),
                grad_norm=float(metrics["grad_norm"]),
                seconds_per_iteration=round(seconds, 3),
            )
        bar.update(1)
        bar.set_postfix(
            loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['inner_lr']):.4g}"
        )
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            checkpoints.save(iteration, state)
    bar.close()
    checkpoints.close()
    if iteration < config.iterations:  # stopped early (tests)
        return results
    _evaluate(work, results, state, dataset, config, iteration, None)
    final = _synset(state, dataset, config, iteration)
    final.save(work.file("synset.npz"))
    save_grid(work.file("synset.png"), final, dataset.to_pixels)
    _plot_curves(work)
    best = results.get("best")
    if best is not None and tuple(config.eval.models) != (config.model,):
        from ddjax.stages import evaluate_into
        from ddjax.synset import load_synset

        evaluate_into(
            work, load_synset(work.file("synset_best.npz")), dataset, config.eval, "final"
        )
        results = work.results()
    if best is not None:
        print(
            f"best: {100 * best['mean']:.2f} ± {100 * best['std']:.2f} % at iteration "
            f"{best['iteration']} (lr {best['learning_rate']:.4g}); sets in {work.path}"
        )
    return results


class _Window:
    """Wall-clock seconds per iteration over a window of iterations."""

    def __init__(self, iteration: int):
        self.reset(iteration)

    def reset(self, iteration: int) -> None:
        self.start, self.iteration = time.time(), iteration

    def seconds_per_iteration(self, iteration: int) -> float:
        return (time.time() - self.start) / max(iteration - self.iteration, 1)


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    return data_lib.load_dataset(
        config.dataset.name,
        data_dir=config.dataset.data_dir or None,
        zca=config.dataset.zca,
        normalisation=config.dataset.get("normalisation") or None,
    )


def _mesh(config):
    """A data-axis mesh over all devices when there are several (else no mesh)."""
    if not config.shard_batch or jax.device_count() == 1:
        return None, None
    mesh = sharding.make_mesh(pool=1, data=jax.device_count())
    return mesh, NamedSharding(mesh, P("data"))


def _initial_state(config, dataset: data_lib.Dataset, settings: mtt.StepConfig):
    """Real images (MTT's pix_init='real': random real images per class) or N(0, 1) noise."""
    key = jax.random.PRNGKey(config.seed)
    init_key, run_key = jax.random.split(key)
    real = select_lib.select(dataset, "random", config.ipc, seed=config.seed)
    images = np.asarray(real.images, np.float32)
    if config.init == "noise":
        images = np.asarray(jax.random.normal(init_key, images.shape), np.float32)
    return mtt.init_state(images, real.labels, config.lr_teacher, run_key, settings)


def _load_subset(experts, experts_dir, done, members, subset_size, num_snapshots):
    """The subset's trajectories ``[subset_size, num_snapshots, ...]`` (padded by repetition).

    A last subset smaller than the others is padded with its first expert so that every
    subset has the same shape and the step never recompiles; the padding is never used.
    """
    ids = [int(done[m]) for m in members]
    ids += [ids[0]] * (subset_size - len(ids))
    trajectories = experts.load_trajectories(experts_dir, ids)
    return jax.tree.map(lambda a: jnp.asarray(a[:, :num_snapshots], jnp.float32), trajectories)


def _synset(state: mtt.DistillState, dataset, config, iteration: int) -> SyntheticSet:
    return SyntheticSet(
        images=np.asarray(jax.device_get(state.images)),
        labels=np.asarray(jax.device_get(state.labels)),
        num_classes=dataset.num_classes,
        learning_rate=float(state.inner_lr),
        meta={
            "method": config.method,
            "dataset": dataset.name,
            "ipc": config.ipc,
            "zca": config.dataset.zca,
            "model": config.model,
            "iteration": iteration,
            "seed": config.seed,
        },
    )


def _evaluate(work: Workdir, results: dict, state, dataset, config, iteration: int, bar) -> None:
    """Evaluates the current set (once per iteration; resumed runs skip done ones)."""
    evals = results["evals"]
    if str(iteration) in evals:
        return
    synset = _synset(state, dataset, config, iteration)
    Path(work.file("grids")).mkdir(exist_ok=True)
    save_grid(work.file(f"grids/iter_{iteration:06d}.png"), synset, dataset.to_pixels)
    result = evaluate_lib.evaluate_synset(
        synset,
        dataset,
        model=config.model,
        protocol=config.eval.protocol,
        num_models=config.eval.num_models,
        seed=config.eval.seed,
        epochs=config.eval.epochs,
        batch_size=config.eval.batch_size,
        lr=config.eval.lr,
    )
    record = {
        "iteration": iteration,
        "mean": result.mean,
        "std": result.std,
        "accuracies": [float(a) for a in result.accuracies],
        "learning_rate": result.learning_rate,
    }
    evals[str(iteration)] = record
    best = results.get("best")
    if best is None or result.mean > best["mean"]:
        results["best"] = record
        synset.save(work.file("synset_best.npz"))
        save_grid(work.file("synset_best.png"), synset, dataset.to_pixels)
    synset.save(work.file("synset.npz"))
    work.save_results(results)
    work.log(event="eval", iteration=iteration, mean=result.mean, std=result.std)
    message = (
        f"iteration {iteration}: {result.summary()} % (lr {result.learning_rate:.4g}; "
        f"best {100 * results['best']['mean']:.2f} at {results['best']['iteration']})"
    )
    (tqdm.write if bar is not None else print)(message)


def _plot_curves(work: Workdir) -> None:
    """``curves.png``: matching loss and evaluation accuracy against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in work.file("metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("event") == "step"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot([r["iteration"] for r in steps], [r["loss"] for r in steps])
    ax_loss.set(xlabel="iteration", ylabel="matching loss", title="loss")
    ax_acc.errorbar(
        [r["iteration"] for r in evals],
        [100 * r["mean"] for r in evals],
        yerr=[100 * r["std"] for r in evals],
        marker="o",
        capsize=3,
    )
    ax_acc.set(xlabel="iteration", ylabel="test accuracy (%)", title="evaluation")
    fig.tight_layout()
    fig.savefig(work.file("curves.png"), dpi=100)
    plt.close(fig)
