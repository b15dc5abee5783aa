"""Distributed training through torchrun: PyTorch's process group, DDP and samplers.

``--cuda -1`` under torchrun starts one process per device: NCCL on CUDA, Gloo
on the CPU. Outside a process group every helper here is the single-process
identity, so the continual loop has one code path.
"""
import logging
import os
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("samcl.distributed")


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init(prefer_cuda: bool = True, timeout_minutes: int = 30) -> torch.device:
    """Join torchrun's process group; one device per process. Returns this process's device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = prefer_cuda and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               f"--nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(local_rank)
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if use_cuda else None)
    return device


def rank_prefix() -> str:
    """'[rank r/w] ' under torchrun, '' otherwise: for messages that must say which process failed."""
    return f"[rank {rank()}/{world_size()}] " if is_distributed() else ""


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks in rank order (identity alone)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: List[Optional[Any]] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's copy of ``module`` (parameters and buffers) equal to rank ``src``'s."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)
