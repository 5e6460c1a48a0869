"""Datasets as small immutable in-memory records: sources, normalisation and ZCA.

Every source ends up in the same :class:`Dataset`: NHWC float32 images, normalised with the
published per-channel constants (or ZCA-whitened), int32 labels, class names, and what is needed
to turn images back into pictures. Everything here is host-side NumPy; distillation datasets
(MNIST/CIFAR scale) fit in memory, and the jitted stages take the arrays as they are.

Sources accepted by :func:`load_dataset`:

* ``fashion_mnist``, ``mnist``: the original IDX files (gzipped or plain). Looked for, in order,
  in ``data_dir`` (and ``data_dir/<name>``), then in TFDS's array_record copy in ``data_dir``,
  then where Debian's ``dataset-fashion-mnist`` package installs them
  (``/usr/share/datasets/fashion-mnist``; ``/usr/share/datasets/mnist`` for MNIST), then in TFDS's
  default data directory. A directory the user names always wins over the system locations.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), split
  deterministically into 1,352 train / 445 test images (see :func:`_load_digits`).
* ``cifar10``, ``cifar100``, ``svhn`` (TFDS ``svhn_cropped``), and any other TFDS
  image-classification dataset with ``image`` and ``label`` features, by its TFDS name or as
  ``tfds:NAME`` (the prefix forces TFDS, e.g. ``tfds:mnist`` skips the IDX lookup). They are read
  with ``tfds.data_source``, which needs no TensorFlow, but the dataset must have been prepared
  once as array_record (``tfds build NAME --file_format=array_record``, which does need
  TensorFlow). ddjax never downloads.
* ``folder:PATH``: one sub-folder per class; see :func:`_load_folder` for the split rules
  (``train``/``test``, Tiny-ImageNet's ``train``/``val``, or a deterministic 20% split).
* ``npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 in 0..255 or
  floats in [0, 1], NHW or NHWC) and optionally ``class_names``.
* ``synthetic`` or ``synthetic:classes=10,size=16,channels=3,train=64,test=32,seed=0``: oriented
  coloured stripes, procedurally generated and deterministic; for tests and smoke runs.

Normalisation: the datasets in :data:`NORMALISATION` use the published constants (those of the
DC/MTT code, so that accuracies are comparable); every other source uses the per-channel mean and
standard deviation of its own train split (after ``train_limit``). With ``zca=True`` the images
are only scaled to [0, 1] and then ZCA-whitened as MTT does (see :class:`ZCA`).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddjax.errors import DDJaxError, check

# Per-channel (mean, std) of images in [0, 1], as used by the published code.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # DC repo (Zhao et al.) utils.get_dataset; MTT's loader has no MNIST-family datasets.
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # MTT utils.get_dataset (also TESLA, DATM, SelMatch).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # MTT reuses the CIFAR-10 statistics for CIFAR-100; reproduced so that results are comparable
    # with MTT and its successors. (The DC repo uses (0.5071, 0.4866, 0.4409) /
    # (0.2673, 0.2564, 0.2762) instead.)
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # MTT uses the ImageNet statistics for Tiny-ImageNet (SelMatch uses Tiny's own). Not a source
    # name: pass ``normalisation='tiny_imagenet'`` with ``folder:PATH``.
    "tiny_imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Not published: computed once from ddjax's fixed digits train split (pixel values / 16) and
    # rounded like the others; tests/test_data.py checks that they still match.
    "digits": ((0.3057,), (0.3762,)),
}

MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# TFDS names for ddjax's own dataset names, where they differ.
_TFDS_NAMES = {"svhn": "svhn_cropped"}
_DEBIAN_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
_FOLDER_TEST_FRACTION = 0.2
# Records decoded per ``__getitems__`` call when reading a TFDS data source.
_TFDS_CHUNK = 1024


# --------------------------------------------------------------------------------------------
# ZCA whitening
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ZCA:
    """ZCA whitening exactly as MTT's ``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)``.

    Fitted on the whole train set flattened to ``D = H * W * C`` features. With the unbiased
    covariance ``Sigma = X_c^T X_c / (N - 1) = U diag(S) U^T`` of the centred images ``X_c``:

        whiten   = U diag((S + eps)^(-1/2)) U^T
        unwhiten = U diag((S + eps)^(+1/2)) U^T

    and an image ``x`` maps to ``(x - mean) @ whiten``. kornia flattens in CHW order and ddjax in
    HWC order; ZCA commutes with any permutation of the features, so the whitened images are the
    same pixel for pixel.

    Attributes:
        mean: ``(D,)`` per-feature mean of the train images.
        whiten: ``(D, D)`` symmetric whitening matrix.
        unwhiten: ``(D, D)`` its inverse, used only to turn whitened images into pictures.
    """

    mean: np.ndarray
    whiten: np.ndarray
    unwhiten: np.ndarray

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Whitens images.

        Args:
            images: ``(N, ...)`` images whose trailing dimensions hold ``D`` values (NHWC).

        Returns:
            float32 array of the same shape: ``(x - mean) @ whiten`` per image.
        """
        flat = self._flatten(images)
        return ((flat - self.mean) @ self.whiten).astype(np.float32).reshape(images.shape)

    def inverse(self, images: np.ndarray) -> np.ndarray:
        """Undoes :meth:`apply`: ``x @ unwhiten + mean`` per image.

        Args:
            images: ``(N, ...)`` whitened images (NHWC).

        Returns:
            float32 array of the same shape, in the original pixel scale ([0, 1]).
        """
        flat = self._flatten(images)
        return (flat @ self.unwhiten + self.mean).astype(np.float32).reshape(images.shape)

    def _flatten(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        dim = self.mean.shape[0]
        check(
            images.ndim >= 2 and math.prod(images.shape[1:]) == dim,
            f"ZCA was fitted on images of {dim} values each, got an array of shape {images.shape}",
        )
        return images.reshape(images.shape[0], dim).astype(np.float32, copy=False)


def fit_zca(images: np.ndarray, eps: float = 0.1) -> ZCA:
    """Fits MTT's ZCA whitening (kornia ``ZCAWhitening``) on a set of images.

    Computed in float64 (the covariance of 50,000 CIFAR images loses digits in float32); the
    eigen-decomposition uses ``eigh`` on the symmetric covariance, which for a positive
    semi-definite matrix gives the same ``U, S`` as kornia's SVD.

    Args:
        images: ``(N, H, W, C)`` (or ``(N, D)``) train images, already scaled to [0, 1].
        eps: added to every eigenvalue before the inverse square root; MTT uses 0.1.

    Returns:
        The fitted :class:`ZCA` (float32 arrays).
    """
    images = np.asarray(images)
    check(images.ndim >= 2 and images.shape[0] >= 2, "fit_zca needs at least 2 images")
    check(eps >= 0, f"zca_eps must be >= 0, got {eps}")
    count = images.shape[0]
    flat = images.reshape(count, -1)
    mean = flat.mean(axis=0, dtype=np.float64)
    dim = flat.shape[1]
    covariance = np.zeros((dim, dim), np.float64)
    # Accumulate X_c^T X_c in row chunks so that no (N, D) float64 copy is ever made.
    for start in range(0, count, 4096):
        centred = flat[start : start + 4096].astype(np.float64) - mean
        covariance += centred.T @ centred
    covariance /= count - 1  # unbiased, as kornia's default
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # eigh may return tiny negative eigenvalues for a PSD matrix (rounding); SVD would give 0.
    eigenvalues = np.maximum(eigenvalues, 0.0) + eps
    whiten = (eigenvectors * eigenvalues**-0.5) @ eigenvectors.T
    unwhiten = (eigenvectors * eigenvalues**0.5) @ eigenvectors.T
    return ZCA(
        mean=mean.astype(np.float32),
        whiten=whiten.astype(np.float32),
        unwhiten=unwhiten.astype(np.float32),
    )


# --------------------------------------------------------------------------------------------
# The dataset record
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: the source name it was loaded from (e.g. ``'cifar10'``, ``'npz:/data/x.npz'``).
        x_train: ``(N, H, W, C)`` float32 train images, normalised (or ZCA-whitened).
        y_train: ``(N,)`` int32 train labels in ``[0, num_classes)``.
        x_test: ``(M, H, W, C)`` float32 test images, transformed like the train images.
        y_test: ``(M,)`` int32 test labels.
        class_names: one name per class.
        mean: per-channel mean subtracted from images in [0, 1] (zeros with ZCA).
        std: per-channel standard deviation divided by (ones with ZCA).
        zca: the ZCA fitted on the train images, or None.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None

    def __post_init__(self) -> None:
        for field in ("x_train", "x_test"):
            images = getattr(self, field)
            check(
                images.ndim == 4 and images.dtype == np.float32,
                f"{self.name}: {field} must be float32 NHWC, got {images.dtype} {images.shape}",
            )
        check(
            self.x_test.shape[1:] == self.x_train.shape[1:],
            f"{self.name}: x_test images are {self.x_test.shape[1:]}, "
            f"x_train images are {self.x_train.shape[1:]}",
        )
        for images, labels, split in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            check(
                labels.shape == (images.shape[0],) and labels.dtype == np.int32,
                f"{self.name}: y_{split} must be int32 of shape ({images.shape[0]},), "
                f"got {labels.dtype} {labels.shape}",
            )
        channels = self.x_train.shape[-1]
        check(
            len(self.mean) == channels and len(self.std) == channels,
            f"{self.name}: mean/std need {channels} values, got {self.mean} / {self.std}",
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        height, width, channels = self.x_train.shape[1:]
        return height, width, channels

    def to_pixels(self, images: np.ndarray) -> np.ndarray:
        """Maps images in this dataset's space back to displayable pixels.

        Undoes the ZCA (if any) or the mean/std normalisation and clips, for pictures of
        synthetic sets. Works on any ``(..., H, W, C)`` array, e.g. NumPy or JAX arrays.

        Args:
            images: ``(..., H, W, C)`` images normalised (or whitened) like ``x_train``.

        Returns:
            float32 array of the same shape with values in [0, 1].
        """
        images = np.asarray(images, dtype=np.float32)
        check(
            images.ndim >= 3 and images.shape[-3:] == self.image_shape,
            f"{self.name}: to_pixels expects (..., {', '.join(map(str, self.image_shape))}) "
            f"images, got shape {images.shape}",
        )
        if self.zca is not None:
            pixels = self.zca.inverse(images.reshape(-1, *self.image_shape)).reshape(images.shape)
        else:
            pixels = images * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(pixels, 0.0, 1.0)

    def class_indices(self, c: int) -> np.ndarray:
        """Indices into ``x_train``/``y_train`` of the images of class ``c``, in order.

        Args:
            c: class index in ``[0, num_classes)``.

        Returns:
            int64 array of train indices.
        """
        check(
            0 <= c < self.num_classes,
            f"{self.name}: class {c} does not exist (valid: 0..{self.num_classes - 1})",
        )
        return np.flatnonzero(self.y_train == c)


def check_ipc(dataset: Dataset, ipc: int) -> None:
    """Checks that every class has at least ``ipc`` train images.

    Selection and distillation initialise ``ipc`` images per class from real ones, so this is
    checked before any work starts.

    Args:
        dataset: the dataset to draw from.
        ipc: images per class requested.

    Raises:
        DDJaxError: naming the smallest class and its size when it has fewer than ``ipc`` images.
    """
    check(
        isinstance(ipc, int | np.integer) and ipc >= 1, f"ipc must be an integer >= 1, got {ipc!r}"
    )
    counts = np.bincount(dataset.y_train, minlength=dataset.num_classes)
    smallest = int(np.argmin(counts))
    check(
        ipc <= counts[smallest],
        f"ipc={ipc} is larger than the smallest class (class {smallest} "
        f"'{dataset.class_names[smallest]}' has {counts[smallest]} train images)",
    )


# --------------------------------------------------------------------------------------------
# Sources: each returns raw _Splits, which load_dataset validates and normalises
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Splits:
    """Raw images (uint8 0..255 or float in [0, 1], NHWC) and labels, before normalisation."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str  # names the file or place, for error messages


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------


# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzipped or plain.

    The header is a 4-byte big-endian magic number ``0x0000TTDD`` (type code ``TT``, number of
    dimensions ``DD``), then ``DD`` big-endian uint32 sizes, then the data. Gzip is recognised by
    its content, not the file name.

    Args:
        path: the file.
        magic: if given, the magic number the file must have (``0x00000803`` for MNIST images,
            ``0x00000801`` for labels).

    Returns:
        The array, with the file's dimensions and a native-endian dtype.

    Raises:
        DDJaxError: naming the file, for a missing or unreadable file, a wrong magic number, or a
            file whose size does not match its header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as error:  # includes gzip.BadGzipFile
        raise DDJaxError(f"cannot read IDX file {path}: {error}") from error
    except EOFError as error:
        raise DDJaxError(f"IDX file {path} is a truncated gzip file: {error}") from error
    check(len(raw) >= 4, f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    found = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if magic is not None:
        check(
            found == magic,
            f"IDX file {path} has magic number 0x{found:08X}, expected 0x{magic:08X} "
            f"({_describe_magic(magic)}); is it the right file?",
        )
    check(
        raw[:2] == b"\x00\x00" and type_code in _IDX_DTYPES and ndim >= 1,
        f"IDX file {path} has magic number 0x{found:08X}, which is not an IDX header "
        "(expected 0x0000TTDD with type code TT in 08..0E and DD >= 1 dimensions)",
    )
    header = 4 + 4 * ndim
    check(len(raw) >= header, f"IDX file {path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    found_bytes = len(raw) - header
    check(
        found_bytes == expected,
        f"IDX file {path} is {'truncated' if found_bytes < expected else 'too long'}: header says "
        f"shape {shape} ({expected} data bytes), found {found_bytes} data bytes",
    )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _describe_magic(magic: int) -> str:
    dtype = _IDX_DTYPES.get((magic >> 8) & 0xFF)
    return f"{dtype.name if dtype else 'unknown type'}, {magic & 0xFF} dimensions"


def _idx_file(directory: Path, split: str, kind: str) -> Path | None:
    """Finds ``{split}-{kind}-idx?-ubyte`` in any of the spellings in circulation."""
    rank = "3" if kind == "images" else "1"
    for stem in (f"{split}-{kind}-idx{rank}-ubyte", f"{split}-{kind}.idx{rank}-ubyte"):
        for suffix in (".gz", ""):
            candidate = directory / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _read_idx_directory(directory: Path, num_classes: int) -> _Splits | None:
    """Reads the four MNIST-style IDX files from one directory, or None if it has none."""
    files = {
        (split, kind): _idx_file(directory, split, kind)
        for split in ("train", "t10k")
        for kind in ("images", "labels")
    }
    if all(found is None for found in files.values()):
        return None
    missing = [f"{split}-{kind}" for (split, kind), found in files.items() if found is None]
    check(
        not missing,
        f"{directory} holds only some of the four IDX files; missing: {', '.join(missing)} "
        "(expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, each optionally .gz)",
    )
    arrays = {}
    for split in ("train", "t10k"):
        images_file, labels_file = files[(split, "images")], files[(split, "labels")]
        images = read_idx(images_file, _IDX_IMAGES_MAGIC)
        labels = read_idx(labels_file, _IDX_LABELS_MAGIC)
        check(
            images.shape[0] == labels.shape[0],
            f"{images_file} holds {images.shape[0]} images but {labels_file} holds "
            f"{labels.shape[0]} labels",
        )
        bad = np.flatnonzero(labels >= num_classes)
        if bad.size:
            raise DDJaxError(
                f"{labels_file}: label {labels[bad[0]]} at index {bad[0]} is out of range "
                f"0..{num_classes - 1}"
            )
        arrays[split] = (images[..., None], labels)
    return _Splits(
        *arrays["train"], *arrays["t10k"], class_names=(), source=f"IDX files in {directory}"
    )


def _load_mnist_family(name: str, data_dir: str | None) -> _Splits:
    class_names = FASHION_MNIST_CLASS_NAMES if name == "fashion_mnist" else MNIST_CLASS_NAMES
    # A directory the user names wins over the system locations, in either format.
    places: list[tuple[str, Path | str | None]] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        places += [("idx", root), ("idx", root / name), ("idx", root / name.replace("_", "-"))]
        places.append(("tfds", data_dir))
    places.append(("idx", Path(_DEBIAN_DIRS[name])))
    if data_dir is None:
        places.append(("tfds", None))
    looked, tfds_reasons = [], []
    for kind, place in places:
        if kind == "idx":
            looked.append(f"IDX files in {place}")
            splits = _read_idx_directory(place, len(class_names)) if place.is_dir() else None
        else:
            looked.append(f"TFDS '{name}' in {place or 'the default TFDS data_dir'}")
            try:
                splits = _load_tfds(name, place)
            except DDJaxError as error:  # not prepared there: reported below if nothing is found
                tfds_reasons.append(str(error))
                splits = None
        if splits is not None:
            return dataclasses.replace(splits, class_names=class_names)
    how = (
        "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)"
        if name == "fashion_mnist"
        else "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...)"
    )
    raise DDJaxError(
        f"{name}: no data found. Looked for {'; '.join(looked)} (IDX files: "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, optionally .gz). To fix: {how}, or put the IDX files in a "
        "directory and pass it as data_dir (--config.data_dir=DIR). "
        f"TFDS said: {' | '.join(tfds_reasons)}"
    )


def _load_digits() -> _Splits:
    """scikit-learn's 8x8 digits with a fixed stratified split.

    Per class, in class order, one ``np.random.default_rng(0)`` draws a permutation of the
    class's indices; the first quarter (rounded down) is the test set. This gives 1,352 train and
    445 test images, independent of any seed the user sets, so results are comparable.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # values 0..16
    labels = digits.target
    rng = np.random.default_rng(0)
    test_parts = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_parts.append(members[: len(members) // 4])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test_parts)] = True
    return _Splits(
        images[~is_test],
        labels[~is_test],
        images[is_test],
        labels[is_test],
        class_names=MNIST_CLASS_NAMES,
        source="sklearn.datasets.load_digits",
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DDJaxError(
            "this dataset is read through TensorFlow Datasets, which is not installed: "
            "pip install 'ddjax[tfds]'"
        ) from error
    return tfds


def _load_tfds(name: str, data_dir: str | None) -> _Splits:
    """Reads a prepared TFDS image-classification dataset through ``tfds.data_source``."""
    tfds = _import_tfds()
    place = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"

    def open_split(split: str):
        try:
            # download=False: preparing needs TensorFlow; ddjax only reads prepared data.
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise DDJaxError(
                f"unknown dataset {name!r}: not a ddjax source (fashion_mnist, mnist, digits, "
                "cifar10, cifar100, svhn, folder:PATH, npz:PATH, synthetic) nor a TFDS name"
            ) from error
        except Exception as error:  # TFDS raises assorted types for "not prepared here"
            raise DDJaxError(
                f"TFDS dataset {name!r} split {split!r} cannot be read from {place} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Prepare it once where TensorFlow is installed: tfds build {name} "
                f"--file_format=array_record [--data_dir=DIR], then pass data_dir=DIR"
            ) from error

    train_source = open_split("train")
    info = train_source.dataset_info
    features = info.features
    check(
        "image" in features and "label" in features,
        f"TFDS dataset {name!r} is not an image-classification dataset: ddjax needs 'image' and "
        f"'label' features, it has {sorted(features.keys())}",
    )
    class_names = getattr(features["label"], "names", None)
    check(
        class_names is not None,
        f"TFDS dataset {name!r}: its 'label' feature is not a ClassLabel with class names",
    )
    # Datasets without a 'test' split (e.g. imagenette) evaluate on 'validation'. Under
    # tfds.testing.mock_data the split list is empty; 'test' is then assumed.
    available = set(info.splits.keys())
    test_split = next((s for s in ("test", "validation") if s in available), "test")
    test_source = open_split(test_split)
    source = f"TFDS '{name}' in {place}"
    train_images, train_labels = _read_tfds_source(train_source, f"{source} split 'train'")
    test_images, test_labels = _read_tfds_source(test_source, f"{source} split '{test_split}'")
    return _Splits(
        train_images,
        train_labels,
        test_images,
        test_labels,
        class_names=tuple(class_names),
        source=source,
    )


def _read_tfds_source(source, where: str) -> tuple[np.ndarray, np.ndarray]:
    count = len(source)
    check(count > 0, f"{where} is empty")
    images = None
    labels = np.empty(count, np.int64)
    batched = True
    for start in range(0, count, _TFDS_CHUNK):
        keys = list(range(start, min(count, start + _TFDS_CHUNK)))
        if batched:
            try:
                examples = source.__getitems__(keys)
            except TypeError:
                # The data source that tfds.testing.mock_data installs (TFDS 4.9) has a broken
                # __getitems__; one record at a time reads the same examples.
                batched = False
        if not batched:
            examples = [source[key] for key in keys]
        for key, example in zip(keys, examples, strict=True):
            image = np.asarray(example["image"])
            if image.ndim == 2:
                image = image[..., None]
            if images is None:
                images = np.empty((count, *image.shape), image.dtype)
            if image.shape != images.shape[1:]:
                raise DDJaxError(
                    f"{where}: example {key} is {image.shape}, example 0 is {images.shape[1:]}; "
                    "ddjax needs images of one size (prepare a resized config of the dataset)"
                )
            images[key] = image
            labels[key] = int(example["label"])
    return images, labels


def _load_npz(path: str) -> _Splits:
    file = Path(path).expanduser()
    check(file.is_file(), f"npz:{path}: file not found")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DDJaxError(f"npz:{path}: cannot read ({error})") from error
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
    check(not missing, f"{file}: missing arrays {missing} (has {sorted(arrays)})")
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        check(
            images.ndim in (3, 4),
            f"{file}: x_{split} must be NHW or NHWC, got shape {images.shape}",
        )
        if images.ndim == 3:
            arrays[f"x_{split}"] = images[..., None]
        check(
            labels.ndim == 1 and len(labels) == len(images),
            f"{file}: y_{split} must have shape ({len(images)},) to match x_{split}, "
            f"got {labels.shape}",
        )
        check(
            np.issubdtype(labels.dtype, np.integer),
            f"{file}: y_{split} must hold integer labels, got dtype {labels.dtype}",
        )
    labels_max = max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))
    if "class_names" in arrays:
        class_names = tuple(str(name) for name in arrays["class_names"].reshape(-1))
    else:
        class_names = tuple(str(c) for c in range(int(labels_max) + 1))
    return _Splits(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        class_names=class_names,
        source=str(file),
    )


def _load_folder(path: str) -> _Splits:
    """Reads images from one sub-folder per class (sorted folder names are the class names).

    Splits, in order of preference:

    * ``PATH/train/<class>/`` for training, and for testing the first of ``PATH/test``,
      ``PATH/val`` whose sub-folders are all train classes. Tiny-ImageNet's raw layout works as
      is: images may sit deeper inside a class folder (``train/<wnid>/images/*.JPEG``), its
      unlabelled ``test/images`` is skipped, and ``val/images`` is labelled from
      ``val/val_annotations.txt``.
    * Otherwise (only ``PATH/train``, or class folders directly in ``PATH``): a deterministic 20%
      of each class (rounded down; a permutation from ``np.random.default_rng(0)``, drawn class by
      class) is the test set.

    All images must have the same size (no resizing is done); grayscale images are repeated to
    three channels when the folder also holds colour images.
    """
    root = Path(path).expanduser()
    check(root.is_dir(), f"folder:{path}: not a directory")
    train_root = root / "train" if (root / "train").is_dir() else root
    class_names = _class_folders(train_root)
    check(class_names, f"folder:{path}: no class sub-folders in {train_root}")
    train_files, train_labels = _class_folder_files(train_root, class_names)
    test_files: list[Path] | None = None
    if train_root != root:
        for name in ("test", "val"):
            candidate = root / name
            annotations = candidate / "val_annotations.txt"
            if annotations.is_file():
                test_files, test_labels = _tiny_imagenet_val(candidate, annotations, class_names)
                break
            folders = _class_folders(candidate) if candidate.is_dir() else []
            if folders and set(folders) <= set(class_names):
                test_files, test_labels = _class_folder_files(candidate, class_names, folders)
                break
    if test_files is None:
        rng = np.random.default_rng(0)
        is_test = np.zeros(len(train_files), bool)
        for c in range(len(class_names)):
            members = rng.permutation(np.flatnonzero(train_labels == c))
            is_test[members[: int(len(members) * _FOLDER_TEST_FRACTION)]] = True
        test_files = [file for file, test in zip(train_files, is_test, strict=True) if test]
        test_labels = train_labels[is_test]
        train_files = [file for file, test in zip(train_files, is_test, strict=True) if not test]
        train_labels = train_labels[~is_test]
    images = _read_image_files(train_files + test_files, root)
    train_images, test_images = images[: len(train_files)], images[len(train_files) :]
    return _Splits(
        train_images,
        train_labels,
        test_images,
        test_labels,
        class_names=tuple(class_names),
        source=f"folder {root}",
    )


def _class_folders(directory: Path) -> list[str]:
    return sorted(
        entry.name for entry in directory.iterdir() if entry.is_dir() and entry.name[0] != "."
    )


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        file
        for file in directory.rglob("*")
        if file.suffix.lower() in _IMAGE_SUFFIXES and file.is_file() and file.name[0] != "."
    )


def _class_folder_files(
    directory: Path, class_names: Sequence[str], folders: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for name in class_names if folders is None else folders:
        found = _image_files(directory / name)
        check(found, f"class folder {directory / name} holds no images ({sorted(_IMAGE_SUFFIXES)})")
        files += found
        labels += [class_names.index(name)] * len(found)
    return files, np.asarray(labels, np.int64)


def _tiny_imagenet_val(
    directory: Path, annotations: Path, class_names: Sequence[str]
) -> tuple[list[Path], np.ndarray]:
    index = {name: c for c, name in enumerate(class_names)}
    files, labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        check(
            len(fields) >= 2 and fields[1] in index,
            f"{annotations} line {line_number}: expected '<file>\\t<class>' with a class among "
            f"the train folders, got {line!r}",
        )
        file = directory / "images" / fields[0]
        check(file.is_file(), f"{annotations} line {line_number}: {file} does not exist")
        files.append(file)
        labels.append(index[fields[1]])
    return files, np.asarray(labels, np.int64)


def _read_image_files(files: Sequence[Path], root: Path) -> np.ndarray:
    """Reads same-sized images to uint8 NHWC: 1 channel if all are grayscale, else 3."""
    from PIL import Image

    images: np.ndarray | None = None
    any_colour = False
    for i, file in enumerate(files):
        try:
            with Image.open(file) as picture:
                if picture.mode in ("1", "L", "LA"):
                    pixels = np.asarray(picture.convert("L"))[..., None]
                elif picture.mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
                    pixels = np.asarray(picture.convert("RGB"))
                else:  # 16-bit and float modes would need a scale ddjax cannot guess
                    raise DDJaxError(
                        f"folder {root}: image {file} has PIL mode {picture.mode!r}; "
                        "use 8-bit grayscale or RGB images"
                    )
        except OSError as error:
            raise DDJaxError(f"folder {root}: cannot read image {file}: {error}") from error
        if images is None:
            images = np.zeros((len(files), *pixels.shape[:2], 3), np.uint8)
        if pixels.shape[:2] != images.shape[1:3]:
            raise DDJaxError(
                f"folder {root}: image {file} is {pixels.shape[1]}x{pixels.shape[0]} pixels but "
                f"{files[0]} is {images.shape[2]}x{images.shape[1]}; all images must have one "
                "size (ddjax does not resize)"
            )
        images[i] = pixels  # grayscale broadcasts to three channels
        any_colour |= pixels.shape[-1] == 3
    assert images is not None  # every class folder holds at least one image
    return images if any_colour else images[..., :1]


def _parse_options(name: str, spec: str, defaults: dict[str, int]) -> dict[str, int]:
    options = dict(defaults)
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        check(
            sep == "=" and key in defaults and value.lstrip("-").isdigit(),
            f"{name}: bad option {item!r}; options are {', '.join(defaults)} as key=integer",
        )
        options[key] = int(value)
    return options


def _load_synthetic(spec: str) -> _Splits:
    """Oriented, coloured stripes: class c has angle pi*c/K, 2 + c%3 cycles and its own hue.

    Each image gets a random phase, contrast and Gaussian pixel noise (std 0.1). The class shows
    in a slight shift of the mean colour (brightness when ``channels=1``), which a linear model
    picks up partly, and in the stripes' orientation and frequency, which need a ConvNet.
    Deterministic in ``seed``.
    """
    defaults = {"classes": 10, "size": 16, "channels": 3, "train": 64, "test": 32, "seed": 0}
    options = _parse_options("synthetic", spec, defaults)
    classes, size, channels = options["classes"], options["size"], options["channels"]
    check(classes >= 2, f"synthetic: classes must be >= 2, got {classes}")
    check(size >= 4, f"synthetic: size must be >= 4, got {size}")
    check(channels in (1, 3), f"synthetic: channels must be 1 or 3, got {channels}")
    check(options["train"] >= 1, f"synthetic: train must be >= 1, got {options['train']}")
    check(options["test"] >= 0, f"synthetic: test must be >= 0, got {options['test']}")
    rng = np.random.default_rng(options["seed"])
    rows, cols = np.mgrid[0:size, 0:size] / size

    def make(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(classes), per_class)
        angle = np.pi * labels / classes
        cycles = 2 + labels % 3
        phase = rng.uniform(0, 2 * np.pi, len(labels))
        contrast = rng.uniform(0.25, 0.45, len(labels))
        position = cols * np.cos(angle)[:, None, None] + rows * np.sin(angle)[:, None, None]
        wave = np.sin(2 * np.pi * cycles[:, None, None] * position + phase[:, None, None])
        if channels == 3:
            hue = labels[:, None] / classes + np.array([0.0, 1 / 3, 2 / 3])
            shade = np.cos(2 * np.pi * hue)  # (N, 3) in [-1, 1]: the class's colour
            stripe_colour = shade
        else:
            shade = (2 * labels / (classes - 1) - 1)[:, None]  # the class's brightness
            stripe_colour = np.ones_like(shade)
        # A weak class-mean cue (learnable in a few steps) plus the stripes (needs convolutions).
        images = 0.5 + 0.08 * shade[:, None, None]
        images = images + (contrast[:, None, None] * wave)[..., None] * stripe_colour[:, None, None]
        images += rng.normal(0, 0.1, images.shape)
        return np.clip(images, 0, 1).astype(np.float32), labels

    train_images, train_labels = make(options["train"])
    test_images, test_labels = make(options["test"])
    return _Splits(
        train_images,
        train_labels,
        test_images,
        test_labels,
        class_names=tuple(f"class_{c}" for c in range(classes)),
        source="synthetic",
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    zca: bool = False,
    zca_eps: float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    normalisation: str | None = None,
) -> Dataset:
    """Loads a dataset into memory, normalised (or ZCA-whitened) and validated.

    Args:
        name: a source name (see the module docstring): ``fashion_mnist``, ``mnist``, ``digits``,
            ``cifar10``, ``cifar100``, ``svhn``, another TFDS name or ``tfds:NAME``,
            ``folder:PATH``, ``npz:PATH``, ``synthetic[:key=value,...]``.
        data_dir: where to look first: a directory with IDX files for the MNIST family, and the
            TFDS data directory for TFDS datasets.
        zca: as MTT's ``--zca``: scale images to [0, 1] only, then whiten train and test with a
            :class:`ZCA` fitted on the (possibly limited) train set.
        zca_eps: the ZCA regulariser (MTT: 0.1).
        train_limit: keep at most this many train images, chosen class by class in round-robin
            (the first image of every class, then the second, ...) in file order, so that small
            limits stay balanced. For quick runs and tests.
        test_limit: the same for the test set.
        normalisation: override the normalisation constants: a key of :data:`NORMALISATION`
            (e.g. ``'tiny_imagenet'`` for ``folder:`` Tiny-ImageNet) or ``'computed'`` to use the
            train split's own statistics. Ignored with ``zca=True``.

    Returns:
        The :class:`Dataset`.

    Raises:
        DDJaxError: for an unknown name, data that cannot be found (naming where it looked) or bad
            data (naming the file and the problem).
    """
    check(isinstance(name, str) and name, f"dataset name must be a non-empty string, got {name!r}")
    prefix, _, argument = name.partition(":")
    if prefix == "folder":
        splits = _load_folder(argument)
    elif prefix == "npz":
        splits = _load_npz(argument)
    elif prefix == "synthetic":
        splits = _load_synthetic(argument)
    elif prefix == "tfds":
        check(argument, "tfds: needs a TFDS dataset name, e.g. tfds:cifar10")
        splits = _load_tfds(argument, data_dir)
    elif name == "digits":
        splits = _load_digits()
    elif name in ("fashion_mnist", "mnist"):
        splits = _load_mnist_family(name, data_dir)
    else:
        splits = _load_tfds(_TFDS_NAMES.get(name, name), data_dir)

    if normalisation is None:
        tfds_name = argument if prefix == "tfds" else name
        key = {v: k for k, v in _TFDS_NAMES.items()}.get(tfds_name, tfds_name)
        normalisation = key if key in NORMALISATION else "computed"
    check(
        normalisation == "computed" or normalisation in NORMALISATION,
        f"normalisation={normalisation!r} is unknown; use 'computed' or one of "
        f"{sorted(NORMALISATION)}",
    )
    return _finish(name, splits, zca, zca_eps, train_limit, test_limit, normalisation)


def _finish(
    name: str,
    splits: _Splits,
    zca: bool,
    zca_eps: float,
    train_limit: int | None,
    test_limit: int | None,
    normalisation: str,
) -> Dataset:
    """Validates raw splits, applies limits, scales, normalises or whitens."""
    where = splits.source
    num_classes = len(splits.class_names)
    check(num_classes >= 1, f"{where}: no classes")
    prepared = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images = getattr(splits, f"{split}_images")
        labels = np.asarray(getattr(splits, f"{split}_labels"))
        check(
            np.issubdtype(labels.dtype, np.integer),
            f"{where}: y_{split} must hold integer labels, got {labels.dtype}",
        )
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise DDJaxError(
                f"{where}: y_{split}[{bad[0]}] = {labels[bad[0]]} is out of range "
                f"0..{num_classes - 1} ({num_classes} classes)"
            )
        if limit is not None:
            check(
                isinstance(limit, int | np.integer) and limit >= 1,
                f"{split}_limit must be a positive integer, got {limit!r}",
            )
            keep = _balanced_subset(labels, int(limit))
            images, labels = images[keep], labels[keep]
        prepared[split] = (_to_unit_interval(images, f"{where}: x_{split}"), labels)

    train_images, train_labels = prepared["train"]
    test_images, test_labels = prepared["test"]
    counts = np.bincount(train_labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        limit_note = f" after train_limit={train_limit}" if train_limit is not None else ""
        raise DDJaxError(
            f"{where}: class {empty[0]} '{splits.class_names[empty[0]]}' has no train "
            f"images{limit_note}"
        )
    channels = train_images.shape[-1]
    check(
        test_images.shape[1:] == train_images.shape[1:],
        f"{where}: test images are {test_images.shape[1:]}, train images are "
        f"{train_images.shape[1:]}",
    )

    zca_transform = None
    if zca:
        zca_transform = fit_zca(train_images, zca_eps)
        train_images = zca_transform.apply(train_images)
        test_images = zca_transform.apply(test_images)
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        if normalisation == "computed":
            mean, std = _channel_statistics(train_images)
        else:
            mean, std = NORMALISATION[normalisation]
            check(
                len(mean) == channels,
                f"{where}: normalisation {normalisation!r} has {len(mean)} channels, the images "
                f"have {channels}",
            )
        for images in (train_images, test_images):
            images -= np.asarray(mean, np.float32)
            images /= np.asarray(std, np.float32)
    return Dataset(
        name=name,
        x_train=train_images,
        y_train=train_labels.astype(np.int32),
        x_test=test_images,
        y_test=test_labels.astype(np.int32),
        class_names=tuple(splits.class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        zca=zca_transform,
    )


def _balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` examples in class round-robin order, in file order."""
    if limit >= len(labels):
        return np.arange(len(labels))
    # Rank of each example within its class (0 for the first of its class, ...).
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts
    chosen = np.lexsort((np.arange(len(labels)), rank))[:limit]
    return np.sort(chosen)


def _to_unit_interval(images: np.ndarray, field: str) -> np.ndarray:
    """Returns a fresh float32 copy in [0, 1] of uint8 (0..255) or float ([0, 1]) images."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    check(
        np.issubdtype(images.dtype, np.floating),
        f"{field} has dtype {images.dtype}; use uint8 in 0..255 or floats in [0, 1]",
    )
    finite = np.isfinite(images)
    if not finite.all():
        index = np.unravel_index(np.argmin(finite), images.shape)
        raise DDJaxError(f"{field} holds a non-finite value ({images[index]}) at index {index}")
    if images.size:
        low, high = float(images.min()), float(images.max())
        check(
            low >= 0.0 and high <= 1.0,
            f"{field} values span [{low:g}, {high:g}]; floats must lie in [0, 1] "
            "(or store uint8 in 0..255)",
        )
    return images.astype(np.float32, copy=True)


def _channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation, accumulated in float64."""
    flat = images.reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1])
    squares = np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 20):
        chunk = flat[start : start + (1 << 20)].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += (chunk**2).sum(axis=0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(squares / len(flat) - mean**2, 0.0))
    # A constant channel carries no information; dividing by 1 keeps it finite (zero).
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_from_config(section) -> Dataset:
    """The dataset a config's ``dataset`` section names (:func:`ddjax.config.dataset_section`):
    ``name``, ``data_dir``, ``zca`` and the optional ``normalisation`` and ``train_limit``."""
    return load_dataset(
        section.name,
        data_dir=section.data_dir or None,
        zca=section.zca,
        normalisation=section.get("normalisation") or None,
        train_limit=section.get("train_limit"),
    )
