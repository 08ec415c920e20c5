"""Reproducible loaders: the SSL loader of two augmented views, whose randomness is a
pure function of ``(seed, epoch, rank, batch index)``, and the evaluation loader."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ldreg.data.augment import BatchViewAugment, view_augmentations
from ldreg.data.datasets import fetch_batch
from ldreg.errors import DatasetError

# --------------------------------------------------------------------------- loaders


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches for one epoch of one rank, each index paired with its batch seed.

    The permutation depends only on ``(seed, epoch)`` — identical on every rank — and is
    padded and strided like ``DistributedSampler`` so every rank gets an equal, disjoint
    shard. Each batch carries ``derive_seed(seed, epoch, rank, batch_index)`` for its
    augmentation, so loader workers and resumption cannot change what a batch contains.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.drop_last = drop_last
        self.shard_size = math.ceil(num_samples / world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        total = self.shard_size * self.world_size
        if total > self.num_samples:
            order = torch.cat([order, order[: total - self.num_samples]])
        shard = order[self.rank : total : self.world_size].tolist()
        for batch_index in range(len(self)):
            batch = shard[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            batch_seed = derive_seed(self.seed, self.epoch, self.rank, batch_index)
            yield [(index, batch_seed) for index in batch]


class _TwoViewBatches(Dataset):
    """Fetches and augments a whole batch in one ``__getitems__`` call (in the worker)."""

    def __init__(
        self,
        dataset: Dataset,
        augments: tuple[BatchViewAugment, BatchViewAugment],
        clean: _NormalisedBatches | None = None,
    ) -> None:
        self.dataset = dataset
        self.augments = augments
        self.clean = clean

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, ...]:
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[Tensor, ...]:
        images, labels = fetch_batch(self.dataset, [index for index, _ in items])
        generator = torch.Generator().manual_seed(items[0][1])
        views = self.augments[0](images, generator), self.augments[1](images, generator)
        if self.clean is None:
            return (*views, labels)
        return (*views, labels, self.clean.normalise(images))


class _NormalisedBatches(Dataset):
    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images, labels = fetch_batch(self.dataset, indices)
        return self.normalise(images), labels

    def normalise(self, images: Tensor) -> Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


def _batch_as_is(batch: Any) -> Any:
    return batch


def make_ssl_loader(
    dataset: Dataset,
    *,
    kind: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    with_clean: bool = False,
) -> DataLoader:
    """A loader of ``(view1, view2, labels)`` batches for one epoch of one rank.

    With ``with_clean`` each batch also carries the un-augmented, normalised images
    (``(view1, view2, labels, clean)``), the input of the online probe.

    Shuffling and augmentation are a pure function of ``(seed, epoch, rank)`` (see
    :class:`EpochBatchSampler`), so rebuilding the loader for a resumed epoch yields the
    very same batches. Raises ``DatasetError`` when ``drop_last`` would leave no batch.
    """
    sampler = EpochBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    if len(sampler) == 0:
        raise DatasetError(
            f"batch_size {batch_size} exceeds the {sampler.shard_size} training images per"
            f" device; lower batch_size or use a larger dataset",
            code="batch_larger_than_dataset",
        )
    first, second = view_augmentations(kind, image_size)
    augments = (BatchViewAugment(first, mean, std), BatchViewAugment(second, mean, std))
    return DataLoader(
        _TwoViewBatches(
            dataset, augments, _NormalisedBatches(dataset, mean, std) if with_clean else None
        ),
        batch_sampler=sampler,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def make_eval_loader(
    dataset: Dataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    max_samples: int | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Un-augmented, normalised ``(images, labels)`` batches in dataset order.

    With ``max_samples`` below the dataset size, a fixed subset (seed 0, kept in dataset
    order) is used, so successive evaluations see the same images.
    """
    n = len(dataset)  # type: ignore[arg-type]
    indices = list(range(n))
    if max_samples is not None and max_samples < n:
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_samples]
        indices = subset.sort().values.tolist()
    return DataLoader(
        _NormalisedBatches(dataset, mean, std),
        batch_size=batch_size,
        sampler=indices,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
    )
