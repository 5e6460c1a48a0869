"""Streaming datasets: ImageNet-scale data read record by record instead of loaded whole.

A ``stream:`` prefix in front of a source name asks for a stream:
``stream:folder:/data/imagenet`` (ImageNet's ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``,
or Tiny-ImageNet's raw layout), ``stream:tfds:NAME`` or a TFDS name such as
``stream:imagenet2012`` (array_record files, read without TensorFlow). The package follows a
batch through its steps:

* :mod:`.records` -- :func:`open_stream`: the name -> a :class:`StreamingDataset` of
  random-access records (listed, nothing decoded), class names, normalisation, image shape;
  :func:`require_in_memory`, the refusal of stages that need the whole dataset.
* :mod:`.order` -- the global order: a permutation per (seed, epoch), global batches, each
  process's share, each example's random generator.
* :mod:`.transforms` -- decode, RandomResizedCrop + flip (train) or resize + centre crop
  (eval), normalise: what grain worker processes run.
* :mod:`.pipeline` -- :class:`BatchIterator` (grain workers, batching, prefetch onto the
  devices, ``get_state``/``set_state``) and :class:`StreamSource`, the training driver's
  :class:`~ddjax.train.BatchSource`.

grain is an optional dependency (``pip install 'ddjax[stream]'``), imported when a pipeline
first runs.
"""

from ddjax.data.streaming.order import EpochOrder
from ddjax.data.streaming.pipeline import BatchIterator, StreamBatch, StreamSource, test_chunks
from ddjax.data.streaming.records import (
    IMAGENET_EVAL_RESIZE,
    STREAM_PREFIX,
    FolderRecords,
    Records,
    StreamingDataset,
    TfdsRecords,
    is_stream,
    open_stream,
    require_in_memory,
)
from ddjax.data.streaming.transforms import Transform, crop_box

__all__ = [
    "IMAGENET_EVAL_RESIZE",
    "STREAM_PREFIX",
    "BatchIterator",
    "EpochOrder",
    "FolderRecords",
    "Records",
    "StreamBatch",
    "StreamSource",
    "StreamingDataset",
    "TfdsRecords",
    "Transform",
    "crop_box",
    "is_stream",
    "open_stream",
    "require_in_memory",
    "test_chunks",
]
