r"""ddjax beside the official PyTorch code: one MTT iteration and one SRe2L recover iteration.

The official code is imported from local checkouts, passed by path and never copied into ddjax:
``--mtt`` is GeorgeCazenavette/mtt-distillation (its ``networks.py``, ``reparam_module.py`` and
``utils.py``, which imports kornia and torchvision), ``--sre2l`` is VILA-Lab/SRe2L (its
``SRe2L/*small_dataset/recover_cifar.py`` and the ``utils.py`` beside it). Each side runs on
identical shapes, data and settings, on the same device (torch: CUDA if available, else the CPU
with ``torch.set_num_threads(os.cpu_count())``; JAX: its default backend), each configuration in
a fresh subprocess so that its peak memory is its own.

**MTT** (Cazenavette et al., CVPR 2022): ConvNet-3 (width 128, instance norm, average pooling),
IPC ``--ipc`` (default 10), ``batch_syn`` = every synthetic image, DSA
(``color_crop_cutout_flip_scale_rotate``) on every inner step, N inner steps. The official side is
``distill.py``'s iteration as written there: ``ReparamModule(ConvNet(...))``, a minibatch from
``randperm`` chunks per step, ``DiffAugment(x, strategy, param=ParamDiffAug())``, the forward pass
with ``flat_param``, cross-entropy, ``torch.autograd.grad(..., create_graph=True)``, the SGD update
with the learnable ``syn_lr``; then the normalised parameter loss, ``backward()`` and the two SGD
(momentum 0.5) steps on the images and the learning rate. ddjax's side is
:func:`ddjax.distill.matching.match_loss_and_grads` in each ``--modes`` (``unroll``: plain
second-order backprop like the official code; ``remat``: exact, checkpointed; ``tesla``: TESLA's
estimator) with ``InnerLoop``'s default loop form (recorded). Both start from the same images,
labels, learning rate and start/target parameters: a PyTorch-default initialisation drawn once by
ddjax and a perturbed copy (θ* + 0.01·ε·(|θ*| + 0.01)) as MTT's flat vector, read by the official
code directly and by ddjax through :func:`~ddjax.distill.matching.from_mtt_flat`. The one
change to the official loop: DiffAugment's crop returns 1-channel batches with channels-last
strides, which the official ConvNet's ``out.view(...)`` rejects under torch 2.x, so such a batch
is copied to the standard layout (counted in the JSON). ddjax's iteration is the loss and its
gradients; the official one also applies its two SGD steps (on 100 images and a scalar:
negligible).

**SRe2L recover** (Yin et al., NeurIPS 2023), as ``recover_cifar.py`` does it: torchvision's
``resnet18`` with the small-image stem (``conv1`` a 3×3 stride-1 convolution, ``maxpool`` the
identity) in eval mode, ``BNFeatureHook`` on every ``BatchNorm2d``, loss CE + r_bn · Σ r_feature
with the first BN layer's multiplier 10, the random roll U{0..4} (no crop or flip), Adam(0.5,
0.9) with the cosine learning rate, the clip to valid pixels: one iteration is forward, backward,
step and clip. ddjax's side is :func:`ddjax.sre2l.recover_step.make_recover_step` on the same
teacher weights (imported with :func:`ddjax.sre2l.teacher.import_torch_teacher`), batch and
settings. The teacher has torchvision's initial weights and random BN running statistics (the
cost of an iteration does not depend on the values).

**Same problem.** Before timing, a sanity check runs both sides without augmentation: the MTT
matching loss at N = 2 and the recover loss (CE and BN parts) on identical inputs must agree to
``rtol 1e-4`` in float32 (the gradients' relative differences are recorded too). A mismatch stops
the run (exit 1): the two sides would not be solving the same problem.

**Reported** per configuration: median seconds per iteration over ``--repeats`` timed iterations
after ``--warmup`` untimed ones (and the process CPU seconds of the same iterations); peak
memory (CPU: the process's ``ru_maxrss``; GPU: ``torch.cuda.max_memory_allocated`` and JAX's
``peak_bytes_in_use``); ddjax's compile time and compiled memory; the ratios ddjax/official of
time and memory; the load averages before and after each configuration.

**Fits?** Before a configuration runs, its peak memory is predicted and compared with the memory
available (``MemAvailable`` on CPU, the device's memory on GPU): for the official MTT code from a
probe at N = 1 and 4 (the graph of every inner step is kept, so its memory grows linearly in N;
refined by every configuration measured), for ddjax from the compiled program's
``memory_analysis()`` (for ``unroll``, whose memory grows with N, first from the same program with
a rolled loop, which compiles in seconds at any N). A configuration that cannot fit is reported
as such, with the predicted figure, and not run. ``--max-seconds-per-config`` (default 1200)
bounds a configuration: it stops repeating once the budget is spent (at least one timed
iteration) and is killed at three times the budget. The full CPU run (N up to 80, three modes,
5 repeats) takes about two hours on a 2-core machine, most of it ddjax at N = 40 and 80
(compiling an unrolled loop there takes minutes); ``--repeats 3`` saves about a fifth.

  PYTHONPATH=$PWD:/work/ext/site python benchmarks/vs_pytorch.py \
      --mtt /work/ext/mtt-distillation --sre2l /work/ext/SRe2L              # CPU: Fashion-MNIST
  ... --preset cifar10 --ns 10,20,40,80 --recover-batches 10,100            # on a GPU
  ... --ns 2,4 --recover-batches 4 --repeats 1 --out /tmp/smoke             # a quick check

torchvision built for CUDA cannot be imported beside a CPU-only torch ("operator torchvision::nms
does not exist"); only then are the schemas of ``nms`` and ``qnms`` defined before importing it
again (the benchmark never calls them), and the JSON records that this was done.

Writes ``benchmarks/results/vs_pytorch_<preset>_<backend>.{json,md,png}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    # MTT's Fashion-MNIST setting on the CPU (research/peer_mtt_cpu.md).
    "fashion_mnist": {
        "image_shape": (28, 28, 1),
        "num_classes": 10,
        "normalisation": "fashion_mnist",
    },
    # CIFAR-10 shapes, for GPUs.
    "cifar10": {"image_shape": (32, 32, 3), "num_classes": 10, "normalisation": "cifar10"},
}
MODES = ("unroll", "remat", "tesla")
PARTS = ("mtt", "train", "recover")
WIDTH = 128
INNER_LR = 0.01  # distill.py --lr_teacher
LR_IMG, LR_LR, MOMENTUM = 1000.0, 1e-5, 0.5  # distill.py --lr_img, --lr_lr; SGD momentum 0.5
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # distill.py --dsa_strategy
# recover_cifar.sh: --lr 0.25 --r-bn 0.01 --iteration 1000; recover_cifar.py: --jitter 4 and
# --first-bn-multiplier 10 by default.
RECOVER = {"lr": 0.25, "r_bn": 0.01, "iterations": 1000, "jitter": 4, "first_bn_multiplier": 10.0}
CHECK_N = 2
CHECK_RTOL = 1e-4
PROBE_NS = (1, 4)
FIT_MARGIN = 0.9  # a configuration must be predicted to need at most 90% of what is available
MTT_FILES = ("networks.py", "reparam_module.py", "utils.py")
SRE2L_FILES = ("recover_cifar.py", "utils.py")
SRE2L_SMALL = Path("SRe2L") / "*small_dataset"  # the directory's name really starts with '*'
TORCHVISION_COMPAT = "operator torchvision::nms does not exist"


# --------------------------------------------------------------------------------------------
# The checkouts
# --------------------------------------------------------------------------------------------


def checkout_dirs(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """The folders to import the official code from, or the one-line reason there are none.

    ``--mtt`` must hold :data:`MTT_FILES`; ``--sre2l`` is the SRe2L repository (or its
    ``SRe2L/*small_dataset`` folder itself) with :data:`SRE2L_FILES`. Only the parts that
    ``--only`` selects need their checkout.
    """
    dirs: dict[str, str] = {}
    wanted = {"mtt": ("--mtt", "GeorgeCazenavette/mtt-distillation", MTT_FILES, [Path()])}
    wanted["recover"] = ("--sre2l", "VILA-Lab/SRe2L", SRE2L_FILES, [SRE2L_SMALL, Path()])
    for part, (option, repo, files, places) in wanted.items():
        # The training-step part runs the official ConvNet and DiffAugment: the MTT checkout.
        if args.only not in (None, part) and not (part == "mtt" and args.only == "train"):
            continue
        path = getattr(args, option[2:])
        if path is None:
            return {}, f"{option} PATH is required: a local checkout of {repo} ({', '.join(files)})"
        found = [
            Path(path) / p for p in places if all((Path(path) / p / f).is_file() for f in files)
        ]
        if not found:
            missing = [f for f in files if not (Path(path) / places[0] / f).is_file()]
            return {}, (
                f"{option} {path!r} is not a checkout of {repo}: it has no "
                f"{', '.join(str(places[0] / f) for f in missing)}"
            )
        dirs[part] = str(found[0].resolve())
    return dirs, None


def checkout_commit(path: str) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``path``, or ``'unknown'``."""
    try:
        done = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _versions() -> dict[str, str]:
    """The PyTorch side's versions, read from the installed metadata (nothing is imported)."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "torchvision", "kornia"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --------------------------------------------------------------------------------------------
# The problem: drawn once, read by both sides
# --------------------------------------------------------------------------------------------


def write_problem(path: Path, preset: str, ipc: int, max_batch: int, width: int = WIDTH) -> None:
    """Writes every array both sides start from, in PyTorch's layouts (NCHW, OIHW, flat).

    ``mtt_start``/``mtt_target`` are MTT's flat parameter vectors of the ConvNet: ddjax's
    PyTorch-default initialisation and a perturbed copy; ``recover_teacher/<key>`` is the
    torchvision ``state_dict`` of the ResNet-18 teacher (torchvision's initialisation, BN running
    means ~ N(0, 0.1²) and variances ~ U(0.5, 1.5) so that the BN loss is not trivial).
    """
    import jax
    import numpy as np

    from ddjax import models

    spec = PRESETS[preset]
    shape, num_classes = spec["image_shape"], spec["num_classes"]
    height, width_px, channels = shape
    rng = np.random.default_rng(0)
    convnet = models.get_model("ConvNet", num_classes, shape, width=width)
    start = models.to_flat_vector(models.init_variables(convnet, jax.random.key(0), shape), convnet)
    noise = rng.standard_normal(start.shape).astype(np.float32)
    target = start + 0.01 * noise * (np.abs(start) + 0.01)
    num_images = ipc * num_classes
    arrays = {
        "mtt_images": rng.standard_normal((num_images, channels, height, width_px), np.float32),
        "mtt_labels": np.repeat(np.arange(num_classes), ipc).astype(np.int64),
        "mtt_start": start.astype(np.float32),
        "mtt_target": target.astype(np.float32),
        "recover_images": rng.standard_normal((max_batch, channels, height, width_px), np.float32),
        "recover_labels": (np.arange(max_batch) % num_classes).astype(np.int64),
    }
    teacher = _teacher_model(preset)
    variables = models.init_variables(teacher, jax.random.key(1, impl="rbg"), shape)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            rng.uniform(0.5, 1.5, x.shape)
            if p[-1].key == "var"
            else 0.1 * rng.standard_normal(x.shape)
        ).astype(np.float32),
        variables["batch_stats"],
    )
    state_dict = models.to_torch_state_dict(
        {**variables, "batch_stats": stats}, teacher, key_style="torchvision"
    )
    arrays.update({f"recover_teacher/{key}": value for key, value in state_dict.items()})
    np.savez(path, **arrays)


def _teacher_model(preset: str):
    """ddjax's ResNet18BN with the small-image stem and torchvision's initialisation."""
    from ddjax import models

    spec = PRESETS[preset]
    return models.get_model(
        "ResNet18BN", spec["num_classes"], spec["image_shape"], conv_init="torchvision"
    )


# --------------------------------------------------------------------------------------------
# Worker helpers
# --------------------------------------------------------------------------------------------


def _mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _torch_setup() -> dict:
    """Imports torch and torchvision (with the CPU-build compatibility step if needed)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    compat = False
    try:
        import torchvision
    except RuntimeError as error:
        if TORCHVISION_COMPAT not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torch_setup.library = library  # kept alive: the schemas go with it
        import torchvision

        compat = True
        print(
            f"torchvision {torchvision.__version__} (a CUDA build) beside torch "
            f"{torch.__version__}: defined the torchvision::nms/qnms schemas to import it "
            "(never called)",
            file=sys.stderr,
        )
    return {"torch": torch, "device": device, "torchvision_compat": compat}


def _torch_sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _torch_peak(torch, device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return _host_peak_bytes(), "process peak RSS"


def _time_iterations(
    iteration, *, warmup: int, repeats: int, budget_s: float, started: float
) -> dict:
    """Warm-up, then up to ``repeats`` timed calls of ``iteration`` (which must block).

    Stops repeating when the next call would end past ``budget_s`` seconds since ``started``
    (the worker's start), after at least one timed call.
    """
    warmup_times = []
    for _ in range(warmup):
        start = time.perf_counter()
        iteration()
        warmup_times.append(time.perf_counter() - start)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        iteration()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if time.perf_counter() - started + times[-1] > budget_s:
            break
    return {
        "s_per_iter": statistics.median(times) if times else None,
        "cpu_s_per_iter": statistics.median(cpu_times) if cpu_times else None,
        "times": times,
        "cpu_times": cpu_times,
        "warmup_times": warmup_times,
        "repeats_done": len(times),
    }


def _measure(row: dict, iteration, opts: dict, started: float, peak) -> dict:
    """``row`` with the timing of ``iteration`` and the peak memory ``peak()`` reports."""
    row = {
        **row,
        **_time_iterations(
            iteration,
            warmup=opts["warmup"],
            repeats=opts["repeats"],
            budget_s=opts["budget_s"],
            started=started,
        ),
    }
    peak_bytes, kind = peak()
    return {
        **row,
        "peak_bytes": peak_bytes,
        "peak_kind": kind,
        "host_peak_bytes": _host_peak_bytes(),
    }


def _jax_fits(memory: dict, source: str = "") -> dict:
    """Whether a compiled ddjax program fits beside what is in use now (``skipped`` if not)."""
    import jax

    needed = memory["temp_bytes"] + memory["argument_bytes"] + memory["output_bytes"]
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        available = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    else:
        available = _mem_available_bytes()
    fit = {"predicted_bytes": needed, "available_bytes": available}
    reason = _not_fitting(needed, available, source)
    return {**fit, "skipped": reason} if reason else fit


def _not_fitting(predicted: float, available: float | None, source: str = "") -> str | None:
    """The reason a configuration is not run, or None if it is predicted to fit."""
    if available is None or predicted <= FIT_MARGIN * available:
        return None
    return (
        f"does not fit in {available / 2**30:.1f} GiB available "
        f"(predicted {predicted / 2**30:.1f} GiB{source})"
    )


# --------------------------------------------------------------------------------------------
# Workers: MTT
# --------------------------------------------------------------------------------------------


def _official_convnet(networks, opts: dict, channel: int, im_size: tuple[int, int]):
    """MTT's ConvNet-3 (``networks.ConvNet``) as ``distill.py`` and ``buffer.py`` build it."""
    return networks.ConvNet(
        channel,
        PRESETS[opts["preset"]]["num_classes"],
        net_width=opts.get("width", WIDTH),
        net_depth=3,
        net_act="relu",
        net_norm="instancenorm",
        net_pooling="avgpooling",
        im_size=im_size,
    )


class _OfficialAugment:
    """The official ``utils.DiffAugment`` with the harness's one deviation, counted.

    DiffAugment's crop returns 1-channel batches with channels-last strides (its final
    ``.contiguous()`` is a no-op there, since such a tensor counts as contiguous); the official
    ConvNet's convolutions keep that layout and its ``out.view(...)`` then fails under torch
    2.x. Such a batch is copied to the standard layout, and :attr:`restored` counts the copies.
    """

    def __init__(self, torch, utils):
        self.torch, self.utils = torch, utils
        self.param = utils.ParamDiffAug()
        self.restored = 0

    def __call__(self, x):
        standard = self.torch.empty(x.shape).stride()
        x = self.utils.DiffAugment(x, DSA_STRATEGY, param=self.param)
        if x.stride() != standard:
            self.restored += 1
            x = x.clone(memory_format=self.torch.contiguous_format)
        return x


def worker_mtt_official(opts: dict) -> dict:
    """The official MTT iteration (``distill.py``), timed; or the probe, or the check."""
    import numpy as np

    started = time.perf_counter()
    setup = _torch_setup()
    torch, device = setup["torch"], setup["device"]
    sys.path.insert(0, opts["checkout"])
    import networks
    import reparam_module
    import utils

    data = np.load(opts["problem"])
    images = data["mtt_images"]
    num_images, channel, height, width = images.shape
    net = _official_convnet(networks, opts, channel, (height, width))
    student_net = reparam_module.ReparamModule(net.to(device))
    student_net.train()
    num_params = sum(int(np.prod(p.size())) for p in student_net.parameters())
    assert num_params == data["mtt_start"].size, (num_params, data["mtt_start"].size)

    image_syn = torch.tensor(images, device=device).requires_grad_(True)
    syn_lr = torch.tensor(INNER_LR, device=device).requires_grad_(True)
    label_syn = torch.tensor(data["mtt_labels"], device=device)
    starting_params = torch.tensor(data["mtt_start"], device=device)
    target_params = torch.tensor(data["mtt_target"], device=device)
    optimizer_img = torch.optim.SGD([image_syn], lr=LR_IMG, momentum=MOMENTUM)
    optimizer_lr = torch.optim.SGD([syn_lr], lr=LR_LR, momentum=MOMENTUM)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    augment = _OfficialAugment(torch, utils)  # DiffAugment, 1-channel layout restored
    batch_syn = num_images  # distill.py: batch_syn = num_classes * ipc when not given

    def iteration(syn_steps: int, dsa: bool, step: bool = True) -> float:
        # distill.py's loop body, from the student's parameters to the optimisers' steps.
        student_params = [starting_params.clone().requires_grad_(True)]
        indices_chunks = []
        for _ in range(syn_steps):
            if not indices_chunks:
                indices = torch.randperm(len(image_syn))
                indices_chunks = list(torch.split(indices, batch_syn))
            these_indices = indices_chunks.pop()
            x = image_syn[these_indices]
            this_y = label_syn[these_indices]
            if dsa:
                x = augment(x)
            x = student_net(x, flat_param=student_params[-1])
            ce_loss = criterion(x, this_y)
            grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - syn_lr * grad)
        param_loss = torch.tensor(0.0).to(device)
        param_dist = torch.tensor(0.0).to(device)
        param_loss += torch.nn.functional.mse_loss(
            student_params[-1], target_params, reduction="sum"
        )
        param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
        param_loss /= num_params
        param_dist /= num_params
        param_loss /= param_dist
        grand_loss = param_loss
        optimizer_img.zero_grad()
        optimizer_lr.zero_grad()
        grand_loss.backward()
        if step:
            optimizer_img.step()
            optimizer_lr.step()
        loss = grand_loss.item()  # what distill.py's logging reads; also a sync
        _torch_sync(torch, device)
        return loss

    row = {"torchvision_compat": setup["torchvision_compat"], "device": device}
    if opts.get("check"):
        row["loss"] = iteration(CHECK_N, dsa=False, step=False)
        np.savez(
            opts["check"],
            images=image_syn.grad.detach().cpu().numpy(),
            inner_lr=syn_lr.grad.detach().cpu().numpy(),
        )
        return row
    if opts.get("probe"):
        # Peak memory and time at a few small N: the prediction for the others.
        points = []
        for syn_steps in opts["probe"]:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            iteration(syn_steps, dsa=True)  # a first call: allocator, thread pools
            start = time.perf_counter()
            iteration(syn_steps, dsa=True)
            seconds = time.perf_counter() - start
            peak, kind = _torch_peak(torch, device)
            points.append({"n": syn_steps, "peak_bytes": peak, "s_per_iter": seconds})
        available = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
        return {
            **row,
            "points": points,
            "peak_kind": kind,
            "device_total_bytes": available,
            "layouts_restored": augment.restored,
        }

    row = _measure(
        row,
        lambda: iteration(opts["n"], dsa=True),
        opts,
        started,
        lambda: _torch_peak(torch, device),
    )
    return {**row, "layouts_restored": augment.restored}


def _mtt_ddjax_args(opts: dict, num_steps: int):
    """ddjax's model and the arguments of ``match_loss_and_grads``, from the problem file."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddjax import models
    from ddjax.distill import matching

    spec = PRESETS[opts["preset"]]
    shape, num_classes = spec["image_shape"], spec["num_classes"]
    data = np.load(opts["problem"])
    model = models.get_model("ConvNet", num_classes, shape, width=opts.get("width", WIDTH))
    start, target = matching.from_mtt_flat(
        data["mtt_start"], data["mtt_target"], model=model, image_shape=shape, dtype="float32"
    )
    images = jnp.asarray(data["mtt_images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    labels = jnp.asarray(data["mtt_labels"], jnp.int32)
    num_images = images.shape[0]
    # batch_syn = every image: each step is a permutation of the whole set, as on the
    # official side (the mean cross-entropy does not depend on the order).
    indices, mask = matching.inner_batch_indices(
        jax.random.key(3), num_images, num_images, num_steps
    )
    return model, (images, labels, jnp.float32(INNER_LR), start, target, indices, mask)


def worker_mtt_ddjax(opts: dict) -> dict:
    """ddjax's ``match_loss_and_grads`` in one mode, compiled ahead of time and timed."""
    import jax
    import numpy as np
    from _common import compiled_memory, peak_memory_bytes

    from ddjax import xla
    from ddjax.distill import matching

    started = time.perf_counter()
    check = opts.get("check")
    num_steps = CHECK_N if check else opts["n"]
    model, args = _mtt_ddjax_args(opts, num_steps)
    inner = matching.InnerLoop(model, mode=opts["mode"])
    key = None if check else jax.random.key(4)  # None: no augmentation
    batch = jax.ShapeDtypeStruct((args[5].shape[1], *args[0].shape[1:]), args[0].dtype)
    row = {
        "loop": f"{inner.loop}: {matching.resolve_loop(inner, args[3], batch)}",
        "conv_grad": model.conv_grad,
        "dsa_strategy": inner.dsa_strategy,
        "compiler_options": xla.options(),
    }
    if opts["mode"] == "unroll" and inner.loop != "rolled" and not check:
        # unroll's memory grows with N, and an unrolled loop compiles in minutes at large N; a
        # rolled loop compiles in seconds with about the same memory (memory_speed.py), so it
        # decides first whether the configuration can fit at all.
        rolled = dataclasses.replace(inner, loop="rolled")
        lowered = matching.match_loss_and_grads.lower(*args, inner=rolled, augment_key=key)
        fit = _jax_fits(compiled_memory(lowered.compile()), " by a rolled loop's compile")
        row["rolled_predicted_bytes"] = fit["predicted_bytes"]
        if "skipped" in fit:
            return {**row, **fit}
    start = time.perf_counter()
    compiled = matching.match_loss_and_grads.lower(*args, inner=inner, augment_key=key).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))

    if check:
        loss, grads = compiled(*args, augment_key=key)
        # The same iteration in float64: a reference that says how far each float32 side is
        # from the exact value (the problem amplifies rounding; see compare_check).
        with jax.enable_x64(True):
            args64 = jax.tree.map(_to_float64, args)
            loss64, grads64 = matching.match_loss_and_grads(*args64, inner=inner, augment_key=key)
            float64 = {
                "images": np.asarray(grads64.images).transpose(0, 3, 1, 2),
                "inner_lr": np.asarray(grads64.inner_lr),
            }
        images = np.asarray(grads.images).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        np.savez(check, images=images, inner_lr=np.asarray(grads.inner_lr))
        np.savez(f"{check}.float64.npz", **float64)
        return {**row, "loss": float(loss), "float64": {"loss": float(loss64)}}
    row.update(_jax_fits(row))
    if "skipped" in row:
        return row

    def iteration():
        return jax.block_until_ready(compiled(*args, augment_key=key))

    return _measure(row, iteration, opts, started, peak_memory_bytes)


# --------------------------------------------------------------------------------------------
# Workers: one plain training step
# --------------------------------------------------------------------------------------------


def worker_train_official(opts: dict) -> dict:
    """One training step as MTT's ``utils.epoch`` takes it (``buffer.py``'s experts), timed."""
    import numpy as np

    started = time.perf_counter()
    setup = _torch_setup()
    torch, device = setup["torch"], setup["device"]
    sys.path.insert(0, opts["checkout"])
    import networks
    import utils

    data = np.load(opts["problem"])
    num_images, channel, height, width = data["mtt_images"].shape
    net = _official_convnet(networks, opts, channel, (height, width)).to(device)
    net.train()
    # buffer.py: SGD(lr=lr_teacher, momentum=mom (0), weight_decay=l2 (0)).
    optimizer = torch.optim.SGD(net.parameters(), lr=INNER_LR, momentum=0, weight_decay=0)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    images = torch.tensor(data["mtt_images"], device=device)
    labels = torch.tensor(data["mtt_labels"], device=device).long()
    augment = _OfficialAugment(torch, utils)

    def iteration():
        # utils.epoch's body for one batch (mode 'train', aug with DSA).
        img = augment(images)
        output = net(img)
        loss = criterion(output, labels)
        np.sum(np.equal(np.argmax(output.cpu().data.numpy(), axis=-1), labels.cpu().numpy()))
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _torch_sync(torch, device)

    row = {"torchvision_compat": setup["torchvision_compat"], "device": device}
    row = _measure(row, iteration, opts, started, lambda: _torch_peak(torch, device))
    return {**row, "layouts_restored": augment.restored, "batch": num_images}


def worker_train_ddjax(opts: dict) -> dict:
    """ddjax's training step (``ddjax.train``: SGD, DSA) on the same images, timed."""
    import jax
    from _common import compiled_memory, peak_memory_bytes

    from ddjax import augment, train, xla

    started = time.perf_counter()
    model, args = _mtt_ddjax_args(opts, 1)
    images, labels = args[0], args[1]
    tx = train.sgd(INNER_LR)
    state = train.init_state(model, tx, jax.random.key(0), images.shape[1:])
    # Compiled as ddjax's training driver compiles its steps (with ddjax.xla's options).
    step = xla.jit(train.make_train_step(model, tx, augment.make_augment("dsa", DSA_STRATEGY)))
    key = jax.random.key(4)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels, key).compile()
    row = {
        "compile_s": time.perf_counter() - start,
        "conv_grad": model.conv_grad,
        "compiler_options": xla.options(),
    }
    row.update(compiled_memory(compiled))
    current = [state]

    def iteration():
        current[0], loss = compiled(current[0], images, labels, key)
        float(loss)  # what a training loop that logs the loss reads; also a sync

    return _measure(row, iteration, opts, started, peak_memory_bytes)


# --------------------------------------------------------------------------------------------
# Workers: SRe2L recover
# --------------------------------------------------------------------------------------------


def _pixel_bounds(preset: str):
    """Per-channel normalised image of [0, 1]: what SRe2L's ``clip_cifar`` clamps to."""
    import numpy as np

    from ddjax.data import NORMALISATION

    mean, std = (np.asarray(v, np.float64) for v in NORMALISATION[PRESETS[preset]["normalisation"]])
    return -mean / std, (1 - mean) / std


def worker_recover_official(opts: dict) -> dict:
    """The official recover iteration (``recover_cifar.py``'s ``get_images`` loop body)."""
    import numpy as np

    started = time.perf_counter()
    setup = _torch_setup()
    torch, device = setup["torch"], setup["device"]
    nn = torch.nn
    sys.path.insert(0, opts["checkout"])
    import recover_cifar
    import torchvision
    from utils import BNFeatureHook, lr_cosine_policy

    data = np.load(opts["problem"])
    batch = opts["batch"]
    num_classes = PRESETS[opts["preset"]]["num_classes"]
    channels = data["recover_images"].shape[1]
    # main_syn: torchvision's resnet18 with the small-image stem, in eval mode, frozen.
    model_teacher = torchvision.models.get_model("resnet18", num_classes=num_classes)
    model_teacher.conv1 = nn.Conv2d(
        channels, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False
    )
    model_teacher.maxpool = nn.Identity()
    prefix = "recover_teacher/"
    state_dict = {
        k[len(prefix) :]: torch.from_numpy(data[k]) for k in data.files if k.startswith(prefix)
    }
    model_teacher.load_state_dict(state_dict)
    model_teacher = model_teacher.to(device)
    model_teacher.eval()
    for p in model_teacher.parameters():
        p.requires_grad = False

    # get_images
    loss_r_feature_layers = [
        BNFeatureHook(module)
        for module in model_teacher.modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    targets = torch.tensor(data["recover_labels"][:batch], device=device)
    inputs = torch.tensor(data["recover_images"][:batch], device=device).requires_grad_(True)
    lim_0 = lim_1 = RECOVER["jitter"]
    optimizer = torch.optim.Adam([inputs], lr=RECOVER["lr"], betas=[0.5, 0.9], eps=1e-8)
    lr_scheduler = lr_cosine_policy(RECOVER["lr"], 0, RECOVER["iterations"])
    criterion = nn.CrossEntropyLoss().to(device)
    rescale = [RECOVER["first_bn_multiplier"]] + [1.0] * (len(loss_r_feature_layers) - 1)
    if channels == 3 and PRESETS[opts["preset"]]["normalisation"] == "cifar10":
        clip = recover_cifar.clip_cifar
    else:
        # clip_cifar's clamp with this preset's constants (clip_cifar's are CIFAR's, 3 channels).
        lower, upper = _pixel_bounds(opts["preset"])

        def clip(image_tensor):
            for c in range(channels):
                image_tensor[:, c] = torch.clamp(image_tensor[:, c], lower[c], upper[c])
            return image_tensor

    def losses(inputs_jit):
        outputs = model_teacher(inputs_jit)
        loss_ce = criterion(outputs, targets)
        loss_r_bn_feature = torch.stack(
            [
                mod.r_feature.to(loss_ce.device) * rescale[i]
                for i, mod in enumerate(loss_r_feature_layers)
            ]
        ).sum()
        return loss_ce, loss_r_bn_feature, loss_ce + RECOVER["r_bn"] * loss_r_bn_feature

    row = {"torchvision_compat": setup["torchvision_compat"], "device": device}
    if opts.get("check"):
        loss_ce, loss_bn, loss = losses(inputs)  # no roll: offsets (0, 0)
        loss.backward()
        np.savez(opts["check"], images=inputs.grad.detach().cpu().numpy())
        return {**row, "loss": loss.item(), "ce": loss_ce.item(), "bn": loss_bn.item()}

    state = {"iteration": 0, "best_cost": 1e4}

    def iteration():
        it = state["iteration"]
        lr_scheduler(optimizer, it, it)
        off1 = random.randint(0, lim_0)
        off2 = random.randint(0, lim_1)
        inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))
        optimizer.zero_grad()
        _, _, loss = losses(inputs_jit)
        loss.backward()
        optimizer.step()
        inputs.data = clip(inputs.data)
        if state["best_cost"] > loss.item() or it == 1:  # recover_cifar.py keeps a copy
            state["best_inputs"] = inputs.data.clone()
        _torch_sync(torch, device)
        state["iteration"] = it + 1

    return _measure(row, iteration, opts, started, lambda: _torch_peak(torch, device))


def _recover_ddjax_setup(opts: dict):
    """ddjax's teacher (imported from the problem's state_dict), settings, state and labels."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddjax.sre2l import recover_step, teacher
    from ddjax.sre2l.contract import DataContract

    spec = PRESETS[opts["preset"]]
    shape, batch = spec["image_shape"], opts["batch"]
    data = np.load(opts["problem"])
    prefix = "recover_teacher/"
    state_dict = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
    contract = DataContract.named(opts["preset"], shape, spec["num_classes"], spec["normalisation"])
    imported = teacher.import_torch_teacher(
        state_dict,
        model_name="ResNet18BN",
        model_overrides={"conv_init": "torchvision"},
        dataset=contract,
    )
    settings = recover_step.RecoverSettings(
        iterations=RECOVER["iterations"],
        lr=RECOVER["lr"],
        r_bn=RECOVER["r_bn"],
        first_bn_multiplier=RECOVER["first_bn_multiplier"],
        mean=contract.mean,
        std=contract.std,
        crop=False,
        flip=False,
        jitter=(0, RECOVER["jitter"]),
    )
    images = jnp.asarray(data["recover_images"][:batch].transpose(0, 2, 3, 1))
    labels = jnp.asarray(data["recover_labels"][:batch], jnp.int32)
    # A fresh state (Adam's moments are zeros whatever the images) holding the shared images.
    state = recover_step.init_state(jax.random.key(5), batch, shape)._replace(images=images)
    return imported, settings, state, labels


def worker_recover_ddjax(opts: dict) -> dict:
    """ddjax's recover step at one batch size, compiled ahead of time and timed."""
    import jax
    import numpy as np
    from _common import compiled_memory, peak_memory_bytes

    from ddjax import xla
    from ddjax.sre2l import recover_step

    started = time.perf_counter()
    imported, settings, state, labels = _recover_ddjax_setup(opts)
    model, variables = imported.model, imported.variables
    row = {"conv_grad": model.conv_grad, "compiler_options": xla.options()}
    if opts.get("check"):

        def objective(images):
            loss, parts = recover_step.recover_loss(
                model,
                variables,
                images,
                labels,
                r_bn=settings.r_bn,
                first_bn_multiplier=settings.first_bn_multiplier,
            )
            return loss, parts

        (loss, parts), grads = jax.value_and_grad(objective, has_aux=True)(state.images)
        np.savez(opts["check"], images=np.asarray(grads).transpose(0, 3, 1, 2))
        with jax.enable_x64(True):  # the float64 reference (see the MTT check)
            variables64, images64 = jax.tree.map(_to_float64, (variables, state.images))
            (loss64, parts64), grads64 = jax.value_and_grad(
                lambda images: recover_step.recover_loss(
                    model,
                    variables64,
                    images,
                    labels,
                    r_bn=settings.r_bn,
                    first_bn_multiplier=settings.first_bn_multiplier,
                ),
                has_aux=True,
            )(images64)
        np.savez(f"{opts['check']}.float64.npz", images=np.asarray(grads64).transpose(0, 3, 1, 2))
        values = {"loss": loss, "ce": parts["ce"], "bn": parts["bn"]}
        values64 = {"loss": loss64, "ce": parts64["ce"], "bn": parts64["bn"]}
        return {
            **row,
            **{name: float(value) for name, value in values.items()},
            "float64": {name: float(value) for name, value in values64.items()},
        }

    step = recover_step.make_recover_step(model, settings)
    start = time.perf_counter()
    compiled = step.lower(state, variables, labels).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))
    row.update(_jax_fits(row))
    if "skipped" in row:
        return row
    current = [state]

    def iteration():
        current[0], metrics = compiled(current[0], variables, labels)  # the state is donated
        jax.block_until_ready(current[0])

    return _measure(row, iteration, opts, started, peak_memory_bytes)


WORKERS = {
    "mtt-official": worker_mtt_official,
    "mtt-ddjax": worker_mtt_ddjax,
    "recover-official": worker_recover_official,
    "recover-ddjax": worker_recover_ddjax,
    "train-official": worker_train_official,
    "train-ddjax": worker_train_ddjax,
}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _spawn(kind: str, opts: dict, timeout_s: float) -> dict:
    """Runs one worker in a fresh Python process; its row (or the failure) with the loads."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(opts)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    row = {"load_before": list(os.getloadavg())}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        row["error"] = f"killed after {timeout_s:.0f} s"
    else:
        for line in done.stderr.splitlines():
            if "torchvision::nms" in line and not _spawn.compat_said:
                print(line, flush=True)  # once per run; every row records it
                _spawn.compat_said = True
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            row["error"] = f"exit code {done.returncode}: {' | '.join(tail)}"
        else:
            row.update(json.loads(lines[-1]))
    row["worker_wall_s"] = time.perf_counter() - start
    row["load_after"] = list(os.getloadavg())
    return row


_spawn.compat_said = False


def _to_float64(x):
    """A floating array as float64 (call under ``jax.enable_x64``); other leaves as they are."""
    import jax.numpy as jnp

    return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _relative_difference(a, b) -> float:
    """max |a − b| / max |b|: how far two gradients are apart, relative to their size."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def compare_check(official: dict, ddjax: dict, grads: tuple[str, str] | None, names) -> dict:
    """The sanity check's record: both sides' values, their relative differences, ``ok``.

    ``ok`` is whether every value in ``names`` agrees to :data:`CHECK_RTOL`; the gradients
    (``.npz`` files the workers wrote) are compared and recorded, not judged.
    """
    import numpy as np

    record = {"rtol": CHECK_RTOL, "official": {}, "ddjax": {}, "relative_difference": {}}
    failures = [side.get("error") for side in (official, ddjax) if side.get("error")]
    if failures:
        return {**record, "ok": False, "error": "; ".join(failures)}
    ok = True
    for name in names:
        record["official"][name], record["ddjax"][name] = official[name], ddjax[name]
        difference = abs(ddjax[name] - official[name]) / max(abs(official[name]), 1e-30)
        record["relative_difference"][name] = difference
        ok = ok and difference <= CHECK_RTOL
    if grads is not None:
        theirs, ours = np.load(grads[0]), np.load(grads[1])
        for name in theirs.files:
            diff = _relative_difference(ours[name], theirs[name])
            record["relative_difference"][f"grad_{name}"] = diff
    reference = ddjax.get("float64")
    if reference is not None:
        # Distances from ddjax's float64 value: which float32 side is off when they differ.
        distance = {"official": {}, "ddjax": {}}
        for name in names:
            for side, values in (("official", official), ("ddjax", ddjax)):
                distance[side][name] = abs(values[name] - reference[name]) / max(
                    abs(reference[name]), 1e-30
                )
        if grads is not None and Path(f"{grads[1]}.float64.npz").exists():
            exact = np.load(f"{grads[1]}.float64.npz")
            for side, path in (("official", grads[0]), ("ddjax", grads[1])):
                values = np.load(path)
                for name in exact.files:
                    distance[side][f"grad_{name}"] = _relative_difference(values[name], exact[name])
        record["float64_distance"] = distance
    return {**record, "ok": ok}


def _run_check(part: str, base: dict, tmp: Path, names, timeout_s: float) -> dict:
    """Both sides of one part without augmentation on identical inputs; prints the result."""
    paths = (str(tmp / f"check_{part}_official.npz"), str(tmp / f"check_{part}_ddjax.npz"))
    official = _spawn(f"{part}-official", {**base, "check": paths[0]}, timeout_s)
    ddjax_opts = {**base, "check": paths[1], "mode": "unroll"}
    ddjax = _spawn(f"{part}-ddjax", ddjax_opts, timeout_s)
    record = compare_check(official, ddjax, paths, names)
    what = f"{part} sanity check (no augmentation{f', N = {CHECK_N}' if part == 'mtt' else ''}"
    what += f"; official code on torch's {official.get('device', '?')})"
    print(f"{what}: {_check_line(record)}", flush=True)
    return record


def _linear_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of peak memory against N."""
    ns = [n for n, _ in points]
    mean_n, mean_m = statistics.fmean(ns), statistics.fmean(m for _, m in points)
    spread = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (m - mean_m) for n, m in points) / spread if spread else 0.0
    return mean_m - slope * mean_n, slope


def predict_official_peak(points: list[tuple[int, int]], n: int) -> float:
    """The official MTT code's peak memory at N from the (N, peak) points measured so far."""
    intercept, slope = _linear_fit(points)
    return intercept + slope * n


def _row_line(row: dict, label: str) -> str:
    if row.get("s_per_iter") is not None:
        cpu_s = _seconds(row.get("cpu_s_per_iter"))
        return (
            f"{label}: {_seconds(row['s_per_iter'])} s/iter (CPU {cpu_s} s), peak "
            f"{_gib(row.get('peak_bytes'))} GiB"
            + (f", compile {row['compile_s']:.1f} s" if row.get("compile_s") is not None else "")
            + (f", ratio {row['time_ratio']:.2f}x time" if row.get("time_ratio") else "")
            + (f" {row['memory_ratio']:.2f}x memory" if row.get("memory_ratio") else "")
        )
    return f"{label}: {row.get('skipped') or row.get('error')}"


def _ratios(row: dict, official: dict | None) -> None:
    """ddjax/official time and memory, where both were measured."""
    if official is None or row.get("s_per_iter") is None:
        return
    if official.get("s_per_iter"):
        row["time_ratio"] = row["s_per_iter"] / official["s_per_iter"]
    if official.get("peak_bytes"):
        row["memory_ratio"] = row["peak_bytes"] / official["peak_bytes"]


def run_mtt(args, dirs: dict, problem: Path, tmp: Path, budget: dict) -> dict:
    """The MTT part: check, probe, then every (N, side); returns its section of the report."""
    base = {"preset": args.preset, "problem": str(problem), "checkout": dirs["mtt"], **budget}
    check = _run_check("mtt", base, tmp, ["loss"], budget["timeout_s"])
    section = {"check": check, "rows": []}
    if not check["ok"]:
        return section
    probe = _spawn("mtt-official", {**base, "probe": list(PROBE_NS)}, budget["timeout_s"])
    section["probe"] = probe
    points = [(p["n"], p["peak_bytes"]) for p in probe.get("points", [])]
    if "error" in probe:
        print(f"official MTT probe failed (no memory prediction): {probe['error']}", flush=True)
    if points:
        intercept, slope = _linear_fit(points)
        print(
            f"official MTT probe: peak {_gib(intercept)} GiB + {slope / 2**30:.3f} GiB per inner "
            f"step ({probe['peak_kind']}; N = {', '.join(map(str, PROBE_NS))})",
            flush=True,
        )
    for n in args.ns:
        opts = {**base, "n": n}
        available = probe.get("device_total_bytes") or _mem_available_bytes()
        official = {"n": n, "side": "official"}
        predicted = predict_official_peak(points, n) if len(points) >= 2 else None
        reason = _not_fitting(predicted, available) if predicted is not None else None
        if reason:
            official.update(skipped=reason, predicted_bytes=predicted, available_bytes=available)
        else:
            official.update(_spawn("mtt-official", opts, budget["timeout_s"]))
            official.update(predicted_bytes=predicted, available_bytes=available)
            if official.get("peak_bytes") is not None:
                points.append((n, official["peak_bytes"]))
        print(f"N {n:3d} " + _row_line(official, "official"), flush=True)
        section["rows"].append(official)
        measured = official if official.get("s_per_iter") is not None else None
        for mode in args.modes:
            row = {"n": n, "side": "ddjax", "mode": mode}
            row.update(_spawn("mtt-ddjax", {**opts, "mode": mode}, budget["timeout_s"]))
            _ratios(row, measured)
            print(f"N {n:3d} " + _row_line(row, f"ddjax {mode} [{row.get('loop')}]"), flush=True)
            section["rows"].append(row)
    return section


def run_recover(args, dirs: dict, problem: Path, tmp: Path, budget: dict) -> dict:
    """The recover part: check, then every (batch, side); returns its section of the report."""
    base = {"preset": args.preset, "problem": str(problem), "checkout": dirs["recover"], **budget}
    check_opts = {**base, "batch": min(args.recover_batches)}
    check = _run_check("recover", check_opts, tmp, ["loss", "ce", "bn"], budget["timeout_s"])
    section = {"check": check, "rows": []}
    if not check["ok"]:
        return section
    for batch in args.recover_batches:
        opts = {**base, "batch": batch}
        official = {"batch": batch, "side": "official"}
        official.update(_spawn("recover-official", opts, budget["timeout_s"]))
        print(f"batch {batch:4d} " + _row_line(official, "official"), flush=True)
        row = {"batch": batch, "side": "ddjax", "mode": "recover"}
        row.update(_spawn("recover-ddjax", opts, budget["timeout_s"]))
        _ratios(row, official if official.get("s_per_iter") is not None else None)
        print(f"batch {batch:4d} " + _row_line(row, "ddjax"), flush=True)
        section["rows"] += [official, row]
    return section


def run_train(args, dirs: dict, problem: Path, tmp: Path, budget: dict) -> dict:
    """The training-step part: one plain SGD step with DSA on the MTT images, each side."""
    base = {"preset": args.preset, "problem": str(problem), "checkout": dirs["mtt"], **budget}
    batch = args.ipc * PRESETS[args.preset]["num_classes"]
    official = {"batch": batch, "side": "official"}
    official.update(_spawn("train-official", base, budget["timeout_s"]))
    print(f"batch {batch:4d} " + _row_line(official, "official train step"), flush=True)
    row = {"batch": batch, "side": "ddjax", "mode": "train"}
    row.update(_spawn("train-ddjax", base, budget["timeout_s"]))
    _ratios(row, official if official.get("s_per_iter") is not None else None)
    print(f"batch {batch:4d} " + _row_line(row, "ddjax train step"), flush=True)
    # The MTT check already showed that both sides' ConvNet computes the same function.
    return {"check": {"ok": True}, "rows": [official, row]}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mtt", metavar="PATH", help="checkout of GeorgeCazenavette/mtt-distillation"
    )
    parser.add_argument("--sre2l", metavar="PATH", help="checkout of VILA-Lab/SRe2L")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
    parser.add_argument("--ns", type=_ints, default=[10, 20, 40, 80], help="inner steps N")
    parser.add_argument("--ipc", type=int, default=10, help="images per class (all in each batch)")
    parser.add_argument("--recover-batches", type=_ints, default=[10, 100], help="recover batches")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--modes", default=",".join(MODES), help="ddjax gradient modes")
    parser.add_argument(
        "--only", choices=PARTS, help="run one part only (train: one plain training step)"
    )
    parser.add_argument(
        "--max-seconds-per-config",
        type=float,
        default=1200,
        help="stop repeating past this (at least one timed iteration); killed at 3x",
    )
    parser.add_argument("--out", help="output stem (default results/vs_pytorch_<preset>_<backend>)")
    parser.add_argument("--note", action="append", default=[], help="a line for the Markdown")
    parser.add_argument("--render", metavar="JSON", help="rewrite the .md and .png of a report")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "OPTIONS"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        kind, opts = args.worker
        print(json.dumps(WORKERS[kind](json.loads(opts))), flush=True)
        return 0
    if args.render:
        report = json.loads(Path(args.render).read_text())
        write_report(report, Path(args.render).with_suffix(""), json_too=False)
        return 0
    dirs, refusal = checkout_dirs(args)
    if refusal is None:
        modes = [m for m in args.modes.split(",") if m]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            refusal = f"--modes {args.modes!r}: expected some of {','.join(MODES)}"
        args.modes = modes
    for option, values in (("--ns", args.ns), ("--recover-batches", args.recover_batches)):
        if refusal is None and (not values or min(values) < 1):
            refusal = f"{option}: expected positive integers separated by commas"
    if refusal is None and (min(args.repeats, args.ipc) < 1 or args.warmup < 0):
        refusal = "--repeats and --ipc must be >= 1, --warmup >= 0"
    if refusal:
        print(f"vs_pytorch.py: error: {refusal}", file=sys.stderr)
        return 2

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    from _common import environment

    from ddjax import xla
    from ddjax.errors import DDJaxError

    try:
        xla.check_environment()
    except DDJaxError as error:
        print(f"vs_pytorch.py: error: {error}", file=sys.stderr)
        return 2
    backend = jax.default_backend()
    # A run with DDJAX_CPU_FUSION set (ddjax.xla; unset: ddjax's default) is a variant with
    # its own files.
    fusion = os.environ.get(xla.ENV, "").replace(",", "_").replace(" ", "")
    suffix = f"_fusion_{fusion}" if fusion and backend == "cpu" else ""
    out = Path(args.out or RESULTS / f"vs_pytorch_{args.preset}_{backend}{suffix}")
    budget = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.max_seconds_per_config,
        "timeout_s": 3 * args.max_seconds_per_config,
    }
    env = environment()
    print(
        f"ddjax on JAX's default backend: {env['device']}; CPU {env['cpu_model']} "
        f"({os.cpu_count()} cores); the official code on torch's CUDA if available, else the "
        "CPU with a thread per core (each worker says which)",
        flush=True,
    )
    started = time.perf_counter()
    report = {
        "benchmark": "vs_pytorch",
        "command": " ".join([sys.executable, *sys.argv]),
        "environment": {**env, **_versions()},
        "checkouts": {part: {"path": d, "commit": checkout_commit(d)} for part, d in dirs.items()},
        "settings": {
            "preset": args.preset,
            "image_shape": list(PRESETS[args.preset]["image_shape"]),
            "num_classes": PRESETS[args.preset]["num_classes"],
            "ipc": args.ipc,
            "batch_syn": args.ipc * PRESETS[args.preset]["num_classes"],
            "model": f"ConvNet-3 width {WIDTH}, instance norm, average pooling",
            "dsa_strategy": DSA_STRATEGY,
            "inner_lr": INNER_LR,
            "lr_img": LR_IMG,
            "lr_lr": LR_LR,
            "recover": {**RECOVER, "teacher": "torchvision resnet18, small-image stem"},
            "ns": args.ns,
            "modes": args.modes,
            "recover_batches": args.recover_batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "statistic": "median seconds per iteration after the warm-up",
            "max_seconds_per_config": args.max_seconds_per_config,
            "fit_margin": FIT_MARGIN,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "notes": args.note,
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="vs_pytorch_") as tmp:
        problem = Path(tmp) / "problem.npz"
        write_problem(problem, args.preset, args.ipc, max(args.recover_batches))
        for part, run in (("mtt", run_mtt), ("train", run_train), ("recover", run_recover)):
            if args.only in (None, part):
                report[part] = run(args, dirs, problem, Path(tmp), budget)
                failed = failed or not report[part]["check"]["ok"]
    rows = [r for part in PARTS for r in report.get(part, {}).get("rows", [])]
    report["settings"]["torchvision_compat"] = any(r.get("torchvision_compat") for r in rows)
    torch_device = next((r["device"] for r in rows if r.get("device")), "unknown")
    report["settings"]["torch_device"] = torch_device
    report["settings"]["torch_threads"] = os.cpu_count() if torch_device == "cpu" else None
    probe = report.get("mtt", {}).get("probe", {})
    report["settings"]["official_layout_copies"] = sum(
        r.get("layouts_restored", 0) for r in [*rows, probe]
    )
    report["settings"]["loop"] = next((r["loop"] for r in rows if r.get("loop")), None)
    report["settings"]["wall_s"] = time.perf_counter() - started
    if failed:
        out = out.with_name(out.name + "_FAILED_CHECK")
    write_report(report, out, json_too=True)
    if failed:
        print(
            "vs_pytorch.py: the sanity check failed: the official code and ddjax do not compute "
            f"the same loss (rtol {CHECK_RTOL}); nothing was timed; see {out}.json",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _gib(value) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def _seconds(value) -> str:
    """Seconds with about three significant digits (GPU iterations take milliseconds)."""
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _loads(row: dict) -> str:
    before, after = row.get("load_before"), row.get("load_after")
    return "–" if not before or not after else f"{before[0]:.1f}/{after[0]:.1f}"


def _table(rows: list[dict], key: str, key_label: str, peak_label: str) -> list[str]:
    lines = [
        f"| {key_label} | code | s / iter | CPU s / iter | {peak_label} | time ddjax/official | "
        "memory ddjax/official | compile s | timed | load 1-min before/after | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        code = "official" if r["side"] == "official" else f"ddjax {r['mode']}"
        if r.get("loop"):  # "auto: rolled": the resolved loop form
            code += f" ({r['loop'].split(': ')[-1]})"
        compile_s = r.get("compile_s")
        lines.append(
            f"| {r[key]} | {code} | {_seconds(r.get('s_per_iter'))} | "
            f"{_seconds(r.get('cpu_s_per_iter'))} | {_gib(r.get('peak_bytes'))} | "
            f"{_ratio(r.get('time_ratio'))} | {_ratio(r.get('memory_ratio'))} | "
            f"{'–' if compile_s is None else f'{compile_s:.1f}'} | {r.get('repeats_done', '–')} | "
            f"{_loads(r)} | {r.get('skipped') or r.get('error') or ''} |"
        )
    return lines


def _check_line(check: dict) -> str:
    if check.get("error"):
        return f"FAILED: {check['error']}"
    values = "; ".join(
        f"{name} {check['official'][name]:.7g} (official) vs {check['ddjax'][name]:.7g} (ddjax)"
        for name in check["official"]
    )
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check["relative_difference"].items())
    line = f"{'agrees' if check['ok'] else 'DISAGREES'}: {values}; relative differences: {diffs}"
    for side, distance in check.get("float64_distance", {}).items():
        line += f"; {side} from float64: " + ", ".join(f"{k} {v:.1e}" for k, v in distance.items())
    return line


def markdown(report: dict) -> str:
    """The report as Markdown: settings, the sanity checks, one table per part, notes."""
    env, settings = report["environment"], report["settings"]
    cpu = env["device"].startswith("cpu")
    peak_label = "peak RSS GiB" if cpu else "device peak GiB"
    commits = ", ".join(
        f"{part} {c['commit'][:12]} ({c['path']})" for part, c in report["checkouts"].items()
    )
    lines = [
        f"# ddjax beside the official PyTorch code ({settings['preset']}, {env['device']})",
        "",
        f"Device: {env['device']}, CPU {env['cpu_model']} ({env['cpu_count']} cores); torch on "
        f"{settings['torch_device']}"
        + (f" with {settings['torch_threads']} threads" if settings["torch_threads"] else "")
        + f". Versions: jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, torch "
        f"{env['torch']}, torchvision {env['torchvision']}, kornia {env['kornia']}, python "
        f"{env['python']}. Official code: {commits}. XLA_FLAGS: "
        f"`{settings['xla_flags'] or '(none)'}`. Median of up to {settings['repeats']} timed "
        f"iterations after {settings['warmup']} warm-up, each configuration in a fresh process; "
        f"command: `{report['command']}`.",
    ]
    compiled_with = {
        json.dumps(row.get("compiler_options"), sort_keys=True)
        for part in PARTS
        for row in report.get(part, {}).get("rows", [])
        if row.get("side") == "ddjax" and "compiler_options" in row
    }
    if compiled_with:
        lines += [
            "",
            "ddjax's programs were compiled with the XLA options of `ddjax.xla.options()` "
            "(`DDJAX_CPU_FUSION`): "
            + ", ".join(f"`{options}`" for options in sorted(compiled_with))
            + ".",
        ]
    if settings.get("torchvision_compat"):
        lines += [
            "",
            "torchvision (a CUDA build) was imported beside the CPU-only torch after defining the "
            "`torchvision::nms`/`qnms` schemas (never called).",
        ]
    if "mtt" in report:
        mtt = report["mtt"]
        lines += [
            "",
            "## MTT: one trajectory-matching iteration",
            "",
            f"{settings['model']}, {settings['batch_syn']} synthetic images "
            f"{tuple(settings['image_shape'])} (IPC {settings['ipc']}), the whole set at every "
            f"inner step, DSA `{settings['dsa_strategy']}` on every step. Official: `distill.py`'s"
            " iteration (ReparamModule, DiffAugment, `create_graph=True`, backward, both SGD "
            "steps). ddjax: `match_loss_and_grads` with InnerLoop's default loop form "
            "`auto` (the form it resolved to in brackets; `ddjax.distill.matching.resolve_loop`).",
            "",
            f"Sanity check (no augmentation, N = {CHECK_N}): {_check_line(mtt['check'])}.",
            "",
            *_table(mtt["rows"], "n", "N", peak_label),
        ]
        probe = mtt.get("probe", {})
        points = probe.get("points", [])
        if len(points) >= 2:
            intercept, slope = _linear_fit([(p["n"], p["peak_bytes"]) for p in points])
            lines += [
                "",
                f"Official memory probe ({probe['peak_kind']}): {_gib(intercept)} GiB + "
                f"{slope / 2**30:.3f} GiB per inner step, from N = "
                f"{', '.join(str(p['n']) for p in points)}; a configuration predicted to need "
                f"more than {settings['fit_margin']:.0%} of the memory available is not run.",
            ]
    if "train" in report:
        lines += [
            "",
            "## One plain training step",
            "",
            f"The same ConvNet and {settings['batch_syn']} images: one SGD step (lr "
            f"{settings['inner_lr']}, no momentum) with DSA, cross-entropy. Official: the body of "
            "MTT's `utils.epoch` for one batch (DiffAugment, forward, loss, accuracy and "
            "`loss.item()`, backward, step), as `buffer.py` trains its experts. ddjax: "
            "`ddjax.train.make_train_step` (jitted), reading the loss.",
            "",
            *_table(report["train"]["rows"], "batch", "batch", peak_label),
        ]
    if "recover" in report:
        recover = report["recover"]
        r = settings["recover"]
        lines += [
            "",
            "## SRe2L recover: one iteration",
            "",
            f"Teacher: {r['teacher']}, eval mode, BN hooks on every BatchNorm2d; loss CE + "
            f"{r['r_bn']} · Σ r_feature (first BN × {r['first_bn_multiplier']}); roll "
            f"U{{0..{r['jitter']}}}; Adam(0.5, 0.9), cosine lr from {r['lr']} over "
            f"{r['iterations']} iterations; clip. Images {tuple(settings['image_shape'])}, "
            f"{settings['num_classes']} classes.",
            "",
            f"Sanity check (no augmentation): {_check_line(recover['check'])}.",
            "",
            *_table(recover["rows"], "batch", "batch", peak_label),
        ]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    if settings.get("official_layout_copies"):
        lines.append(
            "- The one change to the official MTT loop: DiffAugment's crop returns 1-channel "
            "batches with channels-last strides, which the official ConvNet's `out.view(...)` "
            "rejects under torch 2.x, so such a batch is copied to the standard layout after "
            f"DiffAugment ({settings['official_layout_copies']} copies in this run, probe "
            "included)."
        )
    lines += [
        "- Peak memory: "
        + (
            "the process's peak resident set size (`ru_maxrss`), Python and the libraries included."
            if cpu
            else "`torch.cuda.max_memory_allocated` (official) and JAX's `peak_bytes_in_use` "
            "(ddjax, no preallocation); the host RSS is in the JSON."
        ),
        "- CPU s / iter is the process's CPU time per iteration (up to cores × wall time when "
        "the machine is its own). Load averages are the machine's 1-minute figure before and "
        "after each configuration (all three in the JSON).",
        "- ddjax's iteration is the loss and its gradients; the official one also applies its "
        "two SGD steps (100 images and one scalar: negligible).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Time and peak memory against N (MTT) and the batch size (recover)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        (p, k) for p, k in (("mtt", "n"), ("train", "batch"), ("recover", "batch")) if p in report
    ]
    fig, axes = plt.subplots(len(parts), 2, figsize=(10, 3.8 * len(parts)), squeeze=False)
    styles = {"official": "kx--", "unroll": "o-", "remat": "s-", "tesla": "^-"}
    styles.update(recover="o-", train="o")
    for (part, key), (ax_time, ax_memory) in zip(parts, axes, strict=True):
        rows = report[part]["rows"]
        for code in ("official", *MODES, "recover", "train"):
            sub = [
                r
                for r in rows
                if r.get("s_per_iter") is not None
                and (r["side"] if code == "official" else r.get("mode")) == code
            ]
            if not sub:
                continue
            label = "official" if code == "official" else f"ddjax {code}"
            xs = [r[key] for r in sub]
            ax_time.plot(xs, [r["s_per_iter"] for r in sub], styles[code], label=label)
            ax_memory.plot(xs, [r["peak_bytes"] / 2**30 for r in sub], styles[code], label=label)
        unfit = [r for r in rows if r.get("skipped") and r.get("predicted_bytes")]
        if unfit and part == "mtt":
            ax_memory.plot(
                [r[key] for r in unfit],
                [r["predicted_bytes"] / 2**30 for r in unfit],
                "kx",
                mfc="none",
                ms=10,
                alpha=0.5,
                label="predicted, not run (does not fit)",
            )
        x_label = "inner steps N" if part == "mtt" else "batch size"
        ax_time.set(xlabel=x_label, ylabel="seconds per iteration", title=f"{part}: time")
        ax_memory.set(xlabel=x_label, ylabel="peak GiB", title=f"{part}: peak memory")
        for ax in (ax_time, ax_memory):
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(
        f"ddjax vs official PyTorch, {report['settings']['preset']}, "
        f"{report['environment']['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, *, json_too: bool) -> None:
    """Writes ``out``.json (optionally), .md and .png, and prints the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if json_too:
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    plot(report, out.with_suffix(".png"))
    print()
    print(text)
    print(f"wrote {out}.json, .md, .png" if json_too else f"wrote {out}.md, .png")


if __name__ == "__main__":
    sys.exit(main())
