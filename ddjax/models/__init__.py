"""Networks of the dataset-distillation literature as Flax Linen modules, with PyTorch layouts.

The architectures are those of MTT's ``networks.py`` (Cazenavette et al., CVPR 2022; inherited from
DC/DSA), which TESLA, DATM and SelMatch reuse unchanged, plus the torchvision-style ResNet-18 with
the small-image stem that SRe2L squeezes on CIFAR and Tiny-ImageNet (see
``research/trajectory_matching.md`` §1.5 and ``research/sre2l.md`` §2), and torchvision's
ImageNet-scale teachers and students: ResNet-50/101 (:class:`BottleneckResNet`) and MobileNet-V2
(:class:`MobileNetV2`), each with the ImageNet stem or the small-image stem.

Conventions every caller relies on:

* **Input** is NHWC float32 (float64 with float64 variables). The spatial size is not a field
  of any model: Flax infers the classifier's input width from the first call, so
  :func:`init_variables` is where the image shape enters (and where too-small images are
  rejected).
* **Call signature** ``model.apply(variables, images, train=False, features_only=False)``. It
  returns logits ``(N, num_classes)``, or, with ``features_only=True``, the vector the classifier
  sees ``(N, F)`` (herding and k-center selection embed images with it). For flattening heads
  (ConvNet, VGG11, AlexNet, ResNet18_AP) the features are flattened in PyTorch's (C, H, W) order,
  so the classifier's weights have PyTorch's layout up to a transpose.
* **Batch statistics.** BatchNorm models keep PyTorch-style running statistics in the
  ``'batch_stats'`` collection (``{'mean', 'var'}`` per layer). ``train=True`` normalises with
  the batch statistics and updates the running ones when the collection is mutable::

      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
      variables = {**variables, **updates}

  Without ``mutable`` the batch statistics are still used but the running ones are left alone
  (MTT's student in the inner loop works this way: its running statistics are never read).
  Models without BatchNorm accept the same call and return an empty ``updates`` dict, so one
  training step serves every model. ``train=False`` normalises with the running statistics.
  The exception is MobileNet-V2's dropout (torchvision's 0.2 before the classifier): in train
  mode it needs ``rngs={'dropout': key}`` (a clear error says so), or ``dropout=0.0``.
* **BN input statistics** (SRe2L's recover loss): with ``mutable=['bn_inputs']`` every
  BatchNorm layer also stores the batch mean and biased variance of its *input* (over N, H, W)
  in ``'bn_inputs'``, laid out exactly like ``'batch_stats'``; under ``jit`` with a sharded batch
  these are statistics of the whole batch.
* **Dtype.** Every variable a model creates is :func:`float_dtype`: float32, or float64 when
  ``jax_enable_x64`` is on (the weights drawn in float32 and cast, so both start alike);
  :func:`check_float_dtypes` is the loss functions' refusal of a float32/float64 mix.
* **Initialisation** is PyTorch's default, so accuracies are comparable with the published
  numbers: conv and linear weights and biases ~ U(±1/√fan_in) (``kaiming_uniform(a=√5)``),
  normalisation γ = 1, β = 0, running mean 0 and variance 1. ``conv_init='torchvision'``
  (ResNet-18's option; the default of ResNet-50/101 and MobileNet-V2) is torchvision's:
  kaiming-normal fan-out convs, and N(0, 0.01²) with zero bias for MobileNet-V2's classifier.
* **Counting**: ``count_params(variable_shapes(model, image_shape))`` counts trainable
  parameters without allocating or compiling anything.
* **Convolution gradients on CPU.** Stride-1 convolutions differentiate through
  :func:`conv_nhwc`, whose backward pass is written as forward-layout convolutions (input
  gradient; kernel gradient with batch and channels swapped, :func:`kernel_gradient`), at every
  order of derivative and inside loop bodies. The forward pass is XLA's convolution
  unchanged; on GPUs and TPUs every convolution is XLA's. Every model has a ``conv_grad`` field
  (``get_model(..., conv_grad=...)``): ``'fast'`` (the default) or ``'xla'`` for XLA's own
  gradient everywhere (:data:`CONV_GRADS`). :func:`xla_gradient_convolutions` counts the
  convolutions of a function left to XLA's gradient (0: all on the fast path).
* **PyTorch interchange** (numpy only; torch is never imported): :func:`to_torch_state_dict` /
  :func:`from_torch_state_dict` use the exact ``state_dict`` key names of MTT's ``networks.py``
  (or torchvision's for ResNet-18 with ``key_style='torchvision'``, and always for ResNet-50/101
  and MobileNet-V2), and
  :func:`to_flat_vector` / :func:`from_flat_vector` use the flat parameter vector of MTT's
  ``ReparamModule`` (``torch.cat([p.reshape(-1) for p in net.parameters()])``), the format of
  MTT's expert buffers.

Model names (:data:`MODEL_NAMES`, :func:`get_model`) are MTT's ``utils.get_network`` names, and
for torchvision's networks ``ResNet50BN``/``ResNet101BN``/``MobileNetV2`` (small-image stem) and
``ResNet50BNImageNet``/``ResNet101BNImageNet``/``MobileNetV2ImageNet`` (torchvision's own).

Layout (each module's docstring says what it promises):

* :mod:`~ddjax.models.conv` — :func:`conv_nhwc`, the stride-1 convolution with a fast CPU
  gradient, and the ``conv_grad`` switch (:data:`CONV_GRADS`).
* :mod:`~ddjax.models.layers` — conv/linear layers with PyTorch's init, :class:`BatchNorm`, the
  other normalisations, pooling and flattening.
* :mod:`~ddjax.models.convnet`, :mod:`~ddjax.models.resnet`, :mod:`~ddjax.models.vgg_alexnet`,
  :mod:`~ddjax.models.mobilenet` — the architectures.
* :mod:`~ddjax.models.registry` — :func:`get_model`, :data:`MODEL_NAMES`, :func:`init_variables`,
  :func:`variable_shapes`, :func:`count_params`.
* :mod:`~ddjax.models.torch_io` — PyTorch ``state_dict`` and flat-vector conversion.

Adding an architecture: one module with the Flax class, one registry line, and its entries in
``registry._feature_map_size`` and ``torch_io._torch_layers``.
"""

from ddjax.models.conv import CONV_GRADS, conv_nhwc, kernel_gradient, xla_gradient_convolutions
from ddjax.models.convnet import ConvNet
from ddjax.models.layers import BatchNorm, check_float_dtypes, float_dtype
from ddjax.models.mobilenet import MobileNetV2
from ddjax.models.registry import (
    MODEL_NAMES,
    Variables,
    count_params,
    get_model,
    init_variables,
    variable_shapes,
)
from ddjax.models.resnet import BottleneckResNet, ResNet18
from ddjax.models.torch_io import (
    from_flat_vector,
    from_torch_state_dict,
    to_flat_vector,
    to_torch_state_dict,
)
from ddjax.models.vgg_alexnet import VGG11, VGG11_CFG, AlexNet

# The name tests/test_models.py used before the split (it walks MTT's VGG11 layer indices).
_VGG11_CFG = VGG11_CFG

__all__ = [
    "CONV_GRADS",
    "MODEL_NAMES",
    "VGG11_CFG",
    "AlexNet",
    "BatchNorm",
    "BottleneckResNet",
    "ConvNet",
    "MobileNetV2",
    "ResNet18",
    "VGG11",
    "Variables",
    "check_float_dtypes",
    "conv_nhwc",
    "count_params",
    "float_dtype",
    "from_flat_vector",
    "from_torch_state_dict",
    "get_model",
    "init_variables",
    "kernel_gradient",
    "to_flat_vector",
    "to_torch_state_dict",
    "variable_shapes",
    "xla_gradient_convolutions",
]
