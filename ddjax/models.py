"""Networks of the dataset-distillation literature as Flax Linen modules, with PyTorch layouts.

The architectures are those of MTT's ``networks.py`` (Cazenavette et al., CVPR 2022; inherited from
DC/DSA), which TESLA, DATM and SelMatch reuse unchanged, plus the torchvision-style ResNet-18 with
the small-image stem that SRe2L squeezes on CIFAR and Tiny-ImageNet (see
``research/trajectory_matching.md`` §1.5 and ``research/sre2l.md`` §2).

Conventions every caller relies on:

* **Input** is NHWC float32. The spatial size is not a field of any model: Flax infers the
  classifier's input width from the first call, so :func:`init_variables` is where the image
  shape enters (and where too-small images are rejected).
* **Call signature** ``model.apply(variables, images, train=False, features_only=False)``. It
  returns logits ``(N, num_classes)``, or, with ``features_only=True``, the vector the classifier
  sees ``(N, F)`` (herding and k-center selection embed images with it). For flattening heads
  (ConvNet, VGG11, AlexNet, ResNet18_AP) the features are flattened in PyTorch's (C, H, W) order,
  so the classifier's weights have PyTorch's layout up to a transpose.
* **Batch statistics.** BatchNorm models keep PyTorch-style running statistics in the
  ``'batch_stats'`` collection (``{'mean', 'var'}`` per layer). ``train=True`` normalises with
  the batch statistics and updates the running ones when the collection is mutable::

      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
      variables = {**variables, **updates}

  Without ``mutable`` the batch statistics are still used but the running ones are left alone
  (MTT's student in the inner loop works this way: its running statistics are never read).
  Models without BatchNorm accept the same call and return an empty ``updates`` dict, so one
  training step serves every model. ``train=False`` normalises with the running statistics.
* **BN input statistics** (SRe2L's recover loss): with ``mutable=['bn_inputs']`` every
  BatchNorm layer also stores the batch mean and biased variance of its *input* (over N, H, W)
  in ``'bn_inputs'``, laid out exactly like ``'batch_stats'``; under ``jit`` with a sharded batch
  these are statistics of the whole batch.
* **Initialisation** is PyTorch's default, so accuracies are comparable with the published
  numbers: conv and linear weights and biases ~ U(±1/√fan_in) (``kaiming_uniform(a=√5)``),
  normalisation γ = 1, β = 0, running mean 0 and variance 1.
* **Counting**: ``count_params(variable_shapes(model, image_shape))`` counts trainable
  parameters without allocating or compiling anything.
* **Convolution gradients on CPU.** Stride-1 convolutions differentiate through
  :func:`conv_nhwc`, whose backward pass is written as a forward-layout convolution (input
  gradient) and per-tap matrix products (kernel gradient). The forward pass is XLA's convolution
  unchanged; on GPUs and TPUs every convolution is XLA's. Every model has a ``conv_grad`` field
  (``get_model(..., conv_grad=...)``): ``'fast'`` (the default) or ``'xla'`` for XLA's own
  gradient everywhere (:data:`CONV_GRADS`).
* **PyTorch interchange** (numpy only; torch is never imported): :func:`to_torch_state_dict` /
  :func:`from_torch_state_dict` use the exact ``state_dict`` key names of MTT's ``networks.py``
  (or torchvision's for ResNet-18 with ``key_style='torchvision'``), and
  :func:`to_flat_vector` / :func:`from_flat_vector` use the flat parameter vector of MTT's
  ``ReparamModule`` (``torch.cat([p.reshape(-1) for p in net.parameters()])``), the format of
  MTT's expert buffers.

Model names (:data:`MODEL_NAMES`, :func:`get_model`) are MTT's ``utils.get_network`` names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import DDJaxError, check

__all__ = [
    "MODEL_NAMES",
    "AlexNet",
    "BatchNorm",
    "ConvNet",
    "ResNet18",
    "VGG11",
    "count_params",
    "from_flat_vector",
    "from_torch_state_dict",
    "get_model",
    "init_variables",
    "to_flat_vector",
    "to_torch_state_dict",
    "variable_shapes",
]

Variables = dict[str, Any]

# PyTorch's defaults: BatchNorm2d(momentum=0.1) updates running = 0.9·running + 0.1·batch, and
# every normalisation layer of these networks uses eps = 1e-5 (Flax's own default is 1e-6).
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5

_NORMS = ("instance", "batch", "layer", "group", "none")
_POOLS = ("avg", "max", "none")


# --------------------------------------------------------------------------------------------
# Initialisers and layer helpers
# --------------------------------------------------------------------------------------------


def _uniform(bound: float) -> Callable[..., jax.Array]:
    """U(-bound, bound): PyTorch's default for conv/linear weights and biases at 1/√fan_in."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


#: Values of the models' ``conv_grad`` field. ``'fast'`` routes the gradients of stride-1
#: convolutions through :func:`conv_nhwc` when JAX's default backend is the CPU: XLA:CPU lowers
#: the transposed convolutions of a convolution's gradient (and, in trajectory matching, of the
#: gradient's gradient) to slow generic kernels; written as forward-layout convolutions and
#: matrix products they take 2-2.5x less time for a ConvNet's first- and second-order gradients
#: (benchmarks/memory_speed.py). Same values up to float rounding (float64: 1e-15). ``'xla'``
#: keeps XLA's own gradient (for comparison). On GPUs and TPUs both are XLA's.
CONV_GRADS = ("fast", "xla")

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_nhwc(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution whose gradient is built from fast CPU kernels.

    Forward: ``lax.conv_general_dilated`` (cross-correlation, as PyTorch). Backward: the input
    gradient is the stride-1 convolution of the output gradient with the spatially flipped,
    in/out-swapped kernel (itself a :func:`conv_nhwc`, so second-order gradients stay on the fast
    path); the kernel gradient is one ``(C_in, C_out)`` matrix product per kernel tap.

    Args:
      x: ``(N, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)``.
      padding: ``((top, bottom), (left, right))``; negative values crop (used by the gradient of
        a convolution padded by more than ``k - 1``).
    """
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _conv_nhwc_fwd(x, kernel, padding):
    return conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_nhwc_bwd(padding, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    dx = conv_nhwc(dy, flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    ho, wo = dy.shape[1], dy.shape[2]
    taps = [
        jnp.einsum("nhwc,nhwo->co", xp[:, i : i + ho, j : j + wo, :], dy)
        for i in range(kh)
        for j in range(kw)
    ]
    return dx, jnp.stack(taps).reshape(kernel.shape)


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _fast_cpu_conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` for ``nn.Conv``: :func:`conv_nhwc` where it applies."""
    plain = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and precision is None
        and not kwargs
        and not isinstance(padding, str)
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if plain:
        return conv_nhwc(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding))
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


def _conv(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    name: str,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    init: str = "pytorch",
    conv_grad: str = "fast",
) -> jax.Array:
    """A square conv with PyTorch's default init; must be called inside a compact method.

    The initialisers are built here because PyTorch's bias bound depends on the conv's fan-in
    (in_channels·k·k), which a Flax bias initialiser (given only the bias shape) cannot know.
    ``conv_grad`` is one of :data:`CONV_GRADS`.
    """
    fan_in = x.shape[-1] * kernel_size * kernel_size
    bound = 1.0 / math.sqrt(fan_in)
    if init == "torchvision":
        # torchvision's ResNet: kaiming_normal_(mode='fan_out', nonlinearity='relu').
        kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    else:
        kernel_init = _uniform(bound)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=_uniform(bound),
        conv_general_dilated=(
            _fast_cpu_conv_general_dilated if conv_grad == "fast" else jax.lax.conv_general_dilated
        ),
        name=name,
    )(x)


def _dense(x: jax.Array, features: int, *, name: str) -> jax.Array:
    """nn.Linear with PyTorch's default init (weights and bias U(±1/√in_features))."""
    bound = 1.0 / math.sqrt(x.shape[-1])
    return nn.Dense(features, kernel_init=_uniform(bound), bias_init=_uniform(bound), name=name)(x)


def _flatten_chw(x: jax.Array) -> jax.Array:
    """Flattens NHWC maps in PyTorch's (C, H, W) order, as ``out.view(out.size(0), -1)`` does.

    Transposing the activations (not the weights) keeps the head's kernel a plain transpose of
    PyTorch's ``classifier.weight``, so conversion needs no permutation of the feature axis.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _avg_pool(x: jax.Array) -> jax.Array:
    # nn.AvgPool2d(2, 2): VALID windows, odd sizes floor like PyTorch.
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _max_pool(x: jax.Array) -> jax.Array:
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
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,))

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


def _norm(x: jax.Array, kind: str, *, train: bool, name: str) -> jax.Array:
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
            name=name,
        )(x)
    groups = x.shape[-1] if kind == "instance" else 4
    return nn.GroupNorm(
        num_groups=groups, epsilon=NORM_EPSILON, use_fast_variance=False, name=name
    )(x)


def _check_choice(owner: str, field: str, value: Any, valid: Sequence[Any]) -> None:
    check(value in valid, f"{owner}.{field} must be one of {list(valid)}, got {value!r}")


def _check_positive_int(owner: str, field: str, value: Any) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0
    check(ok, f"{owner}.{field} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """MTT's ConvNet: ``depth`` × [3×3 conv → norm → ReLU → 2×2 pool], then one linear layer.

    The default (width 128, depth 3, instance norm, average pooling) is MTT's ``ConvNet``; depth
    4 is ``ConvNetD4`` for 64-px Tiny-ImageNet and depth 5 ``ConvNetD5`` for 128-px ImageNet
    subsets. Parameters: 320,010 on CIFAR-10, 504,420 on CIFAR-100, 317,706 on Fashion-MNIST
    (1×28×28), 857,160 for ConvNetD4 on Tiny-ImageNet.

    As in MTT, the first conv pads by 3 instead of 1 when the input has one channel, which turns
    28-px MNIST/Fashion-MNIST images into 32-px maps (2,048 head features at depth 3). MTT sizes
    its head from a hard-coded rule (28 px counts as 32) that only holds for the published
    sizes; here the head is sized from the actual feature map, which is identical wherever MTT's
    rule is consistent and also works for sizes where MTT would fail.

    Attributes:
        num_classes: outputs of the linear head.
        width: channels of every conv.
        depth: number of conv blocks.
        norm: ``'instance'`` | ``'batch'`` | ``'layer'`` | ``'group'`` | ``'none'``.
        pool: ``'avg'`` | ``'max'`` | ``'none'``.
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    pool: str = "avg"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        _check_positive_int("ConvNet", "num_classes", self.num_classes)
        _check_positive_int("ConvNet", "width", self.width)
        _check_positive_int("ConvNet", "depth", self.depth)
        _check_choice("ConvNet", "norm", self.norm, _NORMS)
        _check_choice("ConvNet", "pool", self.pool, _POOLS)
        _check_choice("ConvNet", "conv_grad", self.conv_grad, CONV_GRADS)
        if self.norm == "group":
            check(
                self.width % 4 == 0,
                f"ConvNet.width must be a multiple of 4 with norm='group' (GroupNorm(4, C)), "
                f"got {self.width}",
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        in_channels = x.shape[-1]
        for d in range(self.depth):
            padding = 3 if in_channels == 1 and d == 0 else 1
            x = _conv(x, self.width, 3, padding=padding, conv_grad=self.conv_grad, name=f"conv_{d}")
            x = _norm(x, self.norm, train=train, name=f"norm_{d}")
            x = nn.relu(x)
            if self.pool == "avg":
                x = _avg_pool(x)
            elif self.pool == "max":
                x = _max_pool(x)
        features = _flatten_chw(x)
        if features_only:
            return features
        return _dense(features, self.num_classes, name="classifier")


class _BasicBlock(nn.Module):
    """ResNet BasicBlock: MTT's ``BasicBlock``, or ``BasicBlock_AP`` with ``avgpool_downsample``."""

    planes: int
    stride: int
    norm: str
    avgpool_downsample: bool
    conv_init: str
    conv_grad: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_planes = x.shape[-1]
        # The _AP variant replaces each stride-2 conv by a stride-1 conv and a 2×2 average pool.
        conv_stride = 1 if self.avgpool_downsample else self.stride
        downsample = self.avgpool_downsample and self.stride != 1
        conv = dict(use_bias=False, init=self.conv_init, conv_grad=self.conv_grad)

        out = _conv(x, self.planes, 3, stride=conv_stride, padding=1, name="conv1", **conv)
        out = nn.relu(_norm(out, self.norm, train=train, name="bn1"))
        if downsample:
            out = _avg_pool(out)
        out = _conv(out, self.planes, 3, padding=1, name="conv2", **conv)
        out = _norm(out, self.norm, train=train, name="bn2")

        shortcut = x
        if self.stride != 1 or in_planes != self.planes:
            shortcut = _conv(x, self.planes, 1, stride=conv_stride, name="shortcut_conv", **conv)
            if self.avgpool_downsample:
                shortcut = _avg_pool(shortcut)
            shortcut = _norm(shortcut, self.norm, train=train, name="shortcut_norm")
        return nn.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock [2, 2, 2, 2], widths 64-128-256-512): one class for four networks.

    * ``ResNet18`` / ``ResNet18BN`` (MTT): ``small_stem=True`` — 3×3 stride-1 conv, norm, ReLU,
      no max-pool. MTT ends with ``F.avg_pool2d(out, 4)``; here the head pools globally, which
      is the same on the 4×4 maps of 28/32-px inputs and makes 64-px inputs work (MTT's version
      would hand a 2×2×512 map to a 512-input linear layer and fail).
    * ``ResNet18_AP`` / ``ResNet18BN_AP`` (MTT): ``avgpool_downsample=True`` — stride-2 convs
      become stride-1 convs followed by 2×2 average pooling, and the head *flattens* the final
      map in (C, H, W) order (512·4·4 features at 32 px, 512·3·3 at 28 px, as in MTT).
    * SRe2L's squeezed teacher for CIFAR/Tiny-ImageNet: torchvision's ``resnet18`` with
      ``conv1 = Conv2d(3, 64, 3, 1, 1)`` and no max-pool is exactly ``ResNet18BN`` (global
      average pool included). Use ``conv_init='torchvision'`` for torchvision's
      initialisation and ``key_style='torchvision'`` when converting its state_dict.
    * ``small_stem=False`` gives the ImageNet stem (7×7 stride-2 conv, norm, ReLU, 3×3 stride-2
      max-pool), i.e. MTT's ``ResNet18ImageNet`` and plain torchvision ``resnet18``.

    Attributes:
        num_classes: outputs of the linear head.
        norm: ``'batch'`` or ``'instance'`` (PyTorch ``GroupNorm(C, C)``, MTT's default).
        small_stem: 3×3/1 stem without max-pool (True) or the 7×7/2 ImageNet stem (False).
        avgpool_downsample: MTT's ``_AP`` variant.
        width: channels of the stem and first stage (64 in every published model; smaller
            values are for tests).
        conv_init: ``'pytorch'`` (default U(±1/√fan_in), as MTT) or ``'torchvision'``
            (kaiming-normal, fan-out, as torchvision's ResNet and hence SRe2L).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    norm: str = "batch"
    small_stem: bool = True
    avgpool_downsample: bool = False
    width: int = 64
    conv_init: str = "pytorch"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        _check_positive_int("ResNet18", "num_classes", self.num_classes)
        _check_positive_int("ResNet18", "width", self.width)
        _check_choice("ResNet18", "norm", self.norm, ("batch", "instance"))
        _check_choice("ResNet18", "small_stem", self.small_stem, (True, False))
        _check_choice("ResNet18", "avgpool_downsample", self.avgpool_downsample, (True, False))
        _check_choice("ResNet18", "conv_init", self.conv_init, ("pytorch", "torchvision"))
        _check_choice("ResNet18", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        # Small-image stem: 3×3 stride 1 (MTT, SRe2L); ImageNet stem: 7×7 stride 2 + max-pool.
        kernel, stride, padding = (3, 1, 1) if self.small_stem else (7, 2, 3)
        x = _conv(
            x,
            self.width,
            kernel,
            stride=stride,
            padding=padding,
            use_bias=False,
            init=self.conv_init,
            conv_grad=self.conv_grad,
            name="conv1",
        )
        x = nn.relu(_norm(x, self.norm, train=train, name="bn1"))
        if not self.small_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in range(4):
            for block in range(2):
                x = _BasicBlock(
                    planes=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    norm=self.norm,
                    avgpool_downsample=self.avgpool_downsample,
                    conv_init=self.conv_init,
                    conv_grad=self.conv_grad,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        features = _flatten_chw(x) if self.avgpool_downsample else jnp.mean(x, axis=(1, 2))
        if features_only:
            return features
        return _dense(features, self.num_classes, name="classifier")


# MTT's cfg_vgg['VGG11']: conv widths, 'M' = 2×2 max-pool.
_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """MTT's VGG11: [conv3×3 → norm → ReLU] blocks with 5 max-pools, then one linear layer.

    Like MTT's ConvNet, the first conv pads by 3 for one-channel input (28 → 32 px). At 32 px
    the head sees 512 features; other sizes flatten the final map in (C, H, W) order (MTT's
    fixed 512-input head only accepts 28/32-px inputs).

    Attributes:
        num_classes: outputs of the linear head.
        norm: ``'instance'`` (``VGG11``) or ``'batch'`` (``VGG11BN``).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    norm: str = "instance"
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        _check_positive_int("VGG11", "num_classes", self.num_classes)
        _check_choice("VGG11", "norm", self.norm, ("instance", "batch"))
        _check_choice("VGG11", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        in_channels = x.shape[-1]
        for index, entry in enumerate(_VGG11_CFG):
            if entry == "M":
                x = _max_pool(x)
                continue
            padding = 3 if in_channels == 1 and index == 0 else 1
            x = _conv(x, entry, 3, padding=padding, conv_grad=self.conv_grad, name=f"conv_{index}")
            x = nn.relu(_norm(x, self.norm, train=train, name=f"norm_{index}"))
        features = _flatten_chw(x)
        if features_only:
            return features
        return _dense(features, self.num_classes, name="classifier")


class AlexNet(nn.Module):
    """MTT's AlexNet: convs 128-192-256-192-192 (5×5, 5×5, 3×3 ×3), ReLU, no normalisation.

    Max-pools (2×2) follow the first, second and fifth conv; the first conv pads by 4 instead of
    2 for one-channel input (28 → 32 px), so both 32-px RGB and 28-px grey images end at
    192·4·4 = 3,072 head features.

    Attributes:
        num_classes: outputs of the linear head (``fc`` in PyTorch).
        conv_grad: CPU convolution gradient, ``'fast'`` (ddjax's) or ``'xla'`` (:data:`CONV_GRADS`).
    """

    num_classes: int
    conv_grad: str = "fast"

    def __post_init__(self) -> None:
        _check_positive_int("AlexNet", "num_classes", self.num_classes)
        _check_choice("AlexNet", "conv_grad", self.conv_grad, CONV_GRADS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes) or features (N, F)."""
        del train  # no batch statistics; accepted so every model has the same signature
        conv = functools.partial(_conv, conv_grad=self.conv_grad)
        x = conv(x, 128, 5, padding=4 if x.shape[-1] == 1 else 2, name="conv_0")
        x = _max_pool(nn.relu(x))
        x = _max_pool(nn.relu(conv(x, 192, 5, padding=2, name="conv_1")))
        x = nn.relu(conv(x, 256, 3, padding=1, name="conv_2"))
        x = nn.relu(conv(x, 192, 3, padding=1, name="conv_3"))
        x = _max_pool(nn.relu(conv(x, 192, 3, padding=1, name="conv_4")))
        features = _flatten_chw(x)
        if features_only:
            return features
        return _dense(features, self.num_classes, name="fc")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "ConvNet": (ConvNet, {}),
    "ConvNetIN": (ConvNet, {"norm": "instance"}),
    "ConvNetBN": (ConvNet, {"norm": "batch"}),
    "ConvNetLN": (ConvNet, {"norm": "layer"}),
    "ConvNetGN": (ConvNet, {"norm": "group"}),
    "ConvNetNN": (ConvNet, {"norm": "none"}),
    "ConvNetAP": (ConvNet, {"pool": "avg"}),
    "ConvNetMP": (ConvNet, {"pool": "max"}),
    "ConvNetNP": (ConvNet, {"pool": "none"}),
    "ConvNetKIP": (ConvNet, {"width": 1024, "norm": "none"}),
    # SelMatch's BatchNorm ConvNet for Tiny-ImageNet.
    "ConvNetD4BN": (ConvNet, {"depth": 4, "norm": "batch"}),
    **{f"ConvNetD{d}": (ConvNet, {"depth": d}) for d in range(1, 9)},
    **{f"ConvNetW{w}": (ConvNet, {"width": w}) for w in (32, 64, 128, 256, 512, 1024)},
    "ResNet18": (ResNet18, {"norm": "instance"}),
    "ResNet18BN": (ResNet18, {"norm": "batch"}),
    "ResNet18_AP": (ResNet18, {"norm": "instance", "avgpool_downsample": True}),
    "ResNet18BN_AP": (ResNet18, {"norm": "batch", "avgpool_downsample": True}),
    "ResNet18ImageNet": (ResNet18, {"norm": "instance", "small_stem": False}),
    "VGG11": (VGG11, {"norm": "instance"}),
    "VGG11BN": (VGG11, {"norm": "batch"}),
    "AlexNet": (AlexNet, {}),
}

#: Names accepted by :func:`get_model` (MTT's names). ``ConvNetD<k>`` and ``ConvNetW<k>`` are
#: also accepted for any positive k beyond the ones listed.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_PATTERNS = ((re.compile(r"ConvNetD(\d+)"), "depth"), (re.compile(r"ConvNetW(\d+)"), "width"))


def _lookup(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    if name in _REGISTRY:
        cls, defaults = _REGISTRY[name]
        return cls, dict(defaults)
    for pattern, field in _PATTERNS:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) > 0:
            return ConvNet, {field: int(match.group(1))}
    raise DDJaxError(
        f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} "
        "(and ConvNetD<k>, ConvNetW<k> for any positive k)"
    )


def get_model(
    name: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    *,
    conv_grad: str = "fast",
    **overrides: Any,
) -> nn.Module:
    """Builds a model by MTT's name, e.g. ``get_model('ConvNetD4', 200, (64, 64, 3))``.

    Args:
        name: one of :data:`MODEL_NAMES`, or ``ConvNetD<k>`` / ``ConvNetW<k>``.
        num_classes: outputs of the classifier.
        image_shape: (H, W, C) of the inputs; checked against the network's downsampling.
        conv_grad: how convolutions are differentiated on the CPU: ``'fast'`` (ddjax's
            :func:`conv_nhwc` gradient for stride-1 convolutions, 2-2.5x faster on XLA:CPU) or
            ``'xla'`` (XLA's own); the same values up to float rounding. Decided once, where a
            stage starts; on GPUs and TPUs both are XLA's. See :data:`CONV_GRADS`.
        **overrides: fields of the model class that replace the name's settings, e.g.
            ``width=32`` or ``norm='batch'``.

    Returns:
        The (unbound) Flax module.

    Raises:
        DDJaxError: unknown name, unknown or invalid field, or images too small for the model.
    """
    cls, settings = _lookup(name)
    explicit = ("parent", "name", "num_classes", "conv_grad")
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in explicit]
    for field in overrides:
        check(
            field in fields,
            f"{name} has no setting {field!r}; valid settings: {', '.join(fields)}",
        )
    settings.update(overrides)
    model = cls(num_classes=num_classes, conv_grad=conv_grad, **settings)
    _check_image_shape(model, image_shape)
    return model


def _feature_map_size(model: nn.Module, size: int, channels: int) -> int:
    """Side of the last feature map for an input side ``size``, following each layer's arithmetic.

    Convolution: out = in + 2·pad − k + 1 (stride 1) or ⌊(in + 2·pad − k)/2⌋ + 1 (stride 2);
    pooling floors, as in PyTorch.
    """
    if isinstance(model, ConvNet):
        for d in range(model.depth):
            size += 4 if channels == 1 and d == 0 else 0
            if model.pool != "none":
                size //= 2
        return size
    if isinstance(model, VGG11):
        size += 4 if channels == 1 else 0
        for _ in range(_VGG11_CFG.count("M")):
            size //= 2
        return size
    if isinstance(model, AlexNet):
        size += 4 if channels == 1 else 0
        for _ in range(3):
            size //= 2
        return size
    if isinstance(model, ResNet18):
        if not model.small_stem:
            size = (size - 1) // 2 + 1  # 7×7 stride-2 conv, padding 3
            size = (size - 1) // 2 + 1  # 3×3 stride-2 max-pool, padding 1
        for _ in range(3):  # stages 2-4 downsample once each
            size = size // 2 if model.avgpool_downsample else (size - 1) // 2 + 1
        return size
    raise DDJaxError(f"not a ddjax model: {type(model).__name__}")


def _check_image_shape(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    ok = len(shape) == 3 and all(isinstance(s, int | np.integer) and s > 0 for s in shape)
    check(ok, f"image_shape must be (height, width, channels) of positive ints, got {image_shape}")
    height, width, channels = (int(s) for s in shape)
    final = [_feature_map_size(model, side, channels) for side in (height, width)]
    check(
        min(final) > 0,
        f"image_shape {shape} is too small for {type(model).__name__}: its downsampling "
        f"leaves a {final[0]}×{final[1]} feature map",
    )
    return height, width, channels


# --------------------------------------------------------------------------------------------
# Variables
# --------------------------------------------------------------------------------------------


def _plain(tree: Any) -> Any:
    """Nested Mappings (e.g. FrozenDict) as plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def init_variables(
    model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]
) -> Variables:
    """Initialises a model as PyTorch would (see the module docstring).

    Args:
        model: a ddjax model.
        key: PRNG key.
        image_shape: (H, W, C) of the inputs.

    Returns:
        ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models, as plain dicts.

    Compile time: XLA:CPU compiles JAX's default threefry PRNG slowly, one draw per parameter
    tensor (≈25 s for ResNet-18 on a busy 2-core CPU; ≈4 s with ``jax.random.key(seed,
    impl='rbg')``). The key's implementation is the caller's choice; note that ``vmap`` over
    ``rbg`` keys does not give the same numbers as a Python loop over them, while threefry's does.
    """
    return _plain(_init(model, key, _check_image_shape(model, image_shape)))


# Jitted with the model as a static argument: equal models (same fields) share one compiled
# program, so initialising K evaluation networks in a loop compiles once. Flax modules are
# hashable dataclasses, which is what makes this cache work.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]) -> Any:
    return model.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def variable_shapes(model: nn.Module, image_shape: tuple[int, int, int]) -> Variables:
    """Like :func:`init_variables` but with ``jax.ShapeDtypeStruct`` leaves; allocates nothing."""
    shape = _check_image_shape(model, image_shape)
    images = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images
    )
    return _plain(variables)


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of trainable scalars: the ``'params'`` collection (running statistics excluded).

    Accepts a variables dict (or a bare params tree) with array or ``ShapeDtypeStruct`` leaves,
    e.g. ``count_params(variable_shapes(model, (32, 32, 3)))``.
    """
    params = variables["params"] if "params" in variables else variables
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------------------------
# PyTorch layouts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TorchLayer:
    """One PyTorch module with state: its state_dict prefix and the matching Flax module path."""

    torch_name: str  # e.g. 'features.0' or 'layer2.0.shortcut.1'
    flax_path: tuple[str, ...]  # e.g. ('conv_0',) or ('layer2_0', 'shortcut_norm')
    kind: str  # 'conv' | 'linear' | 'norm' | 'layer_norm' | 'batch_norm'
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One tensor: Flax (collection, name) ↔ PyTorch suffix, and the axis order to PyTorch."""

    collection: str
    flax_name: str
    torch_suffix: str
    to_torch_axes: tuple[int, ...] | None  # permutation Flax → PyTorch; None = same layout


_OIHW_FROM_HWIO = (3, 2, 0, 1)
_CHW_FROM_HWC = (2, 0, 1)


def _leaves(layer: _TorchLayer) -> list[_Leaf]:
    """The tensors of a layer in PyTorch's state_dict order (parameters, then buffers)."""
    if layer.kind in ("conv", "linear"):
        axes = _OIHW_FROM_HWIO if layer.kind == "conv" else (1, 0)
        leaves = [_Leaf("params", "kernel", "weight", axes)]
        if layer.bias:
            leaves.append(_Leaf("params", "bias", "bias", None))
        return leaves
    axes = _CHW_FROM_HWC if layer.kind == "layer_norm" else None
    leaves = [_Leaf("params", "scale", "weight", axes), _Leaf("params", "bias", "bias", axes)]
    if layer.kind == "batch_norm":
        leaves += [
            _Leaf("batch_stats", "mean", "running_mean", None),
            _Leaf("batch_stats", "var", "running_var", None),
        ]
    return leaves


def _norm_kind(norm: str) -> str:
    return {"batch": "batch_norm", "layer": "layer_norm"}.get(norm, "norm")


def _torch_layers(model: nn.Module, key_style: str = "mtt") -> list[_TorchLayer]:
    """The model's stateful layers in PyTorch registration order (= ``named_parameters`` order)."""
    check(
        key_style in ("mtt", "torchvision"),
        f"key_style must be 'mtt' or 'torchvision', got {key_style!r}",
    )
    if key_style == "torchvision":
        check(
            isinstance(model, ResNet18) and not model.avgpool_downsample,
            f"key_style='torchvision' exists only for ResNet18 without avgpool_downsample, "
            f"not {type(model).__name__}",
        )
    layers: list[_TorchLayer] = []
    if isinstance(model, ConvNet):
        # nn.Sequential indices: conv, [norm], ReLU, [pool] per block.
        index = 0
        for d in range(model.depth):
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{d}",), "conv"))
            index += 1
            if model.norm != "none":
                kind = _norm_kind(model.norm)
                layers.append(_TorchLayer(f"features.{index}", (f"norm_{d}",), kind))
                index += 1
            index += 1 if model.pool == "none" else 2
        layers.append(_TorchLayer("classifier", ("classifier",), "linear"))
    elif isinstance(model, VGG11):
        # nn.Sequential indices: conv, norm, ReLU per conv entry; one MaxPool per 'M'.
        index = 0
        kind = _norm_kind(model.norm)
        for position, entry in enumerate(_VGG11_CFG):
            if entry == "M":
                index += 1
                continue
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{position}",), "conv"))
            layers.append(_TorchLayer(f"features.{index + 1}", (f"norm_{position}",), kind))
            index += 3
        layers.append(_TorchLayer("classifier", ("classifier",), "linear"))
    elif isinstance(model, AlexNet):
        for position, index in enumerate((0, 3, 6, 8, 10)):
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{position}",), "conv"))
        layers.append(_TorchLayer("fc", ("fc",), "linear"))
    elif isinstance(model, ResNet18):
        kind = _norm_kind(model.norm)
        shortcut = "downsample" if key_style == "torchvision" else "shortcut"
        # BasicBlock_AP's shortcut is Sequential(conv, AvgPool2d, norm): the norm is index 2.
        shortcut_norm = 2 if model.avgpool_downsample else 1
        layers.append(_TorchLayer("conv1", ("conv1",), "conv", bias=False))
        layers.append(_TorchLayer("bn1", ("bn1",), kind))
        for stage in range(1, 5):
            for block in range(2):
                torch_prefix, flax_block = f"layer{stage}.{block}.", f"layer{stage}_{block}"
                parts = [("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2")]
                if stage > 1 and block == 0:  # the first block of stages 2-4 downsamples
                    parts.append((f"{shortcut}.0", "shortcut_conv"))
                    parts.append((f"{shortcut}.{shortcut_norm}", "shortcut_norm"))
                for torch_name, flax_name in parts:
                    is_conv = "conv" in flax_name
                    layers.append(
                        _TorchLayer(
                            torch_prefix + torch_name,
                            (flax_block, flax_name),
                            "conv" if is_conv else kind,
                            bias=not is_conv,
                        )
                    )
        head = "fc" if key_style == "torchvision" else "classifier"
        layers.append(_TorchLayer(head, ("classifier",), "linear"))
    else:
        raise DDJaxError(f"no PyTorch layout for {type(model).__name__}")
    return layers


def _tensors(model: nn.Module, key_style: str) -> Iterator[tuple[str, tuple[str, ...], _Leaf]]:
    """Every (torch key, Flax path within its collection, leaf) in state_dict order."""
    for layer in _torch_layers(model, key_style):
        for leaf in _leaves(layer):
            yield f"{layer.torch_name}.{leaf.torch_suffix}", layer.flax_path, leaf


def _get(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise DDJaxError(f"variables do not match the model: {what} has no {'/'.join(path)}")
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _to_torch(array: Any, axes: tuple[int, ...] | None) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array if axes is None else np.ascontiguousarray(np.transpose(array, axes))


def _from_torch(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return array if axes is None else np.transpose(array, np.argsort(axes))


def _torch_shape(shape: Sequence[int], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def to_torch_state_dict(
    variables: Mapping[str, Any], model: nn.Module, *, key_style: str = "mtt"
) -> dict[str, np.ndarray]:
    """Converts ddjax variables to the PyTorch ``state_dict`` of the same network.

    Keys are those of MTT's ``networks.py`` (``features.0.weight``, ``layer1.0.bn1.running_var``,
    ``classifier.weight`` …); ``key_style='torchvision'`` renames ResNet-18's ``shortcut`` →
    ``downsample`` and ``classifier`` → ``fc`` for torchvision's ``resnet18``. Conv kernels go
    HWIO → OIHW, linear kernels (in, out) → (out, in), LayerNorm affines (H, W, C) → (C, H, W).
    BatchNorm layers also get ``num_batches_tracked`` = 0 (ddjax does not count batches; PyTorch
    reads it only when ``momentum=None``). Load with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Args:
        variables: ``{'params': ..., 'batch_stats': ...}`` of ``model``.
        model: the ddjax model the variables belong to.
        key_style: ``'mtt'`` or ``'torchvision'`` (ResNet18 only).

    Returns:
        An ordered dict of float32 numpy arrays (int64 for ``num_batches_tracked``).

    Raises:
        DDJaxError: the variables lack a tensor the model needs.
    """
    state_dict: dict[str, np.ndarray] = {}
    for key, path, leaf in _tensors(model, key_style):
        collection = _get(variables, (leaf.collection,), "variables")
        value = _get(collection, (*path, leaf.flax_name), f"variables[{leaf.collection!r}]")
        state_dict[key] = _to_torch(value, leaf.to_torch_axes)
        if leaf.flax_name == "var":
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state_dict


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drops the ``module.`` prefix that ``nn.DataParallel`` checkpoints (MTT, SRe2L) carry."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _as_numpy(value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DDJaxError(
            f"{what} is not convertible to a float32 array ({error}); pass CPU tensors "
            "(detached) or numpy arrays"
        ) from error


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    image_shape: tuple[int, int, int],
    *,
    key_style: str = "mtt",
) -> Variables:
    """Converts a PyTorch ``state_dict`` of MTT's (or torchvision's) network to ddjax variables.

    The inverse of :func:`to_torch_state_dict`. Values may be numpy arrays or CPU tensors; a
    ``module.`` prefix (``nn.DataParallel``) is removed; ``num_batches_tracked`` is accepted and
    ignored. Every other key must match exactly, as with ``load_state_dict(strict=True)``.

    Args:
        state_dict: mapping from PyTorch keys to tensors.
        model: the ddjax model to load into.
        image_shape: (H, W, C) of the inputs (fixes the head's input size).
        key_style: ``'mtt'`` or ``'torchvision'`` (ResNet18 only).

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only for BatchNorm models).

    Raises:
        DDJaxError: missing or unexpected keys, or a tensor whose shape differs (the message
            names the key, the shape found and the shape expected, both in PyTorch layout).
    """
    template = variable_shapes(model, image_shape)
    state_dict = _strip_data_parallel(state_dict)
    expected = list(_tensors(model, key_style))
    expected_keys = {key for key, _, _ in expected}
    name = type(model).__name__
    missing = [key for key, _, _ in expected if key not in state_dict]
    unexpected = [
        key
        for key in state_dict
        if key not in expected_keys and not key.endswith("num_batches_tracked")
    ]
    check(not missing, f"state_dict for {name} is missing keys: {', '.join(missing)}")
    check(not unexpected, f"state_dict for {name} has unexpected keys: {', '.join(unexpected)}")

    variables: Variables = {}
    for key, path, leaf in expected:
        shape = _get(template[leaf.collection], (*path, leaf.flax_name), "template").shape
        want = _torch_shape(shape, leaf.to_torch_axes)
        value = _as_numpy(state_dict[key], f"state_dict[{key!r}]")
        check(
            value.shape == want,
            f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {want} for {name} "
            f"at image_shape {tuple(image_shape)}",
        )
        array = jnp.asarray(_from_torch(value, leaf.to_torch_axes))
        _set(variables, (leaf.collection, *path, leaf.flax_name), array)
    return variables


def to_flat_vector(variables: Mapping[str, Any], model: nn.Module) -> np.ndarray:
    """MTT's flat parameter vector: ``torch.cat([p.reshape(-1) for p in net.parameters()])``.

    This is the layout of MTT's ``ReparamModule`` and of the parameter lists in MTT's expert
    buffers (``replay_buffer_*.pt``): parameters only (no running statistics), in
    ``named_parameters`` order, each in PyTorch's layout.

    Args:
        variables: variables of ``model`` (only ``'params'`` is read).
        model: the ddjax model.

    Returns:
        A float32 vector of length ``count_params(variables)``.
    """
    pieces = [
        _to_torch(
            _get(variables["params"], (*path, leaf.flax_name), "variables['params']"),
            leaf.to_torch_axes,
        ).reshape(-1)
        for _, path, leaf in _tensors(model, "mtt")
        if leaf.collection == "params"
    ]
    return np.concatenate(pieces)


def from_flat_vector(vector: Any, model: nn.Module, image_shape: tuple[int, int, int]) -> Variables:
    """Inverse of :func:`to_flat_vector`: MTT's flat parameter vector to ddjax variables.

    BatchNorm models also get fresh running statistics (mean 0, variance 1), which is what
    MTT's ``ReparamModule`` student has, since its buffers are not part of the flat vector.

    Args:
        vector: 1-D array (numpy, JAX or a CPU tensor) of all parameters.
        model: the ddjax model.
        image_shape: (H, W, C) of the inputs.

    Returns:
        ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models.

    Raises:
        DDJaxError: the vector is not 1-D or its length is not the model's parameter count.
    """
    template = variable_shapes(model, image_shape)
    vector = _as_numpy(vector, "the flat parameter vector")
    expected = count_params(template)
    check(
        vector.ndim == 1 and vector.size == expected,
        f"flat parameter vector has shape {tuple(vector.shape)}, expected ({expected},) for "
        f"{type(model).__name__} at image_shape {tuple(image_shape)}",
    )
    variables: Variables = {"params": {}}
    offset = 0
    for _, path, leaf in _tensors(model, "mtt"):
        if leaf.collection != "params":
            continue
        shape = _get(template["params"], (*path, leaf.flax_name), "template").shape
        torch_shape = _torch_shape(shape, leaf.to_torch_axes)
        size = math.prod(torch_shape)
        piece = vector[offset : offset + size].reshape(torch_shape)
        offset += size
        array = jnp.asarray(_from_torch(piece, leaf.to_torch_axes))
        _set(variables["params"], (*path, leaf.flax_name), array)
    if "batch_stats" in template:
        variables["batch_stats"] = _fresh_batch_stats(template["batch_stats"])
    return variables


def _fresh_batch_stats(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch's initial running statistics (mean 0, variance 1) shaped like ``shapes``."""
    fresh: dict[str, Any] = {}
    for name, node in shapes.items():
        if isinstance(node, Mapping):
            fresh[name] = _fresh_batch_stats(node)
        else:
            fresh[name] = (jnp.ones if name == "var" else jnp.zeros)(node.shape, node.dtype)
    return fresh
