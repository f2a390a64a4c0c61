"""Which raw samples each training phase reads: `--data_split` arithmetic and the one phase slicer.

Owns upstream DeepSpeed-Chat's split arithmetic, kept exactly (`--data_split` weights over phases 1/2/3,
the seeded `RandomState(seed).shuffle` permutation, the rounding, the `.npy` index files and their names),
the 9:1 train/eval split of sources that have no eval split, and `phase_rows`, the one function that turns
a source into a phase's train and eval samples: `create_dataset` (steps 1-3) and step 2.5's prompt loader
both call it, so selection sees exactly the prompts step 3 trains on.

Works on raw samples only: it must not import the tokenising or collating modules (datasets.py,
collators.py), which build on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dschat.utils.data import raw_datasets
from dschat.utils.data.cache import CACHE_FILE_MODE, data_cache_dir
from dschat.utils.data.raw_datasets import PromptRawDataset
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write

DEFAULT_DATA_SPLIT = "2,4,4"
TRAIN_EVAL_SPLIT = "9,1"


def parse_data_split(data_split: str, expected: int | None = None) -> list[float]:
    """Comma-separated non-negative weights, normalised to sum 1."""
    try:
        weights = [float(part) for part in str(data_split).split(",")]
    except ValueError:
        weights = []
    if (not weights or any(w < 0 or w != w for w in weights) or sum(weights) <= 0
            or (expected is not None and len(weights) != expected)):
        count = f"{expected} " if expected else ""
        raise UserError(
            f"--data_split {data_split}: expected {count}comma-separated non-negative numbers with a "
            "positive sum, e.g. 2,4,4 (shares for phases 1, 2 and 3)"
        )
    total = sum(weights)
    return [w / total for w in weights]


def split_boundaries(data_split: str, size: int) -> list[int]:
    """Upstream boundaries: cumulative int(round(share * size)); the first split absorbs the rounding error."""
    bounds = [0]
    for share in parse_data_split(data_split):
        bounds.append(bounds[-1] + int(round(share * float(size))))
    excess = bounds[-1] - size
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    for i in range(1, len(bounds)):  # only tiny first shares can go negative; keep slices well formed
        bounds[i] = max(bounds[i], bounds[i - 1])
    return bounds


def get_shuffle_idx(seed: int | None, size: int) -> np.ndarray:
    """The seeded permutation upstream uses everywhere (RandomState(seed).shuffle of arange)."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    idx = np.arange(start=0, stop=size, step=1, dtype=dtype)
    np.random.RandomState(seed=seed).shuffle(idx)
    return idx


def split_index_file(output_path: str | os.PathLike, dataset_name: str, seed: int | None, split_name: str,
                     data_split: str, k: int) -> Path:
    return Path(output_path) / f"{dataset_name}_seed{seed}_{split_name}_{data_split}_{k}.npy"


def split_parts(local_rank: int, output_path: str | os.PathLike | None, dataset_name: str, seed: int | None,
                split_name: str, data_split: str, data_size: int) -> list[list[int]]:
    """All index lists of one split. Always recomputed (it is cheap and deterministic) so a stale
    index file from a differently sized source can never be reused; files are still written, with
    upstream's names, for inspection and compatibility."""
    bounds = split_boundaries(data_split, data_size)
    shuffle = get_shuffle_idx(seed, data_size)
    parts = [shuffle[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]
    if local_rank <= 0:
        directory = data_cache_dir(output_path)
        for k, part in enumerate(parts):
            atomic_write(split_index_file(directory, dataset_name, seed, split_name, data_split, k),
                         lambda fh, part=part: np.save(fh, part, allow_pickle=False), mode=CACHE_FILE_MODE)
    return [part.tolist() for part in parts]


def get_raw_dataset_split_index(local_rank: int, output_path: str | os.PathLike | None, dataset_name: str,
                                seed: int | None, split_name: str, data_split: str, split_index: int,
                                data_size: int, rebuild: bool = False) -> list[int]:
    """Indices of slice `split_index` of `data_split` over a source of `data_size` rows (upstream name)."""
    del rebuild  # index files are always rewritten, see split_parts
    return split_parts(local_rank, output_path, dataset_name, seed, split_name, data_split, data_size)[split_index]


def phase_only_split(train_phase: int) -> str:
    """"10,0,0" / "0,10,0" / "0,0,10": the whole source goes to one phase."""
    return ",".join("10" if i == train_phase - 1 else "0" for i in range(3))


def is_local_source(raw: PromptRawDataset) -> bool:
    """Local files/dirs, including a local copy whose path contains a known name; `local/jsonfile` is a name."""
    if isinstance(raw_datasets.underlying_adapter(raw), raw_datasets.LocalJsonFileDataset):
        return False
    return raw.is_local_path or os.path.exists(raw.dataset_name)


def effective_data_split(data_split: str | None, raw: PromptRawDataset, train_phase: int) -> str:
    """None: upstream's 2,4,4 for named datasets; the whole source to the current phase for local paths."""
    if data_split is not None:
        return data_split
    return phase_only_split(train_phase) if is_local_source(raw) else DEFAULT_DATA_SPLIT


def parse_data_part(text: str, flag: str = "--data_part") -> tuple[int, int]:
    """`K/N` -> (K, N) with 1 <= K <= N (part K of N parts)."""
    part, sep, parts = str(text).partition("/")
    try:
        k, n = int(part), int(parts)
    except ValueError:
        k = n = 0
    if not sep or n < 1 or not 1 <= k <= n:
        raise UserError(f"{flag} {text}: expected K/N with 1 <= K <= N, e.g. 1/2 (the first of two disjoint "
                        "halves) or 2/2 (the second)")
    return k, n


def part_indices(size: int, part: int, parts: int, seed: int | None) -> list[int]:
    """Positions of part `part` (1-based) of `parts` disjoint parts of `size` rows: the rows' positions
    permuted by `get_shuffle_idx(seed, size)` (upstream's seeded permutation) and cut into `parts` contiguous
    pieces by `split_boundaries` (equal weights), each piece in ascending position order.

    Why a rule of its own, after the phase split: the held-out reward model must train on pairs the training
    reward model never saw, and the two must together cover exactly the pairs one reward model would have
    used. Same size and seed give the same permutation, so parts 1..N are disjoint and cover every row."""
    bounds = split_boundaries(",".join(["1"] * parts), size)
    shuffle = get_shuffle_idx(seed, size)
    return sorted(int(i) for i in shuffle[bounds[part - 1]:bounds[part]])


def take_rows(data: Any, indices: list[int]) -> list[Mapping[str, Any]]:
    """The samples at `indices`, in that order, from a list of records or a datasets.Dataset."""
    if hasattr(data, "select"):  # datasets.Dataset: one arrow read instead of per-row lookups
        return list(data.select(indices))
    return [data[i] for i in indices]


def phase_rows(raw: PromptRawDataset, data_split: str | None, train_phase: int, seed: int | None,
               output_path: str | os.PathLike | None, local_rank: int,
               ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The raw samples of phase `train_phase`'s train and eval slices of one source, in training order.

    A source without an eval split is first split 9:1 into train and eval parts; each part is then sliced
    by `--data_split` (`None`: see `effective_data_split`). One exception: PPO prompts from a local source
    without an eval split and without `--data_split` (e.g. step 2.5's hard.jsonl) all train, and there is
    no eval slice. Index files are written by local rank <= 0 only.
    """
    split = effective_data_split(data_split, raw, train_phase)
    name = raw.dataset_name_clean
    train_src, eval_src = raw.get_train_data(), raw.get_eval_data()
    if eval_src is None and train_phase == 3 and data_split is None and is_local_source(raw):
        eval_src = []
    elif eval_src is None:
        train_part, eval_part = split_parts(local_rank, output_path, name, seed, "train_eval", TRAIN_EVAL_SPLIT,
                                            len(train_src))
        train_src, eval_src = take_rows(train_src, train_part), take_rows(train_src, eval_part)
    rows = []
    for split_name, source in (("train", train_src), ("eval", eval_src)):
        index = get_raw_dataset_split_index(local_rank, output_path, name, seed, split_name, split, train_phase - 1,
                                            len(source))
        rows.append(take_rows(source, index))
    return rows[0], rows[1]
