"""What a job prints: once (rank 0), whatever the number of ranks. Upstream's `print_rank_0`."""

from __future__ import annotations

from typing import Any

from dschat.utils.dist import get_rank


def print_rank_0(msg: Any, rank: int | None = None) -> None:
    """Print once per job (upstream signature: the optional rank is the caller's global rank)."""
    if (rank if rank is not None else get_rank()) <= 0:
        print(msg, flush=True)
