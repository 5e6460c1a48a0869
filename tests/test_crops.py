"""ddjax.sre2l.crops: torchvision's RandomResizedCrop, resized_crop, hflip and torch.roll.

The references are PyTorch itself: ``torchvision.transforms.functional.resized_crop`` with
``antialias=False`` when torchvision is installed, otherwise ``F.interpolate(bilinear,
align_corners=False)`` of the cropped tensor (what that torchvision function does).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddjax.errors import DDJaxError
from ddjax.sre2l import crops

try:
    import torchvision.transforms.functional as TF
except ImportError:  # torchvision is optional; its resized_crop is crop + interpolate
    TF = None


def _torch_resized_crop(image_nchw, top, left, h, w, size):
    if TF is not None:
        return TF.resized_crop(image_nchw, top, left, h, w, list(size), antialias=False)
    crop = image_nchw[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=False)


def _to_nchw(images):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2))))


def _random_pixel_boxes(rng, num, height, width):
    boxes = []
    for _ in range(num):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        boxes.append(
            (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
        )
    return np.array(boxes)


def _normalise(pixel_boxes, height, width):
    scale = np.array([height, width, height, width], np.float32)
    return jnp.asarray(pixel_boxes.astype(np.float32) / scale)


@pytest.mark.parametrize("out_size", [(12, 12), (5, 9), (16, 7)])
def test_resized_crop_equals_pytorch_bilinear(out_size):
    """Up- and down-sampling, non-square boxes and outputs, boxes touching every edge."""
    rng = np.random.default_rng(0)
    height, width = 10, 14
    images = rng.normal(size=(24, height, width, 3)).astype(np.float32)
    pixel_boxes = _random_pixel_boxes(rng, 20, height, width)
    pixel_boxes = np.concatenate(
        [pixel_boxes, [[0, 0, height, width], [9, 13, 1, 1], [0, 3, 10, 1], [4, 0, 1, 14]]]
    )
    boxes = _normalise(pixel_boxes, height, width)
    np.testing.assert_array_equal(crops.boxes_to_pixels(boxes, height, width), pixel_boxes)
    ours = np.asarray(jax.jit(crops.resized_crop, static_argnums=(2, 3))(images, boxes, *out_size))
    assert ours.shape == (24, *out_size, 3)
    nchw = _to_nchw(images)
    for n, (top, left, h, w) in enumerate(pixel_boxes):
        reference = _torch_resized_crop(nchw[n : n + 1], top, left, h, w, out_size)
        np.testing.assert_allclose(
            ours[n], reference[0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-5
        )


def test_resized_crop_gradient_equals_pytorch_autograd():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 9, 11, 2)).astype(np.float32)
    pixel_boxes = np.array([[1, 2, 6, 7], [0, 0, 9, 11], [3, 4, 2, 5]])
    cotangent = rng.normal(size=(3, 8, 6, 2)).astype(np.float32)

    def loss(x):
        out = crops.resized_crop(x, _normalise(pixel_boxes, 9, 11), 8, 6)
        return jnp.sum(out * cotangent)

    ours = np.asarray(jax.grad(loss)(jnp.asarray(images)))
    x = _to_nchw(images).requires_grad_(True)
    total = 0.0
    for n, (top, left, h, w) in enumerate(pixel_boxes):
        out = _torch_resized_crop(x[n : n + 1], top, left, h, w, (8, 6))
        total = total + (out[0].permute(1, 2, 0) * torch.from_numpy(cotangent[n])).sum()
    total.backward()
    np.testing.assert_allclose(ours, x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    # Pixels outside a box get no gradient from it.
    assert np.all(ours[2, :3] == 0) and np.all(ours[2, 5:] == 0)


def _torchvision_get_params(generator, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params algorithm, with torch's generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def test_rrc_boxes_follow_torchvision_get_params():
    """Valid integer boxes whose (h, w, top, left) distributions match torchvision's."""
    height, width, num = 16, 24, 4000
    boxes = jax.jit(crops.rrc_boxes, static_argnums=(1, 2, 3))(
        jax.random.key(0), num, height, width
    )
    assert boxes.shape == (num, 4) and boxes.dtype == jnp.float32
    pixels = np.asarray(crops.boxes_to_pixels(boxes, height, width))
    np.testing.assert_allclose(pixels / [height, width, height, width], boxes, atol=1e-7)
    top, left, h, w = pixels.T
    assert np.all((h >= 1) & (w >= 1) & (top + h <= height) & (left + w <= width))
    # Rounding of h and w moves the area and ratio a little beyond the nominal bounds.
    fraction = h * w / (height * width)
    assert fraction.min() >= 0.08 * 0.5 and fraction.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.7 and ratio.max() <= 4 / 3 / 0.7

    generator = torch.Generator().manual_seed(0)
    reference = np.array(
        [
            _torchvision_get_params(generator, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
            for _ in range(num)
        ]
    )
    for column, name in enumerate(("top", "left", "h", "w")):
        ours, theirs = pixels[:, column], reference[:, column]
        standard_error = math.sqrt(ours.var() / num + theirs.var() / num)
        assert abs(ours.mean() - theirs.mean()) < 4 * standard_error, name
        assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std() + 0.1, name


def test_rrc_boxes_fallback_is_torchvision_centre_crop():
    """No try can fit (area above the image): the centre crop with the ratio clamped."""
    wide = crops.boxes_to_pixels(crops.rrc_boxes(jax.random.key(1), 3, 8, 32, scale=(2, 3)), 8, 32)
    np.testing.assert_array_equal(wide, [[0, 10, 8, 11]] * 3)  # w = round(8·4/3) = 11
    tall = crops.boxes_to_pixels(crops.rrc_boxes(jax.random.key(1), 2, 32, 8, scale=(2, 3)), 32, 8)
    np.testing.assert_array_equal(tall, [[10, 0, 11, 8]] * 2)  # h = round(8/(3/4)) = 11
    square = crops.boxes_to_pixels(crops.rrc_boxes(jax.random.key(1), 1, 9, 9, scale=(2, 3)), 9, 9)
    np.testing.assert_array_equal(square, [[0, 0, 9, 9]])


def test_rrc_boxes_accept_a_traced_scale_bound():
    """CDA anneals the lower scale bound: one compiled program for every value."""
    fn = jax.jit(lambda key, low: crops.rrc_boxes(key, 500, 32, 32, scale=(low, 1.0)))
    big = np.asarray(crops.boxes_to_pixels(fn(jax.random.key(2), 0.9), 32, 32))
    small = np.asarray(crops.boxes_to_pixels(fn(jax.random.key(2), 0.08), 32, 32))
    assert fn._cache_size() == 1
    assert (big[:, 2] * big[:, 3]).min() >= 0.8 * 32 * 32
    assert (small[:, 2] * small[:, 3]).mean() < 0.7 * 32 * 32


def test_flip_and_roll_equal_torch():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(4, 5, 7, 2)).astype(np.float32)
    flags = np.array([True, False, True, False])
    flipped = np.asarray(crops.flip(images, flags))
    expected = _to_nchw(images)
    expected[flags] = torch.flip(expected[flags], dims=(3,))
    np.testing.assert_array_equal(flipped, expected.permute(0, 2, 3, 1).numpy())

    rolled = jax.jit(crops.roll)
    for shift_h, shift_w in ((0, 0), (3, 1), (-4, 2), (12, -9)):
        ours = np.asarray(rolled(images, shift_h, shift_w))
        reference = torch.roll(_to_nchw(images), shifts=(shift_h, shift_w), dims=(2, 3))
        np.testing.assert_array_equal(ours, reference.permute(0, 2, 3, 1).numpy())
    assert rolled._cache_size() == 1


def test_bad_arguments_are_refused():
    with pytest.raises(DDJaxError, match="height"):
        crops.rrc_boxes(jax.random.key(0), 1, 0, 8)
    with pytest.raises(DDJaxError, match="scale"):
        crops.rrc_boxes(jax.random.key(0), 1, 8, 8, scale=(0.5, 0.1))
    with pytest.raises(DDJaxError, match="boxes"):
        crops.resized_crop(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3, 4)), 4, 4)
    with pytest.raises(DDJaxError, match="flag"):
        crops.flip(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3,), bool))
