"""``ddjax distill``: a trajectory-matching run in a work directory: configs, eval, resume.

A run reads expert trajectories (``ddjax experts``), initialises the synthetic set, and repeats
:func:`ddjax.distill.core.make_distill_step`'s step for ``iterations`` iterations. Every
``eval_every`` iterations (and at the end) K fresh networks are trained on the current set with
the config's protocol and the *learned* step size; the best mean accuracy so far is tracked and
its set saved, as MTT does.

The method (``config.method``) is a plug-in found in :mod:`ddjax.distill.registry`: MTT
(with TESLA's labels when ``soft_labels='tesla'``), DATM, SelMatch, PAD. This driver calls its
run hooks (:class:`ddjax.distill.method.Method`) and never branches on its name. Config
families: ``configs/distill/{mtt,datm,selmatch,pad}.py``.

Soft labels are saved and evaluated as ``(N, C)`` probabilities; a method may save arrays
beside each set (DATM/PAD: the learned logits, ``<set>_label_logits.npy``). The work
directory::

    WORKDIR/config.json            the resolved config (resume refuses a different one)
    WORKDIR/metrics.jsonl          loss, α, start epoch, skipped updates, evaluations
    WORKDIR/checkpoints/<step>/    Orbax checkpoints of the state (the last `keep` kept)
    WORKDIR/selmatch_init.npz      SelMatch: train indices of D_distill and D_select
    WORKDIR/synset.npz, .png       the latest set (DATM/PAD: + synset_label_logits.npy)
    WORKDIR/synset_best.npz, .png  the best-evaluated set (+ its label logits)
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
import matplotlib
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from ddjax import checkpoint as checkpoint_lib
from ddjax import data as data_lib
from ddjax import distributed, guard, loop, sharding, validate
from ddjax import evaluate as evaluate_lib
from ddjax import experts as experts_lib
from ddjax import models as models_lib
from ddjax.distill import core, matching, registry
from ddjax.distill.method import InitContext, Method
from ddjax.errors import DDJaxError, check
from ddjax.evaluate_stage import evaluate_into
from ddjax.synset import SyntheticSet, load_synset, save_grid
from ddjax.workdir import Workdir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = ["inner_loop", "run_distill", "step_config"]


def step_config(config: ml_collections.ConfigDict) -> core.StepConfig:
    """MTT's :class:`~ddjax.distill.core.StepConfig` of a distill config."""
    return core.StepConfig(
        syn_steps=config.syn_steps,
        expert_epochs=config.expert_epochs,
        max_start_epoch=config.max_start_epoch,
        batch_syn=config.batch_syn,
        lr_img=float(config.lr_img),
        lr_lr=float(config.lr_lr),
        momentum=float(config.momentum),
        dsa=config.dsa,
        lr_floor=config.lr_floor,
    )


def inner_loop(config: ml_collections.ConfigDict, model, batch_sharding=None) -> matching.InnerLoop:
    """The :class:`~ddjax.distill.matching.InnerLoop` of a distill config.

    ``loop='auto'`` is resolved by :func:`ddjax.distill.matching.resolve_loop` when the step is
    traced (rolled wherever that is as fast as unrolled: compile time independent of N).
    """
    loop_form = config.loop
    if isinstance(loop_form, str) and loop_form.isdigit():
        loop_form = int(loop_form)
    return matching.InnerLoop(
        model=model,
        mode=config.mode,
        remat_every=config.remat_every,
        loop=loop_form,
        dsa_strategy=config.dsa_strategy,
        batch_sharding=batch_sharding,
    )


def _check_config(config: ml_collections.ConfigDict) -> type[Method]:
    """The config's fields (one-line errors) before any data is read; returns the method."""
    method = registry.method_class(config)
    method.check_config(config)
    check(
        bool(config.experts_dir),
        "config.experts_dir is empty; pass --config.experts_dir=WORKDIR_OF_DDJAX_EXPERTS",
    )
    for name in ("iterations", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        value = config[name]
        check(isinstance(value, int) and value >= 1, f"config.{name}={value!r} must be >= 1")
    check(config.lr_teacher > 0, f"config.lr_teacher={config.lr_teacher} must be positive")
    step_config(config).validate()
    inner_loop(config, model=None).validate()
    return method


def run_distill(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    compiler_options: dict | None = None,
    _stop_after: int | None = None,
) -> dict:
    """``ddjax distill``: runs (or resumes) a trajectory-matching distillation in ``workdir``.

    Args:
      config: a config of ``configs/distill/{mtt,datm,selmatch,pad}.py``.
      workdir: the run directory.
      progress: show a progress bar (silent when not a terminal).
      compiler_options: XLA compiler options for the distill step (tests compile fast).
      _stop_after: for tests: return after this many iterations of this call, as if the
        process were killed there (:class:`ddjax.loop.KillSwitch`): no final evaluation,
        nothing saved beyond the periodic checkpoints.

    Returns:
      ``results.json``'s content.
    """
    validate.check_config(config)
    method_class = _check_config(config)
    settings = step_config(config)
    dataset = data_lib.load_from_config(config.dataset, stage="distill")
    data_lib.check_ipc(dataset, config.ipc)
    validate.check_test_split(dataset, "distill")
    meta = experts_lib.read_meta(config.experts_dir)
    done = experts_lib.completed(config.experts_dir)
    check(bool(done), f"{config.experts_dir} holds no finished expert trajectory yet")
    experts_lib.check_compatible(
        meta,
        dataset_name=dataset.name,
        zca=config.dataset.zca,
        model=config.model,
        model_overrides=None,
        image_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        # T+ + M: the latest target snapshot (DATM's experts: FTD's, 100 epochs).
        min_epochs=config.max_start_epoch + config.expert_epochs,
        min_epochs_reason=(
            f"max_start_epoch + expert_epochs = {config.max_start_epoch} + {config.expert_epochs}"
        ),
        mean=dataset.mean,
        std=dataset.std,
    )
    validate.check_experts_data(meta, dataset)
    # Every trajectory the run will load, checked now: a damaged file is one line before the
    # work directory exists, not a traceback after the first subset is loaded.
    experts_lib.verify_trajectories(config.experts_dir, done)
    # The experts' fingerprint, recorded with the results: a run resumed on experts that
    # changed since (trained again, or more of them finished) is refused, not continued on
    # other trajectories than it started with.
    inputs = {"experts": experts_lib.fingerprint(config.experts_dir, done)}
    validate.check_workdir_inputs(
        workdir, inputs, {"experts": f"config.experts_dir {config.experts_dir}"}
    )
    method = method_class.from_config(config, dataset.num_classes)
    # Data-dependent checks (e.g. SelMatch's scores and windows) before the work directory.
    prepared = method.prepare(config, dataset)
    settings.validate(num_snapshots=int(meta["epochs"]) + 1)
    model = models_lib.get_model(
        config.model, dataset.num_classes, dataset.image_shape, conv_grad=config.conv_grad
    )
    for name in config.eval.models:
        models_lib.get_model(name, dataset.num_classes, dataset.image_shape)
    evaluate_lib.get_protocol(config.eval.protocol, epochs=config.eval.epochs)

    schedule = core.ExpertSchedule(
        len(done), min(config.experts_in_memory, len(done)), seed=config.seed
    )
    init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    # A new run's initial set is made before the work directory exists, since making it can
    # refuse the input (DATM: too few images that the experts classify correctly); its log
    # records and files are written once the directory is there.
    pending = _Pending()
    initial = None
    if not _has_checkpoints(Path(workdir) / "checkpoints"):
        initial = _initial_set(
            config, dataset, method, model, done, schedule, pending, prepared, init_key
        )
    work = Workdir(workdir, config, "distill")
    mesh, batch_sharding = _mesh(config)
    checkpoints = checkpoint_lib.Checkpoints(work.file("checkpoints"), keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    # Events logged after the restored checkpoint are redone, so dropped (once restored: a
    # damaged checkpoint is refused with the work directory as it was). Evaluations stay:
    # results.json keeps them and a resumed run does not redo them.
    if latest is None:
        work.rewind(None, keep=("eval",))
    pending.flush(work)
    if latest is None:
        if initial is None:  # a started run whose checkpoints are all unreadable
            initial = _initial_set(
                config, dataset, method, model, done, schedule, work, prepared, init_key
            )
        images, labels = initial
    else:  # only the structure is needed: the checkpoint replaces every value
        num_images = dataset.num_classes * config.ipc
        images = np.zeros((num_images, *dataset.image_shape), np.float32)
        labels = method.label_template(num_images, dataset.num_classes)
    # alpha_0 = lr_teacher; all later randomness derives from run_key.
    state = core.init_state(images, labels, config.lr_teacher, run_key, settings, method)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
    if latest is not None:
        state = checkpoints.restore(latest, state)
        work.rewind(latest, keep=("eval",))
        print(f"resuming {work.path} at iteration {latest}")
    inner = inner_loop(config, model, batch_sharding)
    step_fn = core.make_distill_step(inner, settings, method, compiler_options=compiler_options)
    num_snapshots = config.max_start_epoch + config.expert_epochs + 1

    results = work.results()
    if results.get("inputs") != inputs:
        results["inputs"] = inputs
        work.save_results(results)
    results.setdefault("evals", {})
    loaded, trajectories = None, None
    iteration = int(state.step)
    kill = loop.KillSwitch(_stop_after)
    bar = loop.progress_bar(
        progress=progress, desc="distill", total=config.iterations, initial=iteration
    )
    window = _Window(iteration)  # seconds per iteration since the last log, without evaluations
    skipped = 0  # updates skipped since the last log
    streak, first = 0, iteration  # consecutive non-finite updates (ddjax.guard)
    kept = f"the last good state is the last checkpoint in {checkpoints.directory}"
    while iteration < config.iterations and not kill.fired:
        if method.evaluates_at(config, iteration):
            _evaluate(work, results, state, dataset, config, method, iteration, bar)
            window.reset(iteration)
        subset_id, members, within = schedule.subset(iteration)
        if subset_id != loaded:
            trajectories = _load_subset(
                config.experts_dir, done, members, schedule.subset_size, num_snapshots
            )
            if mesh is not None:
                trajectories = sharding.replicate(trajectories, mesh)
            loaded = subset_id
        state, metrics = step_fn(state, trajectories, jnp.asarray(within, jnp.int32))
        iteration += 1
        kill.tick()
        metrics = distributed.to_host(metrics)
        if metrics["skipped"]:
            skipped += 1
            reason = (
                f"{guard.REASON} or gradient"
                if metrics["non_finite"]
                else f"loss above threshold {config.get('threshold')}"
            )
            work.log(
                event="skipped",
                iteration=iteration,
                count=1,
                loss=guard.finite_or_none(metrics["loss"]),
                start_epoch=int(metrics["start_epoch"]),
                reason=reason,
            )
            if metrics["non_finite"]:  # threshold skips are routine in DATM: logged only
                tqdm.write(f"iteration {iteration}: {reason}; update skipped")
        # Only non-finite skips count towards the stop; the method's own rule does not.
        streak = streak + 1 if metrics["non_finite"] else (0 if not metrics["skipped"] else streak)
        where = f"iteration {iteration}"
        guard.check_progress(streak, stage="distill", where=where, kept=kept)
        if iteration == config.iterations and streak == iteration - first:
            skipped = f"all {streak} updates up to {where} were skipped"
            raise DDJaxError(guard.no_progress("distill", skipped, kept))
        if loop.every(config.log_every, iteration, last=config.iterations) or kill.fired:
            seconds = window.seconds_per_iteration(iteration)
            window.reset(iteration)
            extra = {}
            if "label_grad_norm" in metrics:
                extra["label_grad_norm"] = guard.finite_or_none(metrics["label_grad_norm"])
            work.log(
                event="step",
                iteration=iteration,
                loss=guard.finite_or_none(metrics["loss"]),
                inner_lr=float(metrics["inner_lr"]),
                start_epoch=int(metrics["start_epoch"]),
                upper_bound=int(metrics["upper_bound"]),
                grad_norm=guard.finite_or_none(metrics["grad_norm"]),
                skipped=skipped,
                seconds_per_iteration=round(seconds, 3),
                **extra,
            )
            skipped = 0
        bar.update(1)
        bar.set_postfix(
            loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['inner_lr']):.4g}"
        )
        if loop.every(config.checkpoint_every, iteration, last=config.iterations):
            checkpoints.save(iteration, state)
    bar.close()
    checkpoints.close()
    if iteration < config.iterations:  # stopped early (tests)
        return results
    _evaluate(work, results, state, dataset, config, method, iteration, None)
    final, extra_arrays = _synset(state, dataset, config, method, iteration)
    _save_synset(work, "synset", final, extra_arrays)
    save_grid(work.file("synset.png"), final, dataset.to_pixels)
    _plot_curves(work)
    best = results.get("best")
    if best is not None and tuple(config.eval.models) != (method.eval_model(config),):
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


def _mesh(config):
    """A data-axis mesh over all devices when there are several (else no mesh)."""
    if not config.shard_batch or jax.device_count() == 1:
        return None, None
    mesh = sharding.make_mesh(pool=1, data=jax.device_count())
    return mesh, NamedSharding(mesh, P("data"))


def _initial_set(
    config,
    dataset: data_lib.Dataset,
    method: Method,
    model,
    done,
    schedule: core.ExpertSchedule,
    work: Workdir | _Pending,
    prepared,
    init_key,
) -> tuple[np.ndarray, np.ndarray]:
    """The method's initial images and labels (its ``initial_set`` hook, with the run's
    data, experts and logging into ``work``, or held by a :class:`_Pending` until it exists)."""
    finals = {}

    def final_params(position: int):
        if position not in finals:
            trajectory = experts_lib.load_trajectory(config.experts_dir, int(done[position]))
            finals[position] = jax.tree.map(lambda a: jnp.asarray(a[-1]), trajectory)
        return finals[position]

    context = InitContext(
        config=config,
        dataset=dataset,
        model=model,
        num_experts=len(done),
        final_params=final_params,
        # DATM's label expert for init='real': the first expert of the first subset used,
        # as DATM's buffer[0][-1] is the first expert of the first buffer file it loads.
        label_expert=int(schedule.subset(0)[1][0]),
        log=lambda **record: work.log(event="init", **record),
        save_npz=_npz_writer(work),
        prepared=prepared,
    )
    return method.initial_set(context, init_key)


class _Pending:
    """Log records and ``.npz`` files of a run's start, held until its work directory exists."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.arrays: dict[str, dict] = {}

    def log(self, **record) -> None:
        self.records.append(record)

    def save_npz(self, name: str, **arrays) -> None:
        self.arrays[name] = arrays

    def flush(self, work: Workdir) -> None:
        for name, arrays in self.arrays.items():
            _npz_writer(work)(name, **arrays)
        for record in self.records:
            work.log(**record)


def _npz_writer(work: Workdir | _Pending):
    """``save_npz(name, **arrays)``: into ``work`` atomically, or held by a :class:`_Pending`."""
    if isinstance(work, _Pending):
        return work.save_npz
    return lambda name, **arrays: loop.atomic_savez(work.file(name), **arrays)


def _has_checkpoints(directory: Path) -> bool:
    """Whether ``directory`` holds a numbered checkpoint (complete or not) of a started run."""
    return directory.is_dir() and any(p.name.split(".")[0].isdigit() for p in directory.iterdir())


def _load_subset(experts_dir, done, members, subset_size, num_snapshots):
    """The subset's trajectories ``[subset_size, num_snapshots, ...]`` (padded by repetition).

    A last subset smaller than the others is padded with its first expert so that every
    subset has the same shape and the step never recompiles; the padding is never used.
    """
    ids = [int(done[m]) for m in members]
    ids += [ids[0]] * (subset_size - len(ids))
    trajectories = experts_lib.load_trajectories(experts_dir, ids)
    dtype = models_lib.float_dtype()  # the state's: float64 under jax_enable_x64
    return jax.tree.map(lambda a: jnp.asarray(a[:, :num_snapshots], dtype), trajectories)


def _synset(
    state: core.DistillState, dataset, config, method: Method, iteration: int
) -> tuple[SyntheticSet, dict[str, np.ndarray]]:
    """The state as a synthetic set, and the arrays the method saves beside it."""
    labels, extra_arrays, label_meta = method.saved_labels(
        np.asarray(distributed.to_host(state.labels))
    )
    meta = {
        "method": config.method,
        "dataset": dataset.name,
        "ipc": config.ipc,
        "zca": config.dataset.zca,
        "model": config.model,
        "iteration": iteration,
        "seed": config.seed,
        **label_meta,
        **method.synset_meta(config, dataset),
    }
    synset = SyntheticSet(
        images=np.asarray(distributed.to_host(state.images)),
        labels=labels,
        num_classes=dataset.num_classes,
        learning_rate=float(state.inner_lr),
        meta=meta,
    )
    return synset, extra_arrays


def _save_synset(
    work: Workdir, name: str, synset: SyntheticSet, extra_arrays: dict[str, np.ndarray]
) -> None:
    """``<name>.npz`` and the method's arrays as ``<name>_<array>.npy`` (atomic)."""
    synset.save(work.file(f"{name}.npz"))
    for array_name, array in extra_arrays.items():
        loop.atomic_save_npy(work.file(f"{name}_{array_name}.npy"), array)


def _evaluate(
    work: Workdir, results: dict, state, dataset, config, method: Method, iteration: int, bar
) -> None:
    """Evaluates the current set (once per iteration; resumed runs skip done ones)."""
    evals = results["evals"]
    if str(iteration) in evals:
        return
    synset, extra_arrays = _synset(state, dataset, config, method, iteration)
    Path(work.file("grids")).mkdir(exist_ok=True)
    save_grid(work.file(f"grids/iter_{iteration:06d}.png"), synset, dataset.to_pixels)
    result = evaluate_lib.evaluate_synset(
        synset,
        dataset,
        model=method.eval_model(config),
        protocol=config.eval.protocol,
        num_models=config.eval.num_models,
        seed=config.eval.seed,
        epochs=config.eval.epochs,
        batch_size=config.eval.batch_size,
        lr=config.eval.lr,
        **method.eval_options(config),
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
        _save_synset(work, "synset_best", synset, extra_arrays)
        save_grid(work.file("synset_best.png"), synset, dataset.to_pixels)
    _save_synset(work, "synset", synset, extra_arrays)
    work.save_results(results)
    work.log(event="eval", iteration=iteration, mean=result.mean, std=result.std)
    message = (
        f"iteration {iteration}: {result.summary()} % (lr {result.learning_rate:.4g}; "
        f"best {100 * results['best']['mean']:.2f} at {results['best']['iteration']})"
    )
    (tqdm.write if bar is not None else print)(message)


def _plot_curves(work: Workdir) -> None:
    """``curves.png``: matching loss and evaluation accuracy against the iteration."""
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
    with loop.atomic_file(work.file("curves.png")) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
