"""Where runs write: output directories and private cache directories, checked before any model loads.

Every stage that takes an `--output_dir` calls `prepare_output_dir` first and saves models through
`staged_output`; small files go through `dschat.utils.utils.atomic_write*`. What this guards against:

- `.`, the current or home directory, `/` or an existing file as the output: refused with one line.
- Two runs into one directory: the first holds an exclusive lock (`.dschat-run.lock`, holding its pid;
  an flock on it is dropped by the kernel when the process dies, so a lock left by a killed run is
  stale and taken over); the second refuses with one line.
- Mount points and symlinks to other disks: new outputs are staged inside the target itself, so every
  rename stays on the target's filesystem, and a symlinked output directory stays a symlink.
- Directories another local user could plant files in (a run directory prepared in /tmp): an output
  directory must be owned by us and not writable by group or others (`dschat.utils.safe_paths.
  check_dir_is_yours`, the one test of "is this directory safely mine", shared with caches and the
  pipeline root); output directories we create get no group/other write bit whatever the umask.

Owns the one output-directory helper (`prepare_output_dir`), the run lock and staged publishing
(`staged_output`, `publish_staged`). Imports the standard library and `dschat.utils.{dist,errors,safe_paths}`
only, so every module, the light `mpo` commands included, can use it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from dschat.utils.errors import EXIT_USER_ERROR, UserError
from dschat.utils.safe_paths import (  # noqa: F401 - ensure_private_dir: its older home, still importable here
    check_dir_is_yours,
    current_umask,
    default_file_mode,
    ensure_private_dir,
)

LOCK_FILE = ".dschat-run.lock"
STAGING_PREFIX = ".staging-"

_held_locks: dict[Path, int] = {}  # resolved directory -> fd holding its flock


# --------------------------------------------------------------------------------------------- modes


def default_dir_mode() -> int:
    return 0o777 & ~current_umask()


def normalise_modes(root: Path) -> None:
    """Give every file and directory below `root` (and `root`) the modes `open`/`mkdir` would have given.

    Writers that go through `mkstemp` (ours, safetensors, transformers) leave 0600 files behind; an
    output's files should all read alike.
    """
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


# --------------------------------------------------------------------------------------------- checks


def _forbidden_targets() -> dict[Path, str]:
    return {Path("/").resolve(): "the filesystem root", Path.cwd().resolve(): "the current directory",
            Path.home().resolve(): "your home directory"}


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Refuse targets a run must never write into; no side effects (safe on every rank)."""
    if not str(path).strip():
        raise UserError(f"{flag}: empty path; pass a directory for this run's outputs, e.g. {flag} runs/NAME")
    target = Path(path).expanduser()
    what = _forbidden_targets().get(target.resolve())
    if what is not None:
        raise UserError(f"{flag} {path}: is {what}; a run replaces files in its output directory, so give it a "
                        f"directory of its own, e.g. {flag} runs/NAME")
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory; remove it or choose another {flag}")
    if target.is_symlink() and not target.exists():
        raise UserError(f"{flag} {path}: is a symlink to a missing directory ({os.readlink(target)}); create the "
                        f"target or choose another {flag}")
    if target.exists():
        check_dir_is_yours(target, flag)
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose a writable location")
    return target


# --------------------------------------------------------------------------------------------- run lock


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}


def acquire_run_lock(directory: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Hold `directory`'s run lock until this process exits; one line if another live run holds it."""
    directory = Path(directory)
    key = directory.resolve()
    lock = directory / LOCK_FILE
    if key in _held_locks:
        return lock
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, default_file_mode())
        except OSError as err:
            raise UserError(f"{flag} {directory}: cannot create its lock file {lock} ({err.strerror}); "
                            f"remove it if it is not a regular file, or choose another {flag}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise UserError(f"{flag} {directory}: another run ({who}) is writing there; wait for it to finish "
                            f"or choose another {flag}") from None
        try:  # the holder may have released and unlinked it between our open and our lock: retry
            same = os.lstat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            print(f"note: {flag} {directory}: taking over the lock of pid {previous['pid']} on "
                  f"{previous.get('host', '?')}, which is gone (killed run)", flush=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        _held_locks[key] = fd
        atexit.register(release_run_lock, directory)
        return lock


@contextlib.contextmanager
def held_run_lock(directory: str | os.PathLike, flag: str = "--output_dir") -> Iterator[Path]:
    """`acquire_run_lock` for a block: released after it unless this process held the lock already."""
    held_before = Path(directory).resolve() in _held_locks
    lock = acquire_run_lock(directory, flag)
    try:
        yield lock
    finally:
        if not held_before:
            release_run_lock(directory)


def release_run_lock(directory: str | os.PathLike) -> None:
    """Remove and unlock `directory`'s lock if this process holds it (also done at exit)."""
    directory = Path(directory)
    fd = _held_locks.pop(directory.resolve(), None)
    if fd is None:
        return
    lock = directory / LOCK_FILE
    with contextlib.suppress(OSError):
        if os.lstat(lock).st_ino == os.fstat(fd).st_ino:
            lock.unlink()  # before unlocking: a waiter that opened this inode sees it gone and retries
    os.close(fd)


def make_dir_yours(path: Path) -> None:
    """Create `path` (and missing parents) without group/other write on it, whatever the umask: a
    directory created group-writable (umask 002) would be refused by `check_dir_is_yours`."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a symlink whose target appeared meanwhile stays as is
            if not path.is_symlink() and os.stat(path).st_uid == os.geteuid():
                os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o022)


def prepare_output_dir(path: str | os.PathLike | None, flag: str = "--output_dir", lock: bool = True) -> Path | None:
    """Check, create and lock a run's output directory; call before loading models.

    Collective when torch.distributed is initialised (global rank 0 creates and locks; every rank
    exits with code 2 if that fails). A symlink stays a symlink: its target is created and used. Staging
    directories left by a killed save are removed once the lock is held. Returns the path (None if
    `path` is None: the stage saves nothing).
    """
    from dschat.utils.dist import any_rank_true, is_rank_0  # torch: not for modules that only parse flags

    if path is None:
        return None
    target = check_output_dir(path, flag)
    error = None
    if is_rank_0():
        try:
            make_dir_yours(target)
            check_dir_is_yours(target, flag)  # also when another user created it since the check above
            if lock:
                acquire_run_lock(target, flag)
                for leftover in target.glob(f"{STAGING_PREFIX}*"):
                    shutil.rmtree(leftover, ignore_errors=True)
        except UserError as err:
            error = str(err)
        except OSError as err:
            error = f"{flag} {path}: cannot create it ({err.strerror}); choose a writable location"
    if any_rank_true(error is not None):
        if error:
            raise UserError(error)
        raise SystemExit(EXIT_USER_ERROR)
    return target


# --------------------------------------------------------------------------------------------- staging


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, markers: Sequence[str] = ("config.json",),
                  keep_existing: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory inside `target`; on success move its entries into `target`.

    Staging inside the target keeps every rename on the target's own filesystem (mount points, symlinks
    to other disks) and leaves a symlinked `target` a symlink. `markers` (the files whose presence says
    "complete", e.g. config.json) are removed from `target` before anything moves and moved in last, so
    a crash mid-publish leaves no marker beside a mix of old and new files. Entries of `target` that the
    new output does not replace are kept (logs, metrics, states) unless `keep_existing` is False.
    On an exception the staging directory is removed and `target` is untouched.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_staged(staging, target, markers, keep_existing)


def publish_directory(source: str | os.PathLike, target: str | os.PathLike, keep_existing: bool = True) -> None:
    """Make `source`'s entries `target`'s (e.g. a kept best model becoming the final one), then remove `source`.

    Entries move by renames (no second copy of the weights) through `staged_output`, so a crash leaves
    `target` whole; `keep_existing` is `staged_output`'s. `source` may lie inside `target`.
    """
    source = Path(source)
    with staged_output(target, keep_existing=keep_existing) as staging:
        for entry in source.iterdir():
            os.replace(entry, staging / entry.name)
    source.rmdir()


def publish_staged(staging: Path, target: Path, markers: Sequence[str] = (), keep_existing: bool = True) -> None:
    normalise_modes(staging)
    entries = sorted(staging.iterdir(), key=lambda e: (e.name in markers, markers.index(e.name)
                                                         if e.name in markers else 0, e.name))
    for entry in entries:
        if entry.name in markers:
            _remove(target / entry.name)
    if not keep_existing:
        new = {e.name for e in entries}
        for old in target.iterdir():
            if old.name not in new and old != staging and old.name != LOCK_FILE:
                _remove(old)
    for entry in entries:
        dest = target / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    staging.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
