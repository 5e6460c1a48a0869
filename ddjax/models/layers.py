"""The layers MTT's networks are built from, with PyTorch's initialisation and semantics.

Promises: :func:`conv2d` and :func:`dense` initialise as PyTorch's ``nn.Conv2d`` / ``nn.Linear``
(U(±1/√fan_in) for weights and biases, or torchvision's kaiming-normal for ResNet and
MobileNet convs and N(0, 0.01²) for MobileNet's classifier); :func:`conv2d` also does grouped
(depthwise) convolutions with PyTorch's ``groups`` semantics;
:class:`BatchNorm` is ``nn.BatchNorm2d`` (biased variance to normalise, unbiased for the running
variance) and can record its input statistics (``'bn_inputs'``); :func:`norm_layer` gives the
other normalisations of MTT's networks with eps 1e-5; :func:`flatten_chw` flattens in PyTorch's
(C, H, W) order. The helpers must be called inside a ``@nn.compact`` method. The field checks
(:func:`check_choice`, :func:`check_positive_int`) raise one-line :class:`DDJaxError` messages
that name ``Owner.field``, the value and what is valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import check
from ddjax.models.conv import conv_general_dilated

# PyTorch's defaults: BatchNorm2d(momentum=0.1) updates running = 0.9·running + 0.1·batch, and
# every normalisation layer of these networks uses eps = 1e-5 (Flax's own default is 1e-6).
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5

NORMS = ("instance", "batch", "layer", "group", "none")
POOLS = ("avg", "max", "none")


def float_dtype() -> jnp.dtype:
    """The dtype of every variable a model creates: float32, or float64 under ``jax_enable_x64``.

    Read when a model is initialised, so one switch gives a network that is float64 throughout
    (Flax's own default would leave convolutions float32 next to float64 BatchNorm leaves).
    """
    return jnp.result_type(float)


def check_float_dtypes(where: str, inputs: Mapping[str, Any]) -> None:
    """Raises :class:`DDJaxError` unless every floating leaf of ``inputs`` has one dtype.

    A float32 leaf among float64 ones (or the reverse) would otherwise fail deep inside
    ``lax.scan`` ("scan carry input and output must have equal types") or silently compute
    part of a loss, or its gradient, at float32 accuracy. Integer leaves and weakly typed
    scalars (Python floats such as a learning rate) take any dtype and are not checked.

    Args:
        where: the function named in the message, e.g. ``'match_loss'``.
        inputs: argument name -> array or pytree, in the order the message should follow.
    """
    first = None
    for name, tree in inputs.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if isinstance(leaf, int | float) or getattr(leaf, "weak_type", False):
                continue
            dtype = np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
            if not np.issubdtype(dtype, np.floating):
                continue
            leaf_name = name + jax.tree_util.keystr(path)
            if first is None:
                first = (leaf_name, dtype)
            check(
                dtype == first[1],
                f"{where}: {leaf_name} is {dtype} but {first[0]} is {first[1]}; give every "
                "floating input one dtype (float64 needs jax_enable_x64; the converters take "
                "dtype='float64', e.g. from_torch_state_dict, from_mtt_flat)",
            )


def _drawn_in_float32(init: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``init`` drawn in float32 and then cast: a float64 network starts from the float32 values.

    So a float64 run (``jax_enable_x64``) and a float32 run of the same seed start from the
    same weights, up to float32's rounding of the float64 ones, which the draw never had.
    """

    def cast(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return init(key, shape, jnp.float32).astype(dtype)

    return cast


def _uniform(bound: float) -> Callable[..., jax.Array]:
    """U(-bound, bound): PyTorch's default for conv/linear weights and biases at 1/√fan_in."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound).astype(
            dtype
        )

    return init


def conv2d(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    name: str,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    groups: int = 1,
    init: str = "pytorch",
    conv_grad: str = "fast",
) -> jax.Array:
    """A square conv with PyTorch's default init; must be called inside a compact method.

    The initialisers are built here because PyTorch's bias bound depends on the conv's fan-in
    ((in_channels/groups)·k·k), which a Flax bias initialiser (given only the bias shape) cannot
    know. ``groups`` is ``nn.Conv2d``'s (``groups = in_channels`` is a depthwise conv); the
    kernel is (k, k, in_channels/groups, features), the HWIO form of PyTorch's
    (features, in_channels/groups, k, k). ``conv_grad`` is one of :data:`CONV_GRADS`.
    """
    fan_in = x.shape[-1] // groups * kernel_size * kernel_size
    bound = 1.0 / math.sqrt(fan_in)
    if init == "torchvision":
        # torchvision's ResNet and MobileNetV2: kaiming_normal_(mode='fan_out'), gain √2. The
        # fan-out of PyTorch's (out, in/groups, k, k) weight is out·k·k, as Flax computes it
        # from the HWIO kernel, grouped or not.
        kernel_init = _drawn_in_float32(nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    else:
        kernel_init = _uniform(bound)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        feature_group_count=groups,
        kernel_init=kernel_init,
        bias_init=_uniform(bound),
        param_dtype=float_dtype(),
        conv_general_dilated=conv_general_dilated(conv_grad),
        name=name,
    )(x)


def dense(x: jax.Array, features: int, *, name: str, normal_std: float | None = None) -> jax.Array:
    """nn.Linear with PyTorch's default init (weights and bias U(±1/√in_features)).

    With ``normal_std`` the weights are N(0, normal_std²) and the bias zero instead
    (torchvision's MobileNetV2 classifier: ``normal_(0, 0.01)``, ``zeros_``).
    """
    if normal_std is None:
        bound = 1.0 / math.sqrt(x.shape[-1])
        kernel_init, bias_init = _uniform(bound), _uniform(bound)
    else:
        kernel_init = _drawn_in_float32(nn.initializers.normal(normal_std))
        bias_init = nn.initializers.zeros
    return nn.Dense(
        features,
        kernel_init=kernel_init,
        bias_init=bias_init,
        param_dtype=float_dtype(),
        name=name,
    )(x)


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flattens NHWC maps in PyTorch's (C, H, W) order, as ``out.view(out.size(0), -1)`` does.

    Transposing the activations (not the weights) keeps the head's kernel a plain transpose of
    PyTorch's ``classifier.weight``, so conversion needs no permutation of the feature axis.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def avg_pool(x: jax.Array) -> jax.Array:
    # nn.AvgPool2d(2, 2): VALID windows, odd sizes floor like PyTorch.
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` semantics over the channel (last) axis.

    Differs from ``flax.linen.BatchNorm`` in one published detail: PyTorch normalises with the
    biased batch variance but updates ``running_var`` with the *unbiased* one (× n/(n−1), n the
    number of values per channel). Reproduced so that running statistics, and therefore
    eval-mode accuracies and SRe2L's BN-matching targets, agree with PyTorch-trained networks.
    Variables: params ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var`` (Flax's names).

    Attributes:
        use_running_average: normalise with the running statistics (eval mode).
        momentum: weight of the old running value (PyTorch's momentum 0.1 is 0.9 here).
        epsilon: added to the variance.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = NORM_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x`` (..., C) per channel; see the class docstring for the statistics."""
        channels = x.shape[-1]
        dtype = float_dtype()
        scale = self.param("scale", nn.initializers.ones, (channels,), dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), dtype)

        record_inputs = not self.is_initializing() and self.is_mutable_collection("bn_inputs")
        if not self.use_running_average or record_inputs:
            axes = tuple(range(x.ndim - 1))
            batch_mean = jnp.mean(x, axis=axes)
            # Two-pass variance: E[x²]−E[x]² loses digits that the PyTorch comparison needs.
            batch_var = jnp.mean(jnp.square(x - batch_mean), axis=axes)
        if record_inputs:
            self.put_variable("bn_inputs", "mean", batch_mean)
            self.put_variable("bn_inputs", "var", batch_var)

        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            mean, var = batch_mean, batch_var
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                count = x.size // channels
                unbiased_var = batch_var * (count / max(count - 1, 1))
                m = self.momentum
                running_mean.value = m * running_mean.value + (1.0 - m) * batch_mean
                running_var.value = m * running_var.value + (1.0 - m) * unbiased_var
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def norm_layer(x: jax.Array, kind: str, *, train: bool, name: str) -> jax.Array:
    """The normalisation layers of MTT's networks (all with affine parameters, eps 1e-5).

    ``instance`` is PyTorch ``GroupNorm(C, C)``: per-sample, per-channel statistics over H, W.
    ``group`` is ``GroupNorm(4, C)``. ``layer`` is ``LayerNorm([C, H, W])``: statistics over all
    of C, H, W and an elementwise affine of that whole shape (stored here as (H, W, C)).
    """
    if kind == "none":
        return x
    if kind == "batch":
        return BatchNorm(use_running_average=not train, name=name)(x)
    if kind == "layer":
        axes = (-3, -2, -1)
        return nn.LayerNorm(
            epsilon=NORM_EPSILON,
            reduction_axes=axes,
            feature_axes=axes,
            use_fast_variance=False,
            param_dtype=float_dtype(),
            name=name,
        )(x)
    groups = x.shape[-1] if kind == "instance" else 4
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=NORM_EPSILON,
        use_fast_variance=False,
        param_dtype=float_dtype(),
        name=name,
    )(x)


def check_choice(owner: str, field: str, value: Any, valid: Sequence[Any]) -> None:
    check(value in valid, f"{owner}.{field} must be one of {list(valid)}, got {value!r}")


def check_positive_int(owner: str, field: str, value: Any) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0
    check(ok, f"{owner}.{field} must be a positive integer, got {value!r}")
