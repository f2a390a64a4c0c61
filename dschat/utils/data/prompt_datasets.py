"""Per-phase tokenised datasets: dataset lookup, `PromptDataset`, tokenising, and the cached build.

Owns what turns a `--data_path` entry into training items: the adapter lookup (a built-in DeepSpeed-Chat
name, a local path, else a hub id), `PromptDataset` (unpadded 1-D LongTensors per phase, stored in the
cache as safetensors: token ids and offsets, no pickle), tokenising with the tokenizer's own special tokens
and one end-of-text (the eos unless told otherwise) for every phase, `create_dataset` over `phase_rows`,
the seeded blending of several sources, `create_prompt_dataset` (the cached, node-safe entry point the
steps call) and step 3's unsupervised pretraining mix.

Builds on splits.py (which samples), cache.py (where and how the cache is built) and raw_datasets.py
(sample texts); it must not import the collators (items are padded per batch there) or anything of MPO.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import Dataset

from dschat.utils import startup
from dschat.utils.data import raw_datasets
from dschat.utils.data.cache import (
    DATA_CACHE_VERSION,
    build_once,
    data_cache_dir,
    data_cache_files,
    data_cache_key,
    resolve_local_rank,
    text_format,
)
from dschat.utils.data.raw_datasets import PromptRawDataset
from dschat.utils.data.splits import get_shuffle_idx, parse_data_split, phase_rows
from dschat.utils.errors import UserError
from dschat.utils.printing import print_rank_0

# Why a source sample is left out of a phase's dataset (or, with --keep_truncated, kept although cut): counted
# per build in `PromptDataset.filter_counts` and reported by `report_filtered` (console), the training loops
# (metrics.jsonl's "data" record, hence the model card) and selection's manifest.
FILTER_REASONS = (
    "skipped",          # the adapter gave no text (missing or empty prompt or answer)
    "truncated",        # --max_seq_len cut an answer away entirely (phase 2: either side's)
    "identical",        # phase 2: chosen and rejected are the same tokens after truncation
    "prompt_too_long",  # phase 3 (and selection): the prompt is longer than --max_prompt_seq_len
)
# The reasons --keep_truncated keeps instead of dropping.
CUT_REASONS = ("truncated", "identical", "prompt_too_long")

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
                    column_map: Mapping[str, str] | None = None, chat_format: str = "auto") -> PromptRawDataset:
    """Adapter for a --data_path entry: a known name (substring, upstream order), else a local path, else a
    hub id. Local paths and hub ids may use the standard (TRL) layouts and a column mapping; `tokenizer`'s
    chat template renders conversational data and HH dialogues as `chat_format` (--chat_format) says."""
    return raw_datasets.apply_chat_format(_open_adapter(dataset_name, output_path, seed, local_rank, tokenizer,
                                                        column_map), tokenizer, chat_format)


def _open_adapter(dataset_name: str, output_path: str, seed: int, local_rank: int, tokenizer,
                  column_map: Mapping[str, str] | None) -> PromptRawDataset:
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
    NOT reversed (DataCollatorRLHF left-pads directly). `filter_counts` says how many source samples
    the build left out or cut, and why (`FILTER_REASONS`); it travels with the cache.
    """

    def __init__(self, prompt_dataset: Sequence[Any], chosen_dataset: Sequence[Any], reject_dataset: Sequence[Any],
                 pad_token_id: int, train_phase: int, prompt_lengths: Sequence[int] | None = None,
                 filter_counts: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.filter_counts = {reason: int((filter_counts or {}).get(reason, 0)) for reason in FILTER_REASONS}
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
                             self.train_phase, cols["prompt_lengths"] or None, self.filter_counts)

    @classmethod
    def concat(cls, parts: Sequence[PromptDataset], pad_token_id: int, train_phase: int) -> PromptDataset:
        def joined(name: str) -> list:
            return [x for part in parts for x in part._columns()[name]]

        counts = {reason: sum(part.filter_counts[reason] for part in parts) for reason in FILTER_REASONS}
        return cls(joined("prompt"), joined("chosen"), joined("rejected"), pad_token_id, train_phase,
                   joined("prompt_lengths") or None, counts)

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
                    "pad_token_id": json.dumps(self.pad_token_id), "filter_counts": json.dumps(self.filter_counts)}
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
                   int(metadata["train_phase"]), lengths or None, json.loads(metadata["filter_counts"]))


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


def _prompts_and_texts(samples: Iterable[Mapping[str, Any]], raw: PromptRawDataset, text_ofs: Sequence,
                       counts: dict[str, int]) -> tuple[list[str], list[list[str]]]:
    """Per usable sample: its prompt text ("" when the adapter has none) and the texts `text_ofs` give; a
    sample any of them maps to None is skipped and counted."""
    prompts: list[str] = []
    texts: list[list[str]] = [[] for _ in text_ofs]
    for sample in samples:
        found = [text_of(sample) for text_of in text_ofs]
        if any(text is None for text in found):
            counts["skipped"] += 1
            continue
        prompts.append(raw.get_prompt(sample) or "")
        for column, text in zip(texts, found):
            column.append(text)
    return prompts, texts


def answer_token_count(prompt_ids: Sequence[int], row_ids: Sequence[int]) -> int:
    """How many tokens of a tokenised (and truncated) prompt + answer row come after its prompt: 0 when the
    length limit cut the answer away entirely. The prompt is matched by position (the row's shared prefix
    with the prompt tokenised alone), so a token merged across the boundary counts as answer."""
    n = len(prompt_ids)
    if list(row_ids[:n]) == list(prompt_ids):
        return max(0, len(row_ids) - n)
    return len(row_ids) - raw_datasets.shared_prefix_length(prompt_ids, row_ids)


def create_dataset_split(current_dataset: Iterable[Mapping[str, Any]], raw_dataset: PromptRawDataset,
                         train_phase: int, tokenizer, end_of_conversation_token: str, max_seq_len: int,
                         local_rank: int = -1, keep_truncated: bool = False) -> PromptDataset:
    """Tokenise one slice for one phase, leaving out (and counting, `PromptDataset.filter_counts`) what
    cannot train: samples an adapter maps to None; rows whose answer `max_seq_len` cuts away entirely
    (phase 1) and pairs where it does so to either side or leaves both sides the same tokens (phase 2);
    prompts longer than `max_seq_len` (phase 3, upstream's filter). `keep_truncated` keeps the cut rows as
    upstream did, and phase-3 prompts cut to their last `max_seq_len` tokens; they are still counted."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eot = end_of_conversation_token or ""
    counts = dict.fromkeys(FILTER_REASONS, 0)
    if train_phase == 1:
        prompts, (texts,) = _prompts_and_texts(current_dataset, raw_dataset, [raw_dataset.get_prompt_and_chosen],
                                               counts)
        rows = []
        for prompt, ids in zip(_encode(tokenizer, prompts, None),
                               _encode(tokenizer, [text + eot for text in texts], max_seq_len)):
            cut = answer_token_count(prompt, ids) == 0
            counts["truncated"] += cut
            if ids and (keep_truncated or not cut):
                rows.append(_long(ids))
        dataset = PromptDataset([], rows, [], pad, 1, filter_counts=counts)
    elif train_phase == 2:
        prompts, (chosen_texts, rejected_texts) = _prompts_and_texts(
            current_dataset, raw_dataset, [raw_dataset.get_prompt_and_chosen, raw_dataset.get_prompt_and_rejected],
            counts)
        chosen_ids = _encode(tokenizer, [text + eot for text in chosen_texts], max_seq_len)
        rejected_ids = _encode(tokenizer, [text + eot for text in rejected_texts], max_seq_len)
        prompt_ids = _encode(tokenizer, prompts, None)
        chosen_rows, rejected_rows, lengths = [], [], []
        for prompt, p, c, r in zip(prompts, prompt_ids, chosen_ids, rejected_ids):
            cut = answer_token_count(p, c) == 0 or answer_token_count(p, r) == 0
            same = not cut and c == r
            counts["truncated"] += cut
            counts["identical"] += same
            if (cut or same) and not keep_truncated:
                continue
            chosen_rows.append(_long(c))
            rejected_rows.append(_long(r))
            lengths.append(min(len(p) if prompt else 0, len(c), len(r)))
        dataset = PromptDataset([], chosen_rows, rejected_rows, pad, 2, lengths, filter_counts=counts)
    elif train_phase == 3:
        prompts, _ = _prompts_and_texts(current_dataset, raw_dataset, [], counts)
        kept = []
        for ids in _encode(tokenizer, [p for p in prompts if p], None):
            if len(ids) > max_seq_len:
                counts["prompt_too_long"] += 1
                if not keep_truncated:
                    continue
                ids = ids[-max_seq_len:]  # the end of the prompt (the turn the answer follows) stays
            if ids:
                kept.append(_long(ids))
        counts["skipped"] += sum(1 for p in prompts if not p)
        dataset = PromptDataset(kept, [], [], pad, 3, filter_counts=counts)
    else:
        raise UserError(f"train_phase {train_phase}: must be 1 (SFT), 2 (reward model / DPO) or 3 (PPO)")
    found = ", ".join(f"{reason}={n}" for reason, n in counts.items() if n)
    print_rank_0(f"Creating dataset {raw_dataset.dataset_name_clean} for train_phase={train_phase} "
                 f"size={len(dataset)}" + (f" ({found})" if found else ""), local_rank)
    return dataset


def create_dataset(local_rank: int, dataset_name: str, data_split: str | None, output_path: str, train_phase: int,
                   seed: int | None, tokenizer, end_of_conversation_token: str, max_seq_len: int,
                   rebuild: bool = False, column_map: Mapping[str, str] | None = None, chat_format: str = "auto",
                   keep_truncated: bool = False) -> tuple[PromptDataset, PromptDataset]:
    """Tokenised train and eval slices of one source for one phase (which samples: `splits.phase_rows`)."""
    del rebuild  # upstream's flag: the split index files are always rewritten (see splits.split_parts)
    raw = get_raw_dataset(dataset_name, output_path, seed, local_rank, tokenizer=tokenizer, column_map=column_map,
                          chat_format=chat_format)
    train_rows, eval_rows = phase_rows(raw, data_split, train_phase, seed, output_path, local_rank)
    return tuple(create_dataset_split(rows, raw, train_phase, tokenizer, end_of_conversation_token, max_seq_len,
                                      local_rank, keep_truncated) for rows in (train_rows, eval_rows))


def _blend(parts: Sequence[PromptDataset], seed: int | None, pad: int, train_phase: int,
           shuffle: bool) -> PromptDataset:
    merged = parts[0] if len(parts) == 1 else PromptDataset.concat(parts, pad, train_phase)
    return merged.select(get_shuffle_idx(seed, len(merged))) if shuffle else merged


def _empty_split_message(paths: Sequence[str], train_phase: int, data_split: str | None, max_seq_len: int,
                         counts: Mapping[str, int]) -> str:
    need = {
        1: "phase 1 needs prompt + chosen texts",
        2: "phase 2 needs pairs with both a chosen and a rejected answer",
        3: f"phase 3 needs prompts of at most {max_seq_len} tokens (--max_prompt_seq_len)",
    }[train_phase]
    split = data_split if data_split is not None else "default"
    cut = sum(counts.get(reason, 0) for reason in CUT_REASONS)
    hint = (f"; {cut} were dropped because the length limit ({max_seq_len}) cut their answer or prompt: raise "
            "it, or pass --keep_truncated" if cut else "")
    return (
        f"--data_path {' '.join(paths)}: no usable samples for phase {train_phase} after splitting "
        f"(data_split={split}) and filtering; {need}: check the files' keys and that --data_split gives "
        f"phase {train_phase} a non-zero share{hint}"
    )


def _build(local_rank: int, paths: Sequence[str], data_split: str | None, output_path: str, train_phase: int,
           seed: int | None, tokenizer, max_seq_len: int, eot: str,
           sft_paths: Sequence[str], column_map: Mapping[str, str] | None = None, chat_format: str = "auto",
           keep_truncated: bool = False) -> tuple[PromptDataset, PromptDataset]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text = {"column_map": column_map, "chat_format": chat_format, "keep_truncated": keep_truncated}
    parts = [create_dataset(local_rank, p, data_split, output_path, train_phase, seed, tokenizer, eot, max_seq_len,
                            **text) for p in paths]
    train = _blend([t for t, _ in parts], seed, pad, train_phase, shuffle=len(parts) > 1)
    evals = _blend([e for _, e in parts], seed, pad, train_phase, shuffle=len(parts) > 1)
    if sft_paths:
        sft = [create_dataset(local_rank, p, "10,0,0", output_path, 1, seed, tokenizer, eot, max_seq_len, **text)
               for p in sft_paths]
        train = _blend([train, *(t for t, _ in sft)], seed, pad, 1, shuffle=True)
        sft_evals = [e for _, e in sft if len(e)]
        if sft_evals:
            evals = _blend([evals, *sft_evals], seed, pad, 1, shuffle=True)
    if len(train) == 0:
        raise UserError(_empty_split_message([*paths, *sft_paths], train_phase, data_split, max_seq_len,
                                             train.filter_counts))
    if len(evals) == 0:
        print_rank_0(f"warning: no evaluation samples for phase {train_phase} from {' '.join(paths)}", local_rank)
    return train, evals


@startup.timed("data")
def create_prompt_dataset(local_rank: int, data_path: str | Sequence[str], data_split: str | None,
                          output_path: str, train_phase: int, seed: int | None, tokenizer, max_seq_len: int,
                          end_of_conversation_token: str | None = None, sft_only_data_path: Sequence[str] = (),
                          reload: bool = False, rebuild: bool = False, wait_timeout_s: float | None = None,
                          column_map: Mapping[str, str] | None = None, chat_format: str = "auto",
                          keep_truncated: bool = False) -> tuple[PromptDataset, PromptDataset]:
    """Build (or load from cache) the phase's train and eval datasets for one or several sources.

    Local rank 0 of each node builds, the other ranks wait (`cache.build_once`; timeout: `wait_timeout_s`,
    $DSCHAT_DATA_CACHE_TIMEOUT, default one hour). `reload` (upstream) and `rebuild` both force a rebuild;
    in a distributed job that rebuild ends with a barrier so no rank reads the previous files. `column_map`
    ({standard column: the data's column}) renames the columns of local files and hub datasets; `chat_format`
    (--chat_format) says which sources the tokenizer's chat template renders. Rows the length limit cuts
    away are dropped unless `keep_truncated` (--keep_truncated); either way they are counted and reported.
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
    raw_datasets.chat_renderer(tokenizer, chat_format)  # a bad or impossible --chat_format: fail now
    key = data_cache_key(paths, data_split, train_phase, seed, tokenizer, max_seq_len, eot, sft_paths,
                         text_format=text_format(tokenizer, column_map, chat_format), keep_truncated=keep_truncated)
    train_file, eval_file = data_cache_files(output_path, key)
    build_once([train_file, eval_file],
               lambda: _build(local_rank, paths, data_split, output_path, train_phase, seed, tokenizer, max_seq_len,
                              eot, sft_paths, column_map, chat_format, keep_truncated),
               local_rank, force, wait_timeout_s)
    train, evals = load_cached_dataset(train_file), load_cached_dataset(eval_file)
    report_filtered(train, evals, train_phase, max_seq_len, keep_truncated, local_rank)
    warn_unknown_tokens(train, tokenizer, [*paths, *sft_paths])
    return train, evals


def report_filtered(train: PromptDataset, evals: PromptDataset, train_phase: int, max_seq_len: int,
                    keep_truncated: bool, local_rank: int = -1) -> None:
    """One console line saying what the length limit cut, and whether those rows were dropped or kept (also
    on a cache hit, where nothing else is printed)."""
    found = {reason: train.filter_counts[reason] + evals.filter_counts[reason] for reason in CUT_REASONS}
    if not any(found.values()):
        return
    limit = "--max_prompt_seq_len" if train_phase == 3 else "--max_seq_len"
    rows = {1: "rows whose answer", 2: "pairs with an answer that"}.get(train_phase, "rows whose answer")
    what = {"truncated": f"{rows} {limit} {max_seq_len} cuts away entirely",
            "identical": "pairs whose chosen and rejected are the same tokens after truncation",
            "prompt_too_long": f"prompts longer than {limit} {max_seq_len}"}
    parts = [f"{n} {what[reason]} ({train.filter_counts[reason]} train, {evals.filter_counts[reason]} eval)"
             for reason, n in found.items() if n]
    action = ("kept as --keep_truncated asks" + (" (cut to their last tokens)" if train_phase == 3 else "")
              if keep_truncated else "dropped (--keep_truncated keeps them)")
    print_rank_0(f"data (phase {train_phase}): {'; '.join(parts)}: {action}", local_rank)


def data_record(train: Dataset, evals: Dataset | None = None) -> dict[str, int]:
    """What a training loop logs as its "data" record (metrics.jsonl, then the model card): rows per split
    and the `filter_counts` of each, under `<split>_<reason>`; {} for datasets that keep no counts."""
    record: dict[str, int] = {}
    for split, dataset in (("train", train), ("eval", evals)):
        counts = getattr(dataset, "filter_counts", None)
        if counts is None:
            continue
        record[f"{split}_rows"] = len(dataset)
        record.update({f"{split}_{reason}": n for reason, n in counts.items()})
    return record


# Above this share of unknown tokens the tokenizer does not know the data's words (e.g. the tiny preset's
# word-level tokenizer, built for the synthetic task, on one's own data): training would learn `<unk>`.
UNKNOWN_TOKEN_WARN_SHARE = 0.03


def unknown_token_share(rows: Iterable[torch.Tensor], unk_id: int | None) -> float:
    """Share of all tokens of `rows` (1-D id tensors) that are `unk_id` (0 without an unknown token or tokens)."""
    if unk_id is None:
        return 0.0
    unknown = total = 0
    for ids in rows:
        unknown += int((ids == unk_id).sum())
        total += int(ids.numel())
    return unknown / total if total else 0.0


def warn_unknown_tokens(dataset: PromptDataset, tokenizer, paths: Sequence[str]) -> float:
    """One warning line when more than UNKNOWN_TOKEN_WARN_SHARE of a stage's tokenised data is the tokenizer's
    unknown token (the share, the tokenizer, the fix); returns the share."""
    columns = dataset._columns()
    share = unknown_token_share([*columns["prompt"], *columns["chosen"], *columns["rejected"]],
                                getattr(tokenizer, "unk_token_id", None))
    if share > UNKNOWN_TOKEN_WARN_SHARE:
        print_rank_0(f"warning: {share:.0%} of the tokens of --data_path {' '.join(paths)} are the tokenizer's unknown "
                     f"token {tokenizer.unk_token!r} (its vocabulary has {len(tokenizer)} tokens, e.g. the tiny "
                     "preset's word-level one, built for the synthetic task): the model would learn from "
                     "unknown tokens; use a real tokenizer and model for this data (--model_name_or_path, or "
                     "models.sft in a pipeline config)")
    return share


def load_cached_dataset(path: Path) -> PromptDataset:
    try:
        return PromptDataset.from_file(path)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"--data_output_path: cache file {path} is unreadable ({str(err).splitlines()[0][:120]}); "
                        "rerun with --rebuild_data_cache") from None



def get_unsupervised_data(settings, tokenizer):
    """Step-3 pretraining mix: `train` split tokenised and chunked into blocks of prompt+answer length."""
    import datasets  # lazy: importing `datasets` costs seconds, and only runs with --unsupervised_dataset_name need it

    name = settings.unsupervised_dataset_name
    config = settings.unsupervised_dataset_config_name
    if raw_datasets.is_save_to_disk_dir(name):
        raw = datasets.load_from_disk(name)
    else:
        raw = datasets.load_dataset(name, config)
    train = raw["train"] if isinstance(raw, Mapping) else raw
    columns = list(train.column_names)
    text_column = "text" if "text" in columns else columns[0]
    block_size = int(settings.max_prompt_seq_len) + int(settings.max_answer_seq_len)
    workers = settings.preprocessing_num_workers
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
