"""Tests for ddjax.data: every source, the normalisation, ZCA, and the errors users see."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from ddjax import data
from ddjax.errors import DDJaxError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None):
    """Writes an unsigned-byte IDX file (the MNIST format) by hand."""
    array = np.asarray(array)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist_dir(directory: Path, *, gz: bool, train: int = 30, test: int = 20, seed: int = 0):
    """Writes the four MNIST IDX files with random 6x5 images; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    suffix = ".gz" if gz else ""
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 6, 5), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays


# ------------------------------------------------------------------------------------------------
# MNIST family: Debian files, IDX in data_dir, corrupted IDX
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_files_is_normalised_with_published_constants():
    dataset = data.load_dataset("fashion_mnist")

    assert dataset.x_train.shape == (60000, 28, 28, 1)
    assert dataset.x_test.shape == (10000, 28, 28, 1)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert np.bincount(dataset.y_train).tolist() == [6000] * 10
    assert dataset.class_names[0] == "T-shirt/top" and dataset.class_names[9] == "Ankle boot"
    assert dataset.mean == (0.2861,) and dataset.std == (0.3530,)
    # The published constants are Fashion-MNIST's own statistics, so the result is standardised.
    assert abs(float(dataset.x_train.mean())) < 0.005
    assert abs(float(dataset.x_train.std()) - 1.0) < 0.005
    raw = data.read_idx(DEBIAN_FASHION / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(
        dataset.to_pixels(dataset.x_train[:50]), raw[:50, ..., None] / 255, atol=1e-6
    )
    labels = data.read_idx(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(dataset.y_test, labels)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_mnist_idx_files_from_data_dir(tmp_path, gz):
    arrays = write_mnist_dir(tmp_path, gz=gz)

    dataset = data.load_dataset("mnist", data_dir=str(tmp_path))

    assert dataset.image_shape == (6, 5, 1)
    assert dataset.mean == (0.1307,) and dataset.std == (0.3081,)
    np.testing.assert_array_equal(dataset.y_train, arrays["train"][1])
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k"][1])
    np.testing.assert_allclose(
        dataset.x_train[..., 0], (arrays["train"][0] / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        dataset.to_pixels(dataset.x_test)[..., 0], arrays["t10k"][0] / 255, atol=1e-6
    )


def test_idx_files_in_a_named_subfolder_of_data_dir_win_over_debian(tmp_path):
    arrays = write_mnist_dir(tmp_path / "fashion-mnist", gz=True, train=20, test=10)

    dataset = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))

    assert dataset.x_train.shape == (20, 6, 5, 1)
    np.testing.assert_array_equal(dataset.y_train, arrays["train"][1])


def test_read_idx_reads_any_idx_type(tmp_path):
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    header = (0x0C02).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    (tmp_path / "ints.idx").write_bytes(header + values.tobytes())

    result = data.read_idx(tmp_path / "ints.idx")

    np.testing.assert_array_equal(result, values)
    assert result.dtype == np.int32


def _corrupt(kind: str, directory: Path) -> str:
    """Damages one file of a valid MNIST directory; returns the damaged file's name."""
    images = directory / "train-images-idx3-ubyte"
    labels = directory / "train-labels-idx1-ubyte"
    if kind == "truncated":
        images.write_bytes(images.read_bytes()[:-7])
        return images.name
    if kind == "wrong_magic":
        write_idx(images, np.zeros((30, 6, 5)), magic=0x00000801)
        return images.name
    if kind == "label_out_of_range":
        write_idx(labels, np.full(30, 12))
        return labels.name
    if kind == "count_mismatch":
        write_idx(labels, np.zeros(29))
        return labels.name
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", ["truncated", "900 data bytes", "found 893"]),
        ("wrong_magic", ["0x00000801", "expected 0x00000803"]),
        ("label_out_of_range", ["label 12", "out of range 0..9"]),
        ("count_mismatch", ["30 images", "29 labels"]),
    ],
)
def test_corrupted_idx_gives_an_error_naming_the_file(tmp_path, kind, words):
    write_mnist_dir(tmp_path, gz=False)
    bad_file = _corrupt(kind, tmp_path)

    with pytest.raises(DDJaxError) as error:
        data.load_dataset("mnist", data_dir=str(tmp_path))

    message = str(error.value)
    assert str(tmp_path / bad_file) in message
    for word in words:
        assert word in message


def test_truncated_gzip_idx_names_the_file(tmp_path):
    write_mnist_dir(tmp_path, gz=True)
    file = tmp_path / "t10k-images-idx3-ubyte.gz"
    file.write_bytes(file.read_bytes()[:-20])

    with pytest.raises(DDJaxError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_incomplete_idx_directory_names_the_missing_files(tmp_path):
    write_mnist_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(DDJaxError, match="missing: t10k-labels"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_missing_mnist_names_every_place_looked(tmp_path):
    with pytest.raises(DDJaxError) as error:
        data.load_dataset("mnist", data_dir=str(tmp_path))

    message = str(error.value)
    assert f"IDX files in {tmp_path}" in message
    assert f"IDX files in {tmp_path / 'mnist'}" in message
    assert "/usr/share/datasets/mnist" in message
    assert "data_dir" in message


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_constants_match():
    dataset = data.load_dataset("digits")

    assert dataset.x_train.shape == (1352, 8, 8, 1) and dataset.x_test.shape == (445, 8, 8, 1)
    total = np.bincount(dataset.y_train) + np.bincount(dataset.y_test)
    np.testing.assert_array_equal(np.bincount(dataset.y_test), total // 4)
    # The literals in NORMALISATION['digits'] are the train split's own statistics.
    pixels = dataset.to_pixels(dataset.x_train).astype(np.float64)
    assert dataset.mean == data.NORMALISATION["digits"][0]
    assert abs(pixels.mean() - dataset.mean[0]) < 5e-5
    assert abs(pixels.std() - dataset.std[0]) < 5e-5
    # Pixel values are the original 0..16 scaled by 1/16.
    np.testing.assert_allclose(np.unique(np.round(pixels * 16, 4)), np.arange(17))
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(again.x_train, dataset.x_train)
    np.testing.assert_array_equal(again.y_test, dataset.y_test)


# ------------------------------------------------------------------------------------------------
# TFDS (read without TensorFlow)
# ------------------------------------------------------------------------------------------------


def test_tfds_mock_is_used_for_mnist_when_data_dir_has_no_idx_files(tmp_path):
    # data_dir holds no IDX files, so the loader falls through to TFDS in that data_dir, which
    # mock_data provides (and would be used before the Debian files).
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200):
        dataset = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
        reference = tfds.data_source("fashion_mnist", split="train")
        first = [reference[i] for i in range(3)]

    assert dataset.x_train.shape == (200, 28, 28, 1) and dataset.x_test.shape == (200, 28, 28, 1)
    assert dataset.mean == (0.2861,)
    assert dataset.class_names == data.FASHION_MNIST_CLASS_NAMES
    for i, example in enumerate(first):
        np.testing.assert_allclose(
            dataset.to_pixels(dataset.x_train[i]), example["image"] / 255, atol=1e-6
        )
        assert dataset.y_train[i] == example["label"]


def test_tfds_mock_cifar10_uses_mtt_constants_and_tfds_class_names():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200):
        dataset = data.load_dataset("cifar10", train_limit=50)
        names = tfds.builder("cifar10").info.features["label"].names

    assert dataset.x_train.shape == (50, 32, 32, 3) and dataset.x_test.shape == (200, 32, 32, 3)
    assert dataset.mean == data.NORMALISATION["cifar10"][0]
    assert dataset.std == data.NORMALISATION["cifar10"][1]
    assert dataset.class_names == tuple(names) and dataset.num_classes == 10
    assert np.bincount(dataset.y_train).tolist() == [5] * 10  # train_limit is balanced


@pytest.fixture(scope="module")
def prepared_tfds_dir(tmp_path_factory):
    """A real array_record TFDS dataset, prepared without TensorFlow (a Tensor feature)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class DdjaxTestStripes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(6, 6, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["left", "right", "up"]),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            # No 'test' split: ddjax must evaluate on 'validation'.
            return {"train": self._generate_examples(36), "validation": self._generate_examples(9)}

        def _generate_examples(self, count):
            for i in range(count):
                image = np.full((6, 6, 3), 7 * i, np.uint8)
                yield i, {"image": image, "label": i % 3}

    directory = tmp_path_factory.mktemp("tfds")
    DdjaxTestStripes(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return directory


def test_prepared_tfds_dataset_reads_with_computed_constants(prepared_tfds_dir):
    dataset = data.load_dataset("tfds:ddjax_test_stripes", data_dir=str(prepared_tfds_dir))

    assert dataset.x_train.shape == (36, 6, 6, 3) and dataset.x_test.shape == (9, 6, 6, 3)
    assert dataset.class_names == ("left", "right", "up")
    # Each image is constant 7*i; labels are i % 3, in whatever order TFDS shuffled them into.
    pixels = dataset.to_pixels(dataset.x_train)[:, 0, 0, 0] * 255
    index = np.round(pixels / 7).astype(int)
    np.testing.assert_allclose(pixels, 7 * index, atol=1e-3)
    np.testing.assert_array_equal(dataset.y_train, index % 3)
    assert sorted(index.tolist()) == list(range(36)) and dataset.y_test.shape == (9,)
    # No published constants: the train split's own statistics are used.
    np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(dataset.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_unprepared_or_unknown_tfds_dataset_gives_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DDJaxError, match="tfds build cifar10 --file_format=array_record"):
        data.load_dataset("tfds:cifar10", data_dir=str(tmp_path))
    with pytest.raises(DDJaxError, match="unknown dataset 'no_such_dataset_xyz'"):
        data.load_dataset("no_such_dataset_xyz", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# folder:PATH
# ------------------------------------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)


def test_folder_with_train_and_test_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", 4), ("test", 2)):
        for name in ("zebra", "cat"):
            for i in range(count):
                pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
                write_png(tmp_path / split / name / f"{i:02d}.png", pixels)
                written[(split, name, i)] = pixels

    dataset = data.load_dataset(f"folder:{tmp_path}")

    assert dataset.class_names == ("cat", "zebra")  # sorted folder names
    assert dataset.x_train.shape == (8, 5, 7, 3) and dataset.x_test.shape == (4, 5, 7, 3)
    np.testing.assert_array_equal(dataset.y_train, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(
        dataset.to_pixels(dataset.x_test[3]), written[("test", "zebra", 1)] / 255, atol=1e-6
    )
    np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(dataset.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_folder_with_only_class_folders_splits_20_percent_per_class(tmp_path):
    for name, count in (("a", 10), ("b", 6)):
        for i in range(count):
            write_png(tmp_path / name / f"{i}.png", np.full((4, 4, 1), i, np.uint8))

    dataset = data.load_dataset(f"folder:{tmp_path}")

    assert dataset.image_shape == (4, 4, 1)  # grayscale stays one channel
    assert np.bincount(dataset.y_test).tolist() == [2, 1]
    assert np.bincount(dataset.y_train).tolist() == [8, 5]
    again = data.load_dataset(f"folder:{tmp_path}")
    np.testing.assert_array_equal(again.x_test, dataset.x_test)


def test_folder_in_tiny_imagenet_layout(tmp_path):
    for wnid in ("n01", "n02"):
        for i in range(3):
            write_png(
                tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.png",
                np.zeros((4, 4, 3), np.uint8),
            )
    write_png(tmp_path / "test" / "images" / "test_0.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "val" / "images" / "val_0.png", np.full((4, 4, 3), 255, np.uint8))
    write_png(tmp_path / "val" / "images" / "val_1.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "val_0.png\tn02\t0\t0\t4\t4\nval_1.png\tn01\t0\t0\t4\t4\n"
    )

    dataset = data.load_dataset(f"folder:{tmp_path}", normalisation="tiny_imagenet")

    assert dataset.class_names == ("n01", "n02")
    assert len(dataset.y_train) == 6
    np.testing.assert_array_equal(dataset.y_test, [1, 0])
    assert dataset.mean == (0.485, 0.456, 0.406)
    np.testing.assert_allclose(dataset.to_pixels(dataset.x_test[0]), 1.0)


def test_folder_with_an_odd_sized_image_names_it(tmp_path):
    write_png(tmp_path / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "b" / "0.png", np.zeros((4, 5, 3), np.uint8))

    with pytest.raises(DDJaxError, match=r"b/0\.png is 5x4 pixels.*one size"):
        data.load_dataset(f"folder:{tmp_path}")


# ------------------------------------------------------------------------------------------------
# npz:PATH
# ------------------------------------------------------------------------------------------------


def npz_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2, 0, 2, 0, 2, 0, 2]),
        "x_test": rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
        "y_test": np.array([2, 1, 0]),
        "class_names": np.array(["dog", "cat", "ship"]),
    }


def test_npz_uint8_nhw(tmp_path):
    arrays = npz_arrays()
    np.savez(tmp_path / "set.npz", **arrays)

    dataset = data.load_dataset(f"npz:{tmp_path / 'set.npz'}")

    assert dataset.class_names == ("dog", "cat", "ship")
    assert dataset.x_train.shape == (12, 4, 4, 1)
    np.testing.assert_allclose(
        dataset.to_pixels(dataset.x_train)[..., 0], arrays["x_train"] / 255, atol=1e-6
    )
    np.testing.assert_array_equal(dataset.y_test, [2, 1, 0])
    np.testing.assert_array_equal(dataset.class_indices(1), [1, 4])


def test_npz_float_nhwc_without_class_names(tmp_path):
    arrays = npz_arrays()
    del arrays["class_names"]
    for split in ("train", "test"):
        arrays[f"x_{split}"] = np.repeat(arrays[f"x_{split}"][..., None] / 255.0, 3, axis=-1)
    np.savez(tmp_path / "set.npz", **arrays)

    dataset = data.load_dataset(f"npz:{tmp_path / 'set.npz'}")

    assert dataset.class_names == ("0", "1", "2")
    np.testing.assert_allclose(dataset.to_pixels(dataset.x_test), arrays["x_test"], atol=1e-6)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: a.update(y_train=a["y_train"] + 1), r"y_train\[2\] = 3 is out of range 0\.\.2"),
        (
            lambda a: a["y_train"].__setitem__(slice(None), [0, 2] * 6),
            "class 1 'cat' has no train images",
        ),
        (lambda a: a.update(x_test=np.full((3, 4, 4), np.nan)), "x_test holds a non-finite value"),
        (
            lambda a: a.update(x_train=a["x_train"] * 2.0),
            r"x_train values span \[[0-9]+, [0-9]+\]; floats must lie in \[0, 1\]",
        ),
        (lambda a: a.pop("y_test"), r"missing arrays \['y_test'\]"),
    ],
    ids=["label_range", "empty_class", "nan", "float_range", "missing"],
)
def test_bad_npz_names_the_file_and_field(tmp_path, change, pattern):
    arrays = npz_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)

    with pytest.raises(DDJaxError, match=pattern) as error:
        data.load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert str(tmp_path / "bad.npz") in str(error.value)


def test_check_ipc_names_the_smallest_class(tmp_path):
    np.savez(tmp_path / "set.npz", **npz_arrays())
    dataset = data.load_dataset(f"npz:{tmp_path / 'set.npz'}")

    data.check_ipc(dataset, 2)
    with pytest.raises(DDJaxError) as error:
        data.check_ipc(dataset, 3)
    assert str(error.value) == (
        "ipc=3 is larger than the smallest class (class 1 'cat' has 2 train images)"
    )


# ------------------------------------------------------------------------------------------------
# synthetic, limits
# ------------------------------------------------------------------------------------------------


def test_a_registered_source_is_one_entry_and_gets_the_usual_treatment(monkeypatch):
    # The seam a new source plugs into: one entry in data.SOURCES, raw splits out; the limits
    # and normalisation are load_dataset's, the same as for the built-in sources.
    calls = []

    def load(name, argument, data_dir):
        calls.append((name, argument, data_dir))
        images = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2, 1)
        labels = np.array([0, 1, 0, 1, 0, 1])
        return data.Splits(images, labels, images[:2], labels[:2], ("a", "b"), "toy source")

    monkeypatch.setitem(data.SOURCES, "toy", data.Source(load, takes_argument=True))
    dataset = data.load_dataset("toy:option=1", data_dir="/somewhere", train_limit=4)
    assert calls == [("toy", "option=1", "/somewhere")]
    assert dataset.name == "toy:option=1" and dataset.class_names == ("a", "b")
    np.testing.assert_array_equal(dataset.y_train, [0, 1, 0, 1])
    pixels = np.arange(16, dtype=np.float32).reshape(4, 2, 2, 1) / 255  # computed constants
    np.testing.assert_allclose(dataset.x_train.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(dataset.to_pixels(dataset.x_train), pixels, atol=1e-6)

    # A source without an argument answers to its bare name only; 'NAME:x' goes to TFDS.
    monkeypatch.setitem(data.SOURCES, "toy", data.Source(load))
    data.load_dataset("toy")
    assert calls[-1] == ("toy", "", None)
    with pytest.raises(DDJaxError, match="toy:x"):
        data.load_dataset("toy:x")
    assert len(calls) == 2


def test_synthetic_defaults_options_and_determinism():
    dataset = data.load_dataset("synthetic")
    assert dataset.x_train.shape == (640, 16, 16, 3) and dataset.x_test.shape == (320, 16, 16, 3)
    assert np.bincount(dataset.y_train).tolist() == [64] * 10
    np.testing.assert_array_equal(data.load_dataset("synthetic").x_train, dataset.x_train)

    small = data.load_dataset("synthetic:classes=3,size=8,channels=1,train=5,test=2,seed=1")
    assert small.x_train.shape == (15, 8, 8, 1) and small.x_test.shape == (6, 8, 8, 1)
    other_seed = data.load_dataset("synthetic:classes=3,size=8,channels=1,train=5,test=2,seed=2")
    assert not np.allclose(small.x_train, other_seed.x_train)
    with pytest.raises(DDJaxError, match="bad option 'colours=3'"):
        data.load_dataset("synthetic:colours=3")


def test_train_limit_keeps_classes_balanced_and_file_order():
    full = data.load_dataset("synthetic", normalisation="computed")
    limited = data.load_dataset("synthetic", train_limit=25, test_limit=10)

    assert np.bincount(limited.y_train).tolist() == [3] * 5 + [2] * 5
    assert np.bincount(limited.y_test).tolist() == [1] * 10
    # The first images of each class, in their original order.
    expected = np.concatenate([full.class_indices(c)[: 3 if c < 5 else 2] for c in range(10)])
    np.testing.assert_allclose(
        limited.to_pixels(limited.x_train), full.to_pixels(full.x_train[expected]), atol=1e-6
    )
    with pytest.raises(
        DDJaxError, match="class 5 'class_5' has no train images after train_limit=5"
    ):
        data.load_dataset("synthetic", train_limit=5)


# ------------------------------------------------------------------------------------------------
# ZCA
# ------------------------------------------------------------------------------------------------


def correlated_images(count: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(12, 12)) * np.linspace(1.0, 0.01, 12)
    flat = 0.5 + 0.05 * rng.normal(size=(count, 12)) @ mixing.T
    return flat.reshape(count, 2, 2, 3).astype(np.float32)


def test_zca_matches_kornia_formula_with_unbiased_covariance():
    images = correlated_images()
    flat = images.reshape(len(images), -1).astype(np.float64)

    zca = data.fit_zca(images, eps=0.1)

    # kornia ZCAWhitening: unbiased covariance, SVD, T = U diag((S + eps)^-1/2) U^T.
    covariance = np.cov(flat, rowvar=False)  # divides by N - 1
    u, s, _ = np.linalg.svd(covariance)
    expected = u @ np.diag((s + 0.1) ** -0.5) @ u.T
    np.testing.assert_allclose(zca.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(zca.whiten, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        zca.unwhiten, u @ np.diag((s + 0.1) ** 0.5) @ u.T, rtol=1e-4, atol=1e-6
    )
    # A biased (N) covariance changes the matrix by more than the tolerance above.
    biased = np.linalg.svd(covariance * (len(flat) - 1) / len(flat))
    assert not np.allclose(
        zca.whiten,
        biased[0] @ np.diag((biased[1] + 0.1) ** -0.5) @ biased[0].T,
        rtol=1e-4,
        atol=1e-6,
    )


def test_zca_whitens_large_eigen_directions_and_inverts_exactly():
    images = correlated_images(count=400) * 20  # large variances so eps matters little
    flat = images.reshape(len(images), -1).astype(np.float64)
    zca = data.fit_zca(images, eps=0.1)

    whitened = zca.apply(images).reshape(len(images), -1).astype(np.float64)

    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(flat, rowvar=False))
    variances = np.diag(eigenvectors.T @ np.cov(whitened, rowvar=False) @ eigenvectors)
    np.testing.assert_allclose(variances, eigenvalues / (eigenvalues + 0.1), rtol=1e-3, atol=1e-5)
    # Directions with variance >> eps come out with unit variance; eps keeps the noise-level
    # directions from being amplified.
    large, small = eigenvalues > 4, eigenvalues < 0.01
    assert large.sum() >= 4 and np.all(np.abs(variances[large] - 1) < 0.025)
    assert small.sum() >= 2 and np.all(variances[small] < 0.1)
    np.testing.assert_allclose(zca.inverse(zca.apply(images)), images, atol=1e-4)


def test_load_dataset_with_zca_fits_on_train_and_applies_to_test():
    plain = data.load_dataset("synthetic:size=8")
    dataset = data.load_dataset("synthetic:size=8", zca=True)

    assert dataset.mean == (0.0, 0.0, 0.0) and dataset.std == (1.0, 1.0, 1.0)
    assert dataset.zca is not None
    raw_train, raw_test = plain.to_pixels(plain.x_train), plain.to_pixels(plain.x_test)
    reference = data.fit_zca(raw_train)
    np.testing.assert_allclose(dataset.x_test, reference.apply(raw_test), atol=1e-4)
    np.testing.assert_allclose(dataset.to_pixels(dataset.x_train), raw_train, atol=1e-4)
    np.testing.assert_allclose(dataset.x_train, reference.apply(raw_train), atol=1e-4)
    np.testing.assert_allclose(dataset.zca.whiten, reference.whiten, atol=1e-5)
