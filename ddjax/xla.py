"""Opt-in XLA:CPU compiler options for ddjax's hot programs, and ``jit`` that adds them.

On CPU, XLA (jaxlib 0.10) hands parts of a program to the YNNPACK library; the option
``xla_cpu_experimental_ynn_fusion_type`` says which kinds. With only matrix products and
reductions there (``DDJAX_CPU_FUSION=dot,reduce``), convolutions run on XLA's own kernels
(Eigen), which for MTT's ConvNet and its gradients are faster: side by side with the official
PyTorch code on a 2-core AMD EPYC (``benchmarks/vs_pytorch.py``) the exact trajectory-matching
iteration went from 1.5-1.7x the official time to 0.94-1.09x, the recover iteration from
1.28-1.39x to 0.98-1.10x.

Not the default, because float32 rounding gets worse. The harness's sanity check (N = 2, no
augmentation) has a float64 reference: the official code's float32 image gradient is 1.2e-6
from it, ddjax's 1.3e-6 with XLA's default and 1.5e-2 with ``dot,reduce`` (its loss 2.4e-6
against 3.8e-8); with ``dot`` alone, reductions in XLA's own emitter lose more (a BatchNorm
ResNet-101's train-mode forward pass: 1.9e-4 from float64, against 2.5e-5). Float64 results
are the same either way (``tests/test_xla.py``). Choose it for speed where float32 training
noise dwarfs that, not for comparisons with other code.

``DDJAX_CPU_FUSION`` is read when a program is built: a comma-separated list of fusion types
(:data:`FUSION_TYPES`' keys), applied per compilation (``compiler_options`` of ``jax.jit``) on
the CPU backend only. A user who names the option in ``XLA_FLAGS`` keeps that value: ddjax
then adds nothing. The CLI checks the variable before any work.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from ddjax.errors import check

FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
ENV = "DDJAX_CPU_FUSION"
# The names DDJAX_CPU_FUSION accepts, and XLA's enum values for them.
FUSION_TYPES = {
    name: f"LIBRARY_FUSION_TYPE_{name.upper()}"
    for name in ("dot", "reduce", "eltwise", "individual_dot", "individual_convolution")
}
RECOMMENDED = "dot,reduce"


def user_sets_fusion() -> bool:
    """Whether ``XLA_FLAGS`` already names the fusion option (the user's value then applies)."""
    return FUSION_OPTION in os.environ.get("XLA_FLAGS", "")


def fusion_value(names: str) -> str:
    """XLA's value for a ``DDJAX_CPU_FUSION`` list (``'dot,reduce'``); refuses unknown names."""
    parts = [part.strip() for part in names.split(",")]
    unknown = [part for part in parts if part not in FUSION_TYPES]
    check(
        not unknown and parts,
        f"{ENV}={names!r}: expected a comma-separated list of {sorted(FUSION_TYPES)} "
        f"(e.g. {RECOMMENDED!r}), or unset for XLA's default",
    )
    return ",".join(FUSION_TYPES[part] for part in parts)


def check_environment() -> None:
    """Refuses a malformed ``DDJAX_CPU_FUSION`` in one line (the CLI calls it first)."""
    names = os.environ.get(ENV, "")
    if names:
        fusion_value(names)


@functools.cache
def _jaxlib_knows(value: str) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={FUSION_OPTION: value}).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def options(extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The compiler options ``DDJAX_CPU_FUSION`` asks for, merged with ``extra`` (which wins).

    Returns ``None`` when there is nothing to set (``jax.jit``'s default). Initialises the
    backend when the variable is set: call it where a program is built, not at import.

    Raises:
      DDJaxError: the variable names an unknown type, or this jaxlib has no such option.
    """
    merged: dict[str, Any] = {}
    names = os.environ.get(ENV, "")
    if names and not user_sets_fusion() and jax.default_backend() == "cpu":
        value = fusion_value(names)
        check(
            _jaxlib_knows(value),
            f"{ENV}={names!r}: this jaxlib ({jax.__version__}) has no XLA option "
            f"{FUSION_OPTION} with these types; unset {ENV}",
        )
        merged[FUSION_OPTION] = value
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
