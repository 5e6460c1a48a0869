"""ddjax.select: coreset baselines return the synthetic-set format with the right images."""

import numpy as np
import pytest

from ddjax import data, select
from ddjax.errors import DDJaxError


def test_herding_tracks_the_mean():
    # Points on a line; the mean is 0. Herding first takes the point nearest the mean,
    # then the point that brings the running mean back to 0.
    features = np.array([[-3.0], [-1.0], [0.2], [1.0], [5.0]])
    np.testing.assert_array_equal(select.herding(features - features.mean(), 3)[:1], [2])
    chosen = select.herding(np.array([[0.1], [-2.0], [2.0], [7.0]]), 3)
    mean = np.mean([0.1, -2.0, 2.0, 7.0])
    assert chosen[0] == int(np.argmin(np.abs(np.array([0.1, -2.0, 2.0, 7.0]) - mean)))
    assert len(set(chosen.tolist())) == 3


def test_kcenter_covers_the_extremes():
    features = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [0.05, 0.05]])
    chosen = select.kcenter(features, 3)
    # Starts near the mean, then the two far corners.
    assert set(chosen[1:].tolist()) == {2, 3}


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_select_returns_ipc_real_images_per_class(digits, method):
    synset = select.select(digits, method, 3, features="pixels", seed=1)
    assert synset.images.shape == (30, *digits.image_shape)
    np.testing.assert_array_equal(synset.labels, np.repeat(np.arange(10), 3))
    indices = np.asarray(synset.meta["indices"])
    assert len(set(indices.tolist())) == 30
    np.testing.assert_array_equal(synset.images, digits.x_train[indices])
    np.testing.assert_array_equal(digits.y_train[indices], synset.labels)
    assert synset.learning_rate is None


def test_random_depends_on_seed_only(digits):
    a = select.select(digits, "random", 2, seed=0).meta["indices"]
    b = select.select(digits, "random", 2, seed=0).meta["indices"]
    c = select.select(digits, "random", 2, seed=1).meta["indices"]
    assert a == b and a != c


def test_herding_uses_the_given_embedding(digits):
    # An embedding in which one example per class sits exactly at the class mean.
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(len(digits.y_train), 4)).astype(np.float32)
    for c in range(10):
        rows = np.flatnonzero(digits.y_train == c)
        # Placing it at the mean of the others keeps it at the mean of all.
        embedding[rows[5]] = embedding[np.delete(rows, 5)].mean(0)
    synset = select.select(digits, "herding", 1, embedding=embedding)
    expected = [np.flatnonzero(digits.y_train == c)[5] for c in range(10)]
    assert synset.meta["indices"] == expected


def test_trained_features_have_the_feature_width(digits):
    features = select.embed(digits, "random", model_overrides={"width": 16})
    assert features.shape[0] == len(digits.x_train) and features.ndim == 2
    assert np.isfinite(features).all()


def test_bad_requests_are_clear(digits):
    with pytest.raises(DDJaxError, match="method='best'"):
        select.select(digits, "best", 1)
    with pytest.raises(DDJaxError, match="ipc"):
        select.select(digits, "random", 10_000)
    with pytest.raises(DDJaxError, match="features='nope'"):
        select.embed(digits, "nope")
