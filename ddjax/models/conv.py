"""Stride-1 convolutions with a gradient built from fast XLA:CPU kernels, and the model switch.

XLA:CPU lowers the transposed convolutions of a convolution's gradient to slow generic kernels.
:func:`conv_nhwc` keeps XLA's forward convolution and writes its backward pass as a
forward-layout convolution (input gradient) and per-tap matrix products (kernel gradient); its
own gradient is again a :func:`conv_nhwc`, so second-order gradients (trajectory matching) stay
on the fast path. Values agree with XLA's to float rounding (float64: 1e-15).

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


def conv_general_dilated(conv_grad: str) -> Callable[..., jax.Array]:
    """The function ``nn.Conv`` calls to convolve, for ``conv_grad`` in :data:`CONV_GRADS`."""
    valid = list(CONV_GRADS)
    check(conv_grad in CONV_GRADS, f"conv_grad must be one of {valid}, got {conv_grad!r}")
    return _fast_cpu_conv_general_dilated if conv_grad == "fast" else jax.lax.conv_general_dilated
