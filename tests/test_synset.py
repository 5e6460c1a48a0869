"""The synthetic-set file format, picture grids and config overrides."""

import numpy as np
import pytest
from PIL import Image

from ddjax import config as config_lib
from ddjax.errors import DDJaxError
from ddjax.synset import SyntheticSet, image_grid, load_synset, save_grid


def _synset(soft=False, lr=0.02):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 4, 5, 1)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    if soft:
        labels = np.eye(3, dtype=np.float32)[labels] * 0.9 + 0.1 / 3
    return SyntheticSet(images, labels, 3, lr, {"method": "test", "ipc": 2})


@pytest.mark.parametrize("soft, lr", [(False, 0.02), (True, None)])
def test_save_load_round_trip(tmp_path, soft, lr):
    synset = _synset(soft, lr)
    path = synset.save(tmp_path / "a" / "synset.npz")
    back = load_synset(path)
    np.testing.assert_array_equal(back.images, synset.images)
    np.testing.assert_array_equal(back.labels, synset.labels)
    assert back.learning_rate == lr and back.num_classes == 3 and back.meta == synset.meta
    np.testing.assert_array_equal(back.hard_labels, [0, 0, 1, 1, 2, 2])
    assert back.ipc == 2
    assert not list(tmp_path.glob("a/*.tmp*"))  # written atomically, nothing left behind


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DDJaxError, match="does not exist"):
        load_synset(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DDJaxError, match="other.npz.*missing"):
        load_synset(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DDJaxError, match="junk.npz"):
        load_synset(tmp_path / "junk.npz")
    with pytest.raises(DDJaxError, match="3 labels"):
        SyntheticSet(np.zeros((2, 4, 4, 1)), np.zeros(3, np.int32), 3)


def test_grid_has_one_row_per_class(tmp_path):
    synset = _synset()
    pixels = np.stack([np.full((4, 5, 1), v) for v in np.linspace(0, 1, 6)])
    grid = image_grid(pixels, synset.labels, 3)
    assert grid.shape == (3 * 5 + 1, 2 * 6 + 1, 1)
    # Class 1's second image (value 0.6) sits in row 1, column 1.
    np.testing.assert_allclose(grid[1 + 5 : 5 + 5, 1 + 6 : 6 + 6], 0.6)
    path = save_grid(tmp_path / "g.png", synset, lambda x: np.clip(x * 0.2 + 0.5, 0, 1), upscale=2)
    assert Image.open(path).size == ((2 * 6 + 1) * 2, (3 * 5 + 1) * 2)


def test_config_overrides_keep_types_and_parse_lists():
    config = config_lib.load_config(
        "configs/select/digits.py",
        [
            "ipc=3",
            "eval.models=ConvNet,VGG11",
            "eval.lr=0.05",
            "evaluate=false",
            "dataset.zca=True",
        ],
    )
    assert config.ipc == 3 and config.eval.models == ("ConvNet", "VGG11")
    assert config.eval.lr == 0.05 and config.evaluate is False and config.dataset.zca is True
    with pytest.raises(DDJaxError, match="unknown field 'eval.epoch'"):
        config_lib.load_config("configs/select/digits.py", ["eval.epoch=3"])
    with pytest.raises(DDJaxError, match="must look like"):
        config_lib.load_config("configs/select/digits.py", ["ipc"])
