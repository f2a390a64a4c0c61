"""Process-group set-up that works the same under the deepspeed launcher, torchrun and plain python."""

from __future__ import annotations

import atexit
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dschat.utils import startup


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHM_DIR = Path("/dev/shm")


def shm_segment_path(rank: int) -> Path:
    """DeepSpeed's CPU shared-memory allreduce workspace of this job's `rank` (named by uid, address, port)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_segment(path: Path) -> None:
    # Peers that still have it mapped keep their mapping; only the name goes away.
    try:
        path.unlink()
    except (FileNotFoundError, PermissionError):
        pass


@startup.timed("dist_init")
def init_distributed(local_rank: int = -1, timeout_minutes: int = 60) -> int:
    """Initialise torch.distributed through DeepSpeed and return the global rank.

    Upstream only worked under the deepspeed launcher; here a single plain `python main.py` gets a
    one-process group, and torchrun's environment is used as is.
    """
    startup.mark("dist_init_start")  # everything before this is interpreter start-up, imports and parsing
    import deepspeed

    if local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" not in os.environ:
        # Plain `python main.py`: one process, a private rendezvous port.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
        if get_accelerator().device_name() == "cpu":
            # DeepSpeed's CPU shm allreduce never unlinks its ~64 MB /dev/shm segment; /dev/shm is RAM, so
            # every finished run would leak memory until the machine runs out.
            atexit.register(_unlink_shm_segment, shm_segment_path(dist.get_rank()))
    return dist.get_rank()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank_0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank_true(flag: bool) -> bool:
    """True on every rank if the flag is set on at least one rank (e.g. a SIGTERM seen by one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from deepspeed.accelerator import get_accelerator

    tensor = torch.tensor([1.0 if flag else 0.0], device=get_accelerator().current_device_name())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"
