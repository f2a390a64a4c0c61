"""Attention-mask helpers shared by training (right-padded rows) and RLHF scoring (left-padded prompts)."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens (cumsum - 1, clamped at 0).

    Needed for left-padded rows on models such as Llama that otherwise number positions 0..L-1
    regardless of padding, which would shift every rotary position by the pad count; it is also the
    numbering HF `generate` gives left-padded rows.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def has_left_padding(attention_mask: torch.Tensor | None) -> bool:
    """True when some row starts with a masked position but attends to something later."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    return bool(((attention_mask[:, 0] == 0) & (attention_mask.sum(dim=1) > 0)).any())


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (what the phase-1/2 collators build)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def training_attention_mask(attention_mask: torch.Tensor, pad_mask: str) -> torch.Tensor | None:
    """The mask a causal LM needs for a right-padded training batch: none at all under `--pad_mask auto`.

    Causal attention already keeps every real token from seeing the pads after it, so real positions
    get the same outputs (pad positions differ, and every loss masks them out); without a mask the
    attention kernel takes its causal fast path instead of materialising a [B, 1, L, L] mask. Callers
    pass batches of the right-padding collators only, so no per-step check (a device sync) is needed.
    """
    return None if pad_mask == "auto" else attention_mask
