"""Full, resumable training states: `OUTPUT_DIR/checkpoints/step-N/`.

A state holds one DeepSpeed checkpoint per engine (module, optimizer, scheduler, ZeRO partitions), each
rank's RNG state and extra per-rank data, and `trainer_state.json`. It is assembled under a temporary
name and renamed into place after the metadata file is written, so a directory named `step-N` with
`trainer_state.json` inside is always complete; a run killed mid-write leaves the previous state intact.
Checkpoints of multi-node runs need storage shared by all nodes (as DeepSpeed's own checkpoints do).

A state is resumed only if this user's runs wrote it. DeepSpeed's engine files are pickles, and a pickle
runs code when it is read, so a state planted by another local user (or copied from elsewhere) must never
reach a loader. The last file written into a state, `state_signature.json`, holds the state's identity
(stage and engines), the sha256 of every other file in it, and an HMAC-SHA256 of both under a key kept in
a private per-user file (`$XDG_CACHE_HOME/dschat/state-signing.key`, 0600). `find_latest_state` returns
the newest state whose signature and file hashes verify, before any file of it is unpickled; a state
without a valid signature is reported in one line and never loaded. The engine files are then read
with `torch.load(weights_only=True)` and an allow-list of the few DeepSpeed classes they hold
(`deepspeed_safe_globals`), as our own per-rank files are.

Owns the layout of a state, its signature and its save/find/load/prune; the trainer decides when to save.
Imports torch and `dschat.utils.{dist,errors,safe_paths,utils}` only: no step, no trainer, nothing of `mpo_ext`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from dschat.utils.dist import barrier, broadcast_object, get_rank, is_rank_0
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write, atomic_write_json
from dschat.utils.printing import print_rank_0
from dschat.utils.safe_paths import ensure_private_dir, user_cache_root
from dschat.utils.seeding import get_rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SIGNATURE_FILE = "state_signature.json"
SIGNATURE_FORMAT = 1
KEY_FILE = "state-signing.key"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_CHUNK = 8 << 20


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


def find_latest_state(output_dir: str | os.PathLike, identity: dict | None = None) -> Path | None:
    """The newest complete state this user's runs wrote (signature and every file hash verified, and its
    identity equal to `identity` when given), or None. States that fail are named in one line each and
    skipped, never loaded. Collective when torch.distributed is up: rank 0 verifies, every rank gets its
    answer (one key file, and each file hashed once)."""
    chosen, skipped, error = None, [], None
    if is_rank_0():
        try:
            for state_dir in reversed(list_complete_states(output_dir)):
                problem = verify_state(state_dir, identity)
                if problem is None:
                    chosen = state_dir
                    break
                skipped.append(f"{state_dir}: {problem}")
        except UserError as err:  # e.g. a key file of the wrong mode: every rank stops with rank 0's line
            error = str(err)
    chosen, skipped, error = broadcast_object((chosen, skipped, error))
    if error:
        raise UserError(error)
    for line in skipped:
        print_rank_0(f"warning: --resume: not resuming from {line}; such a state is never loaded")
    return chosen


# --------------------------------------------------------------------------------------------- signatures


def signing_key_path() -> Path:
    return user_cache_root() / KEY_FILE


def signing_key() -> bytes:
    """This user's key for signing training states, created on first use (32 random bytes, 0600).

    A key file another user owns or can read is refused with one line: whoever reads it could sign a
    planted state. Multi-node runs sign and verify on global rank 0 only, so one node's key is enough.
    """
    path = signing_key_path()
    ensure_private_dir(path.parent, "$XDG_CACHE_HOME/dschat")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            _create_key_file(path)
            continue
        except OSError as err:
            raise UserError(f"{path}: cannot read the key that signs your training states ({err.strerror}); "
                            f"remove it if it is not a regular file (your existing states then no longer "
                            "verify)") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise UserError(f"{path}: the key that signs your training states must be a regular file of "
                                f"yours that only you can read (mode {stat.S_IMODE(info.st_mode):o}, uid "
                                f"{info.st_uid}); remove it (states it signed then no longer verify)")
            text = fh.read(256).decode("ascii", "replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < 32:
            raise UserError(f"{path}: not a state-signing key (expected 64 hex digits); remove it and run again")
        return key
    raise UserError(f"{path}: could not be created; check that {path.parent} is yours and writable")


def _create_key_file(path: Path) -> None:
    """Write a new key under a temporary name and link it into place: concurrent first runs end up with one
    key, and the key is never visible half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
        os.fsync(fd)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _state_files(state_dir: Path) -> dict[str, Path] | str:
    """{relative path: path} of every file in a state except its signature; a description of the problem
    when it holds anything but regular files and directories (a planted symlink, a FIFO)."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(state_dir):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                return f"{path.relative_to(state_dir)} is not a regular file"
            files[str(path.relative_to(state_dir))] = path
    files.pop(SIGNATURE_FILE, None)
    return files


def _signed_payload(record: dict) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != "hmac"}, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")


def sign_state(state_dir: str | os.PathLike, identity: dict) -> None:
    """Write `state_signature.json` into a complete state directory (rank 0, after every file is written)."""
    state_dir = Path(state_dir)
    files = _state_files(state_dir)
    if isinstance(files, str):
        raise RuntimeError(f"{state_dir}: {files}")
    record = {"format": SIGNATURE_FORMAT, "identity": identity,
              "files": {rel: _file_sha256(path) for rel, path in sorted(files.items())}}
    record["hmac"] = hmac.new(signing_key(), _signed_payload(record), hashlib.sha256).hexdigest()
    atomic_write_json(state_dir / SIGNATURE_FILE, record)


def verify_state(state_dir: str | os.PathLike, identity: dict | None = None) -> str | None:
    """None when `state_dir` was signed with this user's key, its identity matches `identity` (if given)
    and every file is the one signed; else what is wrong, in a few words. Nothing in it is unpickled."""
    state_dir = Path(state_dir)
    signature = state_dir / SIGNATURE_FILE
    try:
        with open(signature, "rb") as fh:
            raw = fh.read(64 << 20)
        record = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        return (f"it has no {SIGNATURE_FILE} (written by another user, copied from elsewhere, or saved by an older "
                "version)")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"its {SIGNATURE_FILE} is unreadable"
    if not (isinstance(record, dict) and isinstance(record.get("hmac"), str)
            and isinstance(record.get("files"), dict) and record.get("format") == SIGNATURE_FORMAT):
        return f"its {SIGNATURE_FILE} is not a state signature"
    expected = hmac.new(signing_key(), _signed_payload(record), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, record["hmac"]):
        return (f"its signature does not verify with your key {signing_key_path()} (written by another user or on "
                "another machine; copy that machine's key file here to resume it)")
    if identity is not None and record.get("identity") != identity:
        return f"it is a state of {record.get('identity')}, not of {identity}"
    files = _state_files(state_dir)
    if isinstance(files, str):
        return files
    if set(files) != set(record["files"]):
        changed = sorted(set(files) ^ set(record["files"]))
        return f"its files differ from the signed ones ({', '.join(changed[:3])})"
    for rel, path in sorted(files.items()):
        if not hmac.compare_digest(_file_sha256(path), str(record["files"][rel])):
            return f"{rel} was changed after it was written"
    return None


def save_training_state(
    output_dir: str | os.PathLike,
    global_step: int,
    engines: dict[str, Any],
    trainer_state: dict,
    save_total_limit: int = 2,
    rank_state: dict | None = None,
    identity: dict | None = None,
) -> Path:
    """Write a complete, signed state for `global_step` (collective: call on every rank). `identity` (the
    stage and its engines; `state_identity`) is signed with it, and `find_latest_state` checks it."""
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
        sign_state(tmp, identity if identity is not None else state_identity("", engines))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_complete_states(output_dir)[:-max(1, save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def state_identity(stage: str, engines: dict[str, Any]) -> dict:
    """What a state is a state of: the stage that wrote it and its engines (signed into the state)."""
    return {"stage": stage, "engines": sorted(engines)}


def read_trainer_state(state_dir: str | os.PathLike) -> dict:
    """The JSON metadata of a state (plain JSON: reading it runs nothing), for the cheap checks that come
    before any engine file is read."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"--resume: {path} is unreadable ({type(err).__name__}); remove that state or start a new "
                        "--output_dir") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume: {path} is not a training state; remove that state or start a new --output_dir")
    return state


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain values, measured with
    `torch.serialization.get_unsafe_globals_in_checkpoint` over ZeRO stages 0-3 in fp32 and bf16 (and its
    fp16 loss scalers): loading with exactly these allowed runs no other code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_engine_loads(engine):
    """While inside, `engine.load_checkpoint` reads its files with `torch.load(weights_only=True)` and the
    allow-list above (DeepSpeed's checkpoint engines would unpickle anything); a file holding other objects is
    one line naming it."""
    checkpoint_engine = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"--resume: {path} holds objects DeepSpeed's checkpoints do not, which are never "
                            "unpickled (planted, or written by another DeepSpeed); start a new --output_dir or "
                            "remove that state") from None

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load


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
    """Restore engines and this rank's RNG; return (trainer_state, this rank's extra state).

    `state_dir` must come from `find_latest_state` (verified); run the cheap checks on `read_trainer_state`
    first. Engine files load with `weights_only=True` all the same."""
    state_dir = Path(state_dir)
    trainer_state = read_trainer_state(state_dir)
    for name, engine in engines.items():
        has_optimizer = getattr(engine, "optimizer", None) is not None
        with weights_only_engine_loads(engine):
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
