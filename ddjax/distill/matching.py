"""The core of trajectory matching: the student's inner unroll and the matching loss.

Matching Training Trajectories (MTT; Cazenavette et al., "Dataset Distillation by Matching
Training Trajectories", CVPR 2022, §3 and Algorithm 1) starts a student network at an expert's
parameters θ*_t, trains it for N SGD steps on the synthetic images with a learnable step size α,

    θ̂_0 = θ*_t,    θ̂_{n+1} = θ̂_n − α ∇_θ ℓ(f(A_n(X̃[b_n]); θ̂_n), Y[b_n]),

and compares where it lands with where the expert was M epochs later:

    L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖².

The synthetic images X̃ and α are learned by the gradient of L, back-propagated through all N
steps (a second-order unroll). TESLA (Cui et al., "Scaling Up Dataset Distillation to
ImageNet-1K with Constant Memory", ICML 2023) replaces that gradient by a cheaper two-pass
estimator. See ``research/trajectory_matching.md`` §1.1, §1.2 and §2.1 for the published code's
exact behaviour, which this module reproduces.

Public API (all pure functions; no I/O):

* :func:`inner_batch_indices`: MTT's synthetic minibatch schedule as static-shape arrays.
* :func:`inner_unroll`: θ̂_N from θ̂_0, with the gradient mode chosen by ``mode``.
* :func:`match_loss`: L, differentiable w.r.t. images, ``inner_lr`` and float (soft) labels.
* :func:`match_loss_and_grads`: jitted L and its gradients (:class:`MatchGrads`).
* :func:`from_mtt_flat`: start/target parameters from MTT's flat PyTorch vectors.

Gradient modes (``mode``):

* ``'unroll'``: plain reverse-mode through the N steps; memory grows linearly in N because
  every step's activations are kept (what MTT's ``create_graph=True`` loop does).
* ``'remat'`` (default): every step is checkpointed, so the backward pass keeps only the N
  parameter vectors θ̂_n and recomputes one step's activations at a time. The gradient is
  exact (equal to ``'unroll'`` up to float rounding). ``remat_every=k`` nests it: blocks of k
  checkpointed steps are checkpointed again, so only ≈ N/k + k parameter copies are stored
  (≈ 2√N for k ≈ √N) at the price of a second recomputation. The checkpoint is a small custom
  VJP equivalent to ``jax.checkpoint`` (nothing saveable) plus an ordering constraint, because
  plain ``jax.checkpoint`` saved no memory at all in unrolled loops on XLA:CPU (see
  :func:`_after`); it supports reverse mode only.
* ``'tesla'``: TESLA's estimator as published: it drops the cross-step terms and so is **not**
  the exact gradient for N > 1 (see :func:`inner_unroll`).

Loop forms (``loop``): ``'auto'`` (the default, :func:`resolve_loop`), ``'unrolled'`` (every
step in straight-line code, ``lax.scan(..., unroll=0)``), ``'rolled'`` (a plain ``lax.scan``)
or an int k (a rolled scan whose body is k unrolled steps). A rolled loop compiles in time
independent of N; an unrolled one takes ≈ 3-5 s per step for a width-128 ConvNet-3. XLA:CPU
runs convolutions on its fast kernels (YNNPACK/Eigen) only in the forward layout (NHWC input,
HWIO kernel); the pass that rewrites other convolutions into it visits the entry computation,
not while-loop bodies, and its simplifier swaps the operands of a convolution whose window
exceeds its input into a form no fast kernel takes. The gradients autodiff writes for
``lax.conv_general_dilated`` are in other layouts, so inside a rolled loop they used to run as
naive loop nests (6-10x slower; ``benchmarks/results/memory_speed_fashion_mnist_cpu.md``,
"XLA:CPU loop forms: findings"). The models' stride-1 convolutions now differentiate through
:func:`ddjax.models.conv_nhwc`, whose derivatives of every order are forward-layout
convolutions, so on CPU a rolled loop runs as fast as the unrolled one and ``'auto'`` picks it
wherever every convolution of the student takes that path (:func:`resolve_loop`). The
``'unrolled'`` form asks ``lax.scan`` for ``unroll=0``, not ``unroll=True``: that becomes
``unroll=length``, which for N = 1 is a rolled while loop.

Memory: ``'remat'`` and ``'tesla'`` are flat in N in every loop form (one parameter copy per
step on top of one step's working set); ``'unroll'`` grows by one step's activations per step.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import augment as augment_lib
from ddjax import models, xla
from ddjax.errors import check

__all__ = [
    "LOOPS",
    "MODES",
    "InnerLoop",
    "MatchGrads",
    "from_mtt_flat",
    "inner_batch_indices",
    "inner_unroll",
    "match_loss",
    "match_loss_and_grads",
    "resolve_loop",
]

Array = jax.Array
Params = Any  # a pytree of arrays: the model's 'params' collection
Loop = str | int

MODES = ("unroll", "remat", "tesla")
LOOPS = ("auto", "unrolled", "rolled", "<positive int>")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How the student trains inside one matching step: one frozen, hashable value.

    Everything here is static (part of the compiled program): two equal ``InnerLoop`` values
    share a compilation, and a different one compiles anew. Arrays (images, labels, α, expert
    parameters, keys) are never part of it.

    Attributes:
        model: the student network (a ddjax Linen model; the experts' architecture).
        mode: the gradient mode, ``'unroll'`` | ``'remat'`` | ``'tesla'`` (module docstring).
        remat_every: block size k for nested checkpointing; ``mode='remat'`` only.
        loop: ``'auto'`` | ``'unrolled'`` | ``'rolled'`` | a positive int (module docstring;
            :func:`resolve_loop` says what ``'auto'`` picks).
        dsa_strategy: DSA groups joined by ``'_'`` (MTT's ``dsa_strategy``); used only when a
            step is given an augmentation key.
        batch_sharding: where each step's minibatch lives, e.g.
            ``NamedSharding(mesh, PartitionSpec('data'))`` to split it over the mesh's data
            axis (``None``: leave the placement to XLA).
    """

    model: nn.Module
    mode: str = "remat"
    remat_every: int | None = None
    loop: Loop = "auto"
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY
    batch_sharding: jax.sharding.Sharding | None = None

    def validate(self) -> None:
        """Raises a one-line ``DDJaxError`` for an unknown mode, loop or DSA group."""
        _check_config(self.mode, self.remat_every, self.loop)
        augment_lib.parse_strategy(self.dsa_strategy)


# --------------------------------------------------------------------------------------------
# Minibatch schedule
# --------------------------------------------------------------------------------------------


def inner_batch_indices(
    key: Array, num_images: int, batch_size: int, num_steps: int
) -> tuple[Array, Array]:
    """MTT's synthetic minibatches for ``num_steps`` inner steps, as static-shape arrays.

    MTT's ``distill.py`` (Cazenavette et al. 2022) draws ``randperm(num_images)``, splits it
    with ``torch.split(perm, batch_size)`` (so the *last* chunk is short when ``batch_size``
    does not divide ``num_images``), takes ``chunks.pop()`` at every step, i.e. the last chunk
    first, and draws a fresh permutation once every chunk has been used. A pass is therefore
    sampling without replacement, and the short chunk is the first one of each pass.
    Reproduced exactly, except that the randomness is JAX's:

    * pass ``p`` (0-based) uses ``jax.random.permutation(jax.random.fold_in(key, p),
      num_images)``, so a longer schedule starts with the same steps as a shorter one;
    * a short chunk is padded to ``batch_size`` with index 0 and mask 0 so that every step
      has the same shape; :func:`inner_unroll` takes the masked mean of the loss.
      ``batch_size > num_images`` gives a single (padded) chunk per pass, as ``torch.split``
      does.

    Jitted with the three sizes static, so it can also be called inside a jitted step.

    Args:
        key: PRNG key.
        num_images: number of synthetic images (static).
        batch_size: MTT's ``batch_syn`` (static).
        num_steps: N, the number of inner steps (MTT's ``syn_steps``; static).

    Returns:
        ``(indices, mask)``: ``indices`` int32 ``[num_steps, batch_size]`` into the images,
        ``mask`` float32 ``[num_steps, batch_size]``, 1 for a real entry and 0 for padding.

    Raises:
        DDJaxError: if a size is not a positive integer.
    """
    for field, value in (
        ("num_images", num_images),
        ("batch_size", batch_size),
        ("num_steps", num_steps),
    ):
        _check_positive_int(f"inner_batch_indices {field}", value)
    return _batch_schedule(key, int(num_images), int(batch_size), int(num_steps))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _batch_schedule(
    key: Array, num_images: int, batch_size: int, num_steps: int
) -> tuple[Array, Array]:
    num_chunks = -(-num_images // batch_size)
    num_passes = -(-num_steps // num_chunks)
    padded_size = num_chunks * batch_size

    def one_pass(pass_index: Array) -> Array:
        permutation = jax.random.permutation(jax.random.fold_in(key, pass_index), num_images)
        # torch.split's chunks in order, the short one last (padded at its end) ...
        chunks = jnp.pad(permutation, (0, padded_size - num_images)).reshape(-1, batch_size)
        # ... and popped from the end.
        return chunks[::-1]

    indices = jax.vmap(one_pass)(jnp.arange(num_passes)).reshape(-1, batch_size)
    chunk_mask = (jnp.arange(padded_size) < num_images).reshape(-1, batch_size)[::-1]
    mask = jnp.tile(chunk_mask, (num_passes, 1))
    return indices[:num_steps].astype(jnp.int32), mask[:num_steps].astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# One inner step
# --------------------------------------------------------------------------------------------


def _per_example_cross_entropy(logits: Array, labels: Array) -> Array:
    """Cross-entropy per example, hard labels ``(B,)`` or probabilities ``(B, C)``.

    The per-example form of :func:`ddjax.train.cross_entropy` (needed for the masked mean).
    """
    if labels.ndim == 1:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optax.softmax_cross_entropy(logits, labels)


class _Student(NamedTuple):
    """What one inner step needs besides its arrays: hashable Python values, never traced."""

    model: nn.Module
    dsa_strategy: str | None  # validated DSA groups, or None for no augmentation
    batch_sharding: jax.sharding.Sharding | None = None  # placement of each minibatch


def _batch_loss(
    student: _Student, params: Params, batch_images: Array, batch_labels: Array, mask: Array
) -> Array:
    """Masked mean cross-entropy of the student on one (already augmented) minibatch.

    The student runs in train mode, as MTT's: BatchNorm layers normalise with the statistics of
    this minibatch. The ``batch_stats`` collection is mutable so that Flax creates fresh running
    statistics on the fly; they are discarded, because MTT's ``ReparamModule`` student never
    reads its running statistics either. (Padded rows of a short chunk are masked out of the
    loss but do enter BatchNorm's batch statistics.)
    """
    logits, _ = student.model.apply(
        {"params": params}, batch_images, train=True, mutable=["batch_stats"]
    )
    losses = _per_example_cross_entropy(logits, batch_labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _augmented(
    student: _Student, augment_key: Array | None, step: Array, batch_images: Array
) -> Array:
    """A_n(x): DSA with key ``fold_in(augment_key, n)``, or ``x`` when augmentation is off."""
    if student.dsa_strategy is None or augment_key is None:
        return batch_images
    key = jax.random.fold_in(augment_key, step)
    return augment_lib.dsa(key, batch_images, student.dsa_strategy)


def _step_gradient(
    student: _Student,
    params: Params,
    batch_images: Array,
    batch_labels: Array,
    mask: Array,
    step: Array,
    augment_key: Array | None,
) -> Params:
    """g_n = ∇_θ ℓ(f(A_n(x); θ), y) at θ = ``params`` for the un-augmented minibatch (x, y).

    With ``student.batch_sharding`` the minibatch is split along its batch axis over the
    mesh's data axis; the loss's mean and the gradient's sum over the batch become
    all-reduces that XLA inserts (the value is the same up to summation order).
    """
    if student.batch_sharding is not None:
        batch_images, batch_labels, mask = jax.lax.with_sharding_constraint(
            (batch_images, batch_labels, mask), student.batch_sharding
        )
    augmented = _augmented(student, augment_key, step, batch_images)
    return jax.grad(functools.partial(_batch_loss, student))(params, augmented, batch_labels, mask)


class _StepOperands(NamedTuple):
    """The arrays one SGD step reads: the same for every step, then this step's schedule."""

    images: Array
    labels: Array
    inner_lr: Array
    augment_key: Array | None
    indices: Array
    mask: Array
    step: Array


def _sgd_step(student: _Student, params: Params, operands: _StepOperands) -> Params:
    """θ_{n+1} = θ_n − α g_n: one inner step of the student (MTT Algorithm 1)."""
    batch = (operands.images[operands.indices], operands.labels[operands.indices])
    batch_images, batch_labels = _after(batch, params)
    grads = _step_gradient(
        student,
        params,
        batch_images,
        batch_labels,
        operands.mask,
        operands.step,
        operands.augment_key,
    )
    return jax.tree.map(lambda p, g: p - operands.inner_lr * g, params, grads)


def _after(tree: Any, dependency: Any) -> Any:
    """``tree``, unchanged in value, made to depend on ``dependency`` (a scheduling constraint).

    Adds ``0 · dependency[0]`` (one element of its first leaf) to every float leaf. XLA keeps
    the addition (``x · 0`` is not folded for floats, NaN · 0 being NaN), so ``tree`` cannot be
    computed before ``dependency``. In a loop unrolled into one straight-line program,
    XLA:CPU's scheduler otherwise starts work that does not depend on the loop carry early --
    the minibatches and augmentations of every step, and, in the backward pass, every step's
    recomputation -- and keeps all of it alive: ``jax.checkpoint`` in an unrolled
    ``lax.scan`` saved no memory at all (temp memory grew by one step's activations per step,
    like plain backprop), and ``lax.optimization_barrier`` did not help either (it is expanded
    before scheduling). Rolled loops do not need this; it costs one addition per element.
    """
    leaf = jax.tree.leaves(dependency)[0]
    zero = 0.0 * jnp.reshape(leaf, -1)[0]

    def tie(x: Any) -> Any:
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
            return x + zero.astype(x.dtype)
        return x

    return jax.tree.map(tie, tree)


def _checkpoint_in_order(fn: Callable[[Params, Any], Params]) -> Callable[[Params, Any], Params]:
    """``jax.checkpoint(fn)`` whose recomputation waits for the cotangent (see :func:`_after`).

    ``fn(carry, operands) -> carry``. The forward pass saves only ``(carry, operands)``; the
    backward pass recomputes ``fn`` from them and pulls the cotangent back through it, exactly
    as ``jax.checkpoint`` with nothing saveable does, so the gradient is the exact one. The
    inputs of the recomputation are tied to the incoming cotangent so that, in an unrolled
    loop, step n is recomputed only when the backward pass reaches it. Reverse mode only (a
    ``jax.custom_vjp``).
    """

    @jax.custom_vjp
    def checkpointed(carry: Params, operands: Any) -> Params:
        return fn(carry, operands)

    def forward(carry: Params, operands: Any) -> tuple[Params, Any]:
        return fn(carry, operands), (carry, operands)

    def backward(residuals: Any, cotangent: Params) -> tuple[Any, Any]:
        carry, operands = _after(residuals, cotangent)
        _, pullback = jax.vjp(fn, carry, operands)
        return pullback(cotangent)

    checkpointed.defvjp(forward, backward)
    return checkpointed


# --------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------


def _scan_unroll(loop: Loop, length: int) -> int:
    """The ``unroll`` argument of ``lax.scan`` for a loop form (validated by the caller).

    0 is ``lax.scan``'s "unroll every step". ``unroll=True`` is not used because ``lax.scan``
    turns it into ``unroll=length``, and a scan of length 1 with ``unroll=1`` is lowered as a
    rolled while loop, whose convolutions XLA:CPU runs ~10x slower (module docstring).
    """
    if loop == "rolled":
        return 1
    if loop == "unrolled" or int(loop) >= length:
        return 0
    return int(loop)


def _run_steps(
    step: Callable[[Params, _StepOperands], Params],
    params: Params,
    operands: _StepOperands,
    *,
    remat: bool,
    remat_every: int | None,
    loop: Loop,
) -> Params:
    """Applies ``step`` for every row of the schedule in ``operands``, with optional remat.

    ``operands.indices``, ``.mask`` and ``.step`` have a leading axis of N steps; the other
    fields are shared by every step. With ``remat`` each step is checkpointed
    (:func:`_checkpoint_in_order`). With ``remat_every=k`` the steps are also grouped into
    ⌊N/k⌋ blocks of k (plus one block of the remainder), each checkpointed as a whole: the
    outer backward pass stores one parameter copy per block and a block's backward pass k
    more. For ``k >= N`` there is a single block, which is plain per-step remat.
    """
    num_steps = operands.indices.shape[0]
    shared = operands._replace(indices=None, mask=None, step=None)
    schedule = (operands.indices, operands.mask, operands.step)
    if remat:
        step = _checkpoint_in_order(step)

    def scan_steps(params: Params, shared: _StepOperands, schedule: Any) -> Params:
        def body(params: Params, row: tuple[Array, Array, Array]) -> tuple[Params, None]:
            indices, mask, step_number = row
            return step(params, shared._replace(indices=indices, mask=mask, step=step_number)), None

        length = schedule[0].shape[0]
        return jax.lax.scan(body, params, schedule, unroll=_scan_unroll(loop, length))[0]

    if not remat or remat_every is None or remat_every >= num_steps:
        return scan_steps(params, shared, schedule)

    block_size = remat_every
    num_blocks, remainder = divmod(num_steps, block_size)
    block = _checkpoint_in_order(lambda params, block: scan_steps(params, *block))

    def outer_body(params: Params, block_schedule: Any) -> tuple[Params, None]:
        return block(params, (shared, block_schedule)), None

    head = jax.tree.map(
        lambda a: a[: num_blocks * block_size].reshape(num_blocks, block_size, *a.shape[1:]),
        schedule,
    )
    params = jax.lax.scan(outer_body, params, head, unroll=_scan_unroll(loop, num_blocks))[0]
    if remainder:
        tail = jax.tree.map(lambda a: a[num_blocks * block_size :], schedule)
        params = block(params, (shared, tail))
    return params


# --------------------------------------------------------------------------------------------
# The inner unroll
# --------------------------------------------------------------------------------------------


def resolve_loop(inner: InnerLoop, params: Params, batch_images: Array) -> Loop:
    """The loop form of ``inner``: ``inner.loop``, or for ``'auto'`` the fastest measured one.

    ``'auto'`` is ``'rolled'`` (a ``lax.scan`` while loop: compile time independent of N)
    except on the CPU backend for ``mode='unroll'``, or for a student with a convolution left
    to XLA's own gradient (e.g. a strided one, or ``conv_grad='xla'``): XLA:CPU runs those
    gradients on its fast kernels only in straight-line code, so there it is ``'unrolled'``.
    Measured on 2 CPU cores (width-128 ConvNet-3, 100 images of 28x28, DSA, N = 4; CPU seconds
    per iteration, rolled against unrolled): ``remat`` 13.2 / 13.5, ``tesla`` 11.0 / 11.4,
    ``unroll`` 14.2 / 12.0 (a rolled ``unroll`` stacks every step's activations with dynamic
    updates); compile time rolled 12-15 s at every N, unrolled 27-33 s at N = 4 and growing
    with N (``benchmarks/results/vs_pytorch_*``).

    Args:
      inner: the inner loop's settings.
      params: the student's parameters (arrays or ``jax.ShapeDtypeStruct``).
      batch_images: one inner minibatch, or its ``jax.ShapeDtypeStruct``.
    """
    if inner.loop != "auto":
        return inner.loop
    if jax.default_backend() != "cpu":
        return "rolled"
    if inner.mode == "unroll":
        return "unrolled"
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, batch_images)
    )

    def forward(params: Params, images: Array) -> Array:
        return inner.model.apply({"params": params}, images, train=True, mutable=["batch_stats"])

    return "rolled" if models.xla_gradient_convolutions(forward, *abstract) == 0 else "unrolled"


def inner_unroll(
    images: Array,
    labels: Array,
    inner_lr: Array | float,
    start_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    *,
    inner: InnerLoop,
    augment_key: Array | None = None,
) -> Params:
    """Trains the student for N SGD steps on the synthetic set and returns θ̂_N.

    MTT's inner loop (Cazenavette et al. 2022, Algorithm 1; brief §1.1):
    θ̂_{n+1} = θ̂_n − α ∇_θ mean_{j∈b_n} ℓ_CE(f(A_n(X̃_j); θ̂_n), Y_j), with b_n =
    ``batch_indices[n]``, the mean weighted by ``batch_mask[n]``, and A_n a fresh DSA draw
    (:func:`ddjax.augment.dsa`, key ``jax.random.fold_in(augment_key, n)``). The student runs
    ``model.apply({'params': θ}, x, train=True)``; BatchNorm models normalise with each
    minibatch's statistics and their running statistics are discarded, as in MTT.

    ``mode`` only changes how reverse-mode differentiates θ̂_N (the value is the same):

    * ``'unroll'`` and ``'remat'``: the exact derivative (see the module docstring).
    * ``'tesla'``: TESLA's estimator (Cui et al. 2023; brief §2.1), a ``jax.custom_vjp``. The
      forward pass stores θ̂_0 … θ̂_{N−1} and G = Σ_n g_n, g_n = ∇_θ ℓ(θ̂_n, A_n(X̃[b_n])).
      Given the cotangent θ̄ = ∂L/∂θ̂_N, the backward pass treats every θ̂_n and G as
      constants (θ̂_N ≈ θ̂_0 − α Σ_n g_n(θ̂_n fixed, X̃)):

      - images: Σ_n VJP of ⟨c, g_n(θ̂_n, A_n(x))⟩ w.r.t. the un-augmented slice x = X̃[b_n]
        (through the augmentation, with the same key, hence the same DSA draw as the forward
        pass), scatter-added into the image gradient, with c = −α θ̄. For the matching loss
        θ̄ = 2(θ̂_N − θ*)/D, so c = −(2α/D)(θ̂_N − θ*), TESLA's coefficient;
      - ``inner_lr``: −⟨θ̄, G⟩ (for L: −2 Gᵀ(θ̂_N − θ*)/D);
      - soft labels (float ``labels``): the same VJP w.r.t. Y[b_n] (DATM's ``DATM_tesla.py``);
      - ``start_params``: θ̄ (the dropped terms make ∂θ̂_N/∂θ̂_0 the identity).

      The exact Jacobian also carries each step's effect through the *later* steps:
      ∂θ̂_N/∂X̃ = −α Σ_n (Π_{m>n} (I − α H_m)) ∂g_n/∂X̃ and ∂θ̂_N/∂α = −Σ_n (Π_{m>n} (I − α
      H_m)) g_n, with H_m = ∂g_m/∂θ the Hessian at step m (the product ordered with later
      steps on the left). TESLA keeps only the identity term of each product: the estimate
      equals the exact gradient for N = 1 and, for N > 1, misses cross-step terms of order α²
      (images) and α (learning rate), which grow with N and with the curvature. TESLA's paper
      calls its gradient exact; its released code computes this estimator.
      Unlike TESLA, the augmented minibatches are not stored: DSA is a deterministic function
      of its key here, so the backward pass recomputes the identical draw (it needs the
      augmentation's forward pass for its VJP anyway).

    Memory of the backward pass: ``'unroll'`` keeps N steps' activations; ``'remat'`` and
    ``'tesla'`` keep N parameter copies and one step's activations (``'remat'`` with
    ``remat_every=k``: ≈ N/k + k copies), in unrolled loops too (see :func:`_after`). Both
    are reverse-mode only (``jax.custom_vjp``); ``'unroll'`` also supports forward mode.

    Args:
        images: synthetic images ``[M, H, W, C]`` (X̃).
        labels: int labels ``[M]`` or soft labels ``[M, num_classes]`` (Y).
        inner_lr: the student's learning rate α, a scalar.
        start_params: θ̂_0 = θ*_t, the expert's ``params`` at the start epoch.
        batch_indices: int ``[N, B]`` image indices per step (:func:`inner_batch_indices`).
        batch_mask: ``[N, B]`` weights, 1 for real entries and 0 for padding.
        inner: the student, gradient mode, loop form, DSA groups and batch placement
            (:class:`InnerLoop`).
        augment_key: PRNG key for DSA; ``None`` turns augmentation off (MTT's ``--no_aug``).

    Returns:
        θ̂_N, a pytree like ``start_params``.

    Raises:
        DDJaxError: unknown ``mode``/``loop``/strategy, bad ``remat_every``, mismatched
            shapes, or floating inputs of different dtypes (``start_params``, ``images``,
            float ``labels``, an array ``inner_lr``; the message names the leaf and both
            dtypes).
    """
    check(isinstance(inner, InnerLoop), f"inner must be an InnerLoop, got {type(inner).__name__}")
    inner.validate()
    _check_shapes(images, labels, batch_indices, batch_mask)
    # The learned inputs and θ share one float dtype (batch_mask is a weight, never learned).
    models.check_float_dtypes(
        "inner_unroll",
        {"start_params": start_params, "images": images, "labels": labels, "inner_lr": inner_lr},
    )
    augmenting = augment_key is not None and bool(augment_lib.parse_strategy(inner.dsa_strategy))
    student = _Student(
        inner.model, inner.dsa_strategy if augmenting else None, inner.batch_sharding
    )
    inner_lr = _as_learning_rate(inner_lr)
    batch = jax.ShapeDtypeStruct((batch_indices.shape[1], *images.shape[1:]), images.dtype)
    loop = resolve_loop(inner, start_params, batch)
    if inner.mode == "tesla":
        config = _TeslaConfig(student, loop, labels_differentiable=_is_float(labels))
        return _tesla_unroll(
            config, images, labels, inner_lr, start_params, batch_indices, batch_mask, augment_key
        )
    return _sgd_steps(
        student,
        images,
        labels,
        inner_lr,
        start_params,
        batch_indices,
        batch_mask,
        augment_key,
        remat=inner.mode == "remat",
        remat_every=inner.remat_every,
        loop=loop,
    )


def _sgd_steps(
    student: _Student,
    images: Array,
    labels: Array,
    inner_lr: Array,
    start_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    augment_key: Array | None,
    *,
    remat: bool,
    remat_every: int | None,
    loop: Loop,
) -> Params:
    """θ̂_N by N SGD steps, differentiated by plain reverse mode (with optional remat)."""
    num_steps = batch_indices.shape[0]
    operands = _StepOperands(
        images, labels, inner_lr, augment_key, batch_indices, batch_mask, jnp.arange(num_steps)
    )
    step = functools.partial(_sgd_step, student)
    return _run_steps(step, start_params, operands, remat=remat, remat_every=remat_every, loop=loop)


# --------------------------------------------------------------------------------------------
# TESLA's estimator
# --------------------------------------------------------------------------------------------


class _TeslaConfig(NamedTuple):
    """The static (non-array) part of a TESLA unroll."""

    student: _Student
    loop: Loop
    labels_differentiable: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tesla_unroll(
    config: _TeslaConfig,
    images: Array,
    labels: Array,
    inner_lr: Array,
    start_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    augment_key: Array | None,
) -> Params:
    # Undifferentiated calls need only θ̂_N: the plain loop, without TESLA's stored copies.
    return _sgd_steps(
        config.student,
        images,
        labels,
        inner_lr,
        start_params,
        batch_indices,
        batch_mask,
        augment_key,
        remat=False,
        remat_every=None,
        loop=config.loop,
    )


def _tesla_forward(
    config: _TeslaConfig,
    images: Array,
    labels: Array,
    inner_lr: Array,
    start_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    augment_key: Array | None,
) -> tuple[Params, tuple[Any, ...]]:
    """TESLA's first pass: the N steps, keeping θ̂_0 … θ̂_{N−1} and G = Σ g_n.

    Nothing here is differentiated (it is the forward rule of a custom VJP), which is what
    TESLA's ``detach()`` of every step achieves.
    """
    student = config.student

    def step(carry: tuple[Params, Params], step_inputs: Any) -> tuple[Any, Params]:
        params, grad_sum = carry
        indices, mask, step_number = step_inputs
        batch_images, batch_labels = _after((images[indices], labels[indices]), params)
        grads = _step_gradient(
            student, params, batch_images, batch_labels, mask, step_number, augment_key
        )
        new_params = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
        return (new_params, jax.tree.map(jnp.add, grad_sum, grads)), params

    num_steps = batch_indices.shape[0]
    step_inputs = (batch_indices, batch_mask, jnp.arange(num_steps))
    zeros = jax.tree.map(jnp.zeros_like, start_params)
    unroll = _scan_unroll(config.loop, num_steps)
    (final_params, grad_sum), step_params = jax.lax.scan(
        step, (start_params, zeros), step_inputs, unroll=unroll
    )
    residuals = (
        images,
        labels,
        inner_lr,
        step_params,
        grad_sum,
        batch_indices,
        batch_mask,
        augment_key,
    )
    return final_params, residuals


def _tesla_backward(
    config: _TeslaConfig, residuals: tuple[Any, ...], final_params_cotangent: Params
) -> tuple[Any, ...]:
    """TESLA's second pass: Σ_n of the per-step VJPs with θ̂_n fixed (see :func:`inner_unroll`)."""
    images, labels, inner_lr, step_params, grad_sum, batch_indices, batch_mask, augment_key = (
        residuals
    )
    student = config.student
    # c = −α θ̄; for the matching loss, c = −(2α/D)(θ̂_N − θ*), TESLA's coefficient vector.
    coefficients = jax.tree.map(lambda t: -inner_lr * t, final_params_cotangent)
    label_argnums = (0, 1) if config.labels_differentiable else (0,)

    def step_term(carry: tuple[Array, Array], step_inputs: Any) -> tuple[Any, None]:
        image_grads, label_grads = carry
        params, indices, mask, step_number = step_inputs
        # The terms are independent; tying each to the running sum makes XLA compute them one
        # at a time in unrolled loops (see _after), so one step's activations are alive at once.
        params, batch_images, batch_labels = _after(
            (params, images[indices], labels[indices]), image_grads
        )

        def coefficient_dot_gradient(batch_images: Array, batch_labels: Array) -> Array:
            grads = _step_gradient(
                student, params, batch_images, batch_labels, mask, step_number, augment_key
            )
            return _tree_vdot(coefficients, grads)

        slice_grads = jax.grad(coefficient_dot_gradient, argnums=label_argnums)(
            batch_images, batch_labels
        )
        image_grads = image_grads.at[indices].add(slice_grads[0])
        if config.labels_differentiable:
            label_grads = label_grads.at[indices].add(slice_grads[1])
        return (image_grads, label_grads), None

    num_steps = batch_indices.shape[0]
    step_inputs = (step_params, batch_indices, batch_mask, jnp.arange(num_steps))
    label_grads = jnp.zeros_like(labels) if config.labels_differentiable else jnp.zeros(())
    unroll = _scan_unroll(config.loop, num_steps)
    (image_grads, label_grads), _ = jax.lax.scan(
        step_term, (jnp.zeros_like(images), label_grads), step_inputs, unroll=unroll
    )
    lr_grad = -_tree_vdot(final_params_cotangent, grad_sum).astype(inner_lr.dtype)
    label_cotangent = label_grads if config.labels_differentiable else None
    # Integer indices and the PRNG key have no cotangent (None is JAX's zero for them).
    return (
        image_grads,
        label_cotangent,
        lr_grad,
        final_params_cotangent,
        None,
        None,
        None,
    )


_tesla_unroll.defvjp(_tesla_forward, _tesla_backward)


# --------------------------------------------------------------------------------------------
# The matching loss
# --------------------------------------------------------------------------------------------


def match_loss(
    images: Array,
    labels: Array,
    inner_lr: Array | float,
    start_params: Params,
    target_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    *,
    inner: InnerLoop,
    augment_key: Array | None = None,
    param_weights: Params | None = None,
) -> Array:
    """MTT's normalised parameter-matching loss (Cazenavette et al. 2022, §3; brief §1.1).

    L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖², both squared norms summed over every
    parameter (MTT divides both by the parameter count, which cancels). θ̂_N is
    :func:`inner_unroll` from θ̂_0 = ``start_params``. Differentiable w.r.t. ``images``,
    ``inner_lr`` and float ``labels``; ``inner.mode`` picks the gradient (exact for
    ``'unroll'`` and ``'remat'``, TESLA's estimator for ``'tesla'``). ``start_params`` and
    ``target_params`` are expert snapshots and are treated as data.

    With ``param_weights`` w (a pytree like the parameters, e.g. a 0/1 mask) both sums are
    weighted, L = Σ w (θ̂_N − θ*_{t+M})² / Σ w (θ*_t − θ*_{t+M})²: a parameter of weight 0
    gives the synthetic data no matching signal (PAD's parameter selection,
    :mod:`ddjax.distill.pad`).

    Args:
        images: synthetic images ``[M, H, W, C]``.
        labels: int labels ``[M]`` or soft labels ``[M, num_classes]``.
        inner_lr: the learnable student learning rate α (a scalar).
        start_params: θ*_t, the expert's ``params`` at the start epoch.
        target_params: θ*_{t+M}, the expert's ``params`` M epochs later.
        batch_indices: int ``[N, B]`` (:func:`inner_batch_indices`).
        batch_mask: ``[N, B]`` weights, 0 for padding.
        inner: the student and how it trains (:class:`InnerLoop`).
        augment_key: PRNG key for DSA in the inner loop, or ``None`` for no augmentation.
        param_weights: per-parameter weights of both norms, or ``None`` (all 1: MTT).

    Returns:
        The scalar loss L.

    Raises:
        DDJaxError: see :func:`inner_unroll`; also if start, target and weights have
            different structures, or ``target_params`` a dtype other than the rest.
    """
    structures = [jax.tree.structure(start_params), jax.tree.structure(target_params)]
    if param_weights is not None:
        structures.append(jax.tree.structure(param_weights))
    check(
        all(s == structures[0] for s in structures),
        "match_loss: start_params, target_params (and param_weights) must have the same "
        f"structure, got {' and '.join(map(str, structures))}",
    )
    # Before the unroll, so that a mix is named here rather than inside lax.scan.
    dtypes = {"start_params": start_params, "target_params": target_params, "images": images}
    models.check_float_dtypes("match_loss", {**dtypes, "labels": labels, "inner_lr": inner_lr})
    final_params = inner_unroll(
        images,
        labels,
        inner_lr,
        start_params,
        batch_indices,
        batch_mask,
        inner=inner,
        augment_key=augment_key,
    )
    distance = _tree_squared_distance(final_params, target_params, param_weights)
    expert_distance = _tree_squared_distance(start_params, target_params, param_weights)
    return distance / expert_distance


class MatchGrads(NamedTuple):
    """Gradients of :func:`match_loss` w.r.t. what distillation learns.

    Attributes:
        images: ``[M, H, W, C]``, like the synthetic images.
        inner_lr: a scalar, like the learning rate.
        labels: like the labels when they are float (soft labels or label logits), else
            ``None`` (hard labels are fixed).
    """

    images: Array
    inner_lr: Array
    labels: Array | None


@xla.lazy_jit(static_argnames=("inner", "label_transform"))
def match_loss_and_grads(
    images: Array,
    labels: Array,
    inner_lr: Array | float,
    start_params: Params,
    target_params: Params,
    batch_indices: Array,
    batch_mask: Array,
    *,
    inner: InnerLoop,
    augment_key: Array | None = None,
    param_weights: Params | None = None,
    label_transform: Callable[[Array], Array] | None = None,
) -> tuple[Array, MatchGrads]:
    """:func:`match_loss` and its gradients, jitted (one compile per ``inner`` and transform).

    ``inner`` is static: Flax modules are hashable dataclasses, so equal configurations share
    a compiled program. Arrays (including ``inner_lr`` and ``param_weights``) are traced, so a
    new learning rate does not recompile. Inside a larger jitted step the inner ``jit`` is
    simply inlined.

    Args:
        images, labels, inner_lr, start_params, target_params, batch_indices, batch_mask:
            as for :func:`match_loss`; with ``label_transform``, ``labels`` are what the
            transform takes (e.g. DATM's label logits).
        inner, augment_key, param_weights: as for :func:`match_loss`.
        label_transform: a pure function from ``labels`` to the inner loop's targets (e.g.
            softmax over classes for DATM's learnable logits,
            :func:`ddjax.distill.soft_labels.label_probabilities`); the label gradient is then
            w.r.t. ``labels`` themselves. ``None``: the labels are the targets.

    Returns:
        ``(loss, MatchGrads(images, inner_lr, labels))``; ``labels`` is ``None`` for integer
        labels.

    Raises:
        DDJaxError: see :func:`match_loss`.
    """
    differentiate_labels = _is_float(labels)
    argnums = (0, 1, 2) if differentiate_labels else (0, 2)
    inner_lr = _as_learning_rate(inner_lr)

    data = (start_params, target_params, batch_indices, batch_mask)  # not differentiated
    options = dict(inner=inner, augment_key=augment_key, param_weights=param_weights)

    def loss_fn(images: Array, labels: Array, inner_lr: Array) -> Array:
        if label_transform is not None:
            labels = label_transform(labels)
        return match_loss(images, labels, inner_lr, *data, **options)

    loss, grads = jax.value_and_grad(loss_fn, argnums=argnums)(images, labels, inner_lr)
    if differentiate_labels:
        return loss, MatchGrads(grads[0], grads[2], grads[1])
    return loss, MatchGrads(grads[0], grads[1], None)


def from_mtt_flat(
    start_vector: Any,
    target_vector: Any,
    *,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    dtype: Any = None,
) -> tuple[Params, Params]:
    """Start and target ``params`` from MTT's flat expert vectors (host-side, not jittable).

    MTT's expert buffers store each epoch's parameters as ``ReparamModule``'s flat vector
    (``torch.cat([p.reshape(-1) for p in net.parameters()])``); this converts two of them with
    :func:`ddjax.models.from_flat_vector`. Running BatchNorm statistics are not part of the
    vector and are not needed: the student runs in train mode.

    Args:
        start_vector: θ*_t as a 1-D array (numpy, JAX or a CPU tensor).
        target_vector: θ*_{t+M}, same length.
        model: the ddjax model the expert was trained as.
        image_shape: (H, W, C) of the images.
        dtype: ``'float32'`` or ``'float64'`` for both; ``None`` (default): the wider of the
            two vectors' own floating dtypes, at least float32 (float64 is kept under
            ``jax_enable_x64``).

    Returns:
        ``(start_params, target_params)``, ``params`` pytrees for :func:`match_loss`, of one
        dtype.

    Raises:
        DDJaxError: if a vector's length does not match the model, or an unsupported
            ``dtype``.
    """
    start = models.from_flat_vector(start_vector, model, image_shape, dtype=dtype)["params"]
    target = models.from_flat_vector(target_vector, model, image_shape, dtype=dtype)["params"]
    wider = jnp.result_type(*jax.tree.leaves(start)[:1], *jax.tree.leaves(target)[:1])
    return jax.tree.map(lambda x: x.astype(wider), (start, target))


# --------------------------------------------------------------------------------------------
# Helpers and validation
# --------------------------------------------------------------------------------------------


def _tree_vdot(a: Params, b: Params) -> Array:
    """Σ over leaves of ⟨a, b⟩."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _tree_squared_distance(a: Params, b: Params, weights: Params | None = None) -> Array:
    """‖a − b‖² summed over every leaf; with ``weights``, Σ w (a − b)²."""
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    if weights is None:
        return sum(jnp.sum(jnp.square(x - y)) for x, y in leaves)
    weighted = zip(leaves, jax.tree.leaves(weights), strict=True)
    return sum(jnp.sum(w * jnp.square(x - y)) for (x, y), w in weighted)


def _as_learning_rate(inner_lr: Array | float) -> Array:
    """``inner_lr`` as a float scalar array (its own float dtype is kept)."""
    inner_lr = jnp.asarray(inner_lr)
    check(inner_lr.ndim == 0, f"inner_lr must be a scalar, got shape {inner_lr.shape}")
    if not jnp.issubdtype(inner_lr.dtype, jnp.floating):
        inner_lr = inner_lr.astype(jnp.result_type(float))
    return inner_lr


def _is_float(labels: Array) -> bool:
    return jnp.issubdtype(jnp.asarray(labels).dtype, jnp.floating)


def _check_positive_int(field: str, value: Any) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
    check(ok, f"{field} must be a positive integer, got {value!r}")


def _check_config(mode: str, remat_every: int | None, loop: Loop) -> None:
    check(mode in MODES, f"mode={mode!r}: expected one of {', '.join(map(repr, MODES))}")
    valid_loop = loop in ("auto", "unrolled", "rolled") or (
        isinstance(loop, numbers.Integral) and not isinstance(loop, bool) and loop > 0
    )
    check(
        valid_loop,
        f"loop={loop!r}: expected 'auto', 'unrolled', 'rolled' or a positive integer chunk length",
    )
    if remat_every is not None:
        check(
            mode == "remat",
            f"remat_every={remat_every!r} is only used with mode='remat', got mode={mode!r}",
        )
        _check_positive_int("remat_every", remat_every)


def _check_shapes(images: Array, labels: Array, batch_indices: Array, batch_mask: Array) -> None:
    check(
        np.ndim(images) == 4,
        f"images must be [M, H, W, C], got shape {tuple(np.shape(images))}",
    )
    num_images = np.shape(images)[0]
    check(
        np.ndim(labels) in (1, 2) and np.shape(labels)[0] == num_images,
        f"labels must be [{num_images}] or [{num_images}, num_classes] to match the images, "
        f"got shape {tuple(np.shape(labels))}",
    )
    check(
        np.ndim(batch_indices) == 2 and np.shape(batch_mask) == np.shape(batch_indices),
        "batch_indices and batch_mask must both be [num_inner_steps, batch_size], got shapes "
        f"{tuple(np.shape(batch_indices))} and {tuple(np.shape(batch_mask))}",
    )
    check(
        jnp.issubdtype(jnp.asarray(batch_indices).dtype, jnp.integer),
        f"batch_indices must be integers, got dtype {jnp.asarray(batch_indices).dtype}",
    )
