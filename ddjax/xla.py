"""The XLA:CPU compiler options of ddjax's hot programs, and ``jit`` that adds them.

On CPU, XLA (jaxlib 0.10) hands parts of a program to the YNNPACK library; the option
``xla_cpu_experimental_ynn_fusion_type`` says which kinds. ddjax keeps only matrix products and
reductions there (``dot,reduce``), so convolutions run on XLA's own (Eigen) kernels, which for
MTT's ConvNet and its gradients are the faster ones: side by side with the official PyTorch
code on a 2-core AMD EPYC (``benchmarks/vs_pytorch.py``) the exact trajectory-matching
iteration went from 1.5-1.7x the official time to 0.94-1.09x, the recover iteration from
1.28-1.39x to 0.98-1.10x, the training step from 1.7x to 1.1-1.3x.

Values: float64 results are the same with and without the option. In float32 only rounding
moves, and where it shows is a ReLU whose input is within rounding of zero: its mask can come
out either way, and one such flip moves a first-order kernel gradient by about 1e-3 (the
sanity check of the harness, which has a float64 reference, once drew one). Over six random
image sets of the benchmark's shapes, 9 masks flipped against float64 with this option and 4
with XLA's default (``tests/test_xla.py`` holds the rest). ``dot`` alone, a little faster,
is not used: reductions then go to XLA's own emitter, whose float32 sums lose digits (a
BatchNorm ResNet-101's train-mode forward pass: 1.9e-4 from float64, against 2.8e-5 with
``dot,reduce`` and 2.5e-5 with XLA's default).

``DDJAX_CPU_FUSION`` overrides the choice when a program is built: ``xla`` for XLA's own
default, or a comma-separated list of fusion types (:data:`FUSION_TYPES`' keys). The options
apply per compilation (``compiler_options`` of ``jax.jit``) on the CPU backend only; a user
who names the option in ``XLA_FLAGS`` keeps that value and ddjax adds nothing. The CLI checks
the variable before any work.
"""

from __future__ import annotations

import functools
import os
import warnings
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
DEFAULT = "dot,reduce"
XLA_DEFAULT = "xla"  # DDJAX_CPU_FUSION=xla: XLA's own choice (no option)


def user_sets_fusion() -> bool:
    """Whether ``XLA_FLAGS`` already names the fusion option (the user's value then applies)."""
    return FUSION_OPTION in os.environ.get("XLA_FLAGS", "")


def fusion_value(names: str) -> str:
    """XLA's value for a ``DDJAX_CPU_FUSION`` list (``'dot,reduce'``); refuses unknown names."""
    parts = [part.strip() for part in names.split(",")]
    unknown = [part for part in parts if part not in FUSION_TYPES]
    check(
        not unknown and parts,
        f"{ENV}={names!r}: expected {XLA_DEFAULT!r} (XLA's default) or a comma-separated "
        f"list of {sorted(FUSION_TYPES)} (unset: {DEFAULT!r})",
    )
    return ",".join(FUSION_TYPES[part] for part in parts)


def check_environment() -> None:
    """Refuses a malformed ``DDJAX_CPU_FUSION`` in one line (the CLI calls it first)."""
    names = os.environ.get(ENV, "")
    if names and names != XLA_DEFAULT:
        fusion_value(names)


@functools.cache
def _jaxlib_knows(value: str) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={FUSION_OPTION: value}).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


@functools.cache
def _say_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def options(extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """ddjax's compiler options for the default backend, merged with ``extra`` (which wins).

    Returns ``None`` when there is nothing to set (``jax.jit``'s default). Initialises the
    backend: call it where a program is built, not at import.

    Raises:
      DDJaxError: the variable names an unknown type, or asks for types this jaxlib does not
        have (unset, ddjax then warns once and compiles with XLA's default).
    """
    merged: dict[str, Any] = {}
    asked = os.environ.get(ENV, "")
    names = asked or DEFAULT
    if names != XLA_DEFAULT and not user_sets_fusion() and jax.default_backend() == "cpu":
        value = fusion_value(names)
        if _jaxlib_knows(value):
            merged[FUSION_OPTION] = value
        else:
            check(
                not asked,
                f"{ENV}={names!r}: this jaxlib ({jax.__version__}) has no XLA option "
                f"{FUSION_OPTION} with these types; set {ENV}={XLA_DEFAULT}",
            )
            _say_once(
                f"ddjax: this jaxlib ({jax.__version__}) has no XLA option {FUSION_OPTION}; "
                "compiling with XLA's default fusions"
            )
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
