"""Collators that pad per batch, the project's one row padder, and PPO's mini-batch splitter.

Owns `pad_rows` (stack 1-D rows into a left- or right-padded [N, width] tensor: every other module that
pads token rows should call it), the width rule (`batch_width`: the longest row up to a multiple of 8, or
upstream's fixed maximum length), upstream's collators `DataCollatorReward` and `DataCollatorRLHF` (same
names and batch layout), our `DataCollatorSFT`, and upstream's `MiniDataset` (PPO's experience cut into
mini-batches).

Pure tensor code: it must not import the dataset, split or cache modules, nor anything of MPO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def batch_width(longest: int, max_len: int | None, padding: str) -> int:
    """`max_length`: exactly max_len (upstream). `longest`: longest row up to a multiple of 8, capped at max_len."""
    if padding == "max_length":
        if max_len is None:
            raise ValueError('padding="max_length" needs a maximum length')
        return max_len
    if padding != "longest":
        raise ValueError(f'padding must be "longest" or "max_length", not {padding!r}')
    width = round_up(max(longest, 1))
    return min(width, max_len) if max_len else width


def pad_rows(rows: Sequence[torch.Tensor], width: int, value: int, left: bool = False) -> torch.Tensor:
    """Stack 1-D rows into [N, width]; longer rows lose their end (right padding) or start (left padding)."""
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.long)
    for i, row in enumerate(rows):
        row = row[-width:] if left else row[:width]
        if left:
            out[i, width - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out


def _flat(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).reshape(-1)


class DataCollatorSFT:
    """Right-pads phase-1 items; labels are -100 wherever the attention mask is 0 (pad == eos, so ids can't tell)."""

    def __init__(self, pad_token_id: int, max_seq_len: int | None = None, padding: str = "longest") -> None:
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len
        self.padding = padding

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_flat(item["input_ids"]).long() for item in batch]
        masks = [_flat(item["attention_mask"]).long() if "attention_mask" in item else torch.ones_like(i)
                 for item, i in zip(batch, ids)]
        labels = [_flat(item["labels"]).long() if "labels" in item else i for item, i in zip(batch, ids)]
        width = batch_width(max(len(i) for i in ids), self.max_seq_len, self.padding)
        input_ids = pad_rows(ids, width, self.pad_token_id)
        attention_mask = pad_rows(masks, width, 0)
        label_rows = pad_rows(labels, width, -100).masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_rows}


class DataCollatorReward:
    """Phase-2 pairs -> [2B, L]: all chosen rows, then all rejected rows, one common width."""

    def __init__(self, pad_token_id: int | None = None, max_seq_len: int | None = None,
                 padding: str = "longest") -> None:
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len
        self.padding = padding

    def __call__(self, batch: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        ids = [_flat(item[0]).long() for item in batch] + [_flat(item[2]).long() for item in batch]
        masks = [_flat(item[1]).long() for item in batch] + [_flat(item[3]).long() for item in batch]
        lengths = [int(item[4]) if len(item) > 4 else 0 for item in batch]
        longest = max(len(i) for i in ids)
        if self.pad_token_id is None:  # upstream's `DataCollatorReward()`: items already at one width
            if any(len(i) != longest for i in ids):
                raise ValueError("DataCollatorReward needs pad_token_id to pad unpadded items")
            width = longest
        else:
            width = batch_width(longest, self.max_seq_len, self.padding)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        return {
            "input_ids": pad_rows(ids, width, pad),
            "attention_mask": pad_rows(masks, width, 0),
            "prompt_lengths": torch.tensor(lengths + lengths, dtype=torch.long),
        }


class DataCollatorRLHF:
    """Left-pads phase-3 prompts: exactly max_token_len wide (upstream) or the batch max up to a multiple of 8."""

    def __init__(self, max_token_len: int, inference_tp_size: int = 1, pad_token_id: int | None = None,
                 padding: str = "max_length") -> None:
        self.max_token_len = max_token_len
        self.inference_tp_size = inference_tp_size  # kept for the upstream signature; unused there too
        self.pad_token_id = pad_token_id
        self.padding = padding

    def __call__(self, batch: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        ids = [_flat(item[0]).long() for item in batch]
        masks = [_flat(item[1]).long() for item in batch]
        pad = self.pad_token_id if self.pad_token_id is not None else int(batch[0][2])
        longest = max(len(i) for i in ids)
        if self.padding == "longest":
            width = max(min(round_up(max(longest, 1)), self.max_token_len), longest)
        else:
            width = batch_width(longest, self.max_token_len, self.padding)
        return {"prompt": pad_rows(ids, width, pad, left=True),
                "prompt_att_mask": pad_rows(masks, width, 0, left=True)}


# --------------------------------------------------------------------------------------------- step 3 helpers


class MiniDataset:
    """Collects `max_size` large batches, then cuts each into `small_batch_size` pieces (PPO mini-batches)."""

    def __init__(self, max_size: int, small_batch_size: int) -> None:
        self.dataset: list[Any] = []
        self.max_size = max_size
        self.small_batch_size = small_batch_size

    @staticmethod
    def _size(batch: Any) -> int:
        if isinstance(batch, (list, tuple)):
            return len(batch[0])
        if isinstance(batch, Mapping):
            return len(next(iter(batch.values())))
        return len(batch)

    @staticmethod
    def _slice(value: Any, start: int, stop: int) -> Any:
        if torch.is_tensor(value) and value.dim() == 0:
            return value
        sliceable = hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, str)
        return value[start:stop] if sliceable else value

    def separate(self) -> list[Any]:
        small = []
        step = self.small_batch_size
        for large in self.dataset:
            for start in range(0, self._size(large), step):
                if isinstance(large, (list, tuple)):
                    small.append([self._slice(x, start, start + step) for x in large])
                elif isinstance(large, Mapping):
                    small.append({k: self._slice(v, start, start + step) for k, v in large.items()})
                else:
                    small.append(large[start:start + step])
        self.free()
        return small

    def add(self, data: Any) -> list[Any] | None:
        if len(self.dataset) >= self.max_size:
            raise ValueError("MiniDataset is full: add() called again without consuming the separated batches")
        self.dataset.append(data)
        return self.separate() if len(self.dataset) == self.max_size else None

    def free(self) -> None:
        self.dataset = []
