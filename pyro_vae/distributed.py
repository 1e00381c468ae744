"""Data-parallel training with ``torch.distributed``: one process per device, launched by ``torchrun``.

``pyro-vae train`` runs unchanged under ``torchrun --nproc_per_node N``: the environment variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) start a process group, NCCL
on GPUs and Gloo on CPUs. Each process draws its share of every global minibatch, gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel` through the objective's ``differentiable_loss``, and only
rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "setup", "teardown", "world", "is_main", "DistributedConfigError", "all_reduce_sum", "average_gradients"]

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedConfigError(RuntimeError):
    """The torch.distributed environment is half-configured."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place in the process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def is_main() -> bool:
    return world().rank == 0


def setup(device: torch.device | None = None, timeout_s: float = 300.0) -> World:
    """Start the process group from torchrun's environment variables, if they are set.

    Does nothing outside torchrun. Some variables set and others missing is a
    :class:`DistributedConfigError` naming them. ``timeout_s`` bounds every collective, so a dead peer ends
    the job with an error instead of a hang.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    present = [v for v in _REQUIRED if v in os.environ]
    if not present:
        return World()
    missing = [v for v in _REQUIRED if v not in os.environ]
    if missing:
        raise DistributedConfigError(
            f"torch.distributed is half-configured: {', '.join(present)} set but {', '.join(missing)} missing "
            f"(launch with torchrun, or set all of {', '.join(_REQUIRED)})"
        )
    size = int(os.environ["WORLD_SIZE"])
    if size <= 1:
        return World()
    if not dist.is_available():
        raise DistributedConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = device is not None and device.type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def teardown() -> None:
    """Wait for every process (rank 0 may still be writing), then close the process group.

    Exiting with the group still open lets a process's collective library abort while its peers are still
    working, so every entry point that called :func:`setup` ends with this.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: torch.Tensor, w: World) -> torch.Tensor:
    """This rank's contiguous share of a global minibatch of indices (near-equal sizes)."""
    if not w.distributed:
        return indices
    return torch.tensor_split(indices, w.size)[w.rank]


def all_reduce_sum(t: torch.Tensor, w: World) -> torch.Tensor:
    if w.distributed:
        dist.all_reduce(t)
    return t


def average_gradients(grads: list, w: World) -> list:
    """The mean of each gradient over the processes (one all-reduce of the flattened gradients), as
    DistributedDataParallel averages them; the gradients themselves on a single process."""
    if not w.distributed or not grads:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
