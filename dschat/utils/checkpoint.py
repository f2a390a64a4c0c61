"""Full, resumable training states: `OUTPUT_DIR/checkpoints/step-N/`.

A state holds one DeepSpeed checkpoint per engine (module, optimizer, scheduler, ZeRO partitions), each
rank's RNG state and extra per-rank data, and `trainer_state.json`. It is assembled under a temporary
name and renamed into place after the metadata file is written, so a directory named `step-N` with
`trainer_state.json` inside is always complete; a run killed mid-write leaves the previous state intact.
Checkpoints of multi-node runs need storage shared by all nodes (as DeepSpeed's own checkpoints do).

Owns the layout of a state and its save/find/load/prune; the trainer decides when to save. Imports torch and
`dschat.utils.{dist,errors,utils}` only: no step, no trainer, nothing of `mpo_ext`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from dschat.utils.dist import barrier, get_rank, is_rank_0
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write, atomic_write_json
from dschat.utils.seeding import get_rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def maybe_inject_kill(point: str, step: int) -> None:
    """Crash-test hook: SIGKILL this process at a chosen point (tests only; no effect unless set).

    `DSCHAT_KILL_AT=after_step:N` dies right after optimizer step N; `DSCHAT_KILL_AT=during_save:N` dies
    while the state for step N is half-written; `DSCHAT_KILL_AT=sigterm_after_step:N` (or `sigint_...`)
    sends SIGTERM (SIGINT) instead (the run should then save a state and exit 143, or 130).
    """
    target = os.environ.get("DSCHAT_KILL_AT")
    if target == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif target == f"sigterm_{point}:{step}":
        os.kill(os.getpid(), signal.SIGTERM)
    elif target == f"sigint_{point}:{step}":
        os.kill(os.getpid(), signal.SIGINT)


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_complete_states(output_dir: str | os.PathLike) -> list[Path]:
    """Complete states, oldest first; temporary and half-written directories are ignored."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_state(output_dir: str | os.PathLike) -> Path | None:
    states = list_complete_states(output_dir)
    return states[-1] if states else None


def save_training_state(
    output_dir: str | os.PathLike,
    global_step: int,
    engines: dict[str, Any],
    trainer_state: dict,
    save_total_limit: int = 2,
    rank_state: dict | None = None,
) -> Path:
    """Write a complete state for `global_step` (collective: call on every rank)."""
    root = checkpoints_root(output_dir)
    final = root / f"step-{global_step}"
    tmp = root / f".tmp-step-{global_step}"
    if is_rank_0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
    per_rank = {"rng": get_rng_state(), **(rank_state or {})}
    atomic_write(tmp / f"rank_state_{get_rank()}.pt", lambda fh: torch.save(per_rank, fh))
    maybe_inject_kill("during_save", global_step)
    barrier()
    if is_rank_0():
        atomic_write_json(tmp / STATE_FILE, {**trainer_state, "global_step": global_step,
                                             "engines": sorted(engines)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_complete_states(output_dir)[:-max(1, save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_rank_file(path: Path) -> dict:
    """A rank's state holds tensors and plain values only: loaded with weights_only=True, so a planted or
    foreign pickle cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"--resume: {path} holds objects other than tensors and plain values, which are never "
                        "unpickled (a file not written by this version, or planted); start a new --output_dir "
                        "or remove that state") from None


def load_training_state(state_dir: str | os.PathLike, engines: dict[str, Any],
                        load_optimizer_states: bool = True) -> tuple[dict, dict]:
    """Restore engines and this rank's RNG; return (trainer_state, this rank's extra state)."""
    state_dir = Path(state_dir)
    trainer_state = json.loads((state_dir / STATE_FILE).read_text())
    for name, engine in engines.items():
        has_optimizer = getattr(engine, "optimizer", None) is not None
        load_path, _ = engine.load_checkpoint(
            str(state_dir), tag=name, load_module_strict=True,
            load_optimizer_states=load_optimizer_states and has_optimizer,
            load_lr_scheduler_states=load_optimizer_states and has_optimizer,
        )
        if load_path is None:
            raise RuntimeError(f"{state_dir}: no DeepSpeed checkpoint for engine '{name}'")
    rank_file = state_dir / f"rank_state_{get_rank()}.pt"
    per_rank = load_rank_file(rank_file) if rank_file.exists() else {}
    if "rng" in per_rank:
        set_rng_state(per_rank["rng"])
    return trainer_state, per_rank
