"""ddjax.synfolder: a synthetic set as an ImageNet-layout folder of JPEG/PNG files.

Written batch by batch, read back lazily with the right labels and exactly the pixels of
SRe2L's JPEG round trip; a plain folder dataset for image-folder loaders; damage is an error.
"""

import numpy as np
import pytest

from ddjax import synfolder
from ddjax.data.sources.folder import list_folder
from ddjax.errors import DDJaxError
from ddjax.sre2l.recover_step import jpeg_round_trip
from ddjax.synset import load_synset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES, IPC, SHAPE = 4, 3, (12, 10, 3)


def _batches(seed=0):
    """Recover's batch order: for each ipc index, all classes (one image each)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(IPC, CLASSES, *SHAPE)).astype(np.float32)
    return [(np.arange(CLASSES), np.full(CLASSES, i), images[i]) for i in range(IPC)], images


def _write(root, image_format="jpeg", batches=None):
    writer = synfolder.SynFolderWriter(
        root, num_classes=CLASSES, ipc=IPC, image_shape=SHAPE, mean=MEAN, std=STD,
        image_format=image_format, meta={"method": "test"},
    )  # fmt: skip
    for b, (labels, ipc_ids, images) in enumerate(batches):
        writer.write_batch(b, labels, ipc_ids, images, {"loss": float(b)})
    return writer


def test_round_trip_labels_pixels_and_layout(tmp_path):
    batches, images = _batches()
    writer = _write(tmp_path / "set", batches=batches)
    assert writer.done(1)["loss"] == 1.0 and writer.done(5) is None
    folder = synfolder.open_synfolder(tmp_path / "set")
    # Set order: class 0's ipc images first, as an in-memory recovered set.
    in_class_order = images.transpose(1, 0, 2, 3, 4).reshape(-1, *SHAPE)
    np.testing.assert_array_equal(folder.labels, np.repeat(np.arange(CLASSES), IPC))
    assert folder.files[:2] == ("000/000.jpg", "000/001.jpg") and len(folder) == CLASSES * IPC
    # Exactly SRe2L's saved-JPEG pixels (recover's jpeg_round_trip), decoded batch by batch.
    expected = jpeg_round_trip(in_class_order, MEAN, STD, 75)
    np.testing.assert_array_equal(folder.take([5, 0, 11]), expected[[5, 0, 11]])
    np.testing.assert_array_equal(folder.images[2:4], expected[2:4])
    np.testing.assert_array_equal(load_synset(tmp_path / "set").images, expected)
    # An image-folder loader sees the same labels (class folders sort in class order).
    listing = list_folder(str(tmp_path / "set"))
    files = listing.train.paths() + listing.test.paths()
    labels = np.concatenate([listing.train.labels, listing.test.labels])
    assert len(files) == CLASSES * IPC and listing.class_names == ("000", "001", "002", "003")
    for file, label in zip(files, labels, strict=True):
        assert int(file.parent.name) == label


def test_png_is_lossless_in_the_uint8_codes(tmp_path):
    batches, images = _batches(1)
    _write(tmp_path / "png", "png", batches)
    folder = synfolder.open_synfolder(tmp_path / "png")
    assert folder.files[0] == "000/000.png"
    codes = synfolder.to_codes(images.transpose(1, 0, 2, 3, 4).reshape(-1, *SHAPE), MEAN, STD)
    expected = (codes.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(folder.all_images(), expected.astype(np.float32))


def test_a_folders_input_digest_is_its_recorded_fingerprint(tmp_path):
    """Results record a folder input by the SHA-256s written with its batches (nothing of
    50,000 images is read again); another image in one batch is another fingerprint."""
    from ddjax import validate

    batches, _ = _batches()
    _write(tmp_path / "a", batches=batches)
    labels, ipc_ids, images = batches[0]
    _write(tmp_path / "b", batches=[(labels, ipc_ids, images[::-1]), *batches[1:]])
    first = validate.digest(tmp_path / "a")
    assert first == "synfolder:" + synfolder.open_synfolder(tmp_path / "a").fingerprint
    assert validate.digest(tmp_path / "b") != first


def test_damage_and_misuse_are_one_line_errors(tmp_path):
    batches, _ = _batches()
    _write(tmp_path / "part", batches=batches[:2])
    with pytest.raises(DDJaxError, match="unfinished: 4 of 12 images are missing"):
        synfolder.open_synfolder(tmp_path / "part")
    with pytest.raises(DDJaxError, match="ipc=3, this run writes ipc=5"):
        synfolder.SynFolderWriter(
            tmp_path / "part", num_classes=CLASSES, ipc=5, image_shape=SHAPE, mean=MEAN, std=STD
        )
    with pytest.raises(DDJaxError, match="not a synthetic folder"):
        synfolder.open_synfolder(tmp_path)
    _write(tmp_path / "set", batches=batches)
    folder = synfolder.open_synfolder(tmp_path / "set")
    with pytest.raises(DDJaxError, match="read batch by batch"):
        np.asarray(folder.images)  # the whole set is never built by accident
    # A file replaced after recover wrote it no longer matches its recorded SHA-256.
    (tmp_path / "set" / "002" / "001.jpg").write_bytes((tmp_path / "set/000/000.jpg").read_bytes())
    folder.take([0, 1])  # other files still read
    with pytest.raises(DDJaxError, match="002/001.jpg changed since ddjax recover wrote it"):
        folder.take([7])
