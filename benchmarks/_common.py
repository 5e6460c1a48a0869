"""What every benchmark records beside its numbers: the device, the versions, the memory."""

import os
import platform
import resource

import jax


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Device, core count and library versions, for the JSON and Markdown reports."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "machine": platform.machine(),
    }


def peak_memory_bytes() -> tuple[int, str]:
    """The process's (CPU) or device's (GPU/TPU) peak memory so far, and what it measures."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def compiled_memory(compiled) -> dict:
    """XLA's buffer sizes of a compiled program (``.lower(...).compile().memory_analysis()``)."""
    stats = compiled.memory_analysis()
    return {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }
