"""Process-group set-up for every launcher: plain `python`, torchrun, the deepspeed
launcher and SLURM's srun all end up here with RANK / WORLD_SIZE / LOCAL_RANK in the
environment (or none of them, for a single process)."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device={requested} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op the first time it wraps a CPU
    process group (minutes on a fresh machine). It is only a fast path; gloo does the
    same job, so on CPU we mark the op unavailable unless LETNGPT_DS_SHM=1."""
    if os.environ.get("LETNGPT_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# What a launcher (or init_distributed, for a world of one) puts in the environment. A child process
# that should start a world of its own must not inherit them, or it would try to join this one.
WORLD_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(requested_device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and DeepSpeed's comm layer."""
    if "RANK" not in os.environ:  # a single process: make it a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _skip_deepspeed_shm_op()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """THE tensor collective: all-reduce `tensor` over `group` on `device`, the process group's device.
    NCCL reduces GPU tensors only (a CPU tensor is an error there, silently fine on gloo), so every
    all-reduce in letngpt goes through here. Returns the reduced tensor, on `device`."""
    tensor = tensor.to(device)
    if _world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_max(flag: bool | float, device: torch.device) -> float:
    """Agree across ranks (stop signals, time limits): every rank gets the maximum."""
    return float(all_reduce_(torch.tensor([float(flag)]), device, op=dist.ReduceOp.MAX).item())


def all_reduce_mean(value: float, device: torch.device, group=None) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64 if device.type == "cpu" else torch.float32)
    return float(all_reduce_(tensor, device, group=group).item()) / _world_size(group)


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Elementwise sum over every rank of a small CPU tensor (sent via `device`), returned on the CPU."""
    return all_reduce_(tensor, device).cpu()


def shutdown() -> None:
    """Leave together: a rank that exits while a peer still talks to it (rank 0 writing the
    summary, say) can have gloo abort it at interpreter exit, failing a finished job."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], T], *, is_main: bool) -> T:
    """Run `fn` on rank 0 only (file-system checks, locks) and hand every rank its result. A
    user-facing error it raises (ConfigError, DataError, RunError) is raised on every rank, so
    a bad out_dir or dataset ends the whole job with one line instead of hanging the others."""
    from letngpt.config import ConfigError
    from letngpt.data import DataError
    from letngpt.errors import RunError

    result, error = None, None
    if is_main:
        try:
            result = fn()
        except (ConfigError, DataError, RunError) as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result
