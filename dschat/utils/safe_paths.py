"""What another local user must not be able to plant or redirect: the answer to "is this directory
safely mine", this user's private cache root, and the one way to append to a file.

A run trusts what it finds in its output directory (training states, metrics, caches) and in its caches:
anything there is loaded or appended to as the user's own. Another local user who could write there (a
run directory prepared in /tmp, a shared cache, a group-writable folder) could plant a pickle or a
symlink. So:

- `check_dir_is_yours`: a directory we load from or write into must be owned by us and not writable by
  group or others (output directories, pipeline roots, caches);
- `ensure_private_dir`: a cache directory, created 0700 and checked the same way;
- `user_cache_root`: `$XDG_CACHE_HOME/dschat`, below which per-user data, keys and build caches live;
- `open_append`: appends (metrics, logs, caches) never follow a symlink and only go to a regular file;
- `processes_using`: which live processes hold a file open (or mapped), to tell a stale lock or segment from
  one in use.

Standard library and `dschat.utils.errors` only: every module, the light commands and the process-group
set-up included, can use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from dschat.utils.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0644 under the usual umask 022: what `open()` would give a new file."""
    return 0o666 & ~current_umask()


def user_cache_root() -> Path:
    """$XDG_CACHE_HOME/dschat (~/.cache/dschat): this user's private data, keys and build caches live below."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dschat"


def check_dir_is_yours(path: str | os.PathLike, flag: str) -> os.stat_result:
    """Refuse a directory another local user could have planted files in: owned by someone else, or
    writable by group or others. Follows a symlink (its target is what gets written and read).

    The one answer to "is this directory safely mine", for output directories, pipeline roots and caches:
    whatever such a directory holds (states, caches, logs) is later loaded or appended to as our own.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot read it ({err.strerror}); choose a directory of your own") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{flag} {path}: exists and is not a directory; choose another {flag}")
    if info.st_uid != os.geteuid():
        raise UserError(f"{flag} {path}: owned by uid {info.st_uid}, not by you (uid {os.geteuid()}); files another "
                        f"user placed there would be loaded as yours: use a directory of your own")
    if info.st_mode & 0o022:
        raise UserError(f"{flag} {path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); another "
                        f"user could plant files there: run `chmod go-w {path}` or use a directory of your own")
    return info


def ensure_private_dir(path: str | os.PathLike, flag: str, mode: int = 0o700) -> Path:
    """A directory only we can write (caches we later load, run roots we resume from): created with `mode`
    (0700 by default); refused (`check_dir_is_yours`) when another user owns it or group/others may write it,
    since anything planted there would be trusted."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(mode=mode & ~0o022, parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create it ({err.strerror}); choose a writable directory") from None
    check_dir_is_yours(directory, flag)
    return directory


def open_append(path: str | os.PathLike, encoding: str = "utf-8", buffering: int = -1):
    """Open `path` (created if missing, mode as `open` gives) for appending text, as the one way every log,
    metrics file and cache is appended to (`buffering` as `open` takes it: 1 for a log read while written).

    A symlink planted at `path` is not followed (O_NOFOLLOW: it could point at a file of the victim's, which
    would get our lines), and a FIFO, device or directory is refused instead of blocking or writing into it;
    both are one line naming the file. Other OS errors (permissions, a full disk) propagate.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, default_file_mode())
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path}: is a symbolic link; appends never follow one (it may have been planted to make "
                            "this run write into another file): remove it and run again") from None
        if err.errno in (errno.ENXIO, errno.EISDIR):
            raise UserError(f"{path}: is not a regular file; remove it and run again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: is not a regular file; remove it and run again")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", buffering=buffering, encoding=encoding)


def processes_using(path: str | os.PathLike, mapped: bool = False) -> set[int] | None:
    """Pids of the processes that hold `path` open (and, with `mapped`, that have it mapped), read from /proc;
    only our own processes are visible unless we are root. None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, found = str(path), set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if mapped and target in (entry / "maps").read_text(errors="replace"):
                found.add(int(entry.name))
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        found.add(int(entry.name))
                        break
    return found
