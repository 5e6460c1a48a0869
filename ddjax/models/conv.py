"""Stride-1 convolutions with a gradient built from fast XLA:CPU kernels, and the model switch.

XLA:CPU lowers the transposed convolutions of a convolution's gradient to slow generic kernels.
:func:`conv_nhwc` keeps XLA's forward convolution and writes its backward pass as a
forward-layout convolution (input gradient) and a forward-layout convolution with the batch and
channel axes swapped (kernel gradient, :func:`kernel_gradient`); their own gradients are again
made of these, so second-order gradients (trajectory matching) stay on the fast path, inside
``lax.scan`` bodies too. Values agree with XLA's to float rounding (float64: 1e-15).

Promise: :func:`conv_general_dilated` returns, for a ``conv_grad`` value of :data:`CONV_GRADS`,
the function ``nn.Conv`` calls in place of ``lax.conv_general_dilated``; ``'fast'`` uses
:func:`conv_nhwc` only for plain stride-1 NHWC convolutions on the CPU backend and XLA's
convolution everywhere else, ``'xla'`` is XLA's convolution everywhere. The forward values are
identical either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddjax.errors import check

#: Values of the models' ``conv_grad`` field: ``'fast'`` (the default) takes stride-1
#: convolutions' gradients through :func:`conv_nhwc` on the CPU, 2-2.5x less time for a ConvNet's
#: first- and second-order gradients (benchmarks/memory_speed.py); ``'xla'`` keeps XLA's own
#: gradient, for comparison. On GPUs and TPUs both are XLA's.
CONV_GRADS = ("fast", "xla")

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_nhwc(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution whose gradient is built from fast CPU kernels.

    Forward: ``lax.conv_general_dilated`` (cross-correlation, as PyTorch). Backward: the input
    gradient is the stride-1 convolution of the output gradient with the spatially flipped,
    in/out-swapped kernel (itself a :func:`conv_nhwc`, so second-order gradients stay on the fast
    path); the kernel gradient is :func:`kernel_gradient`.

    Args:
      x: ``(N, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)``.
      padding: ``((top, bottom), (left, right))``; negative values crop (used by the gradient of
        a convolution padded by more than ``k - 1``).
    """
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _conv_nhwc_fwd(x, kernel, padding):
    return conv_nhwc(x, kernel, padding), (x, kernel)


def _input_gradient(dy: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """The gradient w.r.t. a stride-1 convolution's input: a :func:`conv_nhwc` of ``dy``."""
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return conv_nhwc(
        dy, flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    )


def _conv_nhwc_bwd(padding, residuals, dy):
    x, kernel = residuals
    return _input_gradient(dy, kernel, padding), kernel_gradient(x, dy, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel_gradient(x: jax.Array, dy: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """The kernel gradient of ``conv_nhwc(x, kernel, padding)`` for the output cotangent ``dy``.

    ``dk[i, j, c, o] = sum_{n,h,w} x_padded[n, h + i, w + j, c] dy[n, h, w, o]`` is itself a
    forward-layout convolution once the batch and channel axes trade places: ``x`` as a batch of
    ``C_in`` images with ``N`` channels, ``dy`` as an ``(H_out, W_out, N, C_out)`` kernel. That
    is the form XLA:CPU gives its own kernel gradient when it canonicalises it outside loops;
    writing it out keeps it on the fast kernels inside ``lax.scan`` bodies too. Its gradient is
    again made of :func:`conv_nhwc` (input: the input gradient for kernel ``g``; ``dy``: the
    forward convolution of ``x`` with ``g``), so every order of derivative stays fast.
    """
    # Padded here rather than by the convolution: XLA's simplifier swaps the operands of a
    # convolution whose window (H_out) exceeds its unpadded input, and the swapped form has no
    # fast kernel (e.g. MTT's first layer on 28x28 images, padded by 3).
    (top, bottom), (left, right) = padding
    zero = jnp.zeros((), x.dtype)
    x = jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    batch_as_channels = jnp.transpose(x, (3, 1, 2, 0))  # (C_in, H_padded, W_padded, N)
    dy_as_kernel = jnp.transpose(dy, (1, 2, 0, 3))  # (H_out, W_out, N, C_out)
    dk = jax.lax.conv_general_dilated(
        batch_as_channels, dy_as_kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=_NHWC
    )
    return jnp.transpose(dk, (1, 2, 0, 3))  # (kh, kw, C_in, C_out)


def _kernel_gradient_fwd(x, dy, padding):
    return kernel_gradient(x, dy, padding), (x, dy)


def _kernel_gradient_bwd(padding, residuals, g):
    x, dy = residuals
    return _input_gradient(dy, g, padding), conv_nhwc(x, g, padding)


kernel_gradient.defvjp(_kernel_gradient_fwd, _kernel_gradient_bwd)
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


def conv_general_dilated(conv_grad: str) -> Callable[..., jax.Array]:
    """The function ``nn.Conv`` calls to convolve, for ``conv_grad`` in :data:`CONV_GRADS`."""
    valid = list(CONV_GRADS)
    check(conv_grad in CONV_GRADS, f"conv_grad must be one of {valid}, got {conv_grad!r}")
    return _fast_cpu_conv_general_dilated if conv_grad == "fast" else jax.lax.conv_general_dilated


def xla_gradient_convolutions(fn: Callable[..., object], *args: object) -> int:
    """How many convolutions of ``fn(*args)`` would be differentiated by XLA's own gradient.

    Counts the ``conv_general_dilated`` operations of ``fn``'s jaxpr outside :func:`conv_nhwc`
    and :func:`kernel_gradient` (whose gradients are fast forward-layout convolutions). On the
    CPU backend a count of 0 means every convolution gradient of ``fn`` runs on XLA:CPU's fast
    kernels inside loop bodies too; ``args`` may be ``jax.ShapeDtypeStruct`` values.
    """

    def count(jaxpr: jax.extend.core.Jaxpr) -> int:
        found = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found += 1
            elif "custom_vjp" not in eqn.primitive.name:
                for value in eqn.params.values():
                    for sub in value if isinstance(value, (tuple, list)) else (value,):
                        if isinstance(sub, jax.extend.core.ClosedJaxpr):
                            found += count(sub.jaxpr)
                        elif isinstance(sub, jax.extend.core.Jaxpr):
                            found += count(sub)
        return found

    return count(jax.make_jaxpr(fn)(*args).jaxpr)
