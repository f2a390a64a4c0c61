"""Identities of inputs that a completion marker or a cache records, so a changed input is noticed.

Owns `model_signature` (which weight files a model directory holds, with their sizes and times). Used by
DPO's reference tables and selection's shard fingerprint. Must not import models, DeepSpeed or `mpo_ext`.
"""

from __future__ import annotations

from pathlib import Path


def model_signature(path: str) -> dict:
    """Name, size and mtime of a local model's weight files (a retrained model at the same path differs)."""
    directory = Path(path)
    if not directory.is_dir():
        return {"path": path}
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    return {"path": str(directory.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
