"""The one place that gathers tensors across torch.distributed ranks.

Used by LDReg (the reference set) and by the contrastive methods (negatives). Every
helper is the identity on a single process, i.e. when torch.distributed is not
available or not initialised, so the same code runs with and without DDP.

Ranks may hold different numbers of rows (the last batch of an epoch): the row
counts are exchanged first and the tensors padded for ``all_gather``.

Two gradient semantics. :func:`gather_for_loss` (contrastive negatives, batch
statistics of Barlow Twins / VICReg) sums every rank's gradient into the local rows.
:func:`gather_with_grad`: the gathered tensor's rows that came
from this rank are ``x`` itself (autograd flows into them); the other ranks' rows are
constants. This is the cross-replica concatenation of SimCLR's TPU code; each rank
back-propagates its own loss into its own rows and DDP averages parameter gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_rows",
    "gather_for_loss",
    "gather_no_grad",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def all_gather_rows(x: Tensor, *, keep_local_grad: bool) -> tuple[Tensor, int]:
    """Concatenate ``x`` from all ranks along dim 0, in rank order.

    Returns ``(gathered, offset)`` where ``gathered[offset : offset + len(x)]`` are
    this rank's rows. With ``keep_local_grad`` those rows are ``x`` itself (gradient
    flows into them); otherwise the result is detached.
    """
    if x.ndim == 0:
        raise ValueError("all_gather_rows needs a tensor with a leading row dimension")
    if not is_distributed() or world_size() == 1:
        return (x if keep_local_grad else x.detach()), 0
    n_ranks, me = world_size(), rank()
    with torch.no_grad():
        count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        counts = [torch.zeros_like(count) for _ in range(n_ranks)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = x.detach()
        if x.shape[0] < longest:
            pad = padded.new_zeros((longest - x.shape[0], *x.shape[1:]))
            padded = torch.cat([padded, pad], dim=0)
        parts = [torch.empty_like(padded) for _ in range(n_ranks)]
        dist.all_gather(parts, padded.contiguous())
    rows = [part[:size] for part, size in zip(parts, sizes, strict=True)]
    if keep_local_grad:
        rows[me] = x
    return torch.cat(rows, dim=0), sum(sizes[:me])


def gather_with_grad(x: Tensor) -> Tensor:
    """``x`` from all ranks concatenated along dim 0; gradient flows into the local
    rows only. Identity when not distributed."""
    return all_gather_rows(x, keep_local_grad=True)[0]


def gather_no_grad(x: Tensor) -> Tensor:
    """``x`` from all ranks concatenated along dim 0, detached. ``x.detach()`` when not
    distributed."""
    return all_gather_rows(x, keep_local_grad=False)[0]


class _GatherWithAllGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        gathered, offset = all_gather_rows(x.detach(), keep_local_grad=False)
        ctx.rows = (offset, offset + x.shape[0])
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, end = ctx.rows
        return grad[start:end]


def gather_for_loss(x: Tensor) -> Tensor:
    """``x`` from all ranks (rank order), for a loss computed over the global batch.

    The backward sums every rank's gradient for this rank's rows before returning it,
    as the VICReg authors' ``FullGatherLayer`` and lightly's ``GatherLayer``: a rank's
    rows also appear as negatives (SimCLR) or in batch statistics (Barlow Twins,
    VICReg) of the other ranks' losses, and only with those terms does DDP's gradient
    average equal the single-process gradient of the same global batch.
    (:func:`gather_with_grad` keeps only the local loss's gradient, which is right for
    LDReg's detached reference but drops those terms.) Identity on one process.
    """
    if world_size() == 1:
        return x
    return _GatherWithAllGradients.apply(x)
