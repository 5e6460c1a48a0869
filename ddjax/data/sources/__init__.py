"""Where datasets come from: a registry of sources by name, each reading raw :class:`Splits`.

Sources accepted by :func:`ddjax.data.load_dataset` (the registry :data:`SOURCES`):

* ``fashion_mnist``, ``mnist`` (:mod:`.mnist`): the original IDX files (gzipped or plain). Looked
  for, in order, in ``data_dir`` (and ``data_dir/<name>``), then in TFDS's array_record copy in
  ``data_dir``, then where Debian's ``dataset-fashion-mnist`` package installs them
  (``/usr/share/datasets/fashion-mnist``; ``/usr/share/datasets/mnist`` for MNIST), then in
  TFDS's default data directory. A directory the user names always wins over the system
  locations.
* ``digits`` (:mod:`.digits`): scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  download), split deterministically into 1,352 train / 445 test images.
* ``cifar10``, ``cifar100``, ``svhn`` (TFDS ``svhn_cropped``), and any other TFDS
  image-classification dataset with ``image`` and ``label`` features, by its TFDS name or as
  ``tfds:NAME`` (:mod:`.tfds`; the prefix forces TFDS, e.g. ``tfds:mnist`` skips the IDX lookup).
  They are read with ``tfds.data_source``, which needs no TensorFlow, but the dataset must have
  been prepared once as array_record (``tfds build NAME --file_format=array_record``, which does
  need TensorFlow). ddjax never downloads.
* ``folder:PATH`` (:mod:`.folder`): one sub-folder per class (``train``/``test``,
  Tiny-ImageNet's ``train``/``val``, or a deterministic 20% split).
* ``npz:PATH`` (:mod:`.npz`): arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 in
  0..255 or floats in [0, 1], NHW or NHWC) and optionally ``class_names``.
* ``synthetic`` or ``synthetic:classes=10,size=16,channels=3,train=64,test=32,seed=0``
  (:mod:`.synthetic`): oriented coloured stripes, procedurally generated and deterministic; for
  tests and smoke runs.

Any other name is looked up in TFDS. Adding a source is one module with a
``load(name, argument, data_dir) -> Splits`` function and one entry in :data:`SOURCES`; the
module returns raw images and labels and leaves limits, normalisation and ZCA to
:mod:`ddjax.data.loading`.
"""

from __future__ import annotations

from ddjax.data.sources import digits, folder, mnist, npz, synthetic, tfds
from ddjax.data.sources.base import Source, Splits

# Sources by the name (or the prefix before ':') they answer to.
SOURCES: dict[str, Source] = {
    "fashion_mnist": Source(mnist.load),
    "mnist": Source(mnist.load),
    "digits": Source(digits.load),
    "folder": Source(folder.load, takes_argument=True),
    "npz": Source(npz.load, takes_argument=True),
    "synthetic": Source(synthetic.load, takes_argument=True),
    "tfds": Source(tfds.load_prefixed, takes_argument=True),
}


def load_splits(name: str, data_dir: str | None) -> Splits:
    """Reads the raw splits of the dataset ``name`` from the source that answers to it.

    Args:
        name: a dataset name: a key of :data:`SOURCES`, ``KEY:ARGUMENT`` for a source that takes
            an argument, or any other name, which is read from TFDS (ddjax's ``svhn`` is TFDS's
            ``svhn_cropped``).
        data_dir: ``load_dataset``'s ``data_dir``, passed on to the source.

    Returns:
        The source's raw :class:`Splits`.
    """
    prefix, colon, argument = name.partition(":")
    source = SOURCES.get(prefix)
    if source is not None and (source.takes_argument or not colon):
        return source.load(prefix, argument, data_dir)
    return tfds.load_tfds(tfds.TFDS_NAMES.get(name, name), data_dir)


def canonical_name(name: str) -> str:
    """ddjax's name for the dataset ``name`` reads: ``'tfds:svhn_cropped'`` -> ``'svhn'``.

    Used to find a dataset's published normalisation constants whichever way it was named.
    """
    prefix, _, argument = name.partition(":")
    tfds_name = argument if prefix == "tfds" else name
    return {v: k for k, v in tfds.TFDS_NAMES.items()}.get(tfds_name, tfds_name)


__all__ = ["SOURCES", "Source", "Splits", "canonical_name", "load_splits"]
