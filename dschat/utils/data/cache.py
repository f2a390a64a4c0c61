"""The node-safe cache of tokenised datasets: where it lives, what its key covers, and how it is built once.

Owns the cache directory (private to the user: its files are loaded as trusted data), the cache key
(file contents, the tokenizer's vocabulary and behaviour, the text format, every setting that changes the
tokens), and the build protocol: local rank 0 of each node builds under a file lock and writes each file
atomically (0600, through the one atomic writer); the other ranks poll for the files instead of sitting
in a collective, and stop at once with the builder's own error when it failed.

Knows nothing of what the files hold: it must not import the dataset, split or collator modules (they
build on it); `build_once` takes whatever the caller builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dschat.utils.data import raw_datasets
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_bytes, atomic_write_text
from dschat.utils.safe_paths import ensure_private_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: file_lock is a no-op there
    fcntl = None

DATA_CACHE_VERSION = 3  # bump when the cached layout or the way texts are built changes
CACHE_WAIT_TIMEOUT_ENV = "DSCHAT_DATA_CACHE_TIMEOUT"
DEFAULT_CACHE_WAIT_S = 3600.0
FULL_HASH_LIMIT = 64 << 20
EDGE_HASH_BYTES = 1 << 20
MARKER_SLACK_S = 120.0  # clock skew / start-up spread tolerated when judging a builder's error marker
_FINGERPRINT_EXTENSIONS = (*raw_datasets.LOCAL_DATA_EXTENSIONS, ".arrow")
CACHE_FILE_MODE = 0o600  # tokenised data is the user's own: not world-readable
_TOKENIZER_PROBE = "\n\nHuman: Hello, world! 0123 café naïve 日本\n\nAssistant: Sure thing."


# --------------------------------------------------------------------------------------------- cache directory


def default_data_cache_dir() -> Path:
    """Per-user default for --data_output_path: $XDG_CACHE_HOME/dschat/data_files (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dschat" / "data_files"


def data_cache_dir(output_path: str | os.PathLike | None) -> Path:
    """The cache directory to use (the default when None), created 0700 and refused with one line when
    another user owns it or group/others can write it: its files are loaded as trusted data."""
    return ensure_private_dir(default_data_cache_dir() if output_path is None else output_path,
                              "--data_output_path")


# --------------------------------------------------------------------------------------------- cache key


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Content hash for files under 64 MB; size + mtime + first/last MB above (cheap on huge corpora)."""
    st = os.stat(path)
    if st.st_size < FULL_HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return {"size": st.st_size, "sha256": digest.hexdigest()}
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(EDGE_HASH_BYTES)).hexdigest()
        fh.seek(max(0, st.st_size - EDGE_HASH_BYTES))
        tail = hashlib.sha256(fh.read(EDGE_HASH_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head, "tail": tail}


def path_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint of a data file or of every data file below a directory (hidden entries skipped)."""
    p = Path(path)
    if p.is_file():
        return {p.name: file_fingerprint(p)}
    out = {}
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(_FINGERPRINT_EXTENSIONS):
                full = Path(root) / name
                out[str(full.relative_to(p))] = file_fingerprint(full)
    return out


def source_fingerprint(name: str) -> dict[str, Any] | None:
    """What a local source's content is; None for hub ids (their content is pinned by the hub cache)."""
    if raw_datasets.find_adapter(name) is raw_datasets.LocalJsonFileDataset:
        return {str(f): file_fingerprint(f) for f in raw_datasets.local_jsonfile_files()}
    if os.path.exists(name):
        return path_fingerprint(name)
    return None


def tokenizer_fingerprint(tokenizer, end_of_conversation_token: str) -> dict[str, Any]:
    """Name alone is not enough (DS-Chat pitfall): vocabulary, special tokens and a probe encoding count."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
        "probe": list(tokenizer(_TOKENIZER_PROBE + end_of_conversation_token)["input_ids"]),
    }


def data_cache_key(data_path: Sequence[str], data_split: str | None, train_phase: int, seed: int | None,
                   tokenizer, max_seq_len: int, end_of_conversation_token: str,
                   sft_only_data_path: Sequence[str] = (), text_format: Mapping[str, Any] | None = None,
                   keep_truncated: bool = False) -> str:
    payload = {
        "text_format": dict(text_format or {}),
        "keep_truncated": bool(keep_truncated),
        "version": DATA_CACHE_VERSION,
        "data_path": list(data_path),
        "data_split": data_split,
        "train_phase": train_phase,
        "seed": seed,
        "max_seq_len": max_seq_len,
        "end_of_conversation_token": end_of_conversation_token,
        "sft_only_data_path": list(sft_only_data_path),
        "tokenizer": tokenizer_fingerprint(tokenizer, end_of_conversation_token),
        "sources": {name: source_fingerprint(name) for name in [*data_path, *sft_only_data_path]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def text_format(tokenizer, column_map: Mapping[str, str] | None, chat_format: str = "auto") -> dict[str, Any]:
    """What else decides the texts: the column mapping, the chat template that renders messages and
    --chat_format (which sources it renders)."""
    return {"column_map": dict(sorted((column_map or {}).items())),
            "chat_template": getattr(tokenizer, "chat_template", None), "chat_format": chat_format}


def data_cache_files(output_path: str | os.PathLike, key: str) -> tuple[Path, Path]:
    return (Path(output_path) / f"traindata_{key}.safetensors",
            Path(output_path) / f"evaldata_{key}.safetensors")


# --------------------------------------------------------------------------------------------- build protocol


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive POSIX lock (fcntl.lockf also works on NFS with lockd); a no-op where fcntl is missing."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, CACHE_FILE_MODE)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def cache_wait_timeout(wait_timeout_s: float | None = None) -> float:
    if wait_timeout_s is not None:
        return float(wait_timeout_s)
    return float(os.environ.get(CACHE_WAIT_TIMEOUT_ENV, DEFAULT_CACHE_WAIT_S))


def _marker_is_current(error_file: Path, seen_before: int | None, since_wall: float) -> bool:
    """A builder's error marker counts if it appeared or changed while we waited, or is recent: an old
    one (e.g. from a transient network failure last run) must not stop this run's ranks."""
    try:
        mtime_ns = error_file.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return mtime_ns != seen_before or mtime_ns / 1e9 >= since_wall - MARKER_SLACK_S


def wait_for_files(files: Sequence[Path], error_file: Path, timeout_s: float) -> None:
    """Poll until the builder's files exist; stop early with the builder's UserError if it wrote one."""
    since_wall = time.time()
    seen_before = error_file.stat().st_mtime_ns if error_file.exists() else None
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while not all(f.exists() for f in files):
        if _marker_is_current(error_file, seen_before, since_wall):
            with contextlib.suppress(FileNotFoundError):
                raise UserError(error_file.read_text(encoding="utf-8").strip())
        if time.monotonic() >= deadline:
            raise UserError(
                f"--data_output_path: waited {timeout_s:.0f}s for {files[0]} to be built by local rank 0; "
                f"check that rank 0 is alive and the directory is shared by the node's ranks, or raise "
                f"{CACHE_WAIT_TIMEOUT_ENV}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def resolve_local_rank(local_rank: int | None) -> int:
    """-1 from argparse under torchrun means "ask the environment"."""
    if local_rank is None or local_rank < 0:
        env = os.environ.get("LOCAL_RANK")
        return int(env) if env is not None and env.lstrip("-").isdigit() else -1
    return local_rank


def _distributed_world() -> int:
    return (torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)


def build_once(files: Sequence[Path], build: Callable[[], Sequence[Any]], local_rank: int, force: bool = False,
               wait_timeout_s: float | None = None) -> None:
    """Make `files` exist, built once per node, then return on every rank.

    Local rank <= 0 takes `<files[0]>.lock`; if a file is missing (or `force`), it calls `build()`, which
    returns one object per file, each with `to_bytes()`, and writes them in order (the last file's presence
    means "done"). A UserError from `build()` is left in `<files[0]>.error` for the waiting ranks, which
    poll (timeout: `wait_timeout_s`, $DSCHAT_DATA_CACHE_TIMEOUT, default one hour). A forced rebuild in a
    distributed job ends with a barrier instead, so no rank reads the previous files.
    """
    error_file = files[0].with_name(files[0].name + ".error")
    if local_rank <= 0:
        with file_lock(files[0].with_name(files[0].name + ".lock")):
            if force or not all(f.exists() for f in files):
                error_file.unlink(missing_ok=True)
                try:
                    built = build()
                except UserError as err:  # tell the waiting ranks instead of letting them time out
                    atomic_write_text(error_file, str(err), mode=CACHE_FILE_MODE)
                    raise
                for path, item in zip(files, built, strict=True):
                    atomic_write_bytes(path, item.to_bytes(), mode=CACHE_FILE_MODE)
    if force and _distributed_world() > 1:
        torch.distributed.barrier()
    elif local_rank > 0:
        wait_for_files(files, error_file, cache_wait_timeout(wait_timeout_s))
