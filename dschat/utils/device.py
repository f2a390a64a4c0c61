"""Moving batches to the device a model runs on. Upstream's `to_device`."""

from __future__ import annotations

import torch


def to_device(batch: dict, device) -> dict:
    """Move every tensor of a batch dict to `device` (non-tensors are passed through)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
