"""LDReg: the local dimensionality regularizer.

Huang, Campello, Erfani, Ma, Houle, Bailey, "LDReg: Local Dimensionality Regularized
Self-Supervised Learning", ICLR 2024, following the authors' code
(``losses/ntxent_lid_reg.py`` in github.com/HanxunH/LDReg): the LID of every sample
of the batch is estimated from its k nearest neighbours in the detached reference
set (the whole batch, gathered across ranks), and the loss

    'l1'  (official default):  alpha * mean_i( -|ln LID_i| )
    'log':                     alpha * mean_i( -ln LID_i )

is added to the SSL loss; minimising -ln LID raises the geometric mean of the LIDs,
the Fisher–Rao mean (``ldreg.lid.geometric_mean``). For LIDs above 1 -- every
realistic representation -- both forms coincide; 'l1' additionally pushes LIDs
below 1 further down, as the official code does.

Example::

    ldreg = LDReg(alpha=0.01, k=64)            # SimCLR's official setting
    features = torch.cat([backbone(x0), backbone(x1)])   # both views
    loss = ssl_loss + ldreg(features)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ldreg.distributed import all_gather_rows
from ldreg.lid import lid_mle, lid_mom

__all__ = ["LDReg"]


class LDReg(nn.Module):
    """Local dimensionality regularizer as an ``nn.Module``.

    Attributes:
        alpha: weight of the term (official: SimCLR 0.01, BYOL/MoCo 0.005, MAE 5e-6).
        k: neighbours per sample (official default 64).
        estimator: ``"mom"`` (official default; ``ldreg.lid.lid_mom`` variant 'ldreg')
            or ``"mle"`` (``ldreg.lid.lid_mle`` variant 'ldreg').
        form: ``"l1"`` (-|ln LID|, official) or ``"log"`` (-ln LID).
        gather_distributed: all-gather the reference set across torch.distributed
            ranks (``ldreg.distributed.all_gather_rows``). The gradient flows through
            the local rows as queries only; the reference is always detached.

    ``forward(features, reference=None, *, self_offset=None)``: features (N, ...) are
    flattened to (N, D). Without ``reference`` the neighbours come from the (gathered)
    batch itself, each sample's own row excluded by index. With ``reference`` (M, ...)
    they come from it (gathered too when ``gather_distributed``); if the reference
    contains the features themselves at rows ``self_offset : self_offset + N`` (e.g.
    ``torch.cat([features, target_features])``), give ``self_offset`` so those rows are
    excluded by index (shifted to this rank's block after gathering). Returns a scalar;
    NaN when the features contain NaN or inf.
    """

    def __init__(
        self,
        alpha: float,
        k: int = 64,
        estimator: Literal["mom", "mle"] = "mom",
        form: Literal["l1", "log"] = "l1",
        *,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, found {alpha!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2, found {k!r}")
        if estimator not in ("mom", "mle"):
            raise ValueError(f"estimator must be 'mom' or 'mle', found {estimator!r}")
        if form not in ("l1", "log"):
            raise ValueError(f"form must be 'l1' or 'log', found {form!r}")
        self.alpha = float(alpha)
        self.k = k
        self.estimator = estimator
        self.form = form
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, k={self.k}, estimator={self.estimator!r}, "
            f"form={self.form!r}, gather_distributed={self.gather_distributed}"
        )

    def local_lids(
        self, features: Tensor, reference: Tensor | None = None, *, self_offset: int | None = None
    ) -> Tensor:
        """(N,) LIDs of the local samples, differentiable w.r.t. ``features``."""
        queries, ref, offset = self._neighbourhood(features, reference, self_offset)
        return self._estimate(queries, ref, offset)

    def forward(
        self, features: Tensor, reference: Tensor | None = None, *, self_offset: int | None = None
    ) -> Tensor:
        return self.loss_and_lids(features, reference, self_offset=self_offset)[0]

    def loss_and_lids(
        self, features: Tensor, reference: Tensor | None = None, *, self_offset: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The loss of :meth:`forward` and the (N,) LIDs it penalised, detached.

        The LIDs let a training loop report what the term itself sees
        (``ldreg_lid_gmean``) without estimating them a second time.
        """
        queries, ref, offset = self._neighbourhood(features, reference, self_offset)
        # Checked after the gather, so every rank has joined it and sees the same
        # reference: if any rank diverged, all return NaN together instead of one rank
        # leaving the collective (a deadlock) or raising an input error. The training
        # loop reports a NaN loss with its epoch and step. A device-side select, not a
        # host sync: the estimate runs on zeros and the result is poisoned with NaN.
        finite = torch.isfinite(queries).all() & torch.isfinite(ref).all()
        queries = torch.where(finite, queries, torch.zeros_like(queries))
        ref = torch.where(finite, ref, torch.zeros_like(ref))
        poison = torch.where(finite, 0.0, math.nan)
        lids = self._estimate(queries, ref, offset)
        log_lids = torch.log(lids)
        penalty = -log_lids.abs() if self.form == "l1" else -log_lids
        return self.alpha * penalty.mean() + poison, lids.detach() + poison

    def _neighbourhood(
        self, features: Tensor, reference: Tensor | None, self_offset: int | None
    ) -> tuple[Tensor, Tensor, int | None]:
        """(queries, detached gathered reference, index of queries[0] in it or None)."""
        if features.ndim < 2 or features.shape[0] == 0:
            raise ValueError(
                f"features must have shape (N, D, ...) with N >= 1, found {tuple(features.shape)}"
            )
        queries = features.flatten(start_dim=1)
        if reference is None:
            if self_offset is not None:
                raise ValueError("self_offset only applies with an explicit reference")
            ref, offset = self._gather(queries)
            if ref.shape[0] <= self.k:
                raise ValueError(
                    f"LDReg with k={self.k} needs more than {self.k} samples in the batch "
                    f"(all ranks, both views), found {ref.shape[0]}"
                )
            return queries, ref, offset
        if reference.ndim < 2:
            raise ValueError(
                f"reference must have shape (M, D, ...), found {tuple(reference.shape)}"
            )
        ref, rank_offset = self._gather(reference.flatten(start_dim=1))
        return queries, ref, None if self_offset is None else self_offset + rank_offset

    def _estimate(self, queries: Tensor, ref: Tensor, self_offset: int | None) -> Tensor:
        estimate = lid_mom if self.estimator == "mom" else lid_mle
        return estimate(queries, self.k, ref, self_offset=self_offset)

    def _gather(self, rows: Tensor) -> tuple[Tensor, int]:
        if self.gather_distributed:
            return all_gather_rows(rows.detach(), keep_local_grad=False)
        return rows.detach(), 0
