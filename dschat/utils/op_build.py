"""DeepSpeed's JIT-built C++ ops: which runs need one, where it is built, and what a run says while it waits.

On the CPU accelerator, `deepspeed.init_distributed` builds and loads DeepSpeed's shared-memory allreduce
op (`deepspeed_shm_comm`: `deepspeed.comm.torch.build_shm_op`, through the accelerator's
`create_op_builder("ShareMemCommBuilder")`) with torch's `cpp_extension`, which compiles it with the C++
compiler and ninja the first time. Three things went wrong with that, each handled here:

- A one-process run has nobody to reduce with, yet built (and mapped a 64 MB /dev/shm segment for) the
  op. `without_cpu_comm_op` hides that one builder while DeepSpeed sets up a world of size 1, so such a run
  needs no compiler and no build (`inference_all_reduce` returns early for one rank; gloo does the rest).
- torch builds into `~/.cache/torch_extensions/<python>_<accelerator>/`, shared by every environment of
  the user, so two virtual environments rebuild the op over each other, minutes per stage.
  `use_per_environment_build_dir` points `TORCH_EXTENSIONS_DIR` (unless the user set it) at
  `$XDG_CACHE_HOME/dschat/torch_extensions/py<ver>-torch<ver>-<hash of sys.prefix>`: one build per environment.
- torch's build lock (`<build dir>/lock`, created exclusively, removed when the build ends) stays behind
  when a build is killed, and every later run then sleeps on it forever without a word.
  `check_build_lock` looks before DeepSpeed builds: a lock no live process holds open is one line naming
  it and the fix; a live builder is named, and a first build is announced, before the wait.

Imports the standard library and `dschat.utils.{errors,safe_paths}` (torch lazily, for its version), so the
process-group set-up (`dschat.utils.dist`) can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.safe_paths import ensure_private_dir, processes_using, user_cache_root

CPU_COMM_BUILDER = "ShareMemCommBuilder"
CPU_COMM_OP = "deepspeed_shm_comm"
LOCK_FILE = "lock"  # torch.utils.cpp_extension's FileBaton in the op's build directory
_RECHECK_S = 1.0  # a finishing builder closes the lock a moment before it removes it


def per_environment_build_dir() -> Path:
    """Where this environment's ops build: keyed by the interpreter prefix, Python and torch versions."""
    import torch  # lazy: the light commands import this module's users without torch

    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{prefix}"
    return user_cache_root() / "torch_extensions" / tag


def use_per_environment_build_dir() -> Path:
    """Set TORCH_EXTENSIONS_DIR to this environment's own directory unless the user chose one; returns the
    directory ops build under."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        try:
            directory = ensure_private_dir(per_environment_build_dir(), "$XDG_CACHE_HOME/dschat/torch_extensions")
        except UserError:
            return torch_default_build_root()  # a read-only or foreign cache: torch's default rather than fail
        os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def torch_default_build_root() -> Path:
    """Where torch builds when TORCH_EXTENSIONS_DIR is unset (its `_get_build_directory`'s rule)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


@contextlib.contextmanager
def without_cpu_comm_op(accelerator):
    """While inside, the accelerator has no shared-memory comm op builder, so DeepSpeed's process group
    neither builds nor loads it (`build_shm_op` takes "no builder" as "not available")."""
    own = vars(accelerator).get("create_op_builder")
    original = accelerator.create_op_builder

    def create_op_builder(name):
        return None if name == CPU_COMM_BUILDER else original(name)

    accelerator.create_op_builder = create_op_builder
    try:
        yield
    finally:
        if own is None:
            del accelerator.create_op_builder
        else:
            accelerator.create_op_builder = own


def check_build_lock(build_root: Path, op: str = CPU_COMM_OP, announce: bool = True) -> None:
    """Before DeepSpeed builds (or waits to load) `op` under `build_root`: a stale lock is a UserError naming it
    and the fix; a live builder, or a build this environment has not done yet, is said on the console
    (`announce`: local rank 0 speaks for the node)."""
    build_dir = build_root / op
    lock = build_dir / LOCK_FILE
    if not lock.exists():
        if announce and not (build_dir.is_dir() and any(build_dir.glob(f"{op}*.so"))):
            print(f"building DeepSpeed's CPU communication op once for this environment (about a minute) in "
                  f"{build_dir} ...", flush=True)
        return
    try:
        owner = lock.stat().st_uid
    except FileNotFoundError:  # the build just ended
        return
    if owner != os.geteuid() and os.geteuid() != 0:  # another user's processes are invisible to us
        if announce:
            print(f"waiting on {lock} (uid {owner}): another user's build of DeepSpeed's op; if none is running, "
                  "that user must remove it", flush=True)
        return
    holders = processes_using(lock)
    if holders == set():
        time.sleep(_RECHECK_S)
        if not lock.exists():
            return
        holders = processes_using(lock)
        if holders == set():
            raise UserError(f"{lock}: the lock of DeepSpeed's op build was left by a build that was killed (no "
                            f"process holds it), so this run would wait on it forever; remove it (`rm {lock}`) "
                            "and run again")
    if announce and holders:
        print(f"waiting for pid {', '.join(map(str, sorted(holders)))}, which is building DeepSpeed's CPU "
              f"communication op in {build_dir} ...", flush=True)
