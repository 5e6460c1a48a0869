"""Shared test settings.

XLA compilation dominates this suite's time on CPU. A persistent compilation cache in a
per-run temporary directory lets tests that build the same program (same model, same shapes)
compile it once.
"""

import os
import tempfile

import jax

_CACHE = os.environ.get("DDJAX_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="ddjax-jax-cache-")
os.environ["DDJAX_TEST_JAX_CACHE"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The same cache for the tests' subprocesses (multi-device and multi-process runs): a restarted
# run, or a process that compiles what another already has, reads it instead of compiling.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
