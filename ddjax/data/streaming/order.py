"""Which record goes where: the global order of a streamed epoch, and each process's share.

Promises (what makes a stream independent of the number of processes and workers):

* Epoch ``e`` of the train split visits the records in the permutation
  ``default_rng((seed, e, 0, 0)).permutation(N)``; the eval split in file order.
* Global batch ``b`` of an epoch is positions ``[b·B, (b+1)·B)`` of that order. With ``P``
  processes, process ``p`` reads positions ``[b·B + p·B/P, b·B + (p+1)·B/P)`` of every global
  batch (``B`` must be divisible by ``P``), so the concatenation of the processes' batches, in
  process order, is the same global batch whatever ``P`` is.
* The random crop and flip of the example at position ``i`` of epoch ``e`` come from
  ``default_rng((seed, e, 1, i))``: a function of the seed, the epoch and the global position
  only, never of the worker or the process that reads it.
* Train epochs have ``⌊N/B⌋`` batches: the last partial batch is dropped (every process
  computes the same count from ``N`` and ``B``, so all agree). Eval epochs have ``⌈N/B⌉``
  batches: the last one is filled up to ``B`` with padding examples (zero image, label 0,
  ``mask`` False), so that every batch has one shape (one compiled step) and divides over the
  processes like the others.

Everything here is plain NumPy, picklable, and runs in data-loading worker processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddjax.data.streaming.records import Records
from ddjax.data.streaming.transforms import Transform
from ddjax.errors import check

_PERMUTATION = 0  # tags keep the permutation's and the examples' seed sequences apart
_EXAMPLE = 1


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """The global batches of every epoch and one process's share of each.

    Attributes:
        num_records: ``N``, the records in the split.
        batch_size: ``B``, the global batch size.
        process_index: ``p``.
        process_count: ``P``; divides ``B``.
        shuffle: a fresh permutation every epoch (train) or file order (eval).
        drop_last: drop the last partial batch (train) or pad it (eval).
        seed: the run's seed.
    """

    num_records: int
    batch_size: int
    process_index: int
    process_count: int
    shuffle: bool
    drop_last: bool
    seed: int

    def __post_init__(self) -> None:
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be a positive integer, got {self.batch_size!r}",
        )
        check(
            self.batch_size % self.process_count == 0,
            f"batch_size={self.batch_size} is not divisible by the {self.process_count} "
            f"processes; use a multiple of {self.process_count} so that every process reads "
            "the same number of examples of each global batch",
        )
        check(
            0 <= self.process_index < self.process_count,
            f"process_index={self.process_index} is not in 0..{self.process_count - 1}",
        )
        check(
            isinstance(self.seed, int) and self.seed >= 0,
            f"seed must be a non-negative integer, got {self.seed!r}",
        )
        check(
            self.batches_per_epoch >= 1,
            f"a split of {self.num_records} records has no full batch of {self.batch_size}",
        )

    @property
    def local_batch_size(self) -> int:
        """``B / P``: the examples of each global batch this process reads."""
        return self.batch_size // self.process_count

    @property
    def batches_per_epoch(self) -> int:
        """``⌊N/B⌋`` with ``drop_last``, else ``⌈N/B⌉``."""
        if self.drop_last:
            return self.num_records // self.batch_size
        return -(-self.num_records // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The record visited at each position of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_records)
        rng = np.random.default_rng((self.seed, epoch, _PERMUTATION, 0))
        return rng.permutation(self.num_records)

    def example_rng(self, epoch: int, position: int) -> np.random.Generator:
        """The generator of the crop and flip of the example at ``position`` of ``epoch``."""
        return np.random.default_rng((self.seed, epoch, _EXAMPLE, position))

    def locate(self, local_index: int) -> tuple[int, int]:
        """This process's ``local_index``-th example since epoch 0 -> ``(epoch, position)``.

        Local example ``k`` belongs to global batch ``g = k // (B/P)`` counted over all epochs
        (epoch ``g // batches_per_epoch``, batch ``g % batches_per_epoch``) and sits at
        ``p·B/P + k % (B/P)`` inside it.
        """
        global_batch, offset = divmod(local_index, self.local_batch_size)
        epoch, batch = divmod(global_batch, self.batches_per_epoch)
        position = batch * self.batch_size + self.process_index * self.local_batch_size + offset
        return epoch, position


class Examples:
    """``local_index -> {'image', 'label', 'mask'}``: the grain map of a stream.

    Reads the record at the example's place in the global order and transforms it; positions
    past the end of an eval epoch give padding (``mask`` False). The permutation of the last
    epochs is cached per process (computing ImageNet's takes some 20 ms).
    """

    def __init__(self, records: Records, order: EpochOrder, transform: Transform):
        self.records, self.order, self.transform = records, order, transform
        self._permutations: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_permutations": {}}  # workers draw their own

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        epoch, position = self.order.locate(int(local_index))
        if position >= self.order.num_records:
            return {
                "image": np.zeros(self.transform.image_shape, np.float32),
                "label": np.int32(0),
                "mask": np.bool_(False),
            }
        permutation = self._permutations.get(epoch)
        if permutation is None:
            permutation = self.order.permutation(epoch)
            # Two epochs at most: a prefetching worker may straddle an epoch boundary.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = permutation
        record = int(permutation[position])
        value, label = self.records[record]
        rng = self.order.example_rng(epoch, position) if self.transform.train else None
        image = self.transform(value, rng, self.records.describe(record))
        return {"image": image, "label": np.int32(label), "mask": np.bool_(True)}
