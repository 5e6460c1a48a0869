"""Soft labels for trajectory matching: DATM's soft cross-entropy and TESLA's label assignment.

Two published ways to give the synthetic images soft labels (``research/trajectory_matching.md``
§2.2 and §3.1):

* **DATM** (Guo et al., ICLR 2024; ``distill/DATM.py``) learns the labels: the state holds
  *logits* y, the targets are softmax(y) and the loss is DATM's ``SoftCrossEntropy``
  (:func:`soft_cross_entropy`). The learning itself lives in :mod:`ddjax.distill.datm`.
* **TESLA** (Cui et al., ICML 2023; ``distill.py --teacher_label``) assigns them: every
  iteration, the labels are the softmax of the *target* expert θ*_{t+M}'s logits on the
  un-augmented synthetic images (:func:`expert_soft_labels`). They are not learned.

Both use an expert's network in eval mode (:func:`expert_logits`). The published code loads
the expert's flat parameter vector into a freshly built ``ReparamModule`` network; the vector
holds parameters only, so BatchNorm layers of that network keep PyTorch's initial running
statistics (mean 0, variance 1). ``expert_logits`` reproduces exactly that, so BatchNorm
students get the published behaviour too (the experts store no running statistics either).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.errors import check

__all__ = [
    "expert_logits",
    "expert_soft_labels",
    "label_probabilities",
    "predict_in_batches",
    "soft_cross_entropy",
]

Array = jax.Array
Params = Any


def label_probabilities(label_logits: Array) -> Array:
    """softmax(y) over the class axis: the targets DATM's learnable logits y stand for.

    This is also what ddjax saves and evaluates as a DATM set's labels: training on
    probabilities p = softmax(y) with :func:`ddjax.train.cross_entropy` (mean_b Σ_k −p_k
    log_softmax(z)_k) is exactly DATM's evaluation with ``SoftCrossEntropy`` on the logits.
    """
    return jax.nn.softmax(label_logits, axis=-1)


def soft_cross_entropy(logits: Array, label_logits: Array) -> Array:
    """DATM's ``SoftCrossEntropy(inputs, target)``: mean_b Σ_k −log_softmax(z)_k · softmax(y)_k.

    Guo et al. 2024, ``distill/DATM.py``: the sum over the batch and classes divided by the
    batch size, with the softmax of the *learnable* label logits (temperature 1) as targets.
    Used by DATM in the inner loop and for evaluation.

    Args:
      logits: the network's outputs z ``[B, C]``.
      label_logits: the soft labels' logits y ``[B, C]``.

    Returns:
      The scalar loss.
    """
    log_likelihood = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(log_likelihood * label_probabilities(label_logits)) / logits.shape[0]


def expert_logits(model: nn.Module, params: Params, images: Array) -> Array:
    """An expert's logits on ``images`` in eval mode, as the published label code computes them.

    ``model.apply({'params': params}, images, train=False)`` with the ``batch_stats``
    collection created on the fly: BatchNorm layers normalise with PyTorch's initial running
    statistics (mean 0, variance 1), which is what DATM's and TESLA's ``ReparamModule`` label
    networks hold (the expert's flat vector has no buffers). Pure and jittable.

    Args:
      model: the experts' architecture.
      params: the expert's ``params`` at some epoch.
      images: ``[N, H, W, C]`` images in the dataset's space.

    Returns:
      ``[N, num_classes]`` logits.
    """
    logits, _ = model.apply({"params": params}, images, train=False, mutable=["batch_stats"])
    return logits


def expert_soft_labels(model: nn.Module, target_params: Params, images: Array) -> Array:
    """TESLA's soft-label assignment: softmax of the target expert's logits (Cui et al. 2023).

    TESLA's ``distill.py`` (``--teacher_label``), every iteration after drawing the expert and
    the start epoch t: a network in ``eval()`` mode holding θ*_{t+M} (the *target*
    parameters) labels the current, un-augmented synthetic images with ``softmax`` of its
    logits (temperature 1); the inner loop then trains on these probabilities with
    cross-entropy. They are recomputed every iteration and never learned; the result is a
    constant for the outer gradient (TESLA computes it from ``image_syn.detach()``).

    Published-code caveat: the release fills its label batches only when ``dataset ==
    'ImageNet'`` and there are more than 50 images (it labels in batches of 50); on any other
    dataset ``torch.cat([])`` fails, so the released SLA runs on ImageNet-1K only (the README
    uses ``--teacher_label`` only there). ddjax applies the same rule to any dataset, in one
    batch (eval mode has no cross-sample interaction, so batching does not change the labels).

    Args:
      model: the experts' architecture.
      target_params: θ*_{t+M}.
      images: the synthetic images ``[N, H, W, C]``.

    Returns:
      ``[N, num_classes]`` probabilities, without gradient.
    """
    images = jax.lax.stop_gradient(images)
    return jax.lax.stop_gradient(jax.nn.softmax(expert_logits(model, target_params, images), -1))


_jitted_expert_logits = jax.jit(expert_logits, static_argnums=0)


def predict_in_batches(
    model: nn.Module, params: Params, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """:func:`expert_logits` over many images, in fixed-size batches (host-side, not jittable).

    DATM scans real images in batches of 256 to pick and label its initial images; here the
    last batch is padded to the full size so that every call has one shape (one compile per
    model), and the padding's outputs are dropped. Eval mode has no cross-sample interaction,
    so the logits do not depend on the batching.

    Args:
      model: the experts' architecture.
      params: the expert's ``params``.
      images: ``[N, H, W, C]`` images.
      batch_size: images per call.

    Returns:
      float32 ``[N, num_classes]`` logits (NumPy).
    """
    check(batch_size >= 1, f"predict_in_batches batch_size={batch_size} must be positive")
    images = np.asarray(images, np.float32)
    check(len(images) >= 1, "predict_in_batches: no images given")
    outputs = []
    for begin in range(0, len(images), batch_size):
        batch = images[begin : begin + batch_size]
        size = len(batch)
        if size < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - size, *batch.shape[1:]))])
        batch = batch.astype(np.float32)
        outputs.append(np.asarray(_jitted_expert_logits(model, params, batch))[:size])
    return np.concatenate(outputs).astype(np.float32)
