"""Datasets as small immutable in-memory records: sources, normalisation and ZCA.

Every source ends up in the same :class:`Dataset`: NHWC float32 images, normalised with the
published per-channel constants (or ZCA-whitened), int32 labels, class names, and what is needed
to turn images back into pictures. Everything here is host-side NumPy; distillation datasets
(MNIST/CIFAR scale) fit in memory, and the jitted stages take the arrays as they are. Datasets
that do not fit (ImageNet) are streamed instead (``stream:NAME``, :mod:`ddjax.data.streaming`).

The package follows one dataset through its steps:

* :mod:`ddjax.data.sources` -- the registry of sources by name (``fashion_mnist``, ``mnist``,
  ``digits``, TFDS names and ``tfds:NAME``, ``folder:PATH``, ``npz:PATH``, ``synthetic``), one
  module each, returning raw images and labels. Adding a source is one module and one entry.
* :mod:`ddjax.data.loading` -- :func:`load_dataset`: limits, scaling, normalisation or ZCA.
* :mod:`ddjax.data.normalisation` -- the published constants (:data:`NORMALISATION`).
* :mod:`ddjax.data.zca` -- MTT's ZCA whitening (:class:`ZCA`, :func:`fit_zca`).
* :mod:`ddjax.data.dataset` -- the :class:`Dataset` record and :func:`check_ipc`.
* :mod:`ddjax.data.streaming` -- datasets too large for memory (ImageNet), named
  ``stream:SOURCE``: :func:`open_stream`, a grain pipeline and the training driver's
  :class:`StreamSource`; :func:`require_in_memory` is the refusal of stages that cannot stream.

Normalisation: the datasets in :data:`NORMALISATION` use the published constants (those of the
DC/MTT code, so that accuracies are comparable); every other source uses the per-channel mean and
standard deviation of its own train split (after ``train_limit``). With ``zca=True`` the images
are only scaled to [0, 1] and then ZCA-whitened as MTT does (see :class:`ZCA`).
"""

from ddjax.data.dataset import Dataset, check_ipc
from ddjax.data.loading import load_dataset, load_from_config, open_from_config
from ddjax.data.normalisation import NORMALISATION
from ddjax.data.sources import SOURCES, Source, Splits
from ddjax.data.sources.idx import read_idx
from ddjax.data.sources.mnist import FASHION_MNIST_CLASS_NAMES, MNIST_CLASS_NAMES
from ddjax.data.streaming import (
    StreamingDataset,
    StreamSource,
    is_stream,
    open_stream,
    require_in_memory,
)
from ddjax.data.zca import ZCA, fit_zca

__all__ = [
    "FASHION_MNIST_CLASS_NAMES",
    "MNIST_CLASS_NAMES",
    "NORMALISATION",
    "SOURCES",
    "ZCA",
    "Dataset",
    "Source",
    "Splits",
    "StreamSource",
    "StreamingDataset",
    "check_ipc",
    "fit_zca",
    "is_stream",
    "load_dataset",
    "load_from_config",
    "open_from_config",
    "open_stream",
    "read_idx",
    "require_in_memory",
]
