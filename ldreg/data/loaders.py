"""Reproducible loaders: the SSL loader of two augmented views, whose randomness is a
pure function of ``(seed, epoch, rank, batch index)``, and the evaluation loader.

The SSL loader makes the views in its workers (the default, for CPU training), or, with
``augment_on="device"``, yields :class:`RawBatch` es — the images, labels and batch
seed — that a :class:`~ldreg.data.augment.TwoViewAugment` turns into the very same views
on the training device."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ldreg.data.augment import TwoViewAugment, view_augmentations
from ldreg.data.datasets import EncodedImages, fetch_batch, fetch_encoded
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


class RawBatch(NamedTuple):
    """A batch to augment on the training device (``make_ssl_loader(augment_on="device")``).

    Attributes:
        images: uint8 ``(B, 3, S, S)`` (pinned when the loader pins memory), or, for an
            image folder, the files' :class:`EncodedImages`, decoded where they are
            augmented.
        labels: int64 ``(B,)``.
        seed: the batch's augmentation seed (:class:`EpochBatchSampler`); pass it to
            :class:`~ldreg.data.augment.TwoViewAugment` with the images.
    """

    images: Tensor | EncodedImages
    labels: Tensor
    seed: int


class _TwoViewBatches(Dataset):
    """Fetches a whole batch in one ``__getitems__`` call (in the worker) and augments it
    there, or, without an augmenter, hands it on as a :class:`RawBatch`."""

    def __init__(self, dataset: Dataset, augment: TwoViewAugment | None) -> None:
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, ...] | RawBatch:
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[Tensor, ...] | RawBatch:
        indices, seed = [index for index, _ in items], items[0][1]
        fetched = fetch_encoded(self.dataset, indices)
        images, labels = fetched if fetched is not None else fetch_batch(self.dataset, indices)
        if self.augment is None:
            return RawBatch(images, labels, seed)
        view1, view2, clean = self.augment(images, seed)
        return (view1, view2, labels) if clean is None else (view1, view2, labels, clean)


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
    augment_on: Literal["loader", "device"] = "loader",
) -> DataLoader:
    """A loader of ``(view1, view2, labels)`` batches for one epoch of one rank.

    With ``with_clean`` each batch also carries the un-augmented, normalised images
    (``(view1, view2, labels, clean)``), the input of the online probe.

    ``augment_on="device"``: the loader yields :class:`RawBatch` es instead (uint8
    images, pinned with ``pin_memory``; labels; the batch seed), and
    ``TwoViewAugment(kind, image_size, mean, std, with_clean=...)`` makes the same
    views from them on the training device (``with_clean`` is then the augmenter's).

    Image folders are cropped from their full images (the files are decoded in the
    workers, or on the device in ``"device"`` mode); the clean images are their
    evaluation transform (shorter side to ``image_size``, centre crop).

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
    if augment_on not in ("loader", "device"):
        raise ValueError(f"augment_on must be 'loader' or 'device', not {augment_on!r}")
    view_augmentations(kind, image_size)  # an unknown kind fails here, not in a worker
    augment = (
        TwoViewAugment(kind, image_size, mean, std, with_clean=with_clean)
        if augment_on == "loader"
        else None
    )
    return DataLoader(
        _TwoViewBatches(dataset, augment),
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
