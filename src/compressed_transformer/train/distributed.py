"""DDP set-up from torchrun's environment variables only (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``).

Without those variables the process runs alone, exactly as it would without this module. NCCL is used on CUDA
(with gloo for any CPU tensor), gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "cleanup", "main_first", "process_group_backend", "resolve_device", "setup"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or ``None``) picks ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    Raises:
        ValueError: if CUDA is asked for but not available.
    """
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
    return device


# Rank 0 validates (beam search over the validation set) while the other ranks wait in the next collective: allow
# that much longer than NCCL's default 10 minutes before a rank gives up.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=90)


def setup(device: str | None = None) -> DistContext:
    """Initialise the process group if torchrun launched us; pick the device; set CPU threads per process.

    Raises:
        ValueError: for an unavailable device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cpu" and world_size > 1:
        # Processes sharing a machine split its cores; a lone process keeps torch's own thread setting.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=process_group_backend(resolved), timeout=COLLECTIVE_TIMEOUT)
    return DistContext(rank, local_rank, world_size, resolved)


def process_group_backend(device: torch.device) -> str:
    """The process-group backend for training on ``device``: gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo
    for any CPU tensor (NCCL alone refuses CPU tensors, e.g. a small flag or counter kept on the host)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def main_first(ctx: DistContext, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 while the other ranks wait, e.g. to write files they then read.

    Returns:
        ``fn()`` on rank 0, ``None`` on the others.

    Raises:
        RuntimeError: on the other ranks, naming rank 0's error, if ``fn`` raised there (rank 0 re-raises it):
            every rank stops instead of waiting on rank 0 until the collective timeout.
    """
    if not ctx.distributed:
        return fn()
    result, failure = None, [None]
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as error:
            failure = [f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 failed, so rank {ctx.rank} stops too: {failure[0]}")
    return result


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()
