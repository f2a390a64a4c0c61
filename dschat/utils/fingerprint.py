"""Identities of inputs that a completion marker or a cache records, so a changed input is noticed.

Owns `model_signature` (which weight files a model directory holds, with their sizes and times), used by
DPO's reference tables and selection's shard fingerprint, and `check_weight_files` (a truncated or damaged
safetensors file is one line naming it, before anything loads). Must not import models, DeepSpeed or `mpo_ext`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dschat.utils.errors import UserError

_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit on its JSON header


def model_signature(path: str) -> dict:
    """Name, size and mtime of a local model's weight files (a retrained model at the same path differs)."""
    directory = Path(path)
    if not directory.is_dir():
        return {"path": path}
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    return {"path": str(directory.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (reads the header only), or None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "shorter than its 8-byte header length"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its header claims {length} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(length).decode("utf-8"))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"its tensors need {expected} bytes but the file has {size} (truncated or damaged)"
    return None


def check_weight_files(path: str, flag: str) -> None:
    """One line naming a local model directory's damaged safetensors file (a copy cut short, a full disk)
    instead of a traceback from the loader; hub ids and other layouts pass untouched."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return
    for weights in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise UserError(f"{flag} {path}: {weights.name}: {problem}; copy or save the model again")
