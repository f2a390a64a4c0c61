"""Process-group set-up that works the same under the deepspeed launcher, torchrun and plain python.

Owns joining the process group (`init_distributed`), the rank helpers every module uses (`get_rank`,
`is_rank_0`, `barrier`), the one home of collectives (`all_reduce`, `all_gather`, `all_gather_objects`,
`broadcast_object`, `any_rank_true`: identity in one process), the accelerator handle and the clean-up of
DeepSpeed's CPU shared-memory segments. A one-process CPU run neither builds nor loads DeepSpeed's comm op;
a multi-rank one builds it once per environment (`dschat.utils.op_build`). Imports torch and
`dschat.utils.{startup,op_build,errors,safe_paths}` only: it sits under every other module.
DeepSpeed is imported on first use, because the light commands (`mpo --help`, the pipeline driver,
output-directory checks) import this module and never need it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dschat.utils import op_build, startup
from dschat.utils.errors import EXIT_USER_ERROR, UserError, exit_after_success
from dschat.utils.safe_paths import processes_using


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
    import deepspeed  # lazy: see the module docstring

    if local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    single_process = "RANK" not in os.environ
    if single_process:
        # Plain `python main.py`: one process. MASTER_* only name DeepSpeed's shm segment; the rendezvous
        # is an in-process store, so nothing listens on a network port.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    if not dist.is_initialized():
        accelerator = get_accelerator()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        cpu = accelerator.device_name() == "cpu"
        one_rank = int(os.environ.get("WORLD_SIZE", "1")) == 1
        build_root = op_build.use_per_environment_build_dir()
        if cpu:
            remove_orphaned_shm_segments()
        timeout = timedelta(minutes=timeout_minutes)
        if single_process:
            # torch's TCPStore server binds every interface whatever MASTER_ADDR says; a one-rank group
            # needs no rendezvous at all (gloo then binds the loopback device only).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
            dist.init_process_group(backend=accelerator.communication_backend_name(), store=dist.HashStore(),
                                    rank=0, world_size=1, timeout=timeout)
        if cpu and one_rank:
            # One rank reduces with nobody: no comm op, no C++ build, no /dev/shm segment.
            with op_build.without_cpu_comm_op(accelerator):
                deepspeed.init_distributed(timeout=timeout)
        else:
            if cpu:
                _check_build_lock_on_every_rank(build_root)
            deepspeed.init_distributed(timeout=timeout)
        if not one_rank:
            atexit.register(leave_process_group, release_shm=cpu)
            exit_after_success(finish_multi_rank_run)
    return dist.get_rank()


def finish_multi_rank_run() -> None:
    """End a multi-rank rank whose entry point succeeded: the exit handlers (locks, shm, the group), then
    `os._exit(0)`. The C++ teardown after them (static destructors of torch's distributed runtime) sometimes
    aborted a rank that had finished and written everything ("terminate called without an active
    exception", SIGABRT), turning a complete run into a failed launch; nothing of ours runs after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)


def leave_process_group(release_shm: bool = False) -> None:
    """At exit of a multi-rank run: unlink DeepSpeed's CPU shm segment, then destroy the process group.

    DeepSpeed's CPU shm allreduce never unlinks its ~64 MB /dev/shm segment; /dev/shm is RAM, so every finished
    run would leak memory until the machine runs out. A gloo group left to the interpreter's teardown was
    destroyed while its worker threads still ran, and a rank that had finished its work aborted ("terminate
    called without an active exception", exit -6) after the stage had written everything.
    """
    if release_shm:
        release_shm_segment()
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # leaving must never turn a finished run into a failed one
            dist.destroy_process_group()


def _check_build_lock_on_every_rank(build_root: Path) -> None:
    """Every rank would wait on a stale build lock: local rank 0 says so in one line, the others just stop."""
    speaker = get_local_rank() == 0
    try:
        op_build.check_build_lock(build_root, announce=speaker)
    except UserError:
        if speaker:
            raise
        raise SystemExit(EXIT_USER_ERROR) from None


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shm segment (at exit, and on the SIGTERM/SIGINT exit path)."""
    if dist.is_initialized():
        _unlink_shm_segment(shm_segment_path(dist.get_rank()))


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names or not names else names[0]


SHM_ORPHAN_MIN_AGE_S = 60.0


def remove_orphaned_shm_segments(min_age_s: float = SHM_ORPHAN_MIN_AGE_S) -> list[Path]:
    """Remove our uid's DeepSpeed shm segments that no live process maps or holds open and that nobody wrote
    for `min_age_s` (left by SIGKILLed runs).

    A run starting beside another must never take the other's segment: removing it between its creation
    and its mapping made DeepSpeed map nothing and the other run die with SIGSEGV. Where /proc cannot be
    read, nothing is removed.
    """
    if not (SHM_DIR.is_dir() and Path("/proc/self/maps").exists()):
        return []
    removed = []
    now = time.time()
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        with contextlib.suppress(OSError):
            info = path.stat()
            # Open counts as much as mapped: DeepSpeed creates a segment (shm_open), fills it with write() and
            # only then maps it, so during start-up its creator holds it open without a mapping.
            if info.st_uid == os.getuid() and now - info.st_mtime >= min_age_s \
                    and not processes_using(path, mapped=True):
                path.unlink()
                removed.append(path)
    return removed


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


def get_accelerator():
    """DeepSpeed's accelerator (CPU, CUDA, ...): the device, seeding and communication backend of this run."""
    import deepspeed.accelerator  # lazy: see the module docstring

    return deepspeed.accelerator.get_accelerator()


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


# --------------------------------------------------------------------------------------------- collectives
# The one home of collectives: each is the identity in a single process and the same call on every rank
# otherwise, so callers never test the world size themselves.


def is_distributed() -> bool:
    """More than one rank in an initialised process group (collectives have work to do)."""
    return dist.is_initialized() and dist.get_world_size() > 1


_REDUCE_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over the ranks in place ("sum", "mean", "max" or "min") and returned."""
    if is_distributed():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def get_all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (upstream's name; `tensor` holds the sum afterwards, as upstream)."""
    return all_reduce(tensor, "sum") / get_world_size()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each), concatenated along dim 0 in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank_true(flag: bool) -> bool:
    """True on every rank if the flag is set on at least one rank (e.g. a SIGTERM seen by one rank)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=get_accelerator().current_device_name())
    return bool(all_reduce(tensor, "max").item() > 0)
