"""TESLA's soft-label assignment on MTT (Cui et al., "Scaling Up Dataset Distillation to
ImageNet-1K with Constant Memory", ICML 2023; ``distill.py --teacher_label``).

Every iteration the labels are the softmax of the *target* expert θ*_{t+M}'s logits on the
un-augmented synthetic images (:func:`ddjax.distill.soft_labels.expert_soft_labels`); they
are assigned, not learned, and the state keeps the latest assignment for evaluation (one-hot
classes before the first iteration). Selected with ``method='mtt'``, ``soft_labels='tesla'``.
TESLA's constant-memory gradient is independent of this: ``mode='tesla'``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np

from ddjax.distill import soft_labels
from ddjax.distill.mtt import MTT

__all__ = ["TeslaLabels"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TeslaLabels(MTT):
    """MTT whose labels are assigned by the target expert every iteration."""

    float_labels: ClassVar[bool] = True
    label_kinds: ClassVar[tuple[str, ...]] = ("tesla",)

    def step_labels(self, labels: Array, model: nn.Module, images: Array, target) -> Array:
        del labels
        return soft_labels.expert_soft_labels(model, target, images)

    def initial_labels(self, classes: np.ndarray, num_classes: int) -> np.ndarray:
        return np.eye(num_classes, dtype=np.float32)[classes]

    def saved_labels(self, labels: np.ndarray):
        return labels, {}, {"labels": "TESLA's soft-label assignment of the last iteration"}
