"""Files: the one atomic writer and the one JSON-lines reader.

Owns `atomic_write` (and its bytes/text/json/jsonl forms): every file the project writes goes through it,
so a reader sees the old or the complete new content, never half of it. And `parse_jsonl` / `read_jsonl`:
every JSON-lines file it reads (data files, generations, shards, metrics, ...) is parsed here, strictly (a
bad line is a `UserError` naming the file and line) or, for the logs a killed run may leave torn
(`metrics.jsonl`), skipping unreadable lines. Imports `dschat.utils.errors` and `output_dir` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dschat.utils.errors import UserError
from dschat.utils.output_dir import default_file_mode

# --------------------------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """The one atomic writer: `write(fh)` fills a temp file created exclusively (mkstemp: a fresh, unguessable
    name, never opened through a symlink) next to `path`, which then replaces `path` in one rename, so readers
    see the old or the complete new content. Mode: `mode`, else what `open()` gives (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------- reading


def jsonl_lines(text: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed value or the `json.JSONDecodeError`) of every non-blank line. A line nested
    too deep for the parser (`[[[[...`, a RecursionError) is a JSONDecodeError like any unreadable line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, line, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, line, err
        except RecursionError:
            yield number, line, json.JSONDecodeError("nested too deep to read", line, 0)


def parse_jsonl(text: str, source: str | os.PathLike, *, skip_unreadable: bool = False,
                on_skip: Callable[[int, str], None] | None = None, hint: str = "") -> list[Any]:
    """The values of JSON-lines `text` (blank lines ignored). A line that is not JSON is a `UserError`
    "`source`:LINE: invalid JSON line (...)`hint`", or with `skip_unreadable` (a log a killed run may have
    left torn) it is left out and `on_skip(line number, line)` is told."""
    values = []
    for number, line, value in jsonl_lines(text):
        if isinstance(value, json.JSONDecodeError):
            if not skip_unreadable:
                raise UserError(f"{source}:{number}: invalid JSON line ({value}){hint}") from None
            if on_skip is not None:
                on_skip(number, line)
            continue
        values.append(value)
    return values


def read_jsonl(path: str | os.PathLike, *, skip_unreadable: bool = False,
               on_skip: Callable[[int, str], None] | None = None, hint: str = "") -> list[Any]:
    """`parse_jsonl` of a UTF-8 file this project wrote (metrics, shards, generations). Bytes that are not
    UTF-8 are an error naming the file, or with `skip_unreadable` are replaced (their line then fails to
    parse and is skipped). Data files from users go through `dschat.utils.data.raw_datasets.read_data_text`
    (gzip, a BOM) and `parse_jsonl`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace" if skip_unreadable else "strict")
    except UnicodeDecodeError as err:
        raise UserError(f"{p}: not UTF-8 text ({err.reason} at offset {err.start}){hint}") from None
    return parse_jsonl(text, p, skip_unreadable=skip_unreadable, on_skip=on_skip, hint=hint)
