"""Seeding and the random-number state a resumable training state carries.

Owns `set_random_seed` (every generator of the job from one seed) and `get_rng_state` / `set_rng_state`
(tensors and plain numbers only, so a saved state loads with `torch.load(weights_only=True)`). Imports torch,
numpy and `dschat.utils.dist` only.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dschat.utils.dist import get_accelerator


def set_random_seed(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def get_rng_state() -> dict:
    """Every generator's state as tensors and plain numbers only, so a saved state loads with
    `torch.load(weights_only=True)` (no pickled objects, no code run on load)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
