"""``ddjax distill``: an MTT, DATM or SelMatch run in a work directory: configs, eval, resume.

A run reads expert trajectories (``ddjax experts``), initialises the synthetic set, and repeats
:func:`ddjax.distill.mtt.make_distill_step`'s step for ``iterations`` iterations. Every
``eval_every`` iterations (and at the end) K fresh networks are trained on the current set with
the MTT protocol and the *learned* step size; the best mean accuracy so far is tracked and its
set saved, as MTT does.

Methods (``config.method``):

* ``'mtt'`` (Cazenavette et al. 2022): real or noise images, hard labels
  (``soft_labels='none'``) or TESLA's soft-label assignment (``soft_labels='tesla'``, Cui et
  al. 2023); TESLA's gradient is ``mode='tesla'``. Configs: :func:`distill_config`.
* ``'datm'`` (Guo et al. 2024; :mod:`ddjax.distill.datm`): images and label logits initialised
  from the experts (``init='samples_predicted_correctly'`` or ``'real'``), learned soft labels
  (``soft_labels='learned'``), the matching range with sequential generation and the loss
  threshold; evaluated with soft cross-entropy and batch 128. Configs: :func:`datm_config`.
* ``'selmatch'`` (Lee & Chung 2024; :mod:`ddjax.distill.selmatch`): the set initialised from
  a sliding window of each class's hardest-first difficulty ranking (``init='window'``, scores
  from ``config.scores``) or at random, laid out ``cat(distilled, selected)``; only the
  distilled part is learned (``num_frozen``); evaluated at SelMatch's iterations
  (``eval_iterations``) with its protocol (``'selmatch'``: ResNet-18-BN, lr 0.1 cosine,
  combined augmentation). Configs: :func:`selmatch_config`.

Soft labels are saved and evaluated as ``(N, C)`` probabilities: DATM's are softmax of the
learned logits, which are stored beside each set (``<set>_label_logits.npy``). The work
directory::

    WORKDIR/config.json            the resolved config (resume refuses a different one)
    WORKDIR/metrics.jsonl          loss, α, start epoch, skipped updates, evaluations
    WORKDIR/checkpoints/<step>/    Orbax checkpoints of the state (the last `keep` kept)
    WORKDIR/selmatch_init.npz      SelMatch: train indices of D_distill and D_select
    WORKDIR/synset.npz, .png       the latest set (DATM: + synset_label_logits.npy)
    WORKDIR/synset_best.npz, .png  the best-evaluated set (DATM: + synset_best_label_logits.npy)
    WORKDIR/grids/iter_<it>.png    the set at every evaluation
    WORKDIR/curves.png             loss and accuracy curves
    WORKDIR/results.json           evaluations, best, final cross-architecture results

Re-running the same command resumes from the newest complete checkpoint; the result is the
same synthetic set as an uninterrupted run (the expert order is a function of the iteration
and all other randomness comes from the checkpointed key).
"""

from __future__ import annotations

import json
import os
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
from ddjax import difficulty, sharding
from ddjax import evaluate as evaluate_lib
from ddjax import models as models_lib
from ddjax import select as select_lib
from ddjax.config import dataset_section, eval_section
from ddjax.distill import datm, mtt, selmatch, soft_labels
from ddjax.errors import check
from ddjax.synset import SyntheticSet, save_grid
from ddjax.workdir import Workdir

__all__ = [
    "METHODS",
    "SELMATCH_EVAL_ITERATIONS",
    "datm_config",
    "distill_config",
    "run_distill",
    "selmatch_config",
    "step_config",
]

METHODS = ("mtt", "datm", "selmatch")
#: Per method: the valid ``config.soft_labels`` and ``config.init``.
_METHOD_LABELS = {"mtt": ("none", "tesla"), "datm": ("learned",), "selmatch": ("none",)}
_METHOD_INITS = {"mtt": ("real", "noise"), "datm": datm.INITS, "selmatch": selmatch.INITS}
#: SelMatch's ``eval_it_pool``: the iterations at which distill.py evaluates its set.
SELMATCH_EVAL_ITERATIONS = (0, 500, 1000, 2500, 5000, 7500, 10000)
#: The fields selmatch_config adds to distill_config's.
_SELMATCH_FIELDS = ("alpha", "beta", "scores", "scores_higher", "eval_iterations")


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
    eval_batch_size: int = 256,
) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax distill`` config (``configs/distill/<dataset>_ipc<k>.py``).

    Arguments are MTT's hyper-parameters (brief §1.8), named as MTT's arguments. The DATM and
    TESLA-label fields start at MTT's behaviour (T⁻ = 0, no sequential generation, hard labels,
    no threshold); :func:`datm_config` sets them for DATM.
    """
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(dataset, zca=zca)
    config.method = "mtt"  # mtt | datm (datm_config)
    config.model = model  # the student; must be the experts' architecture
    config.experts_dir = ""  # a `ddjax experts` work directory (required)
    config.experts_in_memory = 10  # experts loaded at once (MTT: one buffer file of 10)
    config.ipc = ipc
    # mtt: real (random real images per class) | noise; datm: samples_predicted_correctly | real
    config.init = "real"
    config.iterations = iterations
    config.syn_steps = syn_steps  # N
    config.expert_epochs = expert_epochs  # M
    config.max_start_epoch = max_start_epoch  # T+ (start epoch drawn from 0..T+-1)
    config.min_start_epoch = 0  # T-: start epoch drawn from T-..upper bound - 1 (DATM)
    # DATM's sequential generation: the upper bound grows from T to T+ over
    # expansion_end_iteration outer iterations (DATM's expansion_end_epoch); unset: off.
    config.current_max_start_epoch = ml_collections.config_dict.placeholder(int)
    config.expansion_end_iteration = ml_collections.config_dict.placeholder(int)
    config.batch_syn = ml_collections.config_dict.placeholder(int)  # None: all images
    config.batch_syn = batch_syn
    config.lr_img = lr_img
    config.lr_lr = lr_lr
    config.lr_teacher = lr_teacher  # initial learnable step size alpha
    config.momentum = 0.5  # outer SGD momentum (images and alpha)
    # none: hard labels | tesla: TESLA's soft-label assignment (mtt) | learned: DATM's logits
    config.soft_labels = "none"
    config.lr_y = ml_collections.config_dict.placeholder(float)  # learned labels' lr (DATM)
    config.momentum_y = 0.9  # learned labels' SGD momentum (DATM)
    config.threshold = ml_collections.config_dict.placeholder(float)  # skip if loss > it (DATM)
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
    config.eval.batch_size = eval_batch_size
    return config


def datm_config(
    dataset: str,
    ipc: int,
    *,
    syn_steps: int,
    expert_epochs: int,
    min_start_epoch: int,
    max_start_epoch: int,
    lr_img: float,
    lr_lr: float,
    lr_teacher: float,
    lr_y: float,
    threshold: float,
    current_max_start_epoch: int | None = None,
    expansion_end_iteration: int | None = None,
    batch_syn: int | None = None,
    zca: bool = True,
    init: str = "samples_predicted_correctly",
    model: str = "ConvNet",
    iterations: int = 10000,
    eval_every: int = 500,
    eval_epochs: int = 1000,
    num_eval: int = 1,
) -> ml_collections.ConfigDict:
    """The fields of a DATM ``ddjax distill`` config (``configs/distill/datm_<dataset>_ipc<k>.py``).

    Arguments are DATM's hyper-parameters (brief §3.2; ``NUS-HPC-AI-Lab/DATM`` configs), named as
    its arguments except ``expansion_end_iteration`` (DATM's ``expansion_end_epoch``, a number of
    outer iterations). Sequential generation is on when ``current_max_start_epoch`` is given.
    The rest is DATM's: 10,000 iterations, learned labels with momentum 0.9, evaluation with
    soft cross-entropy and batch 128 every 500 iterations with one network (DATM re-evaluates
    the best set with 5 afterwards: ``ddjax evaluate`` on ``synset_best.npz``).
    """
    config = distill_config(
        dataset,
        ipc,
        syn_steps=syn_steps,
        expert_epochs=expert_epochs,
        max_start_epoch=max_start_epoch,
        lr_img=lr_img,
        lr_lr=lr_lr,
        lr_teacher=lr_teacher,
        batch_syn=batch_syn,
        zca=zca,
        model=model,
        iterations=iterations,
        eval_every=eval_every,
        eval_epochs=eval_epochs,
        num_eval=num_eval,
        eval_batch_size=128,
    )
    config.method = "datm"
    config.init = init
    config.soft_labels = "learned"
    config.min_start_epoch = min_start_epoch
    config.current_max_start_epoch = current_max_start_epoch
    config.expansion_end_iteration = expansion_end_iteration
    config.lr_y = float(lr_y)
    config.threshold = float(threshold)
    return config


def selmatch_config(
    dataset: str,
    ipc: int,
    *,
    alpha: float,
    beta: float,
    eval_epochs: int,
    scores: str = "forgetting",
    scores_higher: str = "harder",
    syn_steps: int = 55,
    expert_epochs: int = 2,
    max_start_epoch: int = 80,
    lr_img: float = 1000.0,
    lr_lr: float = 1e-5,
    lr_teacher: float = 0.001,
    batch_syn: int | None = 125,
    model: str = "ConvNetBN",
    eval_model: str = "ResNet18BN",
    iterations: int = 10000,
    eval_iterations: tuple[int, ...] = SELMATCH_EVAL_ITERATIONS,
    num_eval: int = 5,
) -> ml_collections.ConfigDict:
    """The fields of a SelMatch ``ddjax distill`` config (``configs/distill/selmatch_*.py``).

    The defaults are SelMatch's ``distill.py`` arguments (brief §4.3): ConvNet-BN student,
    N = 55, M = 2, T⁺ = 80, batch_syn 125, lr_img 1000, lr_lr 1e-5, α₀ (``lr_init``) 0.001,
    10,000 iterations, no ZCA, evaluation at iterations {0, 500, 1000, 2500, 5000, 7500,
    10000} with 5 ResNet-18-BN networks under the ``'selmatch'`` protocol (lr 0.1 cosine,
    batch 128, combined augmentation) for ``eval_epochs`` epochs (SelMatch's
    ``epoch_eval_train``, scaled with IPC: :func:`ddjax.evaluate.selmatch_epochs`). As in
    SelMatch, the evaluation's DSA uses the inner loop's ``dsa_strategy``.

    Args:
      dataset, ipc: the data and images per class.
      alpha: α, the distilled fraction: cpc = ⌊IPC·α⌋ images per class are learned, the
        other spc = IPC − cpc stay real.
      beta: β, the window start ths = ⌊IPC·β⌋ in each class's hardest-first ranking.
      eval_epochs: evaluation epochs (SelMatch scales them with IPC).
      scores: ``'forgetting'`` (the experts' forgetting counts, ``config.experts_dir``) or a
        ``.npy``/``.npz`` file of per-example scores (SelMatch's CIFAR runs: C-scores).
      scores_higher: ``'harder'`` (forgetting counts) or ``'easier'`` (C-scores).
      syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn, model:
        as in :func:`distill_config`.
      eval_model: the evaluation architecture (SelMatch's ``model_eval``).
      iterations: outer iterations.
      eval_iterations: evaluate exactly at these iterations (and at the end); empty: every
        ``eval_every``.
      num_eval: networks per evaluation.
    """
    config = distill_config(
        dataset,
        ipc,
        syn_steps=syn_steps,
        expert_epochs=expert_epochs,
        max_start_epoch=max_start_epoch,
        lr_img=lr_img,
        lr_lr=lr_lr,
        lr_teacher=lr_teacher,
        batch_syn=batch_syn,
        zca=False,
        model=model,
        iterations=iterations,
        eval_every=500,  # unused while eval_iterations is set
        eval_epochs=eval_epochs,
        num_eval=num_eval,
        eval_batch_size=128,
    )
    config.method = "selmatch"
    config.init = "window"  # window (SelMatch's default) | random
    config.alpha = float(alpha)  # distilled fraction: cpc = floor(ipc * alpha)
    config.beta = float(beta)  # window start: ths = floor(ipc * beta), hardest first
    config.scores = scores  # 'forgetting' (experts_dir's counts) | a .npy/.npz scores file
    config.scores_higher = scores_higher  # harder (forgetting) | easier (C-scores)
    config.eval_iterations = tuple(int(i) for i in eval_iterations)
    config.eval.protocol = "selmatch"
    config.eval.models = (eval_model,)
    return config


def step_config(
    config: ml_collections.ConfigDict, num_classes: int | None = None
) -> mtt.StepConfig:
    """The :class:`~ddjax.distill.mtt.StepConfig` of a distill config.

    Args:
      config: a distill config.
      num_classes: the dataset's classes; SelMatch's frozen count ``C·spc`` needs it (without
        it nothing is frozen, which is enough to validate the other fields).
    """
    num_frozen = 0
    if config.method == "selmatch" and num_classes is not None:
        split = difficulty.window_split(config.ipc, config.alpha, config.beta)
        num_frozen = num_classes * split.select_per_class
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
        min_start_epoch=config.min_start_epoch,
        current_max_start_epoch=config.current_max_start_epoch,
        expansion_end_iteration=config.expansion_end_iteration,
        soft_labels=config.soft_labels,
        lr_y=None if config.lr_y is None else float(config.lr_y),
        momentum_y=float(config.momentum_y),
        threshold=None if config.threshold is None else float(config.threshold),
        num_frozen=num_frozen,
    )


def _check_config(config: ml_collections.ConfigDict) -> None:
    method = config.method
    check(
        method in METHODS,
        f"config.method={method!r} is not known; valid: {list(METHODS)} (TESLA is method='mtt' "
        "with mode='tesla' for its gradient and soft_labels='tesla' for its labels)",
    )
    if method == "selmatch":
        missing = [name for name in _SELMATCH_FIELDS if name not in config]
        check(
            not missing,
            f"config.method='selmatch' needs the fields {missing}, which this config lacks; "
            "start from selmatch_config (configs/distill/selmatch_*.py)",
        )
    labels, inits = _METHOD_LABELS[method], _METHOD_INITS[method]
    check(
        config.soft_labels in labels,
        f"config.soft_labels={config.soft_labels!r} with method={method!r}: expected "
        f"{' | '.join(labels)}"
        + (" (DATM configs: datm_config, configs/distill/datm_*.py)" if method == "datm" else ""),
    )
    check(
        config.init in inits,
        f"config.init={config.init!r} with method={method!r}: expected {' | '.join(inits)}",
    )
    if method == "selmatch":
        _check_selmatch(config)
    check(
        bool(config.experts_dir),
        "config.experts_dir is empty; pass --config.experts_dir=WORKDIR_OF_DDJAX_EXPERTS",
    )
    for name in ("iterations", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        value = config[name]
        check(isinstance(value, int) and value >= 1, f"config.{name}={value!r} must be >= 1")
    check(config.lr_teacher > 0, f"config.lr_teacher={config.lr_teacher} must be positive")


def _check_selmatch(config: ml_collections.ConfigDict) -> None:
    """SelMatch's fields (α, β, scores, evaluation iterations); data-dependent checks later."""
    split = difficulty.window_split(config.ipc, config.alpha, config.beta)
    check(
        split.distill_per_class >= 1,
        f"config.alpha={config.alpha} with ipc={config.ipc} distils floor(ipc * alpha) = 0 "
        "images per class; raise alpha (or use ddjax select method='window' for selection only)",
    )
    check(
        config.scores_higher in difficulty.HIGHER,
        f"config.scores_higher={config.scores_higher!r}: expected 'harder' (forgetting counts) "
        "or 'easier' (C-scores)",
    )
    if config.init == "window":
        check(
            bool(config.scores),
            "config.scores is empty: 'forgetting' (the experts' forgetting counts) or a "
            ".npy/.npz file of per-example scores (SelMatch's CIFAR runs use C-scores: "
            "--config.scores=PATH --config.scores_higher=easier)",
        )
    check(
        len(config.eval.models) >= 1,
        "config.eval.models is empty; SelMatch evaluates on its first (ResNet18BN)",
    )
    iterations = config.eval_iterations
    check(
        isinstance(iterations, tuple)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in iterations),
        f"config.eval_iterations={iterations!r} must be a tuple of non-negative iterations "
        "(empty: every eval_every)",
    )


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
    """``ddjax distill``: runs (or resumes) an MTT, DATM or SelMatch distillation in ``workdir``.

    Args:
      config: a :func:`distill_config`, :func:`datm_config` or :func:`selmatch_config` config.
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
    dataset = data_lib.load_from_config(config.dataset)
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
        # T+ + M: the latest target snapshot (DATM's experts: FTD's, 100 epochs).
        min_epochs=config.max_start_epoch + config.expert_epochs,
        min_epochs_reason=(
            f"max_start_epoch + expert_epochs = {config.max_start_epoch} + {config.expert_epochs}"
        ),
        mean=dataset.mean,
        std=dataset.std,
    )
    num_images = dataset.num_classes * config.ipc
    selmatch_set = None
    if config.method == "selmatch":
        # Scores, windows and the frozen count are checked before the work directory exists.
        selmatch_set = _selmatch_initial_set(config, dataset)
        settings = step_config(config, num_classes=dataset.num_classes)
    settings.validate(num_images, num_snapshots=int(meta["epochs"]) + 1)
    model = models_lib.get_model(config.model, dataset.num_classes, dataset.image_shape)
    for name in config.eval.models:
        models_lib.get_model(name, dataset.num_classes, dataset.image_shape)
    evaluate_lib.get_protocol(config.eval.protocol, epochs=config.eval.epochs)

    work = Workdir(workdir, config, "distill")
    mesh, batch_sharding = _mesh(config)
    schedule = mtt.ExpertSchedule(
        len(done), min(config.experts_in_memory, len(done)), seed=config.seed
    )
    checkpoints = checkpoint_lib.Checkpoints(work.file("checkpoints"), keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is None:
        # DATM's label expert for init='real': the first expert of the first subset used,
        # as DATM's buffer[0][-1] is the first expert of the first buffer file it loads.
        label_expert = int(schedule.subset(0)[1][0])
        state = _initial_state(
            config, dataset, settings, model, experts, done, label_expert, work, selmatch_set
        )
    else:  # only the structure is needed: the checkpoint replaces every value
        state = _state_template(config, dataset, settings)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
    if latest is not None:
        state = checkpoints.restore(latest, state)
        print(f"resuming {work.path} at iteration {latest}")
    step_fn = mtt.make_distill_step(
        model, settings, batch_sharding=batch_sharding, compiler_options=compiler_options
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
    skipped = 0  # updates skipped since the last log
    while iteration < stop:
        if _evaluates_at(config, iteration):
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
            skipped += 1
            reason = (
                "non-finite loss/gradient/lr"
                if metrics["non_finite"]
                else f"loss above threshold {config.threshold}"
            )
            work.log(
                event="skipped",
                iteration=iteration,
                loss=float(metrics["loss"]),
                start_epoch=int(metrics["start_epoch"]),
                reason=reason,
            )
            if metrics["non_finite"]:  # threshold skips are routine in DATM: logged only
                tqdm.write(f"iteration {iteration}: {reason}; update skipped")
        if iteration % config.log_every == 0 or iteration == stop:
            seconds = window.seconds_per_iteration(iteration)
            window.reset(iteration)
            extra = {}
            if "label_grad_norm" in metrics:
                extra["label_grad_norm"] = float(metrics["label_grad_norm"])
            work.log(
                event="step",
                iteration=iteration,
                loss=float(metrics["loss"]),
                inner_lr=float(metrics["inner_lr"]),
                start_epoch=int(metrics["start_epoch"]),
                upper_bound=int(metrics["upper_bound"]),
                grad_norm=float(metrics["grad_norm"]),
                skipped=skipped,
                seconds_per_iteration=round(seconds, 3),
                **extra,
            )
            skipped = 0
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
    final, final_logits = _synset(state, dataset, config, iteration)
    _save_synset(work, "synset", final, final_logits)
    save_grid(work.file("synset.png"), final, dataset.to_pixels)
    _plot_curves(work)
    best = results.get("best")
    if best is not None and tuple(config.eval.models) != (_eval_model(config),):
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


def _evaluates_at(config: ml_collections.ConfigDict, iteration: int) -> bool:
    """Whether the set is evaluated before ``iteration`` (SelMatch: its list; else periodic)."""
    listed = tuple(config.get("eval_iterations", ()) or ())
    if listed:
        return iteration in listed
    return iteration % config.eval_every == 0


def _eval_model(config: ml_collections.ConfigDict) -> str:
    """The architecture of the evaluations during the run.

    MTT/DATM evaluate the student's architecture; SelMatch evaluates ``model_eval``
    (ResNet-18-BN), the first of ``config.eval.models``.
    """
    return config.eval.models[0] if config.method == "selmatch" else config.model


def _selmatch_initial_set(config, dataset: data_lib.Dataset) -> selmatch.SelMatchSet:
    """SelMatch's initial set (validates the scores file and the windows on the way)."""
    scores = None
    if config.init == "window":
        scores = difficulty.scores_from_source(
            config.scores,
            higher=config.scores_higher,
            train_labels=dataset.y_train,
            experts_dir=config.experts_dir,
        )
    return selmatch.initial_set(
        dataset,
        config.ipc,
        config.alpha,
        config.beta,
        scores=scores,
        init=config.init,
        seed=config.seed,
    )


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


def _initial_state(
    config,
    dataset: data_lib.Dataset,
    settings: mtt.StepConfig,
    model,
    experts,
    done,
    label_expert,
    work: Workdir,
    selmatch_set: selmatch.SelMatchSet | None = None,
) -> mtt.DistillState:
    """The run's first state.

    MTT: real images (MTT's pix_init='real': random real images per class) or N(0, 1) noise,
    hard labels (one-hot probabilities with TESLA's assignment, which replaces them from the
    first iteration on). DATM: images and label logits from the experts
    (:func:`ddjax.distill.datm.initial_set`; the final snapshots are loaded one expert at a
    time, each once), and DATM's "InitialAcc" (how many initial labels' arg-max is the
    image's class) logged as an ``init`` event. SelMatch: ``selmatch_set`` (distilled images
    first, then the selected ones), hard labels; the train indices of both parts are saved
    as ``selmatch_init.npz`` and the window logged as an ``init`` event.
    """
    key = jax.random.PRNGKey(config.seed)
    init_key, run_key = jax.random.split(key)
    if config.method == "selmatch":
        split = selmatch_set.split
        _save_npz(
            work.file("selmatch_init.npz"),
            distilled=selmatch_set.distilled_indices,
            selected=selmatch_set.selected_indices,
        )
        work.log(
            event="init",
            init=config.init,
            distilled_per_class=split.distill_per_class,
            selected_per_class=split.select_per_class,
            window_start=split.start,
            num_frozen=selmatch_set.num_frozen,
        )
        return mtt.init_state(
            selmatch_set.images, selmatch_set.labels, config.lr_teacher, run_key, settings
        )
    if config.method == "datm":
        finals = {}

        def final_params(position: int):
            if position not in finals:
                trajectory = experts.load_trajectory(config.experts_dir, int(done[position]))
                finals[position] = jax.tree.map(lambda a: jnp.asarray(a[-1]), trajectory)
            return finals[position]

        images, classes, label_logits = datm.initial_set(
            dataset,
            config.ipc,
            config.init,
            model=model,
            final_params=final_params,
            num_experts=len(done),
            label_expert=label_expert,
            seed=config.seed,
        )
        accuracy = float(np.mean(np.argmax(label_logits, axis=1) == classes))
        work.log(event="init", init=config.init, label_accuracy=accuracy, experts=len(done))
        print(f"DATM init ({config.init}): initial labels' accuracy {100 * accuracy:.1f} %")
        return mtt.init_state(images, label_logits, config.lr_teacher, run_key, settings)
    real = select_lib.select(dataset, "random", config.ipc, seed=config.seed)
    images = np.asarray(real.images, np.float32)
    if config.init == "noise":
        images = np.asarray(jax.random.normal(init_key, images.shape), np.float32)
    labels = real.labels
    if config.soft_labels == "tesla":
        labels = np.eye(dataset.num_classes, dtype=np.float32)[labels]
    return mtt.init_state(images, labels, config.lr_teacher, run_key, settings)


def _state_template(config, dataset: data_lib.Dataset, settings: mtt.StepConfig):
    """A state with the run's structure, shapes and dtypes (to restore a checkpoint into)."""
    num_images = dataset.num_classes * config.ipc
    images = np.zeros((num_images, *dataset.image_shape), np.float32)
    if config.soft_labels == "none":
        labels = np.zeros((num_images,), np.int32)
    else:
        labels = np.zeros((num_images, dataset.num_classes), np.float32)
    return mtt.init_state(images, labels, config.lr_teacher, jax.random.PRNGKey(0), settings)


def _load_subset(experts, experts_dir, done, members, subset_size, num_snapshots):
    """The subset's trajectories ``[subset_size, num_snapshots, ...]`` (padded by repetition).

    A last subset smaller than the others is padded with its first expert so that every
    subset has the same shape and the step never recompiles; the padding is never used.
    """
    ids = [int(done[m]) for m in members]
    ids += [ids[0]] * (subset_size - len(ids))
    trajectories = experts.load_trajectories(experts_dir, ids)
    return jax.tree.map(lambda a: jnp.asarray(a[:, :num_snapshots], jnp.float32), trajectories)


def _save_npz(path: Path, **arrays) -> None:
    """``np.savez`` written atomically (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _synset(
    state: mtt.DistillState, dataset, config, iteration: int
) -> tuple[SyntheticSet, np.ndarray | None]:
    """The state as a synthetic set, and DATM's label logits (``None`` for other labels).

    Soft labels are (N, C) probabilities: DATM's are softmax of its learned logits (what
    ``SoftCrossEntropy`` trains on), TESLA's the last iteration's assignment.
    """
    labels = np.asarray(jax.device_get(state.labels))
    logits = None
    meta = {
        "method": config.method,
        "dataset": dataset.name,
        "ipc": config.ipc,
        "zca": config.dataset.zca,
        "model": config.model,
        "iteration": iteration,
        "seed": config.seed,
    }
    if config.soft_labels == "learned":
        logits = labels.astype(np.float32)
        labels = np.asarray(soft_labels.label_probabilities(logits), np.float32)
        meta["labels"] = "softmax of the learned label logits (saved beside: *_label_logits.npy)"
    elif config.soft_labels == "tesla":
        meta["labels"] = "TESLA's soft-label assignment of the last iteration"
    if config.method == "selmatch":
        split = difficulty.window_split(config.ipc, config.alpha, config.beta)
        meta.update(
            init=config.init,
            alpha=split.alpha,
            beta=split.beta,
            scores=config.scores if config.init == "window" else "",
            scores_higher=config.scores_higher,
            window_start=split.start,
            distilled_per_class=split.distill_per_class,
            selected_per_class=split.select_per_class,
            # The leading distilled images: the 'combined' evaluation augments them with DSA.
            num_distilled=dataset.num_classes * split.distill_per_class,
        )
    synset = SyntheticSet(
        images=np.asarray(jax.device_get(state.images)),
        labels=labels,
        num_classes=dataset.num_classes,
        learning_rate=float(state.inner_lr),
        meta=meta,
    )
    return synset, logits


def _save_synset(work: Workdir, name: str, synset: SyntheticSet, logits) -> None:
    """``<name>.npz`` and, for DATM, the label logits as ``<name>_label_logits.npy`` (atomic)."""
    synset.save(work.file(f"{name}.npz"))
    if logits is not None:
        path = work.file(f"{name}_label_logits.npy")
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, np.asarray(logits, np.float32))
        os.replace(tmp, path)


def _evaluate(work: Workdir, results: dict, state, dataset, config, iteration: int, bar) -> None:
    """Evaluates the current set (once per iteration; resumed runs skip done ones)."""
    evals = results["evals"]
    if str(iteration) in evals:
        return
    synset, logits = _synset(state, dataset, config, iteration)
    Path(work.file("grids")).mkdir(exist_ok=True)
    save_grid(work.file(f"grids/iter_{iteration:06d}.png"), synset, dataset.to_pixels)
    # SelMatch's evaluate_synset augments with args.dsa_strategy, the inner loop's strategy.
    extra = {"dsa_strategy": config.dsa_strategy} if config.method == "selmatch" else {}
    result = evaluate_lib.evaluate_synset(
        synset,
        dataset,
        model=_eval_model(config),
        protocol=config.eval.protocol,
        num_models=config.eval.num_models,
        seed=config.eval.seed,
        epochs=config.eval.epochs,
        batch_size=config.eval.batch_size,
        lr=config.eval.lr,
        **extra,
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
        _save_synset(work, "synset_best", synset, logits)
        save_grid(work.file("synset_best.png"), synset, dataset.to_pixels)
    _save_synset(work, "synset", synset, logits)
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
