"""ddjax.data.streaming: streams list what the in-memory loader lists, batches do not depend on
the number of workers or processes, and a stopped stream or training run resumes exactly."""

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ddjax import checkpoint, data, models, train
from ddjax.data.streaming import BatchIterator, StreamSource, Transform, crop_box
from ddjax.errors import DDJaxError

pytest.importorskip("grain")

CLASSES = ("n02", "n01", "n03")  # listed out of order: class names are sorted
HEIGHT, WIDTH = 40, 48


def _pixels(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour image (JPEG-friendly), HEIGHT x WIDTH."""
    coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))


def _write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".JPEG" else None)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    """ImageNet's layout in JPEG: train/<class>/*.JPEG (6 a class), val/<class>/*.JPEG (2)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in CLASSES:
            for i in range(count):
                _write(root / split / name / f"{name}_{i}.JPEG", _pixels(rng))
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Tiny-ImageNet's raw layout in PNG: train/<wnid>/images, val/images + annotations."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / f"{name}_boxes.txt").write_text("not an image\n")
        for i in range(6):
            _write(root / "train" / name / "images" / f"{name}_{i}.png", _pixels(rng))
    lines = []
    for i in range(5):
        _write(root / "val" / "images" / f"val_{i}.png", _pixels(rng))
        lines.append(f"val_{i}.png\t{CLASSES[i % 3]}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _write(root / "test" / "images" / "test_0.png", _pixels(rng))  # unlabelled: skipped
    return root


def _native(root: Path, normalisation: str = "imagenet") -> data.StreamingDataset:
    """The folder as a stream at its native size, without the eval resize."""
    return data.open_stream(
        f"stream:folder:{root}", image_size=None, eval_resize=None, normalisation=normalisation
    )


def _collect(iterator, count: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Host copies of ``(images, labels)`` of the next ``count`` batches (all if None)."""
    batches = []
    for batch in iterator:
        batches.append((np.asarray(batch.images), np.asarray(batch.labels)))
        if count is not None and len(batches) == count:
            break
    return batches


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


# ------------------------------------------------------------------------------------------------
# Listing and transforms against the in-memory loader
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["imagenet", "tiny"])
def test_stream_lists_and_decodes_what_the_in_memory_loader_does(
    layout, imagenet_folder, tiny_folder
):
    root, norm = (
        (imagenet_folder, "imagenet") if layout == "imagenet" else (tiny_folder, "tiny_imagenet")
    )
    stream = _native(root, norm)
    memory = data.load_dataset(f"folder:{root}", normalisation=norm)

    assert stream.class_names == memory.class_names == tuple(sorted(CLASSES))
    assert stream.image_shape == memory.image_shape == (HEIGHT, WIDTH, 3)
    assert (stream.mean, stream.std) == (memory.mean, memory.std)
    for records, images, labels in (
        (stream.train, memory.x_train, memory.y_train),
        (stream.test, memory.x_test, memory.y_test),
    ):
        assert [records[i][1] for i in range(len(records))] == labels.tolist()
        # The eval transform at the native size (no resize, no crop) is the loader's scaling
        # and normalisation, bit for bit.
        transform = Transform(False, stream.image_shape, None, stream.mean, stream.std, True)
        for i in range(len(records)):
            value = records[i][0]
            np.testing.assert_array_equal(transform(value, None, records.describe(i)), images[i])


def test_eval_batches_equal_the_in_memory_test_set_with_a_masked_last_batch(imagenet_folder):
    stream = _native(imagenet_folder)
    memory = data.load_dataset(f"folder:{imagenet_folder}", normalisation="imagenet")

    batches = list(BatchIterator(stream, 4, split="test"))  # 6 images: 4 + 2 (+ 2 padding)

    assert [b.batch for b in batches] == [0, 1] and all(b.images.shape[0] == 4 for b in batches)
    mask = np.concatenate([np.asarray(b.mask) for b in batches])
    np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
    images = np.concatenate([np.asarray(b.images) for b in batches])[mask]
    labels = np.concatenate([np.asarray(b.labels) for b in batches])[mask]
    np.testing.assert_array_equal(images, memory.x_test)
    np.testing.assert_array_equal(labels, memory.y_test)


def test_random_resized_crop_boxes_crops_and_flips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 375, 500)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        assert 0.08 * 0.95 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # No try fits a 10x1000 strip: torchvision's fallback, the centre of the widest 4:3 box.
    assert crop_box(rng, 10, 1000) == (0, 493, 10, 13)

    # Red increases left to right (unless flipped), green top to bottom.
    ramp = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, WIDTH).astype(np.uint8)[None, :]
    ramp[..., 1] = np.linspace(0, 255, HEIGHT).astype(np.uint8)[:, None]
    transform = Transform(True, (24, 24, 3), None, (0.0,) * 3, (1.0,) * 3, False)
    crops = [transform(ramp, np.random.default_rng((0, e)), "ramp") for e in range(40)]
    assert all(c.shape == (24, 24, 3) and c.dtype == np.float32 for c in crops)
    slopes = [np.sign(c[:, -1, 0].mean() - c[:, 0, 0].mean()) for c in crops]
    assert 5 <= slopes.count(-1) <= 35 and slopes.count(-1) + slopes.count(1) == 40
    assert len({c.tobytes() for c in crops}) == 40


# ------------------------------------------------------------------------------------------------
# Determinism: seeds, epochs, workers, processes, resume
# ------------------------------------------------------------------------------------------------


def _train_batches(stream, seed=0, count=None, **options):
    with BatchIterator(stream, 4, seed=seed, num_epochs=2, **options) as iterator:
        return _collect(iterator, count)


def test_the_seed_decides_the_batches_and_epochs_differ(imagenet_folder):
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=24, normalisation="imagenet"
    )
    first, again, other = (_train_batches(stream, seed) for seed in (0, 0, 1))

    assert len(first) == 8  # 18 images in batches of 4: 4 per epoch, the last 2 dropped
    assert first[0][0].shape == (4, 24, 24, 3)
    _assert_same_batches(first, again)
    assert not np.array_equal(first[0][0], other[0][0])
    # Epoch 1 reorders the records and crops them anew.
    epoch0 = np.concatenate([labels for _, labels in first[:4]])
    epoch1 = np.concatenate([labels for _, labels in first[4:]])
    assert np.bincount(epoch0).sum() == 16 and not np.array_equal(epoch0, epoch1)


def test_worker_processes_do_not_change_the_batches(imagenet_folder):
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=24, normalisation="imagenet"
    )
    in_process = _train_batches(stream, count=5)
    two_workers = _train_batches(stream, count=5, worker_count=2, read_threads=2)
    _assert_same_batches(in_process, two_workers)


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_processes_read_the_global_batches_of_one(imagenet_folder, split):
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=24, normalisation="imagenet"
    )

    def batches(process_index, process_count):
        iterator = BatchIterator(
            stream, 4, split=split, num_epochs=2, seed=3,
            process_index=process_index, process_count=process_count,
        )  # fmt: skip
        return [(np.asarray(b.images), np.asarray(b.labels), np.asarray(b.mask)) for b in iterator]

    one = batches(0, 1)
    halves = zip(batches(0, 2), batches(1, 2), strict=True)
    two = [tuple(np.concatenate(parts) for parts in zip(*pair, strict=True)) for pair in halves]
    assert len(one) == len(two) == (8 if split == "train" else 4)  # 2 epochs
    assert all(b[0].shape[0] == 4 for b in one)
    for a, b in zip(one, two, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_stopped_iterator_resumes_from_its_saved_state(imagenet_folder):
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=24, normalisation="imagenet"
    )
    whole = _train_batches(stream)

    iterator = BatchIterator(stream, 4, num_epochs=2)
    head = _collect(iterator, 3)
    state = iterator.get_state()
    iterator.close()
    assert state == {"epoch": 0, "batch": 3}

    resumed = BatchIterator(stream, 4, num_epochs=2, worker_count=0)
    resumed.set_state(state)
    _assert_same_batches(head + _collect(resumed), whole)


# ------------------------------------------------------------------------------------------------
# The training driver: a run killed inside an epoch resumes bit for bit
# ------------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


class _KilledAfter:
    """A source that dies when asked for more than ``batches`` batches in all."""

    per_model = False

    def __init__(self, source, batches):
        self.source, self.left = source, batches

    def epoch_batches(self, epoch, key, start_batch=0):
        for batch in self.source.epoch_batches(epoch, key, start_batch):
            if self.left == 0:
                raise _Killed
            self.left -= 1
            yield batch


def test_train_epochs_killed_inside_an_epoch_resumes_bit_identical(imagenet_folder, tmp_path):
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=16, normalisation="imagenet"
    )
    net = models.get_model("ConvNet", 3, (16, 16, 3), width=4, depth=2)
    tx = train.sgd(0.05, momentum=0.9)
    step = train.make_train_step(net, tx)

    def run(directory, kill_after=None):
        record = {"loss": np.full((2, 2), np.nan, np.float32)}

        def on_epoch(epoch, state, outputs):
            record["loss"][epoch] = outputs.loss

        source = StreamSource(stream, 4, seed=5)  # 4 batches an epoch
        if kill_after is not None:
            source = _KilledAfter(source, kill_after)
        pool = train.init_pool(net, tx, jax.random.key(0), (16, 16, 3), 2)
        with checkpoint.Checkpoints(directory, keep=None) as saves:
            result = train.train_epochs(
                pool, step, source, epochs=2, pool_mode="vmap",
                lr_schedule=lambda e: 0.05 / (e + 1), reset_optimizer_at=(1,), tx=tx,
                on_epoch=on_epoch, record=record, checkpoints=saves, checkpoint_every_batches=2,
            )  # fmt: skip
            steps = saves.all_steps()
        return result, record, steps

    whole, whole_record, _ = run(tmp_path / "whole")
    # Killed while fetching batch 3 of epoch 1, after the checkpoint before its batch 2.
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_after=7)
    (state, losses), record, steps = run(tmp_path / "killed")

    assert steps == [2, 4, 6, 8]  # batches trained: inside epoch 0, its end, inside 1, its end
    assert losses.shape == (1, 2)  # the resumed epoch only, its mean over all its batches
    np.testing.assert_array_equal(losses[0], whole[1][1])
    np.testing.assert_array_equal(record["loss"], whole_record["loss"])
    for a, b in zip(jax.tree.leaves(whole[0]), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_every_batches_needs_a_source_that_starts_inside_an_epoch(tmp_path):
    images, labels = np.zeros((8, 4, 4, 1), np.float32), np.zeros(8, np.int32)
    with checkpoint.Checkpoints(tmp_path) as saves, pytest.raises(DDJaxError, match="start_batch"):
        train.train_epochs(
            None, None, train.ArraySource(images, labels, 4), epochs=1,
            epoch_keys=lambda e: None, checkpoints=saves, checkpoint_every_batches=2,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# TFDS (mocked) and the errors users see
# ------------------------------------------------------------------------------------------------


def test_tfds_imagenet_streams_with_imagenet_constants_from_validation():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        stream = data.open_stream("stream:imagenet2012", image_size=16)
        assert stream.num_classes == 1000 and stream.mean == data.NORMALISATION["imagenet"][0]
        assert "split 'validation'" in stream.test.describe(0)
        train_batch = next(iter(BatchIterator(stream, 4, seed=0)))
        test_batches = list(BatchIterator(stream, 4, split="test"))
    assert train_batch.images.shape == (4, 16, 16, 3)
    assert len(test_batches) == 3 and int(np.asarray(test_batches[-1].mask).sum()) == 2


def test_load_dataset_refuses_a_stream_in_one_line(imagenet_folder):
    with pytest.raises(DDJaxError, match="needs the whole dataset in memory") as error:
        data.load_dataset(f"stream:folder:{imagenet_folder}")
    assert "\n" not in str(error.value) and f"'folder:{imagenet_folder}'" in str(error.value)
    with pytest.raises(DDJaxError, match="select needs the whole dataset"):
        data.require_in_memory("stream:imagenet2012", stage="select")
    data.require_in_memory("cifar10", stage="select")  # not a stream: fine


@pytest.mark.parametrize(
    "change, pattern",
    [
        ("missing", "not a directory"),
        ("empty_class", r"class folder .*n04 holds no images"),
        ("no_val", r"no test split: expected .*val"),
        ("no_normalisation", r"pass normalisation= one of \[.*'imagenet'"),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, change, pattern):
    root = tmp_path / "data"
    for split in ("train", "val"):
        _write(root / split / "n01" / "a.JPEG", np.zeros((8, 8, 3), np.uint8))
    normalisation = "imagenet"
    if change == "missing":
        root = tmp_path / "nowhere"
    elif change == "empty_class":
        (root / "train" / "n04").mkdir()
    elif change == "no_val":
        (root / "val" / "n01" / "a.JPEG").unlink()
        (root / "val" / "n01").rmdir()
    else:
        normalisation = None
    with pytest.raises(DDJaxError, match=pattern) as error:
        data.open_stream(f"stream:folder:{root}", normalisation=normalisation)
    assert "\n" not in str(error.value)


def test_other_stream_errors(imagenet_folder):
    stream = _native(imagenet_folder)
    with pytest.raises(DDJaxError, match="batch_size=6 is not divisible by the 4 processes"):
        BatchIterator(stream, 6, process_index=0, process_count=4)
    with pytest.raises(DDJaxError, match="'digits' is read whole into memory"):
        data.open_stream("stream:digits")
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DDJaxError, match="unknown dataset 'no_such_dataset_xyz'"):
        data.open_stream("stream:tfds:no_such_dataset_xyz", data_dir=str(imagenet_folder))


def test_open_stream_decodes_nothing_and_a_bad_file_is_named_when_read(tmp_path):
    for split in ("train", "val"):
        _write(tmp_path / split / "n01" / "a.JPEG", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "train" / "n01" / "b.JPEG").write_bytes(b"not a jpeg")

    stream = data.open_stream(f"stream:folder:{tmp_path}", image_size=4, normalisation="imagenet")

    assert len(stream.train) == 2
    with pytest.raises(DDJaxError, match=r"b\.JPEG: cannot decode"):
        list(BatchIterator(stream, 2, num_epochs=1))


def test_a_mesh_gets_global_arrays_sharded_over_data(imagenet_folder):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    stream = data.open_stream(
        f"stream:folder:{imagenet_folder}", image_size=8, normalisation="imagenet"
    )
    batch = next(iter(BatchIterator(stream, 4, mesh=mesh)))
    assert isinstance(batch.images, jax.Array) and batch.images.shape == (4, 8, 8, 3)
    assert batch.images.sharding.spec == jax.sharding.PartitionSpec("data")


@pytest.mark.parametrize("size", [(333, 251), (251, 333), (500, 375)])
def test_validation_is_torchvisions_resize_256_centre_crop_224(tmp_path, size):
    """ImageNet's eval transform: Resize(256) (shorter side, longer side truncated), PIL
    bilinear, CenterCrop(224) at offsets int(round((H - 224) / 2)), ToTensor, Normalize.

    Stated here from torchvision's definitions (its ``_compute_resized_output_size`` and
    ``center_crop``) on an odd-sized JPEG where the rounding matters; where torchvision imports,
    its own transforms give the same pixels.
    """
    rng = np.random.default_rng(sum(size))
    path = tmp_path / "x.JPEG"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path, quality=90)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    resize = round(224 * data.streaming.IMAGENET_EVAL_RESIZE)
    assert resize == 256
    transform = Transform(False, (224, 224, 3), resize, mean, std, False)
    got = transform(path.read_bytes(), None, str(path))

    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(256 * long / short)
        new = (256, new_long) if width <= height else (new_long, 256)
        resized = image.resize(new, Image.Resampling.BILINEAR)
        top = int(round((resized.height - 224) / 2.0))
        left = int(round((resized.width - 224) / 2.0))
        crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    expected = (crop - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    try:
        from torchvision import transforms  # noqa: PLC0415 -- not installable everywhere
    except ImportError:
        return
    pipeline = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
         transforms.Normalize(mean, std)]
    )  # fmt: skip
    with Image.open(path) as image:
        reference = pipeline(image.convert("RGB")).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
