"""Splits, per-phase tokenised datasets, the node-safe cache, collators and MiniDataset.

Upstream's function names and split arithmetic (`--data_split` weights over phases 1/2/3, the same
seeded shuffle and rounding) are kept; what differs on purpose:
items are stored unpadded and padded per batch by the collators; one end-of-text convention
(the tokenizer's eos) for every phase; the cache key covers file contents and the tokenizer; the cache
is built by local rank 0 under a file lock while other ranks poll for the files instead of sitting in
an NCCL barrier; caches are safetensors files (token ids and offsets, no pickle: loading one cannot run
code) in a directory only the user can write, by default under the user's cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import Dataset

from dschat.utils import startup
from dschat.utils.data import raw_datasets
from dschat.utils.data.raw_datasets import PromptRawDataset
from dschat.utils.errors import UserError
from dschat.utils.output_dir import ensure_private_dir
from dschat.utils.utils import atomic_write, atomic_write_bytes, atomic_write_text, print_rank_0

DATA_CACHE_VERSION = 2  # bump when the cached layout or the way texts are built changes
DEFAULT_DATA_SPLIT = "2,4,4"
TRAIN_EVAL_SPLIT = "9,1"
CACHE_WAIT_TIMEOUT_ENV = "DSCHAT_DATA_CACHE_TIMEOUT"
DEFAULT_CACHE_WAIT_S = 3600.0
FULL_HASH_LIMIT = 64 << 20
EDGE_HASH_BYTES = 1 << 20
MARKER_SLACK_S = 120.0  # clock skew / start-up spread tolerated when judging a builder's error marker
_FINGERPRINT_EXTENSIONS = (*raw_datasets.LOCAL_DATA_EXTENSIONS, ".arrow")
CACHE_FILE_MODE = 0o600  # tokenised data is the user's own: not world-readable
_TOKENIZER_PROBE = "\n\nHuman: Hello, world! 0123 café naïve 日本\n\nAssistant: Sure thing."


# --------------------------------------------------------------------------------------------- dataset lookup


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or raw_datasets.is_data_file(name)


def unknown_dataset_error(name: str) -> UserError:
    return UserError(f"--data_path {name}: no such file or directory")


def check_data_path(name: str) -> None:
    """Fail fast (on every rank, before any waiting) for paths that do not exist; other names are tried
    as built-in DeepSpeed-Chat names, then as hub ids through datasets.load_dataset."""
    if raw_datasets.find_adapter(name) is None and looks_like_path(name) and not os.path.exists(name):
        raise unknown_dataset_error(name)


def get_raw_dataset(dataset_name: str, output_path: str, seed: int, local_rank: int, tokenizer=None,
                    column_map: Mapping[str, str] | None = None) -> PromptRawDataset:
    """Adapter for a --data_path entry: a known name (substring, upstream order), else a local path, else a
    hub id. Local paths and hub ids may use the standard (TRL) layouts and a column mapping; `tokenizer`
    renders conversational data with its chat template."""
    adapter = raw_datasets.find_adapter(dataset_name)
    if adapter is not None:
        if column_map:
            raise UserError(f"--data_path {dataset_name}: a built-in dataset has fixed columns; the column mapping "
                            "(--data_keys/--prompt_key/--chosen_key/--rejected_key) applies to local files and "
                            "other hub datasets")
        return adapter(output_path, seed, local_rank, dataset_name)
    if os.path.exists(dataset_name):
        return raw_datasets.open_standard_source(dataset_name, output_path, seed, local_rank, local=True,
                                                 column_map=column_map, tokenizer=tokenizer)
    if looks_like_path(dataset_name):
        raise unknown_dataset_error(dataset_name)
    return raw_datasets.open_standard_source(dataset_name, output_path, seed, local_rank, local=False,
                                             column_map=column_map, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------- split arithmetic


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


def split_index_file(output_path: str, dataset_name: str, seed: int | None, split_name: str,
                     data_split: str, k: int) -> Path:
    return Path(output_path) / f"{dataset_name}_seed{seed}_{split_name}_{data_split}_{k}.npy"


def default_data_cache_dir() -> Path:
    """Per-user default for --data_output_path: $XDG_CACHE_HOME/dschat/data_files (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dschat" / "data_files"


def data_cache_dir(output_path: str | os.PathLike | None) -> Path:
    """The cache directory to use (the default when None), created 0700 and refused with one line when
    another user owns it or group/others can write it: its files are loaded as trusted data."""
    return ensure_private_dir(default_data_cache_dir() if output_path is None else output_path,
                              "--data_output_path")


def split_parts(local_rank: int, output_path: str | None, dataset_name: str, seed: int | None,
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


def get_raw_dataset_split_index(local_rank: int, output_path: str | None, dataset_name: str, seed: int | None,
                                split_name: str, data_split: str, split_index: int, data_size: int,
                                rebuild: bool = False) -> list[int]:
    """Indices of slice `split_index` of `data_split` over a source of `data_size` rows (upstream name)."""
    del rebuild  # index files are always rewritten, see split_parts
    return split_parts(local_rank, output_path, dataset_name, seed, split_name, data_split, data_size)[split_index]


def phase_only_split(train_phase: int) -> str:
    """"10,0,0" / "0,10,0" / "0,0,10": the whole source goes to one phase."""
    return ",".join("10" if i == train_phase - 1 else "0" for i in range(3))


def is_local_source(raw: PromptRawDataset) -> bool:
    """Local files/dirs, including a local copy whose path contains a known name; `local/jsonfile` is a name."""
    if isinstance(raw, raw_datasets.LocalJsonFileDataset):
        return False
    return raw.is_local_path or os.path.exists(raw.dataset_name)


def effective_data_split(data_split: str | None, raw: PromptRawDataset, train_phase: int) -> str:
    """None: upstream's 2,4,4 for named datasets; the whole source to the current phase for local paths."""
    if data_split is not None:
        return data_split
    return phase_only_split(train_phase) if is_local_source(raw) else DEFAULT_DATA_SPLIT


# --------------------------------------------------------------------------------------------- dataset


def _as_ids(item: Any) -> torch.Tensor:
    """Accept a tensor, a list of ints, or a tokenizer-style dict (padding removed via its mask)."""
    if isinstance(item, Mapping):
        ids = torch.as_tensor(item["input_ids"]).reshape(-1)
        if "attention_mask" in item:
            ids = ids[torch.as_tensor(item["attention_mask"]).reshape(-1).bool()]
        return ids.long()
    return torch.as_tensor(item).reshape(-1).long()


class PromptDataset(Dataset):
    """Per-phase items over plain lists of 1-D LongTensors (unpadded; collators pad per batch).

    phase 1: {"input_ids", "attention_mask", "labels"}; phase 2: (chosen_ids, chosen_mask,
    rejected_ids, rejected_mask, prompt_length); phase 3: (prompt_ids, prompt_mask, pad_token_id),
    NOT reversed (DataCollatorRLHF left-pads directly).
    """

    def __init__(self, prompt_dataset: Sequence[Any], chosen_dataset: Sequence[Any], reject_dataset: Sequence[Any],
                 pad_token_id: int, train_phase: int, prompt_lengths: Sequence[int] | None = None) -> None:
        super().__init__()
        self.prompt_dataset = [_as_ids(x) for x in prompt_dataset]
        self.chosen_dataset = [_as_ids(x) for x in chosen_dataset]
        self.reject_dataset = [_as_ids(x) for x in reject_dataset]
        self.pad_token_id = pad_token_id
        self.train_phase = train_phase
        if train_phase == 2:
            if len(self.chosen_dataset) != len(self.reject_dataset):
                raise ValueError("phase 2 needs as many rejected as chosen sequences")
            lengths = prompt_lengths if prompt_lengths is not None else [0] * len(self.chosen_dataset)
            self.prompt_lengths = [int(n) for n in lengths]
        else:
            self.prompt_lengths = [int(n) for n in (prompt_lengths or [])]

    def __len__(self) -> int:
        return len(self.prompt_dataset) if self.train_phase == 3 else len(self.chosen_dataset)

    def __getitem__(self, idx: int):
        if self.train_phase == 1:
            ids = self.chosen_dataset[idx]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        if self.train_phase == 2:
            chosen, rejected = self.chosen_dataset[idx], self.reject_dataset[idx]
            return (chosen, torch.ones_like(chosen), rejected, torch.ones_like(rejected),
                    torch.tensor(self.prompt_lengths[idx], dtype=torch.long))
        prompt = self.prompt_dataset[idx]
        return prompt, torch.ones_like(prompt), self.pad_token_id

    def lengths(self) -> list[int]:
        """Row length per item as a collator pads it (a pair: its longer side), for length grouping."""
        if self.train_phase == 1:
            return [len(ids) for ids in self.chosen_dataset]
        if self.train_phase == 2:
            return [max(len(c), len(r)) for c, r in zip(self.chosen_dataset, self.reject_dataset)]
        return [len(ids) for ids in self.prompt_dataset]

    def _columns(self) -> dict[str, list]:
        return {"prompt": self.prompt_dataset, "chosen": self.chosen_dataset, "rejected": self.reject_dataset,
                "prompt_lengths": self.prompt_lengths}

    def select(self, indices: Iterable[int]) -> PromptDataset:
        """A reordered/subset copy (used for seeded blending)."""
        order = [int(i) for i in indices]
        cols = {name: ([col[i] for i in order] if col else []) for name, col in self._columns().items()}
        return PromptDataset(cols["prompt"], cols["chosen"], cols["rejected"], self.pad_token_id,
                             self.train_phase, cols["prompt_lengths"] or None)

    @classmethod
    def concat(cls, parts: Sequence[PromptDataset], pad_token_id: int, train_phase: int) -> PromptDataset:
        def joined(name: str) -> list:
            return [x for part in parts for x in part._columns()[name]]

        return cls(joined("prompt"), joined("chosen"), joined("rejected"), pad_token_id, train_phase,
                   joined("prompt_lengths") or None)

    def to_bytes(self) -> bytes:
        """The cache format: safetensors (each column's ids concatenated, plus offsets), settings as string
        metadata. Holds no code, so a planted file cannot run anything when loaded."""
        tensors = {"prompt_lengths": torch.tensor(self.prompt_lengths, dtype=torch.long)}
        for name in ("prompt", "chosen", "rejected"):
            column = self._columns()[name]
            tensors[f"{name}.ids"] = torch.cat(column) if column else torch.zeros(0, dtype=torch.long)
            tensors[f"{name}.offsets"] = torch.tensor([0, *np.cumsum([len(x) for x in column]).tolist()],
                                                      dtype=torch.long)
        metadata = {"format": str(DATA_CACHE_VERSION), "train_phase": str(self.train_phase),
                    "pad_token_id": json.dumps(self.pad_token_id)}
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PromptDataset:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
        if metadata.get("format") != str(DATA_CACHE_VERSION):
            raise ValueError(f"cache format {metadata.get('format')}, expected {DATA_CACHE_VERSION}")

        def column(name: str) -> list[torch.Tensor]:
            offsets = tensors[f"{name}.offsets"].tolist()
            return list(torch.split(tensors[f"{name}.ids"], [b - a for a, b in zip(offsets, offsets[1:])]))

        lengths = tensors["prompt_lengths"].tolist()
        return cls(column("prompt"), column("chosen"), column("rejected"), json.loads(metadata["pad_token_id"]),
                   int(metadata["train_phase"]), lengths or None)


# --------------------------------------------------------------------------------------------- tokenising


def _encode(tokenizer, texts: list[str], max_len: int | None, batch_size: int = 1000) -> list[list[int]]:
    """Batched tokenisation with the tokenizer's own special tokens (BOS for Llama/OPT), right truncation."""
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if max_len is None:
            enc = tokenizer(chunk)
        else:
            enc = tokenizer(chunk, truncation=True, max_length=max_len)
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def create_dataset_split(current_dataset: Iterable[Mapping[str, Any]], raw_dataset: PromptRawDataset,
                         train_phase: int, tokenizer, end_of_conversation_token: str, max_seq_len: int,
                         local_rank: int = -1) -> PromptDataset:
    """Tokenise one slice for one phase. Samples an adapter maps to None are skipped and counted."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eot = end_of_conversation_token or ""
    skipped = filtered = 0
    if train_phase == 1:
        texts = []
        for sample in current_dataset:
            text = raw_dataset.get_prompt_and_chosen(sample)
            if text is None:
                skipped += 1
            else:
                texts.append(text + eot)
        chosen = [_long(ids) for ids in _encode(tokenizer, texts, max_seq_len) if ids]
        dataset = PromptDataset([], chosen, [], pad, 1)
    elif train_phase == 2:
        prompts, chosen_texts, rejected_texts = [], [], []
        for sample in current_dataset:
            chosen = raw_dataset.get_prompt_and_chosen(sample)
            rejected = raw_dataset.get_prompt_and_rejected(sample)
            if chosen is None or rejected is None:
                skipped += 1
                continue
            prompts.append(raw_dataset.get_prompt(sample) or "")
            chosen_texts.append(chosen + eot)
            rejected_texts.append(rejected + eot)
        chosen_ids = _encode(tokenizer, chosen_texts, max_seq_len)
        rejected_ids = _encode(tokenizer, rejected_texts, max_seq_len)
        prompt_ids = _encode(tokenizer, prompts, None)
        lengths = [min(len(p) if prompt else 0, len(c), len(r))
                   for prompt, p, c, r in zip(prompts, prompt_ids, chosen_ids, rejected_ids)]
        dataset = PromptDataset([], [_long(c) for c in chosen_ids], [_long(r) for r in rejected_ids], pad, 2,
                                lengths)
    elif train_phase == 3:
        prompts = []
        for sample in current_dataset:
            prompt = raw_dataset.get_prompt(sample)
            if prompt is None:
                skipped += 1
            else:
                prompts.append(prompt)
        kept = []
        for ids in _encode(tokenizer, prompts, None):
            if 0 < len(ids) <= max_seq_len:
                kept.append(_long(ids))
            else:
                filtered += 1
        dataset = PromptDataset(kept, [], [], pad, 3)
    else:
        raise UserError(f"train_phase {train_phase}: must be 1 (SFT), 2 (reward model / DPO) or 3 (PPO)")
    message = f"Creating dataset {raw_dataset.dataset_name_clean} for train_phase={train_phase} size={len(dataset)}"
    if train_phase == 3:
        message += f" filtered={filtered}"
    if skipped:
        message += f" skipped={skipped} (missing or empty prompt/answer)"
    print_rank_0(message, local_rank)
    return dataset


def _take(data: Any, indices: list[int]) -> list[Mapping[str, Any]]:
    if hasattr(data, "select"):  # datasets.Dataset: one arrow read instead of per-row lookups
        return list(data.select(indices))
    return [data[i] for i in indices]


def create_dataset(local_rank: int, dataset_name: str, data_split: str | None, output_path: str, train_phase: int,
                   seed: int | None, tokenizer, end_of_conversation_token: str, max_seq_len: int,
                   rebuild: bool = False, column_map: Mapping[str, str] | None = None,
                   ) -> tuple[PromptDataset, PromptDataset]:
    """Phase slice of one source's train and eval parts (train-only sources are split 9:1 first)."""
    raw = get_raw_dataset(dataset_name, output_path, seed, local_rank, tokenizer=tokenizer, column_map=column_map)
    split = effective_data_split(data_split, raw, train_phase)
    clean = raw.dataset_name_clean
    train_src, eval_src = raw.get_train_data(), raw.get_eval_data()
    if eval_src is None and train_phase == 3 and data_split is None and is_local_source(raw):
        eval_src = []  # PPO prompts (e.g. select's hard.jsonl): every prompt trains; step 3 has no eval
    elif eval_src is None:
        train_part, eval_part = split_parts(local_rank, output_path, clean, seed, "train_eval", TRAIN_EVAL_SPLIT,
                                            len(train_src))
        train_src, eval_src = _take(train_src, train_part), _take(train_src, eval_part)
    out = []
    for split_name, source in (("train", train_src), ("eval", eval_src)):
        index = get_raw_dataset_split_index(local_rank, output_path, clean, seed, split_name, split,
                                            train_phase - 1, len(source), rebuild)
        out.append(create_dataset_split(_take(source, index), raw, train_phase, tokenizer,
                                        end_of_conversation_token, max_seq_len, local_rank))
    return out[0], out[1]


def _blend(parts: Sequence[PromptDataset], seed: int | None, pad: int, train_phase: int,
           shuffle: bool) -> PromptDataset:
    merged = parts[0] if len(parts) == 1 else PromptDataset.concat(parts, pad, train_phase)
    return merged.select(get_shuffle_idx(seed, len(merged))) if shuffle else merged


# --------------------------------------------------------------------------------------------- cache key


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Content hash for files under 64 MB; size + mtime + first/last MB above (cheap on huge corpora)."""
    st = os.stat(path)
    if st.st_size < FULL_HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return {"size": st.st_size, "sha256": digest.hexdigest()}
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(EDGE_HASH_BYTES)).hexdigest()
        fh.seek(max(0, st.st_size - EDGE_HASH_BYTES))
        tail = hashlib.sha256(fh.read(EDGE_HASH_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head, "tail": tail}


def path_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint of a data file or of every data file below a directory (hidden entries skipped)."""
    p = Path(path)
    if p.is_file():
        return {p.name: file_fingerprint(p)}
    out = {}
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(_FINGERPRINT_EXTENSIONS):
                full = Path(root) / name
                out[str(full.relative_to(p))] = file_fingerprint(full)
    return out


def source_fingerprint(name: str) -> dict[str, Any] | None:
    """What a local source's content is; None for hub ids (their content is pinned by the hub cache)."""
    if raw_datasets.find_adapter(name) is raw_datasets.LocalJsonFileDataset:
        return {str(f): file_fingerprint(f) for f in raw_datasets.local_jsonfile_files()}
    if os.path.exists(name):
        return path_fingerprint(name)
    return None


def tokenizer_fingerprint(tokenizer, end_of_conversation_token: str) -> dict[str, Any]:
    """Name alone is not enough (DS-Chat pitfall): vocabulary, special tokens and a probe encoding count."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
        "probe": list(tokenizer(_TOKENIZER_PROBE + end_of_conversation_token)["input_ids"]),
    }


def data_cache_key(data_path: Sequence[str], data_split: str | None, train_phase: int, seed: int | None,
                   tokenizer, max_seq_len: int, end_of_conversation_token: str,
                   sft_only_data_path: Sequence[str] = (), text_format: Mapping[str, Any] | None = None) -> str:
    payload = {
        "text_format": dict(text_format or {}),
        "version": DATA_CACHE_VERSION,
        "data_path": list(data_path),
        "data_split": data_split,
        "train_phase": train_phase,
        "seed": seed,
        "max_seq_len": max_seq_len,
        "end_of_conversation_token": end_of_conversation_token,
        "sft_only_data_path": list(sft_only_data_path),
        "tokenizer": tokenizer_fingerprint(tokenizer, end_of_conversation_token),
        "sources": {name: source_fingerprint(name) for name in [*data_path, *sft_only_data_path]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def text_format(tokenizer, column_map: Mapping[str, str] | None) -> dict[str, Any]:
    """What else decides the texts: the column mapping and the chat template that renders messages."""
    return {"column_map": dict(sorted((column_map or {}).items())),
            "chat_template": getattr(tokenizer, "chat_template", None)}


def data_cache_files(output_path: str | os.PathLike, key: str) -> tuple[Path, Path]:
    return (Path(output_path) / f"traindata_{key}.safetensors",
            Path(output_path) / f"evaldata_{key}.safetensors")


# --------------------------------------------------------------------------------------------- build protocol


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive POSIX lock (fcntl.lockf also works on NFS with lockd); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, CACHE_FILE_MODE)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def cache_wait_timeout(wait_timeout_s: float | None = None) -> float:
    if wait_timeout_s is not None:
        return float(wait_timeout_s)
    return float(os.environ.get(CACHE_WAIT_TIMEOUT_ENV, DEFAULT_CACHE_WAIT_S))


def _marker_is_current(error_file: Path, seen_before: int | None, since_wall: float) -> bool:
    """A builder's error marker counts if it appeared or changed while we waited, or is recent: an old
    one (e.g. from a transient network failure last run) must not stop this run's ranks."""
    try:
        mtime_ns = error_file.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return mtime_ns != seen_before or mtime_ns / 1e9 >= since_wall - MARKER_SLACK_S


def wait_for_files(files: Sequence[Path], error_file: Path, timeout_s: float) -> None:
    """Poll until the builder's files exist; stop early with the builder's UserError if it wrote one."""
    since_wall = time.time()
    seen_before = error_file.stat().st_mtime_ns if error_file.exists() else None
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while not all(f.exists() for f in files):
        if _marker_is_current(error_file, seen_before, since_wall):
            with contextlib.suppress(FileNotFoundError):
                raise UserError(error_file.read_text(encoding="utf-8").strip())
        if time.monotonic() >= deadline:
            raise UserError(
                f"--data_output_path: waited {timeout_s:.0f}s for {files[0]} to be built by local rank 0; "
                f"check that rank 0 is alive and the directory is shared by the node's ranks, or raise "
                f"{CACHE_WAIT_TIMEOUT_ENV}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def resolve_local_rank(local_rank: int | None) -> int:
    """-1 from argparse under torchrun means "ask the environment"."""
    if local_rank is None or local_rank < 0:
        env = os.environ.get("LOCAL_RANK")
        return int(env) if env is not None and env.lstrip("-").isdigit() else -1
    return local_rank


def _distributed_world() -> int:
    return (torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)


def _empty_split_message(paths: Sequence[str], train_phase: int, data_split: str | None, max_seq_len: int) -> str:
    need = {
        1: "phase 1 needs prompt + chosen texts",
        2: "phase 2 needs pairs with both a chosen and a rejected answer",
        3: f"phase 3 needs prompts of at most {max_seq_len} tokens (--max_prompt_seq_len)",
    }[train_phase]
    split = data_split if data_split is not None else "default"
    return (
        f"--data_path {' '.join(paths)}: no usable samples for phase {train_phase} after splitting "
        f"(data_split={split}) and filtering; {need}: check the files' keys and that --data_split gives "
        f"phase {train_phase} a non-zero share"
    )


def _build(local_rank: int, paths: Sequence[str], data_split: str | None, output_path: str, train_phase: int,
           seed: int | None, tokenizer, max_seq_len: int, eot: str,
           sft_paths: Sequence[str], column_map: Mapping[str, str] | None = None) -> tuple[PromptDataset, PromptDataset]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts = [create_dataset(local_rank, p, data_split, output_path, train_phase, seed, tokenizer, eot, max_seq_len,
                            column_map=column_map) for p in paths]
    train = _blend([t for t, _ in parts], seed, pad, train_phase, shuffle=len(parts) > 1)
    evals = _blend([e for _, e in parts], seed, pad, train_phase, shuffle=len(parts) > 1)
    if sft_paths:
        sft = [create_dataset(local_rank, p, "10,0,0", output_path, 1, seed, tokenizer, eot, max_seq_len,
                              column_map=column_map) for p in sft_paths]
        train = _blend([train, *(t for t, _ in sft)], seed, pad, 1, shuffle=True)
        sft_evals = [e for _, e in sft if len(e)]
        if sft_evals:
            evals = _blend([evals, *sft_evals], seed, pad, 1, shuffle=True)
    if len(train) == 0:
        raise UserError(_empty_split_message([*paths, *sft_paths], train_phase, data_split, max_seq_len))
    if len(evals) == 0:
        print_rank_0(f"warning: no evaluation samples for phase {train_phase} from {' '.join(paths)}", local_rank)
    return train, evals


@startup.timed("data")
def create_prompt_dataset(local_rank: int, data_path: str | Sequence[str], data_split: str | None,
                          output_path: str, train_phase: int, seed: int | None, tokenizer, max_seq_len: int,
                          end_of_conversation_token: str | None = None, sft_only_data_path: Sequence[str] = (),
                          reload: bool = False, rebuild: bool = False, wait_timeout_s: float | None = None,
                          column_map: Mapping[str, str] | None = None) -> tuple[PromptDataset, PromptDataset]:
    """Build (or load from cache) the phase's train and eval datasets for one or several sources.

    Local rank 0 of each node builds under `<cache>.lock` and writes atomically; the other ranks poll
    for the files (timeout: `wait_timeout_s`, $DSCHAT_DATA_CACHE_TIMEOUT, default one hour). `reload`
    (upstream) and `rebuild` both force a rebuild; in a distributed job that rebuild ends with a barrier
    so no rank reads the previous files. `column_map` ({standard column: the data's column}) renames the
    columns of local files and hub datasets; conversational data uses the tokenizer's chat template.
    """
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if not paths:
        raise UserError("--data_path: no dataset given")
    if train_phase not in (1, 2, 3):
        raise UserError(f"train_phase {train_phase}: must be 1, 2 or 3")
    if max_seq_len is None or max_seq_len <= 0:
        raise UserError(f"--max_seq_len {max_seq_len}: must be a positive number of tokens")
    if data_split is not None:
        parse_data_split(data_split, expected=3)
    sft_paths = list(sft_only_data_path or []) if train_phase == 1 else []
    for name in [*paths, *sft_paths]:
        check_data_path(name)
    eot = tokenizer.eos_token if end_of_conversation_token is None else end_of_conversation_token
    eot = eot or ""
    local_rank = resolve_local_rank(local_rank)
    force = bool(reload or rebuild)

    output_path = data_cache_dir(output_path)
    key = data_cache_key(paths, data_split, train_phase, seed, tokenizer, max_seq_len, eot, sft_paths,
                         text_format=text_format(tokenizer, column_map))
    train_file, eval_file = data_cache_files(output_path, key)
    error_file = train_file.with_name(train_file.name + ".error")
    if local_rank <= 0:
        with file_lock(train_file.with_name(train_file.name + ".lock")):
            if force or not (train_file.exists() and eval_file.exists()):
                error_file.unlink(missing_ok=True)
                try:
                    train, evals = _build(local_rank, paths, data_split, output_path, train_phase, seed,
                                          tokenizer, max_seq_len, eot, sft_paths, column_map)
                except UserError as err:  # tell the waiting ranks instead of letting them time out
                    atomic_write_text(error_file, str(err), mode=CACHE_FILE_MODE)
                    raise
                atomic_write_bytes(train_file, train.to_bytes(), mode=CACHE_FILE_MODE)
                # written last: its presence means "done"
                atomic_write_bytes(eval_file, evals.to_bytes(), mode=CACHE_FILE_MODE)
    if force and _distributed_world() > 1:
        torch.distributed.barrier()
    elif local_rank > 0:
        wait_for_files([train_file, eval_file], error_file, cache_wait_timeout(wait_timeout_s))
    return load_cached_dataset(train_file), load_cached_dataset(eval_file)


def load_cached_dataset(path: Path) -> PromptDataset:
    try:
        return PromptDataset.from_file(path)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"--data_output_path: cache file {path} is unreadable ({str(err).splitlines()[0][:120]}); "
                        "rerun with --rebuild_data_cache") from None


# --------------------------------------------------------------------------------------------- collators


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
        width = batch_width(max(len(i) for i in ids), self.max_seq_len, self.padding)
        if self.pad_token_id is None and any(len(i) != width for i in ids):
            raise ValueError("DataCollatorReward needs pad_token_id to pad unpadded items")
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


def get_unsupervised_data(args, tokenizer):
    """Step-3 pretraining mix: `train` split tokenised and chunked into blocks of prompt+answer length."""
    import datasets

    name = args.unsupervised_dataset_name
    config = getattr(args, "unsupervised_dataset_config_name", None)
    if raw_datasets.is_save_to_disk_dir(name):
        raw = datasets.load_from_disk(name)
    else:
        raw = datasets.load_dataset(name, config)
    train = raw["train"] if isinstance(raw, Mapping) else raw
    columns = list(train.column_names)
    text_column = "text" if "text" in columns else columns[0]
    block_size = int(args.max_prompt_seq_len) + int(args.max_answer_seq_len)
    workers = getattr(args, "preprocessing_num_workers", None)
    num_proc = workers if workers and workers > 1 else None

    def tokenize(examples):
        return tokenizer(examples[text_column])

    def group(examples):
        joined = {k: [t for seq in examples[k] for t in seq] for k in examples.keys()}
        total = (len(joined["input_ids"]) // block_size) * block_size
        out = {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        out["labels"] = [list(block) for block in out["input_ids"]]
        return out

    tokenized = train.map(tokenize, batched=True, num_proc=num_proc, remove_columns=columns,
                          desc="Running tokenizer on dataset")
    return tokenized.map(group, batched=True, num_proc=num_proc, desc=f"Grouping texts in chunks of {block_size}")
