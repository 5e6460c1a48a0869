"""``synthetic[:key=value,...]``: procedurally generated striped images, for tests and smoke runs.

Promises: deterministic in its ``seed`` option; no files are read. Options (all integers):
``classes`` (>= 2), ``size`` (>= 4), ``channels`` (1 or 3), ``train`` and ``test`` images per
class, ``seed``; an unknown option or a bad value is a :class:`DDJaxError` naming it.
"""

from __future__ import annotations

import numpy as np

from ddjax.data.sources.base import Splits
from ddjax.errors import check


def _parse_options(name: str, spec: str, defaults: dict[str, int]) -> dict[str, int]:
    options = dict(defaults)
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        check(
            sep == "=" and key in defaults and value.lstrip("-").isdigit(),
            f"{name}: bad option {item!r}; options are {', '.join(defaults)} as key=integer",
        )
        options[key] = int(value)
    return options


def load(name: str, spec: str, data_dir: str | None) -> Splits:
    """Oriented, coloured stripes: class c has angle pi*c/K, 2 + c%3 cycles and its own hue.

    Each image gets a random phase, contrast and Gaussian pixel noise (std 0.1). The class shows
    in a slight shift of the mean colour (brightness when ``channels=1``), which a linear model
    picks up partly, and in the stripes' orientation and frequency, which need a ConvNet.
    Deterministic in ``seed``. ``spec`` holds the options (``classes=10,size=16,...``);
    ``name`` and ``data_dir`` are unused.
    """
    del name, data_dir
    defaults = {"classes": 10, "size": 16, "channels": 3, "train": 64, "test": 32, "seed": 0}
    options = _parse_options("synthetic", spec, defaults)
    classes, size, channels = options["classes"], options["size"], options["channels"]
    check(classes >= 2, f"synthetic: classes must be >= 2, got {classes}")
    check(size >= 4, f"synthetic: size must be >= 4, got {size}")
    check(channels in (1, 3), f"synthetic: channels must be 1 or 3, got {channels}")
    check(options["train"] >= 1, f"synthetic: train must be >= 1, got {options['train']}")
    check(options["test"] >= 0, f"synthetic: test must be >= 0, got {options['test']}")
    rng = np.random.default_rng(options["seed"])
    rows, cols = np.mgrid[0:size, 0:size] / size

    def make(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(classes), per_class)
        angle = np.pi * labels / classes
        cycles = 2 + labels % 3
        phase = rng.uniform(0, 2 * np.pi, len(labels))
        contrast = rng.uniform(0.25, 0.45, len(labels))
        position = cols * np.cos(angle)[:, None, None] + rows * np.sin(angle)[:, None, None]
        wave = np.sin(2 * np.pi * cycles[:, None, None] * position + phase[:, None, None])
        if channels == 3:
            hue = labels[:, None] / classes + np.array([0.0, 1 / 3, 2 / 3])
            shade = np.cos(2 * np.pi * hue)  # (N, 3) in [-1, 1]: the class's colour
            stripe_colour = shade
        else:
            shade = (2 * labels / (classes - 1) - 1)[:, None]  # the class's brightness
            stripe_colour = np.ones_like(shade)
        # A weak class-mean cue (learnable in a few steps) plus the stripes (needs convolutions).
        images = 0.5 + 0.08 * shade[:, None, None]
        images = images + (contrast[:, None, None] * wave)[..., None] * stripe_colour[:, None, None]
        images += rng.normal(0, 0.1, images.shape)
        return np.clip(images, 0, 1).astype(np.float32), labels

    train_images, train_labels = make(options["train"])
    test_images, test_labels = make(options["test"])
    return Splits(
        train_images,
        train_labels,
        test_images,
        test_labels,
        class_names=tuple(f"class_{c}" for c in range(classes)),
        source="synthetic",
    )
