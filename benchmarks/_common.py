"""What every benchmark records beside its numbers: the device and the versions."""

import os
import platform

import jax


def environment() -> dict:
    """Device, core count and library versions, for the JSON and Markdown reports."""
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "machine": platform.machine(),
    }
