"""Launching one training job on several devices with torch.distributed (DDP).

The calling process is rank 0 and the other ranks are spawned (``spawn``, never
``fork``, so no CUDA state is inherited). Rank 0 staying in the caller means the
caller's sink (database writer, progress bar) is used directly, with no pickling and
no relaying of events between processes. Backends: NCCL on GPU, gloo on CPU.

Usage::

    result = launch(train_rank, world_size=2, device_type="cpu", args=(spec,),
                    rank0_kwargs={"sink": sink})
    # train_rank(rank, world_size, spec, sink=None) runs in every rank

``convert_sync_batchnorm`` makes BatchNorm use global-batch statistics: torch's
``SyncBatchNorm`` on GPU and :class:`GlobalBatchNorm` (an autograd all-reduce of the
per-channel sums) on CPU, where torch's implementation refuses to run.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# Long enough for rank 0's evaluation while the other ranks wait at a collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)

_children: mp.ProcessContext | None = None


def free_port() -> int:
    """A TCP port free on localhost right now, for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _init_rank(rank: int, world_size: int, port: int, device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        # Share the cores between the ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=rank == 0,
        timeout=PROCESS_GROUP_TIMEOUT,
        wait_for_workers=False,
    )
    if rank == 0:
        _wait_for_ranks(store, world_size)
    else:
        store.set(f"ldreg_ready_{rank}", "1")
    dist.init_process_group(
        backend_for(device_type),
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
    )


def _wait_for_ranks(store: dist.TCPStore, world_size: int) -> None:
    """Rank 0 waits for the others to reach the rendezvous, polling from Python so that
    a rank that died while starting (import error, bad device) fails the launch at
    once instead of leaving rank 0 blocked until the process-group timeout."""
    keys = [f"ldreg_ready_{r}" for r in range(1, world_size)]
    while not store.check(keys):
        check_peers()
        time.sleep(0.05)


def _child_main(
    index: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    device_type: str,
    args: tuple,
) -> None:
    rank = index + 1
    parent = os.getppid()

    def on_sigint(signum: int, frame: object) -> None:
        # A Ctrl-C at the terminal reaches every rank; rank 0 turns it into a cooperative
        # stop that all ranks follow. Exit only if the parent is gone (torch's spawn sets
        # SIGINT as the parent-death signal).
        if os.getppid() != parent:
            os._exit(1)

    signal.signal(signal.SIGINT, on_sigint)
    _init_rank(rank, world_size, port, device_type)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *,
    device_type: str,
    args: tuple = (),
    rank0_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return rank 0's result.

    ``fn`` and ``args`` must be picklable (they travel to the spawned ranks);
    ``rank0_kwargs`` are passed to rank 0 only and need not be. If rank 0 fails, the
    other ranks are stopped; if another rank fails, rank 0's next collective fails (or
    :func:`check_peers` notices) and the error names that rank's traceback.
    """
    global _children
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, found {world_size}")
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already active here")
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        from ldreg.errors import UserError

        raise UserError(
            f"{world_size} devices requested but {torch.cuda.device_count()} GPUs are visible",
            code="not_enough_devices",
        )
    port = free_port()
    threads = torch.get_num_threads()
    context = None
    if world_size > 1:
        context = mp.start_processes(
            _child_main,
            args=(fn, world_size, port, device_type, args),
            nprocs=world_size - 1,
            join=False,
            start_method="spawn",
        )
    _children = context
    try:
        _init_rank(0, world_size, port, device_type)
        try:
            result = fn(0, world_size, *args, **(rank0_kwargs or {}))
        finally:
            dist.destroy_process_group()
    except BaseException as error:
        if context is not None:
            child_error = _stop(context, grace_s=10.0)
            if child_error is not None and not _is_library_error(error):
                raise RuntimeError(f"a training rank failed:\n{child_error}") from error
        raise
    finally:
        _children = None
        torch.set_num_threads(threads)
    if context is not None:
        while not context.join():
            pass
    return result


def _is_library_error(error: BaseException) -> bool:
    from ldreg.errors import LDRegError

    return isinstance(error, LDRegError)


def _stop(context: mp.ProcessContext, *, grace_s: float) -> str | None:
    """Wait up to ``grace_s`` for the other ranks, then kill them; return a child's error."""
    deadline = time.monotonic() + grace_s
    for p in context.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in context.processes:
        if p.is_alive():
            p.kill()
            p.join()
    return _child_error(context)


def _child_error(context: mp.ProcessContext) -> str | None:
    for i, p in enumerate(context.processes):
        if p.exitcode not in (0, None):
            message = f"rank {i + 1} exited with code {p.exitcode}"
            path = context.error_files[i]
            if os.path.exists(path) and os.path.getsize(path) > 0:
                import pickle

                with open(path, "rb") as f:
                    message += "\n" + pickle.load(f)
            return message
    return None


def check_peers() -> None:
    """On rank 0: raise if another rank has died (so rank 0 does not wait on it)."""
    if _children is None:
        return
    error = _child_error(_children)
    if error is not None:
        raise RuntimeError(f"a training rank failed:\n{error}")


def wrap_model(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``module`` when a process group with more than one rank is active."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return module
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm with one that normalises over the global batch."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return GlobalBatchNorm.convert(module)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks: each rank's loss depends
    on every rank's input through the sum, so each input receives all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over all ranks' samples, for any device (gloo on CPU).

    In training, the per-channel count, sum and sum of squares are all-reduced with
    gradient, so output and gradients equal BatchNorm on the concatenated global batch
    (Ioffe & Szegedy 2015, Alg. 1; the same reduction as torch's ``SyncBatchNorm``).
    Outside training, or without a multi-rank process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), found {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.square().sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean.square()).clamp_min(0.0)
        tracked, running_mean, running_var = (
            self.num_batches_tracked,
            self.running_mean,
            self.running_var,
        )
        if self.track_running_stats and tracked is not None:
            assert running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                m = 1.0 / tracked.item() if self.momentum is None else self.momentum
                running_mean.lerp_(mean.detach(), m)
                running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1.0), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """A copy-free conversion: BatchNorm{1,2,3}d modules are swapped in place."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            bn = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                device=module.weight.device if module.affine else None,
            )
            if module.affine:
                with torch.no_grad():
                    bn.weight = module.weight
                    bn.bias = module.bias
            bn.running_mean = module.running_mean
            bn.running_var = module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
            bn.train(module.training)
            return bn
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module
