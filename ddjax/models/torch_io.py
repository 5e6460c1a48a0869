"""PyTorch interchange: MTT's (or torchvision's) ``state_dict`` and MTT's flat parameter vector.

numpy only; torch is never imported. Promises: :func:`to_torch_state_dict` /
:func:`from_torch_state_dict` use the exact ``state_dict`` keys of MTT's ``networks.py`` (or
torchvision's for ResNet-18 with ``key_style='torchvision'``; always torchvision's for ResNet-50/101
and MobileNet-V2, which MTT never had) in ``named_parameters`` order, and are inverse to each
other; :func:`to_flat_vector` / :func:`from_flat_vector` use the flat vector
of MTT's ``ReparamModule``, the format of MTT's expert buffers. A missing, unexpected or
mis-shaped tensor is a one-line :class:`~ddjax.errors.DDJaxError` naming the key. Every
converter keeps the floating dtype it is given (float32, or float64 from ``net.double()`` or
``jax_enable_x64``; narrower floats become float32) or takes ``dtype='float32'|'float64'``, in
both directions; JAX arrays are float64 only with ``jax_enable_x64`` on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ddjax.errors import DDJaxError, check
from ddjax.models.convnet import ConvNet
from ddjax.models.mobilenet import MobileNetV2, inverted_residual_blocks
from ddjax.models.registry import Variables, count_params, variable_shapes
from ddjax.models.resnet import BOTTLENECK_DEPTHS, BottleneckResNet, ResNet18
from ddjax.models.vgg_alexnet import VGG11, VGG11_CFG, AlexNet

# Networks that exist only in torchvision: their keys are torchvision's under either key style.
_TORCHVISION_ONLY = (BottleneckResNet, MobileNetV2)


@dataclasses.dataclass(frozen=True)
class _TorchLayer:
    """One PyTorch module with state: its state_dict prefix and the matching Flax module path."""

    torch_name: str  # e.g. 'features.0' or 'layer2.0.shortcut.1'
    flax_path: tuple[str, ...]  # e.g. ('conv_0',) or ('layer2_0', 'shortcut_norm')
    kind: str  # 'conv' | 'linear' | 'norm' | 'layer_norm' | 'batch_norm'
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One tensor: Flax (collection, name) ↔ PyTorch suffix, and the axis order to PyTorch."""

    collection: str
    flax_name: str
    torch_suffix: str
    to_torch_axes: tuple[int, ...] | None  # permutation Flax → PyTorch; None = same layout


_OIHW_FROM_HWIO = (3, 2, 0, 1)
_CHW_FROM_HWC = (2, 0, 1)


def _leaves(layer: _TorchLayer) -> list[_Leaf]:
    """The tensors of a layer in PyTorch's state_dict order (parameters, then buffers)."""
    if layer.kind in ("conv", "linear"):
        axes = _OIHW_FROM_HWIO if layer.kind == "conv" else (1, 0)
        leaves = [_Leaf("params", "kernel", "weight", axes)]
        if layer.bias:
            leaves.append(_Leaf("params", "bias", "bias", None))
        return leaves
    axes = _CHW_FROM_HWC if layer.kind == "layer_norm" else None
    leaves = [_Leaf("params", "scale", "weight", axes), _Leaf("params", "bias", "bias", axes)]
    if layer.kind == "batch_norm":
        leaves += [
            _Leaf("batch_stats", "mean", "running_mean", None),
            _Leaf("batch_stats", "var", "running_var", None),
        ]
    return leaves


def _norm_kind(norm: str) -> str:
    return {"batch": "batch_norm", "layer": "layer_norm"}.get(norm, "norm")


def _torch_layers(model: nn.Module, key_style: str = "mtt") -> list[_TorchLayer]:
    """The model's stateful layers in PyTorch registration order (= ``named_parameters`` order)."""
    check(
        key_style in ("mtt", "torchvision"),
        f"key_style must be 'mtt' or 'torchvision', got {key_style!r}",
    )
    if key_style == "torchvision":
        resnet18 = isinstance(model, ResNet18) and not model.avgpool_downsample
        check(
            resnet18 or isinstance(model, _TORCHVISION_ONLY),
            f"key_style='torchvision' exists only for ResNet18 without avgpool_downsample, "
            f"BottleneckResNet and MobileNetV2, not {type(model).__name__}",
        )
    layers: list[_TorchLayer] = []
    if isinstance(model, ConvNet):
        # nn.Sequential indices: conv, [norm], ReLU, [pool] per block.
        index = 0
        for d in range(model.depth):
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{d}",), "conv"))
            index += 1
            if model.norm != "none":
                kind = _norm_kind(model.norm)
                layers.append(_TorchLayer(f"features.{index}", (f"norm_{d}",), kind))
                index += 1
            index += 1 if model.pool == "none" else 2
        layers.append(_TorchLayer("classifier", ("classifier",), "linear"))
    elif isinstance(model, VGG11):
        # nn.Sequential indices: conv, norm, ReLU per conv entry; one MaxPool per 'M'.
        index = 0
        kind = _norm_kind(model.norm)
        for position, entry in enumerate(VGG11_CFG):
            if entry == "M":
                index += 1
                continue
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{position}",), "conv"))
            layers.append(_TorchLayer(f"features.{index + 1}", (f"norm_{position}",), kind))
            index += 3
        layers.append(_TorchLayer("classifier", ("classifier",), "linear"))
    elif isinstance(model, AlexNet):
        for position, index in enumerate((0, 3, 6, 8, 10)):
            layers.append(_TorchLayer(f"features.{index}", (f"conv_{position}",), "conv"))
        layers.append(_TorchLayer("fc", ("fc",), "linear"))
    elif isinstance(model, ResNet18 | BottleneckResNet):
        layers = _resnet_layers(model, key_style)
    elif isinstance(model, MobileNetV2):
        layers = _mobilenet_v2_layers(model)
    else:
        raise DDJaxError(f"no PyTorch layout for {type(model).__name__}")
    return layers


def _conv_bn_layers(
    torch_prefix: str, flax_prefix: tuple[str, ...], parts: Sequence[tuple[str, str]], norm: str
) -> list[_TorchLayer]:
    """(torch suffix, Flax name) pairs of bias-free convs (Flax names with 'conv') and norms."""
    return [
        _TorchLayer(
            torch_prefix + torch_name,
            (*flax_prefix, flax_name),
            "conv" if "conv" in flax_name else norm,
            bias="conv" not in flax_name,
        )
        for torch_name, flax_name in parts
    ]


def _resnet_layers(model: ResNet18 | BottleneckResNet, key_style: str) -> list[_TorchLayer]:
    """ResNet-18 in MTT's or torchvision's keys; ResNet-50/101 in torchvision's (their only ones).

    torchvision: ``conv1``, ``bn1``, ``layer{s}.{b}.conv{i}``/``bn{i}``, ``layer{s}.0.downsample.0``
    (conv) and ``.1`` (BatchNorm), ``fc``. MTT's ResNet-18 says ``shortcut`` and ``classifier``.
    """
    bottleneck = isinstance(model, BottleneckResNet)
    torchvision = bottleneck or key_style == "torchvision"
    kind = "batch_norm" if bottleneck else _norm_kind(model.norm)
    shortcut = "downsample" if torchvision else "shortcut"
    # BasicBlock_AP's shortcut is Sequential(conv, AvgPool2d, norm): the norm is index 2.
    shortcut_norm = 2 if not bottleneck and model.avgpool_downsample else 1
    blocks_per_stage = BOTTLENECK_DEPTHS[model.depth] if bottleneck else (2, 2, 2, 2)
    convs_per_block = 3 if bottleneck else 2

    layers = _conv_bn_layers("", (), [("conv1", "conv1"), ("bn1", "bn1")], kind)
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        for block in range(num_blocks):
            parts = []
            for index in range(1, convs_per_block + 1):
                parts += [(f"conv{index}", f"conv{index}"), (f"bn{index}", f"bn{index}")]
            # A stage's first block changes the shape (ResNet-18: stages 2-4; bottleneck: all).
            if block == 0 and (bottleneck or stage > 1):
                parts.append((f"{shortcut}.0", "shortcut_conv"))
                parts.append((f"{shortcut}.{shortcut_norm}", "shortcut_norm"))
            layers += _conv_bn_layers(
                f"layer{stage}.{block}.", (f"layer{stage}_{block}",), parts, kind
            )
    layers.append(_TorchLayer("fc" if torchvision else "classifier", ("classifier",), "linear"))
    return layers


def _mobilenet_v2_layers(model: MobileNetV2) -> list[_TorchLayer]:
    """torchvision's ``mobilenet_v2`` keys.

    ``features.0`` is the stem (``.0`` conv, ``.1`` BatchNorm, ``.2`` ReLU6); ``features.{i}``
    for i = 1..17 an ``InvertedResidual`` whose ``conv`` Sequential holds [the 1×1 expansion
    ``Conv2dNormActivation``,] the depthwise ``Conv2dNormActivation``, the projection conv and its
    BatchNorm; ``features.18`` the last 1×1 ``Conv2dNormActivation``; ``classifier.1`` the linear
    layer after ``classifier.0``, the Dropout.
    """
    norm = "batch_norm"
    layers = _conv_bn_layers("features.0.", (), [("0", "stem_conv"), ("1", "stem_bn")], norm)
    blocks = list(inverted_residual_blocks(model.width_mult))
    for block in blocks:
        stages = (["expand"] if block.expansion != 1 else []) + ["depthwise"]
        parts = []
        for index, stage in enumerate(stages):
            parts += [(f"{index}.0", f"{stage}_conv"), (f"{index}.1", f"{stage}_bn")]
        parts += [(f"{len(stages)}", "project_conv"), (f"{len(stages) + 1}", "project_bn")]
        layers += _conv_bn_layers(
            f"features.{block.index}.conv.", (f"block_{block.index}",), parts, norm
        )
    layers += _conv_bn_layers(
        f"features.{len(blocks) + 1}.", (), [("0", "last_conv"), ("1", "last_bn")], norm
    )
    layers.append(_TorchLayer("classifier.1", ("classifier",), "linear"))
    return layers


def _tensors(model: nn.Module, key_style: str) -> Iterator[tuple[str, tuple[str, ...], _Leaf]]:
    """Every (torch key, Flax path within its collection, leaf) in state_dict order."""
    for layer in _torch_layers(model, key_style):
        for leaf in _leaves(layer):
            yield f"{layer.torch_name}.{leaf.torch_suffix}", layer.flax_path, leaf


def _get(tree: Mapping[str, Any], path: Sequence[str], what: str) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise DDJaxError(f"variables do not match the model: {what} has no {'/'.join(path)}")
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _to_torch(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return array if axes is None else np.ascontiguousarray(np.transpose(array, axes))


def _from_torch(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return array if axes is None else np.transpose(array, np.argsort(axes))


def _torch_shape(shape: Sequence[int], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def to_torch_state_dict(
    variables: Mapping[str, Any], model: nn.Module, *, key_style: str = "mtt", dtype: Any = None
) -> dict[str, np.ndarray]:
    """Converts ddjax variables to the PyTorch ``state_dict`` of the same network.

    Keys are those of MTT's ``networks.py`` (``features.0.weight``, ``layer1.0.bn1.running_var``,
    ``classifier.weight`` …); ``key_style='torchvision'`` renames ResNet-18's ``shortcut`` →
    ``downsample`` and ``classifier`` → ``fc`` for torchvision's ``resnet18``. ResNet-50/101
    (``BottleneckResNet``) and MobileNet-V2 have torchvision's keys under either style
    (``layer1.0.conv3.weight``, ``layer1.0.downsample.0.weight``, ``fc.weight``;
    ``features.0.0.weight``, ``features.1.conv.0.0.weight``, ``classifier.1.weight``).
    Conv kernels go HWIO → OIHW (depthwise: (k, k, 1, C) → (C, 1, k, k)), linear kernels
    (in, out) → (out, in), LayerNorm affines (H, W, C) → (C, H, W). BatchNorm layers also get
    ``num_batches_tracked`` = 0 (ddjax does not count batches; PyTorch reads it only when
    ``momentum=None``). Load with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Args:
        variables: ``{'params': ..., 'batch_stats': ...}`` of ``model``.
        model: the ddjax model the variables belong to.
        key_style: ``'mtt'`` or ``'torchvision'`` (ResNet18, BottleneckResNet, MobileNetV2).
        dtype: ``'float32'`` or ``'float64'`` for every tensor; ``None`` (default): the widest
            floating dtype among the variables, at least float32 (float64 variables stay
            float64, for a ``net.double()``).

    Returns:
        An ordered dict of numpy arrays of that dtype (int64 for ``num_batches_tracked``).

    Raises:
        DDJaxError: the variables lack a tensor the model needs, or an unsupported ``dtype``.
    """
    values = {}
    for key, path, leaf in _tensors(model, key_style):
        collection = _get(variables, (leaf.collection,), "variables")
        value = _get(collection, (*path, leaf.flax_name), f"variables[{leaf.collection!r}]")
        values[key] = _as_numpy(value, f"variables[{leaf.collection!r}] at {'/'.join(path)}")
    dtype = _variable_dtype(dtype, values.values())
    state_dict: dict[str, np.ndarray] = {}
    for key, _, leaf in _tensors(model, key_style):
        state_dict[key] = _to_torch(values[key].astype(dtype, copy=False), leaf.to_torch_axes)
        if leaf.flax_name == "var":
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state_dict


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drops the ``module.`` prefix that ``nn.DataParallel`` checkpoints (MTT, SRe2L) carry."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _as_numpy(value: Any, what: str) -> np.ndarray:
    """``value`` as a numpy array of its own floating dtype (float32 for anything else)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DDJaxError(
            f"{what} is not convertible to a numpy array ({error}); pass CPU tensors "
            "(detached) or numpy arrays"
        ) from error
    if array.dtype.kind == "f":
        return array
    try:
        return array.astype(np.float32)
    except (TypeError, ValueError) as error:
        raise DDJaxError(f"{what} has dtype {array.dtype}, not convertible to float32") from error


# The float types variables may have: float32 (ddjax's default) and float64 (with
# jax_enable_x64, e.g. to compare with PyTorch's float64 to 1e-10).
_VARIABLE_DTYPES = ("float32", "float64")


def _variable_dtype(dtype: Any, arrays: Iterable[np.ndarray]) -> np.dtype:
    """``dtype`` checked, or for ``None`` the widest floating dtype of ``arrays``, >= float32."""
    if dtype is None:
        return np.result_type(np.float32, *(a.dtype for a in arrays if a.dtype.kind == "f"))
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    check(
        resolved is not None and resolved.name in _VARIABLE_DTYPES,
        f"dtype={dtype!r} is not one of {list(_VARIABLE_DTYPES)} (or None: the tensors' own)",
    )
    return resolved


def _some(keys: Sequence[str], shown: int = 6) -> str:
    """The first keys and how many there are: a whole ResNet-50's keys would fill a screen."""
    more = f" ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + (", ..." if more else "") + more


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    image_shape: tuple[int, int, int],
    *,
    key_style: str = "mtt",
    dtype: Any = None,
) -> Variables:
    """Converts a PyTorch ``state_dict`` of MTT's (or torchvision's) network to ddjax variables.

    The inverse of :func:`to_torch_state_dict`. Values may be numpy arrays or CPU tensors; a
    ``module.`` prefix (``nn.DataParallel``) is removed; ``num_batches_tracked`` is accepted and
    ignored. Every other key must match exactly, as with ``load_state_dict(strict=True)``.

    Args:
        state_dict: mapping from PyTorch keys to tensors.
        model: the ddjax model to load into.
        image_shape: (H, W, C) of the inputs (fixes the head's input size).
        key_style: ``'mtt'`` or ``'torchvision'`` (ResNet18, BottleneckResNet, MobileNetV2).
        dtype: ``'float32'`` or ``'float64'`` for every variable; ``None`` (default): the
            widest floating dtype among the tensors, at least float32 -- float32 for an
            ordinary checkpoint (float16 ones too), float64 for a ``net.double()`` one. JAX keeps
            float64 only with ``jax_enable_x64`` on; otherwise arrays are float32 as always.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only for BatchNorm models).

    Raises:
        DDJaxError: missing or unexpected keys, a tensor whose shape differs (the message
            names the key, the shape found and the shape expected, both in PyTorch layout), or
            an unsupported ``dtype``.
    """
    template = variable_shapes(model, image_shape)
    state_dict = _strip_data_parallel(state_dict)
    expected = list(_tensors(model, key_style))
    expected_keys = {key for key, _, _ in expected}
    name = type(model).__name__
    missing = [key for key, _, _ in expected if key not in state_dict]
    unexpected = [
        key
        for key in state_dict
        if key not in expected_keys and not key.endswith("num_batches_tracked")
    ]
    check(not missing, f"state_dict for {name} is missing keys: {_some(missing)}")
    check(not unexpected, f"state_dict for {name} has unexpected keys: {_some(unexpected)}")

    arrays = {key: _as_numpy(state_dict[key], f"state_dict[{key!r}]") for key in expected_keys}
    dtype = _variable_dtype(dtype, arrays.values())
    variables: Variables = {}
    for key, path, leaf in expected:
        shape = _get(template[leaf.collection], (*path, leaf.flax_name), "template").shape
        want = _torch_shape(shape, leaf.to_torch_axes)
        value = arrays[key].astype(dtype, copy=False)
        check(
            value.shape == want,
            f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {want} for {name} "
            f"at image_shape {tuple(image_shape)}",
        )
        array = jnp.asarray(_from_torch(value, leaf.to_torch_axes))
        _set(variables, (leaf.collection, *path, leaf.flax_name), array)
    return variables


def to_flat_vector(
    variables: Mapping[str, Any], model: nn.Module, *, dtype: Any = None
) -> np.ndarray:
    """MTT's flat parameter vector: ``torch.cat([p.reshape(-1) for p in net.parameters()])``.

    This is the layout of MTT's ``ReparamModule`` and of the parameter lists in MTT's expert
    buffers (``replay_buffer_*.pt``): parameters only (no running statistics), in
    ``named_parameters`` order, each in PyTorch's layout.

    Args:
        variables: variables of ``model`` (only ``'params'`` is read).
        model: the ddjax model.
        dtype: ``'float32'`` or ``'float64'``; ``None`` (default): the widest floating dtype
            of the parameters, at least float32.

    Returns:
        A vector of length ``count_params(variables)`` of that dtype.

    Raises:
        DDJaxError: the variables lack a parameter the model needs, or an unsupported ``dtype``.
    """
    pieces = [
        _to_torch(
            _as_numpy(
                _get(variables["params"], (*path, leaf.flax_name), "variables['params']"),
                f"variables['params'] at {'/'.join(path)}",
            ),
            leaf.to_torch_axes,
        ).reshape(-1)
        for _, path, leaf in _tensors(model, "mtt")
        if leaf.collection == "params"
    ]
    return np.concatenate(pieces).astype(_variable_dtype(dtype, pieces), copy=False)


def from_flat_vector(
    vector: Any, model: nn.Module, image_shape: tuple[int, int, int], *, dtype: Any = None
) -> Variables:
    """Inverse of :func:`to_flat_vector`: MTT's flat parameter vector to ddjax variables.

    BatchNorm models also get fresh running statistics (mean 0, variance 1), which is what
    MTT's ``ReparamModule`` student has, since its buffers are not part of the flat vector.

    Args:
        vector: 1-D array (numpy, JAX or a CPU tensor) of all parameters.
        model: the ddjax model.
        image_shape: (H, W, C) of the inputs.
        dtype: ``'float32'`` or ``'float64'`` for every variable (the fresh running statistics
            too); ``None`` (default): the vector's own, at least float32. JAX keeps float64
            only with ``jax_enable_x64`` on.

    Returns:
        ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models.

    Raises:
        DDJaxError: the vector is not 1-D, its length is not the model's parameter count, or
            an unsupported ``dtype``.
    """
    template = variable_shapes(model, image_shape)
    vector = _as_numpy(vector, "the flat parameter vector")
    vector = vector.astype(_variable_dtype(dtype, [vector]), copy=False)
    expected = count_params(template)
    check(
        vector.ndim == 1 and vector.size == expected,
        f"flat parameter vector has shape {tuple(vector.shape)}, expected ({expected},) for "
        f"{type(model).__name__} at image_shape {tuple(image_shape)}",
    )
    variables: Variables = {"params": {}}
    offset = 0
    for _, path, leaf in _tensors(model, "mtt"):
        if leaf.collection != "params":
            continue
        shape = _get(template["params"], (*path, leaf.flax_name), "template").shape
        torch_shape = _torch_shape(shape, leaf.to_torch_axes)
        size = math.prod(torch_shape)
        piece = vector[offset : offset + size].reshape(torch_shape)
        offset += size
        array = jnp.asarray(_from_torch(piece, leaf.to_torch_axes))
        _set(variables["params"], (*path, leaf.flax_name), array)
    if "batch_stats" in template:
        variables["batch_stats"] = _fresh_batch_stats(template["batch_stats"], vector.dtype)
    return variables


def _fresh_batch_stats(shapes: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """PyTorch's initial running statistics (mean 0, variance 1) shaped like ``shapes``."""
    fresh: dict[str, Any] = {}
    for name, node in shapes.items():
        if isinstance(node, Mapping):
            fresh[name] = _fresh_batch_stats(node, dtype)
        else:
            fresh[name] = jnp.asarray((np.ones if name == "var" else np.zeros)(node.shape, dtype))
    return fresh
