"""The grain pipeline of a stream, its checkpointable position, and the training driver's source.

Promises:

* :class:`BatchIterator` yields one :class:`StreamBatch` per global batch, in order: this
  process's ``B/P`` examples of it (:mod:`ddjax.data.streaming.order`), decoded and transformed
  in ``worker_count`` grain worker processes (0: in this process), batched, and put on the
  devices by a background thread -- as a global ``jax.Array`` sharded over the mesh's ``data``
  axis (``jax.make_array_from_process_local_data``) when a mesh is given, else on the default
  device.
* **Position as state.** The pipeline is a pure function of ``(seed, epoch, batch index)``, so
  the iterator's state is ``{'epoch', 'batch'}`` of the next batch (:meth:`BatchIterator.
  get_state`): restoring it builds the pipeline from that batch on and yields exactly the
  batches an uninterrupted iterator would. This is used rather than grain's own
  ``get_state``: grain's state of a multi-process pipeline holds one entry per worker and so
  ties a checkpoint to the worker count, and it counts batches already sitting in prefetch
  buffers; two integers resume with any number of workers or processes.
* :class:`StreamSource` is a :class:`ddjax.train.BatchSource` over the train split that can
  start an epoch at any batch (``epoch_batches(epoch, key, start_batch)``), which is what
  :func:`ddjax.train.train_epochs` needs to checkpoint inside an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from ddjax.data.streaming.order import EpochOrder, Examples
from ddjax.data.streaming.records import StreamingDataset
from ddjax.data.streaming.transforms import Transform
from ddjax.errors import DDJaxError, check

# A run with no epoch count goes on "forever": this many global batches (grain's ranges are
# lazy, so the bound costs nothing).
_ENDLESS = 1 << 40


class StreamBatch(NamedTuple):
    """One global batch, this process's part of it.

    Attributes:
        images: ``(B, H, W, C)`` float32, normalised (the global batch as a ``jax.Array``
            sharded over ``data`` when the iterator has a mesh; with ``P`` processes and no
            mesh, this process's ``(B/P, H, W, C)``).
        labels: int32 class indices.
        mask: True for real examples, False for the padding of an eval epoch's last batch.
        epoch: the epoch the batch belongs to.
        batch: its index in the epoch.
    """

    images: Any
    labels: Any
    mask: Any
    epoch: int
    batch: int


def _import_grain():
    # Imported on first use: grain is an optional dependency (the 'stream' extra).
    try:
        import grain
    except ImportError as error:
        raise DDJaxError(
            "streaming datasets are read with grain, which is not installed: "
            "pip install 'ddjax[stream]'"
        ) from error
    from absl import flags

    # grain 0.2.18 reads an absl flag when it starts worker processes and fails unless absl's
    # flags are parsed; outside an absl app nobody parses them. Marking them parsed keeps every
    # flag at its default.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


class BatchIterator:
    """The batches of one split of a :class:`StreamingDataset`, epoch after epoch.

    Args:
        dataset: from :func:`ddjax.data.open_stream`.
        batch_size: the global batch size ``B`` (divisible by the process count).
        split: ``'train'`` (a fresh permutation each epoch, random crop and flip, the last
            partial batch dropped) or ``'test'`` (file order, resize and centre crop, the last
            batch padded and masked).
        seed: the run's seed (the order and the crops of every epoch derive from it).
        epoch, batch: where to start (a saved :meth:`get_state`).
        num_epochs: stop after the epoch ``num_epochs - 1``; ``None``: never (train) -- the
            eval split defaults to one epoch.
        worker_count: grain worker processes decoding and transforming (0: in this process).
        read_threads: extra threads per process reading and transforming records (grain
            ``ReadOptions.num_threads``; PIL releases the GIL while decoding). 0: the thread
            that iterates does it -- in this process the prefetch thread, so decoding still
            overlaps training.
        prefetch: batches put on the devices ahead by the background thread.
        mesh: place batches as global arrays sharded over ``mesh``'s ``data`` axis (its
            devices in process order, as ``jax.make_mesh`` lists them); ``None``: the default
            device.
        process_index, process_count: this process and the number of processes (default
            ``jax.process_index()``, ``jax.process_count()``); simulated in tests.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        epoch: int = 0,
        batch: int = 0,
        num_epochs: int | None = None,
        worker_count: int = 0,
        read_threads: int = 0,
        prefetch: int = 2,
        mesh: jax.sharding.Mesh | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
        for field, value, low in (
            ("worker_count", worker_count, 0),
            ("read_threads", read_threads, 0),
            ("prefetch", prefetch, 1),
        ):
            check(
                isinstance(value, int) and value >= low,
                f"{field} must be an integer >= {low}, got {value!r}",
            )
        check(
            num_epochs is None or (isinstance(num_epochs, int) and num_epochs >= 1),
            f"num_epochs must be a positive integer or None, got {num_epochs!r}",
        )
        train = split == "train"
        records = dataset.train if train else dataset.test
        self.order = EpochOrder(
            num_records=len(records),
            batch_size=batch_size,
            process_index=jax.process_index() if process_index is None else process_index,
            process_count=jax.process_count() if process_count is None else process_count,
            shuffle=train,
            drop_last=train,
            seed=seed,
        )
        resize_to = None
        if not train and dataset.eval_resize is not None and dataset.image_size is not None:
            resize_to = round(dataset.image_size * dataset.eval_resize)
        transform = Transform(
            train=train,
            image_shape=dataset.image_shape,
            resize_to=resize_to,
            mean=dataset.mean,
            std=dataset.std,
            native=dataset.image_size is None,
        )
        self.examples = Examples(records, self.order, transform)
        self.num_epochs = num_epochs if num_epochs is not None or train else 1
        self.worker_count, self.read_threads, self.prefetch = worker_count, read_threads, prefetch
        self.mesh = mesh
        self._iterator = None
        self.set_state({"epoch": epoch, "batch": batch})

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the same in every process)."""
        return self.order.batches_per_epoch

    def get_state(self) -> dict[str, int]:
        """``{'epoch', 'batch'}`` of the next batch: all a checkpoint needs to resume."""
        return {
            "epoch": self._next // self.batches_per_epoch,
            "batch": self._next % self.batches_per_epoch,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Continues at ``state`` (from :meth:`get_state`); the pipeline restarts there."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        check(
            epoch >= 0 and 0 <= batch < self.batches_per_epoch,
            f"stream position epoch={epoch} batch={batch} is not valid "
            f"({self.batches_per_epoch} batches per epoch)",
        )
        self.close()
        self._next = epoch * self.batches_per_epoch + batch

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> StreamBatch:
        stop = _ENDLESS if self.num_epochs is None else self.num_epochs * self.batches_per_epoch
        if self._next >= stop:
            self.close()
            raise StopIteration
        if self._iterator is None:
            self._iterator = iter(self._pipeline(self._next, stop))
        arrays = next(self._iterator)
        epoch, batch = divmod(self._next, self.batches_per_epoch)
        self._next += 1
        return StreamBatch(arrays["image"], arrays["label"], arrays["mask"], epoch, batch)

    def _pipeline(self, start: int, stop: int):
        """The grain dataset of global batches ``[start, stop)`` (counted over all epochs)."""
        grain = _import_grain()
        local = self.order.local_batch_size
        dataset = (
            grain.MapDataset.range(start * local, stop * local)
            .map(self.examples)
            .batch(local, drop_remainder=True)
        )
        # A small read-ahead: a batch of 256 ImageNet crops is 154 MB of float32.
        options = grain.ReadOptions(
            num_threads=self.read_threads, prefetch_buffer_size=max(self.read_threads, 1)
        )
        dataset = dataset.to_iter_dataset(options)
        if self.worker_count:
            workers = grain.MultiprocessingOptions(self.worker_count, per_worker_buffer_size=1)
            dataset = dataset.mp_prefetch(workers)
        dataset = dataset.map(self._place)
        return grain.experimental.ThreadPrefetchIterDataset(
            dataset, prefetch_buffer_size=self.prefetch
        )

    def _place(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's batch -> device arrays (global ones sharded over ``data``)."""
        if self.mesh is None:
            return jax.device_put(arrays)
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        return {
            name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in arrays.items()
        }

    def close(self) -> None:
        """Stops the background thread and the worker processes (a later batch restarts them)."""
        if self._iterator is not None:
            iterator, self._iterator = self._iterator, None
            iterator.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamSource:
    """The train split of a stream as a :class:`ddjax.train.BatchSource` (``per_model = False``).

    Every model of a pool trains on the same batches (the stream is read once). Batch ``b`` of
    epoch ``e`` comes with the key ``fold_in(fold_in(key(seed), e), b)`` for the train step's
    own randomness (augmentation on top of the crops). One :class:`BatchIterator` runs across
    epochs, so worker processes start once and prefetching crosses epoch boundaries; asking
    for another position than the next one (a resumed run) restarts it there.

    Args:
        dataset: from :func:`ddjax.data.open_stream`.
        batch_size: the global batch size.
        seed: the run's seed: epoch order, crops, flips and the per-batch keys.
        **options: ``worker_count``, ``read_threads``, ``prefetch``, ``mesh``,
            ``process_index``, ``process_count`` of :class:`BatchIterator`.
    """

    per_model = False

    def __init__(self, dataset: StreamingDataset, batch_size: int, *, seed: int = 0, **options):
        self.seed = seed
        self.batches = BatchIterator(dataset, batch_size, split="train", seed=seed, **options)

    @property
    def batches_per_epoch(self) -> int:
        """Train batches per epoch (the last partial batch is dropped)."""
        return self.batches.batches_per_epoch

    def epoch_batches(
        self, epoch: int, key: jax.Array | None = None, start_batch: int = 0
    ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """Yields ``(images, labels, key)`` for batches ``start_batch, ...`` of ``epoch``.

        ``key`` is ignored (the batches are shared by all models).
        """
        del key
        position = {"epoch": epoch, "batch": start_batch}
        if self.batches.get_state() != position:
            self.batches.set_state(position)
        epoch_key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        for _ in range(start_batch, self.batches_per_epoch):
            batch = next(self.batches)
            yield batch.images, batch.labels, jax.random.fold_in(epoch_key, batch.batch)

    def close(self) -> None:
        """Stops the pipeline's threads and worker processes."""
        self.batches.close()

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_chunks(
    dataset: StreamingDataset, batch_size: int, *, worker_count: int | None = None
) -> Callable[[], Iterator[tuple[Any, np.ndarray]]]:
    """The test split as ``chunks()`` for :func:`ddjax.train.accuracy_over`.

    Every call reads the whole test split in file order (eval transform) and yields
    ``(images, labels)`` batches with ``-1`` as the label of the last batch's padding. Every
    process reads all of it (``process_count=1``): the models that score it are replicated or
    spread over a pool, and each needs every test image. ``worker_count=None``: the dataset's
    ``workers``.
    """
    if worker_count is None:
        worker_count = dataset.workers

    def chunks():
        with BatchIterator(
            dataset,
            batch_size,
            split="test",
            worker_count=worker_count,
            process_index=0,
            process_count=1,
        ) as batches:
            for batch in batches:
                labels = np.where(np.asarray(batch.mask), np.asarray(batch.labels), -1)
                yield batch.images, labels.astype(np.int32)

    return chunks
