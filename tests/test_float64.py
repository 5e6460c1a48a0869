"""float64 through the public API: PyTorch converters, model init, the two public losses.

A user who turns on ``jax_enable_x64`` and hands ddjax a ``net.double()`` PyTorch network
gets float64 everywhere without casting anything: the converters keep the dtype in both
directions, models initialise float64 (from the float32 draw), and MTT's matching loss and
SRe2L's recover objective run in float64, where their gradients equal central finite
differences to ~1e-9 (asserted at 1e-6). A float32/float64 mix is refused with the leaf named.
x64 is confined to ``jax.enable_x64`` blocks (jit caches are keyed on it). Tiny nets; the
programs compile with XLA's fast options (see tests/test_matching.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddjax import models
from ddjax.distill import matching
from ddjax.errors import DDJaxError
from ddjax.sre2l import recover_step, teacher
from ddjax.sre2l.contract import DataContract

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 3
WIDTH = 3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _torch_convnet(norm: str) -> torch.nn.Module:
    """MTT's ConvNet-1 (width 3) in PyTorch, float64: ``features.{0,1}``, ``classifier``."""
    torch.manual_seed(0)
    norm_layer = {
        "instance": torch.nn.GroupNorm(WIDTH, WIDTH, affine=True),
        "batch": torch.nn.BatchNorm2d(WIDTH),
    }[norm]
    features = [torch.nn.Conv2d(3, WIDTH, 3, padding=1), norm_layer]
    features += [torch.nn.ReLU(), torch.nn.AvgPool2d(2, 2)]
    net = torch.nn.Module()
    net.features = torch.nn.Sequential(*features)
    net.classifier = torch.nn.Linear(WIDTH * 4 * 4, NUM_CLASSES)
    net = net.double()
    if norm == "batch":  # a trained look: running statistics away from (0, 1)
        with torch.no_grad():
            norm_layer.running_mean.uniform_(-0.5, 0.5)
            norm_layer.running_var.uniform_(0.3, 1.5)
    return net


def _model(norm: str):
    return models.get_model(
        {"instance": "ConvNet", "batch": "ConvNetBN"}[norm],
        NUM_CLASSES,
        IMAGE_SHAPE,
        width=WIDTH,
        depth=1,
    )


def _dtypes(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}


def _assert_gradient_matches_central_differences(loss, grad, point, rng, eps=1e-6):
    """⟨∇L, d⟩ = (L(x + εd) − L(x − εd)) / 2ε for random d; float64 truncation error ~ε²."""
    for _ in range(3):
        direction = jnp.asarray(rng.normal(size=point.shape))
        fd = (loss(point + eps * direction) - loss(point - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6)


def test_converters_keep_float64_both_ways_and_take_a_dtype():
    net = _torch_convnet("batch")
    model = _model("batch")
    state_dict = net.state_dict()
    vector = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with jax.enable_x64(True):
        variables = models.from_torch_state_dict(state_dict, model, IMAGE_SHAPE)
        assert _dtypes(variables) == {"float64"}  # running statistics included
        back = models.to_torch_state_dict(variables, model)
        for key, tensor in state_dict.items():  # float64 round trip: bit for bit
            np.testing.assert_array_equal(back[key], tensor.numpy(), err_msg=key)
            assert back[key].dtype == tensor.numpy().dtype, key
        flat = models.to_flat_vector(variables, model)
        assert flat.dtype == np.float64
        np.testing.assert_array_equal(flat, vector.numpy())
        from_flat = models.from_flat_vector(vector, model, IMAGE_SHAPE)
        assert _dtypes(from_flat) == {"float64"}  # the fresh running statistics too
        start, target = matching.from_mtt_flat(
            vector, vector.float(), model=model, image_shape=IMAGE_SHAPE
        )
        assert _dtypes((start, target)) == {"float64"}  # the wider of the two
        narrow = models.from_flat_vector(vector, model, IMAGE_SHAPE, dtype="float32")
        assert _dtypes(narrow) == {"float32"}
        assert models.to_flat_vector(variables, model, dtype="float32").dtype == np.float32
        assert _dtypes(models.to_torch_state_dict(variables, model, dtype=np.float32)) >= {
            "float32"
        }
        # Models created under x64 are float64 throughout, starting at the float32 draw.
        init64 = models.init_variables(model, jax.random.key(3, impl="rbg"), IMAGE_SHAPE)
        assert _dtypes(init64) == {"float64"}
    init32 = models.init_variables(model, jax.random.key(3, impl="rbg"), IMAGE_SHAPE)
    assert _dtypes(init32) == {"float32"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.float32(a), b), init64, init32)
    # Without x64 the JAX side is float32 as always; the numpy side keeps float64.
    assert _dtypes(models.from_flat_vector(vector, model, IMAGE_SHAPE)) == {"float32"}
    assert models.to_flat_vector(init32, model, dtype="float64").dtype == np.float64
    with pytest.raises(DDJaxError, match=r"dtype='float16' is not one of"):
        models.from_flat_vector(vector, model, IMAGE_SHAPE, dtype="float16")


def test_match_loss_in_float64_on_pytorch_vectors_matches_finite_differences():
    """MTT's expert buffers hold flat PyTorch vectors: two of a ``net.double()`` expert go
    through from_mtt_flat and match_loss_and_grads with no cast; image and α gradients equal
    central differences."""
    net = _torch_convnet("instance")
    start_vector = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target_vector = start_vector + 0.05 * torch.randn(start_vector.shape, dtype=torch.float64)
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        model = _model("instance")
        start, target = matching.from_mtt_flat(
            start_vector, target_vector, model=model, image_shape=IMAGE_SHAPE
        )
        images = jnp.asarray(rng.normal(size=(5, *IMAGE_SHAPE)))
        labels = jnp.arange(5) % NUM_CLASSES
        indices, mask = matching.inner_batch_indices(jax.random.key(7), 5, 2, 2)
        inner = matching.InnerLoop(model, mode="unroll")

        def loss_and_grads(images, inner_lr):
            loss, grads = matching.match_loss_and_grads(
                images, labels, inner_lr, start, target, indices, mask, inner=inner
            )
            return loss, grads.images, grads.inner_lr

        inner_lr = jnp.float64(0.2)
        compiled = jax.jit(loss_and_grads).lower(images, inner_lr).compile(FAST_COMPILE)
        value, image_grad, lr_grad = compiled(images, inner_lr)
        assert value.dtype == image_grad.dtype == lr_grad.dtype == jnp.float64
        loss = jax.jit(lambda x, lr: loss_and_grads(x, lr)[0]).lower(images, inner_lr)
        loss = loss.compile(FAST_COMPILE)
        _assert_gradient_matches_central_differences(
            lambda x: loss(x, inner_lr), image_grad, images, rng
        )
        eps = 1e-6
        fd = (loss(images, inner_lr + eps) - loss(images, inner_lr - eps)) / (2 * eps)
        np.testing.assert_allclose(float(lr_grad), float(fd), rtol=1e-6)


def test_recover_loss_in_float64_on_a_pytorch_teacher_matches_finite_differences():
    """A ``net.double()`` BatchNorm teacher imported with import_torch_teacher (a contract, no
    dataset): its running statistics are float64, and the recover objective's image gradient
    equals central differences."""
    net = _torch_convnet("batch")
    contract = DataContract.named("synthetic:test", IMAGE_SHAPE, NUM_CLASSES, "cifar10")
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        imported = teacher.import_torch_teacher(
            net.state_dict(),
            model_name="ConvNetBN",
            model_overrides={"width": WIDTH, "depth": 1},
            dataset=contract,
            key_style="mtt",
        )
        assert _dtypes(imported.variables) == {"float64"}
        np.testing.assert_array_equal(
            imported.variables["batch_stats"]["norm_0"]["var"],
            net.features[1].running_var.numpy(),
        )
        images = jnp.asarray(rng.normal(size=(4, *IMAGE_SHAPE)))
        labels = jnp.array([2, 0, 1, 2])

        def loss(images):
            return recover_step.recover_loss(
                imported.model, imported.variables, images, labels, r_bn=0.3
            )[0]

        value, grad = jax.jit(jax.value_and_grad(loss)).lower(images).compile(FAST_COMPILE)(images)
        assert value.dtype == grad.dtype == jnp.float64
        compiled = jax.jit(loss).lower(images).compile(FAST_COMPILE)
        _assert_gradient_matches_central_differences(compiled, grad, images, rng)


def test_a_float32_float64_mix_is_refused_with_the_leaf_named():
    """Before: lax.scan's "carry input and output must have equal types" from match_loss, and a
    silently float32 recover objective; now one DDJaxError naming the leaf and both dtypes."""
    with jax.enable_x64(True):
        model = _model("batch")
        variables = models.init_variables(model, jax.random.key(0), IMAGE_SHAPE)
        params32 = jax.tree.map(lambda a: a.astype(jnp.float32), variables["params"])
        images = jnp.zeros((2, *IMAGE_SHAPE))
        indices, mask = matching.inner_batch_indices(jax.random.key(7), 2, 2, 1)
        inner = matching.InnerLoop(model, mode="unroll")
        with pytest.raises(
            DDJaxError, match=r"match_loss: images is float64 but start_params\['classifier'\]"
        ):
            matching.match_loss_and_grads(
                images, jnp.arange(2), 0.1, params32, params32, indices, mask, inner=inner
            )
        norm_0 = {"mean": jnp.zeros(WIDTH, jnp.float32), "var": jnp.ones(WIDTH)}
        stats = dict(variables["batch_stats"], norm_0=norm_0)
        with pytest.raises(
            DDJaxError,
            match=r"recover_loss: batch_stats\['norm_0'\]\['mean'\] is float32 but images is "
            "float64",
        ):
            recover_step.recover_loss(
                model, {**variables, "batch_stats": stats}, images, jnp.arange(2), r_bn=0.1
            )
