"""Tests for ddjax.augment: DSA (Zhao & Bilen 2021, as in MTT utils.py) and crop+flip.

Test-side arithmetic is done in numpy and a few image shapes are reused, because on CPU every
new (function, shape) pair is an XLA compile and compiles dominate the runtime of this file.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import augment
from ddjax.errors import DDJaxError

OPS = {
    "brightness": augment.brightness,
    "saturation": augment.saturation,
    "contrast": augment.contrast,
    "crop": augment.crop,
    "cutout": augment.cutout,
    "flip": augment.flip,
    "scale": augment.scale,
    "rotate": augment.rotate,
}
SQUARE = (8, 8, 8, 3)  # the shape most tests share
ODD = (3, 6, 9, 2)  # non-square, to catch height/width mix-ups


def _images(seed=0, shape=SQUARE):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _reference_affine(image, theta):
    """PyTorch affine_grid + grid_sample (bilinear, zeros, align_corners=True), float64 loops.

    Written from the PyTorch documentation: output pixel (i, j) has normalised coordinates
    x = -1 + 2 j / (W - 1), y = -1 + 2 i / (H - 1); theta maps them to the input point, which is
    unnormalised as (x' + 1) / 2 * (W - 1) and read bilinearly, zero outside the image.
    """
    image = np.asarray(image, np.float64)
    theta = np.asarray(theta, np.float64)
    height, width, _ = image.shape
    out = np.zeros_like(image)
    for i in range(height):
        for j in range(width):
            x = -1.0 + 2.0 * j / (width - 1)
            y = -1.0 + 2.0 * i / (height - 1)
            px = (theta[0, 0] * x + theta[0, 1] * y + theta[0, 2] + 1.0) / 2.0 * (width - 1)
            py = (theta[1, 0] * x + theta[1, 1] * y + theta[1, 2] + 1.0) / 2.0 * (height - 1)
            x0, y0 = math.floor(px), math.floor(py)
            for row in (y0, y0 + 1):
                for col in (x0, x0 + 1):
                    if 0 <= row < height and 0 <= col < width:
                        weight = (1.0 - abs(px - col)) * (1.0 - abs(py - row))
                        out[i, j] += weight * image[row, col]
    return out


def _reference_mtt_crop(images, shift_h, shift_w):
    """MTT's rand_crop gather: 1-px zero pad, indices i + shift + 1 clamped to [0, size + 1]."""
    images = np.asarray(images)
    _, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros_like(images)
    for n in range(len(images)):
        rows = np.clip(np.arange(height) + shift_h[n] + 1, 0, height + 1)
        cols = np.clip(np.arange(width) + shift_w[n] + 1, 0, width + 1)
        out[n] = padded[n][rows[:, None], cols[None, :]]
    return out


def _zero_rows_and_cols(out):
    """Per sample: how many whole rows and whole columns are zero."""
    out = np.asarray(out)
    return np.sum(np.all(out == 0, axis=(2, 3)), axis=1), np.sum(np.all(out == 0, axis=(1, 3)), 1)


# --- properties every op has ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_shape_dtype_keys_and_per_sample_parameters(name):
    op = OPS[name]
    images = _images()
    out = op(jax.random.key(1), images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, op(jax.random.key(1), images))
    assert not np.allclose(out, op(jax.random.key(2), images))
    # Identical samples come out different: parameters are drawn per sample (MTT's seed=-1).
    same = jnp.broadcast_to(images[:1], images.shape)
    out = np.asarray(op(jax.random.key(3), same))
    assert len({out[i].tobytes() for i in range(len(out))}) > 1


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_gradient_flows_to_images(name):
    images = _images()
    weights = _images(seed=5)
    grad = jax.grad(lambda x: jnp.sum(OPS[name](jax.random.key(4), x) * weights))(images)
    assert grad.shape == images.shape
    assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 0.0


# --- colour -----------------------------------------------------------------------------------


def test_brightness_adds_one_offset_per_sample_in_range():
    images = np.asarray(_images())
    delta = np.asarray(augment.brightness(jax.random.key(0), jnp.asarray(images))) - images
    offsets = delta[:, 0, 0, 0]
    np.testing.assert_allclose(
        delta, np.broadcast_to(offsets[:, None, None, None], delta.shape), atol=1e-5
    )
    assert np.all(offsets >= -0.5) and np.all(offsets < 0.5)
    assert len(np.unique(offsets)) == len(offsets)


def test_saturation_is_identity_for_one_channel_and_follows_the_formula():
    gray = _images(shape=(8, 8, 8, 1))
    np.testing.assert_array_equal(augment.saturation(jax.random.key(0), gray), gray)
    images = np.asarray(_images())
    factors = np.array([0.0, 0.5, 1.0, 1.9, 0.1, 0.2, 0.3, 0.4], np.float32)
    out = augment._adjust_saturation(jnp.asarray(images), jnp.asarray(factors))
    mean = images.mean(axis=3, keepdims=True)  # over channels only
    expected = (images - mean) * factors[:, None, None, None] + mean
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_contrast_keeps_per_sample_mean_and_factor_range():
    images = np.asarray(_images())
    out = np.asarray(augment.contrast(jax.random.key(0), jnp.asarray(images)))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=1e-5)
    centred_in = images - images.mean(axis=(1, 2, 3), keepdims=True)
    centred_out = out - out.mean(axis=(1, 2, 3), keepdims=True)
    factors = (centred_out / centred_in).reshape(len(images), -1)
    np.testing.assert_allclose(factors, factors[:, :1] * np.ones_like(factors), rtol=1e-3)
    assert np.all(factors >= 0.5 - 1e-4) and np.all(factors < 1.5 + 1e-4)


def test_color_group_is_brightness_saturation_contrast_with_split_keys():
    images = _images()
    key = jax.random.key(7)
    k_b, k_s, k_c = jax.random.split(key, 3)
    expected = augment.contrast(k_c, augment.saturation(k_s, augment.brightness(k_b, images)))
    np.testing.assert_allclose(augment.apply_group(key, images, "color"), expected, atol=1e-6)


# --- crop -------------------------------------------------------------------------------------


def test_translate_zero_is_identity_and_plus_one_moves_pixels_with_zero_fill():
    images = np.asarray(_images(shape=ODD))
    zeros = jnp.zeros((3,), jnp.int32)
    np.testing.assert_array_equal(augment._translate(jnp.asarray(images), zeros, zeros), images)
    out = np.asarray(
        augment._translate(jnp.asarray(images), jnp.array([1, 0, 0]), jnp.array([0, -1, 0]))
    )
    # Sample 0: output row i reads input row i + 1; the last row comes from outside: zero.
    np.testing.assert_array_equal(out[0, :-1], images[0, 1:])
    np.testing.assert_array_equal(out[0, -1], 0.0)
    # Sample 1: output column j reads input column j - 1; the first column is zero.
    np.testing.assert_array_equal(out[1, :, 1:], images[1, :, :-1])
    np.testing.assert_array_equal(out[1, :, 0], 0.0)


def test_translate_matches_mtt_padded_clamped_gather():
    images = _images(shape=(6, 6, 9, 2))
    shift_h = np.array([-2, 3, 0, 7, -9, 1])
    shift_w = np.array([4, -1, 0, -12, 2, 9])
    out = augment._translate(images, jnp.asarray(shift_h), jnp.asarray(shift_w))
    np.testing.assert_array_equal(out, _reference_mtt_crop(images, shift_h, shift_w))


def test_crop_shift_ranges_follow_height_and_width():
    # 8 x 16 images: shift = int(8 * 0.125 + 0.5) = 1 along H, int(16 * 0.125 + 0.5) = 2 along W.
    # On an all-ones image a shift of s zeroes exactly |s| rows (or columns).
    out = augment.crop(jax.random.key(0), jnp.ones((64, 8, 16, 1)))
    zero_rows, zero_cols = _zero_rows_and_cols(out)
    assert set(zero_rows.tolist()) == {0, 1}
    assert set(zero_cols.tolist()) == {0, 1, 2}
    # Values are copied or zero-filled, never interpolated.
    assert set(np.unique(out).tolist()) == {0.0, 1.0}


# --- cutout -----------------------------------------------------------------------------------


def test_cutout_helper_zeroes_a_square_of_the_right_side():
    out = np.asarray(
        augment._cutout(jnp.ones((2, 8, 8, 3)), jnp.array([4, 0]), jnp.array([4, 7]), 4, 4)
    )
    expected = np.ones((2, 8, 8, 3))
    expected[0, 2:6, 2:6] = 0.0  # rows and columns 4 - 4 // 2 + k for k = 0..3
    expected[1, 0:2, 5:8] = 0.0  # clipped at the top and right borders
    np.testing.assert_array_equal(out, expected)


def test_cutout_holes_are_clipped_rectangles_with_mtt_centres():
    # 8 x 16 images: side int(8 * 0.5 + 0.5) = 4 along H and 8 along W. MTT draws the centre o
    # in [0, H + 1) (even side) and cuts rows clip(o - 2 + k, 0, H - 1), k < 4; likewise W.
    out = np.asarray(augment.cutout(jax.random.key(0), jnp.ones((200, 8, 16, 1))))[..., 0]
    centres_h, centres_w = set(), set()
    for hole in out == 0:
        rows, cols = np.nonzero(hole)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        assert hole.sum() == (bottom - top + 1) * (right - left + 1)  # one rectangle
        # Recover the centre from the side of the hole that was not clipped.
        centre_h = bottom - 1 if bottom < 7 else top + 2
        centre_w = right - 3 if right < 15 else left + 4
        np.testing.assert_array_equal(
            np.unique(np.clip(centre_h - 2 + np.arange(4), 0, 7)), np.arange(top, bottom + 1)
        )
        np.testing.assert_array_equal(
            np.unique(np.clip(centre_w - 4 + np.arange(8), 0, 15)), np.arange(left, right + 1)
        )
        centres_h.add(int(centre_h))
        centres_w.add(int(centre_w))
    assert centres_h == set(range(9)) and centres_w == set(range(17))


def test_cutout_gradient_is_zero_exactly_inside_the_hole():
    images = _images()
    grad = jax.grad(lambda x: jnp.sum(augment.cutout(jax.random.key(1), x)))(images)
    hole = np.asarray(augment.cutout(jax.random.key(1), jnp.ones_like(images))) == 0
    np.testing.assert_array_equal(np.asarray(grad) == 0, hole)


# --- flip -------------------------------------------------------------------------------------


def test_flip_reverses_width_and_twice_is_identity():
    images = np.asarray(_images(shape=ODD))
    flags = jnp.array([True, False, True])
    once = np.asarray(augment._flip(jnp.asarray(images), flags))
    np.testing.assert_array_equal(once[0], images[0, :, ::-1])
    np.testing.assert_array_equal(once[1], images[1])
    np.testing.assert_array_equal(augment._flip(jnp.asarray(once), flags), images)


def test_flip_each_sample_is_original_or_mirrored_with_both_occurring():
    images = np.asarray(_images())
    out = np.asarray(augment.flip(jax.random.key(0), jnp.asarray(images)))
    mirrored = [np.array_equal(out[i], images[i, :, ::-1]) for i in range(len(out))]
    kept = [np.array_equal(out[i], images[i]) for i in range(len(out))]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 0 < sum(mirrored) < len(out)


# --- affine: scale and rotate -----------------------------------------------------------------


def test_affine_identity_theta_returns_the_image():
    images = _images(shape=ODD)
    theta = jnp.broadcast_to(jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (3, 2, 3))
    np.testing.assert_allclose(augment._affine(images, theta), images, atol=1e-5)


def test_affine_matches_reference_grid_sample():
    images = _images(shape=ODD)
    theta = np.array(
        [
            [[0.9, -0.3, 0.1], [0.25, 1.1, -0.2]],
            [[1.2, 0.0, 0.0], [0.0, 0.85, 0.0]],
            [[0.5, 0.1, 0.6], [-0.4, 0.7, 0.3]],
        ],
        np.float32,
    )
    out = augment._affine(images, jnp.asarray(theta))
    for n in range(3):
        np.testing.assert_allclose(out[n], _reference_affine(images[n], theta[n]), atol=1e-5)


def test_rotate_by_90_degrees_equals_rot90():
    # With theta = [[cos, -sin, 0], [sin, cos, 0]] at 90 degrees, output point (x, y) reads the
    # input at (-y, x): output pixel (i, j) reads input (row j, column n - 1 - i), which is
    # np.rot90(k=1), anticlockwise as displayed. PyTorch (align_corners=True) does the same.
    images = np.asarray(_images(shape=(3, 6, 6, 2)))
    expected = np.rot90(images, k=1, axes=(1, 2))
    exact = np.broadcast_to(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], np.float32), (3, 2, 3))
    np.testing.assert_allclose(
        augment._affine(jnp.asarray(images), jnp.asarray(exact)), expected, atol=1e-5
    )
    angle = np.float32(math.pi / 2)  # through float32 cos/sin, as rand_rotate computes it
    c, s = np.cos(angle), np.sin(angle)
    theta = np.broadcast_to(np.array([[c, -s, 0.0], [s, c, 0.0]], np.float32), (3, 2, 3))
    np.testing.assert_allclose(
        augment._affine(jnp.asarray(images), jnp.asarray(theta)), expected, atol=1e-5
    )


def test_affine_gradient_matches_finite_difference():
    images, weights, direction = (_images(seed=s, shape=ODD) for s in (0, 9, 10))
    theta = jnp.array(  # generic warps: rotated, sheared, scaled, shifted
        [
            [[0.95, -0.35, 0.05], [0.3, 0.9, -0.1]],
            [[1.15, 0.1, 0.0], [-0.05, 0.8, 0.2]],
            [[0.7, 0.4, -0.3], [-0.4, 1.05, 0.1]],
        ]
    )

    def loss(x):
        return jnp.sum(augment._affine(x, theta) * weights)

    grad = np.asarray(jax.grad(loss)(images), np.float64)
    eps = 1e-1  # the map is linear in the images, so a large step has no truncation error
    plus, minus = float(loss(images + eps * direction)), float(loss(images - eps * direction))
    numeric = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * np.asarray(direction)), numeric, rtol=1e-3)


def test_scale_and_rotate_identities_and_parameter_ranges():
    images = _images()
    identity_scale = augment.scale(jax.random.key(0), images, augment.DSAParams(ratio_scale=1.0))
    np.testing.assert_allclose(identity_scale, images, atol=1e-5)
    no_rotation = augment.rotate(jax.random.key(0), images, augment.DSAParams(ratio_rotate=0.0))
    np.testing.assert_allclose(no_rotation, images, atol=1e-5)

    make_thetas = jax.jit(
        lambda key: (
            augment._scale_theta(key, 500, augment.DEFAULT_PARAMS),
            augment._rotate_theta(key, 500, augment.DEFAULT_PARAMS),
        )
    )
    scales, rotations = (np.asarray(t) for t in make_thetas(jax.random.key(1)))
    diag = scales[:, [0, 1], [0, 1]]
    assert np.all(diag >= 1 / 1.2 - 1e-6) and np.all(diag < 1.2)
    assert diag.min() < 0.85 and diag.max() > 1.18
    assert not np.allclose(diag[:, 0], diag[:, 1])  # sx and sy are independent draws
    np.testing.assert_array_equal(scales[:, [0, 1, 0, 1], [1, 0, 2, 2]], 0.0)

    degrees = np.degrees(np.arctan2(rotations[:, 1, 0], rotations[:, 0, 0]))
    assert np.all(np.abs(degrees) <= 15.0 + 1e-4) and degrees.max() > 14 and degrees.min() < -14
    np.testing.assert_allclose(rotations[:, 0, 1], -rotations[:, 1, 0])


def test_scale_and_rotate_use_their_theta_from_the_same_key():
    images = _images()
    key = jax.random.key(8)
    for op, make_theta in (
        (augment.scale, augment._scale_theta),
        (augment.rotate, augment._rotate_theta),
    ):
        theta = make_theta(key, len(images), augment.DEFAULT_PARAMS)
        np.testing.assert_allclose(op(key, images), augment._affine(images, theta), atol=1e-5)


# --- dsa --------------------------------------------------------------------------------------


def test_dsa_applies_exactly_one_group_with_uniform_frequency():
    images = _images()

    @jax.jit
    def dsa_and_candidates(key):
        # lax.map, not vmap: per-key draws stay 1-D, which compiles much faster on CPU.
        _, key_apply = jax.random.split(key)
        groups = [augment.apply_group(key_apply, images, g) for g in augment.GROUPS]
        return augment.dsa(key, images), jnp.stack(groups)

    keys = jax.random.split(jax.random.key(0), 240)
    out, candidates = jax.lax.map(dsa_and_candidates, keys)
    matches = np.all(np.isclose(out[:, None], candidates, atol=1e-5), axis=(2, 3, 4, 5))
    assert np.all(matches.sum(axis=1) == 1), "exactly one group per call, never two in sequence"
    counts = matches.sum(axis=0)
    assert np.all((20 <= counts) & (counts <= 65)), counts  # about 40 each


def test_dsa_single_group_strategy_uses_key_apply_and_none_is_identity():
    images = _images()
    key = jax.random.key(3)
    _, key_apply = jax.random.split(key)
    np.testing.assert_array_equal(augment.dsa(key, images, "crop"), augment.crop(key_apply, images))
    for strategy in ("none", "None", ""):
        assert augment.dsa(key, images, strategy) is images


def test_dsa_under_jit_and_vmap_over_a_model_axis():
    # Each model of a pool augments its own batch with its own key, all inside one jit.
    keys = jax.random.split(jax.random.key(1), 24)
    stacked = jnp.stack([_images(seed=i) for i in range(24)])
    batched = np.asarray(jax.jit(jax.vmap(augment.dsa))(keys, stacked))
    for i in range(24):
        np.testing.assert_allclose(batched[i], augment.dsa(keys[i], stacked[i]), atol=1e-5)
    # The keys chose every group, so every branch was checked under jit + vmap.
    chosen = {int(augment._choose_group(jax.random.split(k)[0], 6)) for k in keys}
    assert chosen == set(range(6))
    np.testing.assert_array_equal(augment.make_augment("dsa")(keys[0], stacked[0]), batched[0])


def test_dsa_gradient_flows_to_images():
    images = _images()
    grad = jax.grad(lambda x: jnp.sum(augment.dsa(jax.random.key(0), x) ** 2))(images)
    assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 0


# --- validation -------------------------------------------------------------------------------


def test_parse_strategy():
    assert augment.parse_strategy("color_crop") == ("color", "crop")
    assert augment.parse_strategy(augment.DEFAULT_STRATEGY) == tuple(augment.GROUPS)
    assert augment.parse_strategy("none") == ()
    assert augment.parse_strategy("") == ()
    with pytest.raises(DDJaxError, match="'blur'.*color, crop, cutout, flip, scale, rotate"):
        augment.parse_strategy("color_blur")
    with pytest.raises(DDJaxError, match="unknown group ''"):
        augment.parse_strategy("color__crop")


def test_make_augment_and_params_validation():
    with pytest.raises(DDJaxError, match="'bogus'"):
        augment.make_augment("bogus")
    with pytest.raises(DDJaxError, match="'noise'"):
        augment.make_augment("dsa", strategy="crop_noise")
    with pytest.raises(DDJaxError, match="prob_flip"):
        augment.DSAParams(prob_flip=1.5)
    with pytest.raises(DDJaxError, match="ratio_scale"):
        augment.DSAParams(ratio_scale=0.0)
    images = _images()
    key = jax.random.key(0)
    assert augment.make_augment("none")(key, images) is images
    assert augment.make_augment("crop_flip") is augment.crop_flip
    hash(augment.DEFAULT_PARAMS)  # static-argument friendly


# --- crop_flip and combined -------------------------------------------------------------------


def test_crop_flip_zero_padding_and_ranges():
    ones = jnp.ones((64, 12, 12, 1))
    out = augment.crop_flip(jax.random.key(0), ones)
    assert out.shape == ones.shape and out.dtype == ones.dtype
    assert set(np.unique(out).tolist()) == {0.0, 1.0}  # zero fill, no interpolation
    zero_rows, zero_cols = _zero_rows_and_cols(out)
    assert set(zero_rows.tolist()) == set(range(5)) and set(zero_cols.tolist()) == set(range(5))
    with pytest.raises(DDJaxError, match="padding"):
        augment.crop_flip(jax.random.key(0), ones, padding=-1)


def test_crop_flip_without_padding_only_flips_and_passes_gradients():
    images = np.asarray(_images())
    out = np.asarray(augment.crop_flip(jax.random.key(1), jnp.asarray(images), padding=0))
    mirrored = [np.array_equal(out[i], images[i, :, ::-1]) for i in range(len(out))]
    kept = [np.array_equal(out[i], images[i]) for i in range(len(out))]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True)) and 0 < sum(mirrored) < 8
    grad = jax.grad(lambda x: jnp.sum(augment.crop_flip(jax.random.key(2), x)))(jnp.asarray(images))
    assert np.max(grad) == 1.0 and np.min(grad) == 0.0  # pixels shifted out get no gradient


def test_combined_applies_dsa_to_distilled_images_only_with_documented_keys():
    images = _images(shape=(10, 8, 8, 3))
    key = jax.random.key(11)
    # A cheap strategy: which groups are used does not matter for the split being tested.
    strategy = "flip_cutout"
    out = np.asarray(jax.jit(lambda k, x: augment.combined(k, x, 6, strategy))(key, images))
    key_distilled, key_rest = jax.random.split(key)
    np.testing.assert_allclose(out[6:], augment.crop_flip(key_rest, images[6:]), atol=1e-6)
    per_image = jax.random.split(key_distilled, 6)
    for i in range(6):
        expected = augment.dsa(per_image[i], images[i : i + 1], strategy)[0]
        np.testing.assert_allclose(out[i], expected, atol=1e-5)
    np.testing.assert_array_equal(
        augment.combined(key, images, 0), augment.crop_flip(key_rest, images)
    )
    with pytest.raises(DDJaxError, match="num_distilled"):
        augment.combined(key, images, 11)
