"""The IDX file format (MNIST, Fashion-MNIST): one file, and the four files of a directory.

Promises: :func:`read_idx` reads any IDX file, gzipped or plain, and names the file in every
error (missing, truncated, wrong magic number, size that disagrees with the header);
:func:`read_idx_directory` finds the four MNIST-style files under any of their usual spellings.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from ddjax.data.sources.base import Splits
from ddjax.errors import DDJaxError, check

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


def read_idx_directory(directory: Path, num_classes: int) -> Splits | None:
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
    return Splits(
        *arrays["train"], *arrays["t10k"], class_names=(), source=f"IDX files in {directory}"
    )
