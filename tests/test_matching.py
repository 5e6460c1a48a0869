"""ddjax.distill.matching: MTT's inner unroll and matching loss, and its gradient modes.

XLA:CPU compile time dominates here (≈1 s per unrolled second-order step even for these tiny
nets), so the nets are tiny, N ≤ 3, results are shared between tests, and every program is
compiled with :data:`FAST_COMPILE`: XLA's backend optimisation level 0 and its older (non-MLIR)
fusion emitters, which together cut compile time about 4x. They change code generation (hence
float rounding), not what is computed, and left the memory analysis as it is with the default
options (measured: the same temp sizes to within 0.2 MiB of 2-30 MiB).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddjax import augment, models
from ddjax.distill import matching
from ddjax.errors import DDJaxError

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
NUM_IMAGES = 5
BATCH_SIZE = 2  # does not divide NUM_IMAGES: every pass has a short, masked chunk
# Two groups, so the mode-'S' choice (a lax.switch) and per-sample draws are both exercised at a
# fraction of the compile time of all six.
STRATEGY = "crop_flip"
INNER_LR = 0.2
AUGMENT_KEY_SEED = 11
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _compile(fun, *example_args):
    """``jax.jit(fun)`` compiled with :data:`FAST_COMPILE` for arguments shaped like these."""
    return jax.jit(fun).lower(*example_args).compile(compiler_options=FAST_COMPILE)


def _run(fun, *args):
    """``jax.jit(fun)(*args)``, compiled with :data:`FAST_COMPILE`."""
    return _compile(fun, *args)(*args)


@functools.cache
def _model(norm: str = "none"):
    # No normalisation in the shared student (a third cheaper to compile); the finite-difference
    # test uses MTT's instance norm.
    return models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=3, depth=1, norm=norm)


@functools.cache
def _problem(seed: int = 0):
    """Images, labels, and an expert segment (start, target) for the shared tiny ConvNet."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(NUM_IMAGES, *IMAGE_SHAPE)), jnp.float32)
    labels = jnp.arange(NUM_IMAGES, dtype=jnp.int32) % NUM_CLASSES
    start = models.init_variables(_model(), jax.random.key(seed), IMAGE_SHAPE)["params"]
    # A target that differs from the start the way an expert's later epoch does: everywhere.
    offsets = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), start)
    target = jax.tree.map(lambda p, o: p + 0.05 * o, start, offsets)
    return images, labels, start, target


def _schedule(num_steps: int):
    return matching.inner_batch_indices(jax.random.key(7), NUM_IMAGES, BATCH_SIZE, num_steps)


def _augment_key_at(step: int):
    """The documented DSA key of inner step ``step``: ``fold_in(augment_key, step)``."""
    return jax.random.fold_in(jax.random.key(AUGMENT_KEY_SEED), step)


@functools.cache
def _loss_and_grads(num_steps: int, soft_labels: bool = False, float64: bool = False, **config):
    """match_loss_and_grads on the shared problem with augmentation on (cached per config).

    ``float64``: computed under x64 with the problem's floats in float64 (x64 is confined to
    the call: the jit caches are keyed on it).
    """
    with jax.enable_x64(float64):
        images, labels, start, target = jax.tree.map(
            lambda a: a.astype(jnp.float64) if float64 and _is_float(a) else a, _problem()
        )
        if soft_labels:
            logits = jax.random.normal(jax.random.key(3), (NUM_IMAGES, NUM_CLASSES))
            labels = jax.nn.softmax(logits + 2 * jax.nn.one_hot(labels, NUM_CLASSES))
        indices, mask = _schedule(num_steps)
        inner = matching.InnerLoop(_model(), dsa_strategy=STRATEGY, **config)

        def loss_and_grads(images, inner_lr, augment_key):
            return matching.match_loss_and_grads(
                images,
                labels,
                inner_lr,
                start,
                target,
                indices,
                mask,
                inner=inner,
                augment_key=augment_key,
            )

        inner_lr = jnp.asarray(INNER_LR, images.dtype)
        return _run(loss_and_grads, images, inner_lr, jax.random.key(AUGMENT_KEY_SEED))


def _is_float(a):
    return jnp.issubdtype(a.dtype, jnp.floating)


def _assert_trees_close(actual, expected, rtol, atol=0.0):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol, atol),
        actual,
        expected,
    )


def _relative_difference(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# --- the minibatch schedule -------------------------------------------------------------------


def test_batch_indices_use_every_image_once_per_pass_short_chunk_first():
    key, num_images, batch_size = jax.random.key(0), 7, 3  # chunks of 3, 3 and a short 1
    chunks_per_pass, passes = 3, 4
    indices, mask = matching.inner_batch_indices(
        key, num_images, batch_size, chunks_per_pass * passes
    )
    indices, mask = np.asarray(indices), np.asarray(mask)
    assert indices.shape == mask.shape == (chunks_per_pass * passes, batch_size)
    assert indices.dtype == np.int32 and mask.dtype == np.float32
    permutations = []
    for p in range(passes):
        steps = slice(p * chunks_per_pass, (p + 1) * chunks_per_pass)
        pass_indices, pass_mask = indices[steps], mask[steps]
        used = pass_indices[pass_mask == 1]
        np.testing.assert_array_equal(np.sort(used), np.arange(num_images))
        # MTT: chunks = torch.split(perm, 3) = [perm[:3], perm[3:6], perm[6:]], then pop() from
        # the end, so the short chunk comes first; its padding is index 0 with mask 0.
        permutation = np.asarray(jax.random.permutation(jax.random.fold_in(key, p), num_images))
        np.testing.assert_array_equal(pass_indices[0], [permutation[6], 0, 0])
        np.testing.assert_array_equal(pass_mask[0], [1, 0, 0])
        np.testing.assert_array_equal(pass_indices[1], permutation[3:6])
        np.testing.assert_array_equal(pass_indices[2], permutation[:3])
        np.testing.assert_array_equal(pass_mask[1:], np.ones((2, 3)))
        permutations.append(permutation)
    assert len({p.tobytes() for p in permutations}) > 1  # a fresh permutation every pass


def test_batch_indices_prefix_is_stable_and_partial_passes_are_cut():
    long_indices, long_mask = matching.inner_batch_indices(jax.random.key(3), 6, 2, 9)
    indices, mask = matching.inner_batch_indices(jax.random.key(3), 6, 2, 4)
    np.testing.assert_array_equal(indices, long_indices[:4])
    np.testing.assert_array_equal(mask, long_mask[:4])
    assert np.all(np.asarray(long_mask) == 1)  # 2 divides 6: nothing is padded


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("num_steps", 2.5)])
def test_batch_indices_reject_bad_sizes(field, value):
    sizes = {"num_images": 4, "batch_size": 2, "num_steps": 3} | {field: value}
    with pytest.raises(DDJaxError, match=field):
        matching.inner_batch_indices(jax.random.key(0), **sizes)


# --- gradients --------------------------------------------------------------------------------


def test_unroll_gradient_matches_central_finite_differences_in_float64():
    # Soft labels, so the label gradient is checked too. x64 is confined to this block: the
    # jit caches are keyed on it, so nothing compiled here leaks into other tests.
    with jax.enable_x64(True):
        model = _model("instance")
        rng = np.random.default_rng(1)
        images = jnp.asarray(rng.normal(size=(NUM_IMAGES, *IMAGE_SHAPE)))
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(NUM_IMAGES, NUM_CLASSES))))
        start = models.init_variables(model, jax.random.key(1), IMAGE_SHAPE)["params"]
        start = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), start)
        target = jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape), start)
        indices, mask = _schedule(2)
        inner = matching.InnerLoop(model, mode="unroll", dsa_strategy=STRATEGY)
        config = dict(inner=inner, augment_key=jax.random.key(5))

        def match_loss(images, labels, inner_lr):
            return matching.match_loss(
                images, labels, inner_lr, start, target, indices, mask, **config
            )

        inner_lr = jnp.float64(INNER_LR)
        loss = _compile(match_loss, images, labels, inner_lr)
        value, grads = _run(
            lambda *args: matching.match_loss_and_grads(
                *args, start, target, indices, mask, **config
            ),
            images,
            labels,
            inner_lr,
        )
        assert value.dtype == jnp.float64 and grads.images.dtype == jnp.float64
        np.testing.assert_allclose(value, loss(images, labels, inner_lr), rtol=1e-12)

        def central_difference(direction_images, direction_labels, direction_lr, eps=1e-5):
            def at(sign):
                return loss(
                    images + sign * eps * direction_images,
                    labels + sign * eps * direction_labels,
                    inner_lr + sign * eps * direction_lr,
                )

            return float((at(1) - at(-1)) / (2 * eps))

        zero_images, zero_labels = jnp.zeros_like(images), jnp.zeros_like(labels)
        lr_fd = central_difference(zero_images, zero_labels, 1.0)
        np.testing.assert_allclose(float(grads.inner_lr), lr_fd, rtol=1e-7)
        for _ in range(2):
            direction = jnp.asarray(rng.normal(size=images.shape))
            fd = central_difference(direction, zero_labels, 0.0)
            np.testing.assert_allclose(float(jnp.vdot(grads.images, direction)), fd, rtol=1e-7)
        direction = jnp.asarray(rng.normal(size=labels.shape))
        fd = central_difference(zero_images, direction, 0.0)
        np.testing.assert_allclose(float(jnp.vdot(grads.labels, direction)), fd, rtol=1e-7)
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


@pytest.mark.parametrize("remat_every, loop", [(None, "unrolled"), (2, "rolled")])
def test_remat_equals_unroll_with_augmentation(remat_every, loop):
    # N = 3 with blocks of 2: one checkpointed block plus a remainder block. The reference is
    # the default (unrolled) loop, so the rolled case also checks that the loop form is only a
    # matter of compilation.
    loss, grads = _loss_and_grads(3, mode="unroll")
    remat_loss, remat_grads = _loss_and_grads(3, mode="remat", remat_every=remat_every, loop=loop)
    assert grads.labels is None and remat_grads.labels is None  # hard labels are fixed
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    _assert_trees_close(remat_grads, grads, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads.images))) > 0.0


def test_tesla_equals_unroll_for_one_step():
    # With soft labels, so TESLA's label gradient (DATM_tesla.py) is checked as well.
    loss, grads = _loss_and_grads(1, soft_labels=True, mode="unroll")
    tesla_loss, tesla_grads = _loss_and_grads(1, soft_labels=True, mode="tesla")
    assert tesla_grads.labels.shape == (NUM_IMAGES, NUM_CLASSES)
    np.testing.assert_allclose(tesla_loss, loss, rtol=1e-6)
    _assert_trees_close(tesla_grads, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", matching.MODES)
def test_loop_forms_give_the_same_loss_and_gradients_in_float64(mode):
    # 'auto' resolves to 'rolled' on CPU for remat and tesla (the student's convs all take the
    # fast gradient), so the rolled form must be the unrolled one up to float64 rounding:
    # N = 3 steps of sums of a few hundred terms, ≈ 1e-13 relative; asserted at 1e-10.
    loss, grads = _loss_and_grads(3, float64=True, mode=mode, loop="unrolled")
    rolled_loss, rolled_grads = _loss_and_grads(3, float64=True, mode=mode, loop="rolled")
    assert grads.images.dtype == jnp.float64
    np.testing.assert_allclose(rolled_loss, loss, rtol=1e-10)
    _assert_trees_close(rolled_grads, grads, rtol=1e-10, atol=1e-14)
    assert np.max(np.abs(grads.images)) > 0.0


def test_auto_loop_is_rolled_where_every_conv_gradient_is_fast():
    params = models.variable_shapes(_model(), IMAGE_SHAPE)["params"]
    batch = jax.ShapeDtypeStruct((BATCH_SIZE, *IMAGE_SHAPE), jnp.float32)

    def resolved(model, mode="remat", loop="auto", params=params):
        return matching.resolve_loop(matching.InnerLoop(model, mode=mode, loop=loop), params, batch)

    assert jax.default_backend() == "cpu"
    assert resolved(_model()) == "rolled"
    assert resolved(_model(), mode="tesla") == "rolled"
    # A rolled 'unroll' stacks every step's activations with dynamic updates: slower on CPU.
    assert resolved(_model(), mode="unroll") == "unrolled"
    assert resolved(_model(), loop=3) == 3  # an explicit form is kept
    # XLA's own conv gradient (conv_grad='xla', or a strided conv) is slow inside loop bodies.
    xla = models.get_model(
        "ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=3, depth=1, norm="none", conv_grad="xla"
    )
    assert resolved(xla) == "unrolled"
    resnet = models.get_model("ResNet18", NUM_CLASSES, IMAGE_SHAPE, width=2)
    resnet_params = models.variable_shapes(resnet, IMAGE_SHAPE)["params"]
    assert resolved(resnet, params=resnet_params) == "unrolled"


def _reference_step_gradient(params, images, labels, indices, mask, key):
    """g_i written out independently: masked-mean CE of the student on A_i(X̃[b_i])."""
    batch = augment.dsa(key, images[indices], STRATEGY)
    logits = _model().apply({"params": params}, batch, train=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels[indices])
    return jnp.sum(losses * mask) / jnp.sum(mask)


def test_tesla_is_the_published_estimator_and_not_the_exact_gradient():
    num_steps = 3
    images, labels, start, target = _problem()
    indices, mask = _schedule(num_steps)
    step_inputs = [(indices[i], mask[i], _augment_key_at(i)) for i in range(num_steps)]
    step_gradient = _compile(
        jax.grad(_reference_step_gradient), start, images, labels, *step_inputs[0]
    )

    # TESLA's first pass: the student's parameters θ_i and G = Σ g_i.
    params, step_params, grad_sum = start, [], jax.tree.map(jnp.zeros_like, start)
    for i in range(num_steps):
        g = step_gradient(params, images, labels, *step_inputs[i])
        step_params.append(params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, g)
        params = jax.tree.map(lambda p, g: p - INNER_LR * g, params, g)
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    residual = flat(params) - flat(target)  # θ_N − θ*
    expert_distance = jnp.sum(jnp.square(flat(start) - flat(target)))  # D

    # Its second pass, as published: c = −(2α/D)(θ_N − θ*), the VJP of ⟨c, g_i⟩ at fixed θ_i.
    coefficients = -(2 * INNER_LR / expert_distance) * residual

    def image_term(params, images, indices, mask, key):
        def inner_product(images):
            grads = jax.grad(_reference_step_gradient)(params, images, labels, indices, mask, key)
            return jnp.vdot(coefficients, flat(grads))

        return jax.grad(inner_product)(images)

    image_term = _compile(image_term, start, images, *step_inputs[0])
    expected_image_grads = sum(
        image_term(step_params[i], images, *step_inputs[i]) for i in range(num_steps)
    )
    expected_lr_grad = -2 * jnp.vdot(flat(grad_sum), residual) / expert_distance

    # A scan of unrolled chunks of 2 steps (one chunk and a remainder), in both of TESLA's passes.
    tesla_loss, tesla_grads = _loss_and_grads(num_steps, mode="tesla", loop=2)
    np.testing.assert_allclose(tesla_loss, jnp.sum(jnp.square(residual)) / expert_distance, 1e-5)
    np.testing.assert_allclose(tesla_grads.images, expected_image_grads, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(tesla_grads.inner_lr, expected_lr_grad, rtol=1e-4)

    # The dropped cross-step terms are visible for N > 1.
    _, exact_grads = _loss_and_grads(num_steps, mode="unroll")
    assert _relative_difference(tesla_grads.images, exact_grads.images) > 1e-2
    assert abs(float(tesla_grads.inner_lr - exact_grads.inner_lr)) > 1e-3 * abs(
        float(exact_grads.inner_lr)
    )


# --- memory -----------------------------------------------------------------------------------


def _compiled_temp_bytes(mode: str, num_steps: int, loop: str) -> int:
    """Temp memory of the compiled loss-and-gradient program (lowered and compiled, never run).

    A net and batch whose activations (32 images of 20×20×8 after the first conv) dwarf its
    2.4k parameters, so that storing a parameter copy per step is visibly cheaper than storing
    a step's activations.
    """
    image_shape = (16, 16, 1)
    model = models.get_model("ConvNet", NUM_CLASSES, image_shape, width=8, depth=1, norm="none")
    params = models.variable_shapes(model, image_shape)["params"]
    num_images = 32
    images = jax.ShapeDtypeStruct((num_images, *image_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((num_images,), jnp.int32)
    indices = jax.ShapeDtypeStruct((num_steps, num_images), jnp.int32)
    mask = jax.ShapeDtypeStruct((num_steps, num_images), jnp.float32)
    inner_lr = jax.ShapeDtypeStruct((), jnp.float32)
    lowered = matching.match_loss_and_grads.lower(
        images,
        labels,
        inner_lr,
        params,
        params,
        indices,
        mask,
        inner=matching.InnerLoop(model, mode=mode, loop=loop),
    )
    return lowered.compile(FAST_COMPILE).memory_analysis().temp_size_in_bytes


def test_remat_memory_does_not_grow_with_steps_while_unroll_does():
    # A rolled loop compiles in time independent of N (unrolled N = 40 would take minutes).
    remat = {n: _compiled_temp_bytes("remat", n, "rolled") for n in (10, 40)}
    unroll = {n: _compiled_temp_bytes("unroll", n, "rolled") for n in (10, 40)}
    # remat stores one parameter copy per step and one step's activations; plain backprop
    # keeps every step's activations.
    assert remat[40] <= 1.3 * remat[10], remat
    # Linear growth: with remat[10] as the one-step baseline, the 30 steps from 10 to 40 add
    # about 3x what the first 10 steps added (asserted: at least 2x).
    per_step_first = (unroll[10] - remat[10]) / 10
    per_step_after = (unroll[40] - unroll[10]) / 30
    assert per_step_first > 0 and per_step_after >= 0.66 * per_step_first, (unroll, remat)


def test_remat_and_tesla_save_memory_in_the_unrolled_loop():
    # In a loop unrolled into straight-line code XLA:CPU is free to schedule every step's
    # recomputation early; plain jax.checkpoint then saved nothing (matching._after).
    remat = {n: _compiled_temp_bytes("remat", n, "unrolled") for n in (2, 6)}
    tesla = _compiled_temp_bytes("tesla", 6, "unrolled")
    unroll = _compiled_temp_bytes("unroll", 6, "unrolled")
    assert remat[6] <= 1.1 * remat[2], remat
    # TESLA keeps θ̂_n and one step's working set, a little more than remat's (measured 1.46x
    # at these shapes); unroll keeps all six steps' activations (3.2x).
    assert tesla <= 1.6 * remat[2], (tesla, remat)
    assert unroll >= 2 * remat[6] and unroll >= 2 * tesla, (unroll, tesla, remat)


# --- other models, conversion and errors ------------------------------------------------------


def test_batchnorm_student_uses_minibatch_statistics():
    model = models.get_model("ConvNet", NUM_CLASSES, IMAGE_SHAPE, width=2, depth=1, norm="batch")
    variables = models.init_variables(model, jax.random.key(0), IMAGE_SHAPE)
    images, labels, _, _ = _problem()
    indices, mask = jnp.arange(4, dtype=jnp.int32)[None], jnp.ones((1, 4))

    def reference_loss(params):
        # Train-mode BatchNorm on this minibatch, fresh running statistics thrown away.
        logits, _ = model.apply(
            variables | {"params": params}, images[:4], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:4]).mean()

    def reference_step(params):
        grads = jax.grad(reference_loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    def inner_unroll(params):
        return matching.inner_unroll(
            images,
            labels,
            0.1,
            params,
            indices,
            mask,
            inner=matching.InnerLoop(model, mode="unroll"),
        )

    final, expected = _run(lambda p: (inner_unroll(p), reference_step(p)), variables["params"])
    _assert_trees_close(final, expected, rtol=1e-5, atol=1e-7)


def test_from_mtt_flat_converts_start_and_target():
    model = _model()
    _, _, start, target = _problem()
    start_vector = models.to_flat_vector({"params": start}, model)
    target_vector = models.to_flat_vector({"params": target}, model)
    converted = matching.from_mtt_flat(
        start_vector, target_vector, model=model, image_shape=IMAGE_SHAPE
    )
    _assert_trees_close(converted, (start, target), rtol=0)


@pytest.mark.parametrize(
    "config, field",
    [
        (dict(mode="bptt"), "mode"),
        (dict(loop="scan"), "loop"),
        (dict(loop=0), "loop"),
        (dict(mode="tesla", remat_every=2), "remat_every"),
        (dict(mode="remat", remat_every=0), "remat_every"),
    ],
)
def test_bad_configuration_names_the_field(config, field):
    images, labels, start, target = _problem()
    indices, mask = _schedule(3)
    with pytest.raises(DDJaxError, match=field) as error:
        matching.match_loss(
            images,
            labels,
            INNER_LR,
            start,
            target,
            indices,
            mask,
            inner=matching.InnerLoop(_model(), **config),
        )
    if field == "mode":
        assert "'unroll', 'remat', 'tesla'" in str(error.value)
    if field == "loop":
        assert "'unrolled', 'rolled'" in str(error.value)
