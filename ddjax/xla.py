"""The XLA compiler options ddjax compiles its hot programs with, and ``jit`` that adds them.

On CPU, XLA (jaxlib 0.10) hands parts of a program to the YNNPACK library; the option
``xla_cpu_experimental_ynn_fusion_type`` says which kinds. ddjax names two: matrix products
(``DOT``) and reductions (``REDUCE``). Convolutions then run on XLA's own convolution kernels
(Eigen) instead of YNNPACK's, which on the convolutions of MTT's ConvNet and their gradients
(large-window kernel gradients above all) are the faster ones. Measured side by side with the
official PyTorch code on a 2-core AMD EPYC (``benchmarks/vs_pytorch.py``), this takes the
exact trajectory-matching iteration from 1.6x the official time to about 1x, and the
training step and the SRe2L recover iteration most of the way there.

Why not ``DOT`` alone, a little faster still: reductions then go to XLA's own emitter, whose
float32 sums lose digits. A BatchNorm ResNet-101's train-mode forward pass is 1.9e-4 from its
float64 value with ``DOT`` alone, 2.8e-5 with ``DOT`` and ``REDUCE``, 2.5e-5 with XLA's default.
Float64 results are the same with and without the options; float32 rounding moves, as it
does with any change of kernels (``tests/test_xla.py`` holds both).

The options apply per compilation (``compiler_options`` of ``jax.jit``), only on the CPU
backend, and only when this jaxlib knows them (checked once by compiling a scalar program).
A user who names the option in ``XLA_FLAGS`` keeps their own value: ddjax then adds nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
FUSION_TYPES = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def user_sets_fusion() -> bool:
    """Whether ``XLA_FLAGS`` already names the fusion option (the user's value then applies)."""
    return FUSION_OPTION in os.environ.get("XLA_FLAGS", "")


@functools.cache
def _jaxlib_knows_fusion_option() -> bool:
    options = {FUSION_OPTION: FUSION_TYPES}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def options(extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """ddjax's compiler options for the default backend, merged with ``extra`` (which wins).

    Returns ``None`` when there is nothing to set (``jax.jit``'s default). Initialises the
    backend: call it where a program is built, not at import.
    """
    merged: dict[str, Any] = {}
    if jax.default_backend() == "cpu" and not user_sets_fusion() and _jaxlib_knows_fusion_option():
        merged[FUSION_OPTION] = FUSION_TYPES
    merged.update(extra or {})
    return merged or None


def jit(fun: Callable, *, compiler_options: Mapping[str, Any] | None = None, **kwargs) -> Any:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`options` merged with ``compiler_options``."""
    return jax.jit(fun, compiler_options=options(compiler_options), **kwargs)


class LazyJit:
    """:func:`jit` for a module-level function, built at its first use rather than at import.

    Importing ddjax must not start JAX's backend (``jax.distributed.initialize`` has to come
    first in a multi-process run), and :func:`options` needs the backend. Called from inside
    another traced program (any argument a tracer), the function is a plain nested ``jax.jit``:
    JAX accepts compiler options on the outermost program only, whose own apply. ``lower``,
    ``trace``, ``eval_shape`` and the other attributes are those of the top-level program.
    """

    def __init__(self, fun: Callable, **kwargs) -> None:
        functools.update_wrapper(self, fun)
        self._fun, self._kwargs = fun, kwargs

    @functools.cached_property
    def _jitted(self):
        return jit(self._fun, **self._kwargs)

    @functools.cached_property
    def _nested(self):
        return jax.jit(self._fun, **self._kwargs)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._jitted)(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_fun", "_kwargs", "_jitted", "_nested"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def lazy_jit(fun: Callable | None = None, **kwargs) -> Any:
    """Decorator form of :class:`LazyJit` (``@lazy_jit`` or ``@lazy_jit(static_argnames=...)``)."""
    if fun is None:
        return functools.partial(LazyJit, **kwargs)
    return LazyJit(fun, **kwargs)
