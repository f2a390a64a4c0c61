"""Step 2.5's unit of work: shards of prompts, their file protocol and the worker that fills them.

Owns how prompts are cut into shards and dealt to ranks, the per-prompt seeds, the shard files and their
settings fingerprint (`OUTPUT_DIR/shards/config.json`: a shard counts only for the settings it was made
under), and `ShardWorker` (sample N answers per prompt, score them, keep the best/worst pair). Builds no
models and parses no flags: the stage driver hands it an engine-backed generator and scorer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dschat.rlhf.generation import Generator, answer_extent, decode_continuations
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json, read_jsonl
from dschat.utils.fingerprint import model_signature
from dschat.utils.inference import RewardScorer, pad_with_mask
from dschat.utils.printing import print_rank_0
from dschat.utils.seeding import set_random_seed
from mpo_ext.selection.gaps import pair_from_samples
from mpo_ext.selection.settings import SelectionSettings

SHARD_DIR = "shards"
SHARD_CONFIG = "config.json"


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed from --seed and integer keys (e.g. a prompt index): stable across runs and ranks."""
    text = ":".join(str(int(k)) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Consecutive index ranges of at most `shard_size` items (the last one may be shorter)."""
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shard_path(output_dir: str | os.PathLike, shard_id: int) -> Path:
    return Path(output_dir) / SHARD_DIR / f"shard-{shard_id:05d}.jsonl"


def assign_shards(pending: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Round-robin share of the unfinished shards for one rank."""
    return list(pending[rank::world_size])


def length_sorted_batches(indices: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of item indices, longest prompts first (less padding); ties by index, so deterministic."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_fingerprint(settings: SelectionSettings, items_digest: str, num_items: int) -> dict:
    """What a shard's records depend on, derived from the settings: a shard made under another fingerprint
    is refused or rebuilt (`prepare_shard_dir`). The keys and values are those of the records this stage
    has always written (scoring settings, models, items, the "sampling" flag group), so shards of an earlier
    run stay valid."""
    scoring = settings.scoring
    return {
        **scoring.record(),
        "sft_model": model_signature(settings.sft_model_name_or_path) if settings.samples_answers else None,
        "reward_model": model_signature(settings.reward_model_name_or_path),
        "items": [num_items, items_digest],
        "sampling": settings.sampling_record(),
    }


def prepare_shard_dir(output_dir: Path, fingerprint: dict, rebuild: bool) -> None:
    """Rank 0: make OUTPUT_DIR/shards match this run's settings (refuse to mix runs unless asked)."""
    root = output_dir / SHARD_DIR
    config = root / SHARD_CONFIG
    if config.is_file():
        old = json.loads(config.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(fingerprint)):
            differing = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if not rebuild:
                raise UserError(f"--output_dir {output_dir}: holds shards of a run with different settings "
                                f"({', '.join(differing)}); pass --rebuild_shards to discard them or use another "
                                "--output_dir")
            print_rank_0(f"--rebuild_shards: discarding shards of a different run ({', '.join(differing)})")
            shutil.rmtree(root)
    elif root.is_dir() and any(root.glob("shard-*.jsonl")):
        if not rebuild:
            raise UserError(f"--output_dir {output_dir}: {root} has shards but no {SHARD_CONFIG}; pass "
                            "--rebuild_shards to discard them")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config, fingerprint)


def discard_empty_shard_dir(output_dir: Path) -> None:
    """Remove `shards/` (its fingerprint) when the run that created it wrote no shard: a failed first run
    leaves no trace."""
    root = output_dir / SHARD_DIR
    if root.is_dir() and not any(root.glob("shard-*.jsonl")):
        shutil.rmtree(root, ignore_errors=True)


def read_shards(output_dir: Path, num_shards: int) -> list[dict]:
    records: list[dict] = []
    for shard_id in range(num_shards):
        path = shard_path(output_dir, shard_id)
        if not path.is_file():
            raise UserError(f"{path}: missing after all ranks finished; --output_dir must be on storage shared by "
                            "all nodes")
        records.extend(read_jsonl(path, hint="; pass --rebuild_shards to discard the shards"))
    return sorted(records, key=lambda r: r["index"])


class ShardWorker:
    """Generates and scores one shard at a time (both answers of a prompt come from one batch)."""

    def __init__(self, settings: SelectionSettings, items: list[dict], prompt_tokenizer, scorer: RewardScorer,
                 generator: Generator | None = None, lockstep: bool = False,
                 max_prompt_tokens: int | None = None):
        self.settings = settings
        self.items = items
        self.tokenizer = prompt_tokenizer
        self.scorer = scorer
        self.generator = generator
        self.lockstep = lockstep
        # A prompt over `max_prompt_tokens` (--max_prompt_seq_len) is here only under --keep_truncated: the
        # sampler sees its end.
        self.prompt_ids = ([ids[-max_prompt_tokens:] if max_prompt_tokens else ids for ids in
                            prompt_tokenizer([it["prompt"] for it in items])["input_ids"]]
                           if generator is not None else None)
        self.lengths = ([len(x) for x in self.prompt_ids] if self.prompt_ids is not None
                        else [len(it["prompt"]) for it in items])
        self.num_samples = settings.num_samples if generator is not None else 2
        self.score_calls = math.ceil(self.num_samples * settings.per_device_generation_batch_size
                                     / settings.per_device_eval_batch_size)
        self.answer_tokens = 0
        self.generate_seconds = 0.0

    def batches(self, shard: range) -> list[list[int]]:
        return length_sorted_batches(list(shard), self.lengths, self.settings.per_device_generation_batch_size)

    def run_batch(self, batch: list[int]) -> list[dict]:
        calls = self.score_calls if self.lockstep else None
        if self.generator is None:
            prompts = [self.items[i]["prompt"] for i in batch for _ in range(2)]
            answers = [self.items[i][k] for i in batch for k in ("chosen", "rejected")]
            rewards = self.scorer.score(prompts, answers, calls)
            return [self._record(i, answers[2 * j:2 * j + 2], rewards[2 * j:2 * j + 2], human_preferred=0)
                    for j, i in enumerate(batch)]
        answers, meta = self._sample(batch)
        return self.score_samples(batch, answers, meta, calls)

    def score_samples(self, batch: list[int], answers: list[str], meta: list[dict],
                      calls: int | None = None) -> list[dict]:
        """Score the N answers of each prompt (one batched pass) and keep its best/worst pair."""
        n = self.num_samples
        prompts = [self.items[i]["prompt"] for i in batch for _ in range(n)]
        rewards = self.scorer.score(prompts, answers, calls)
        records = []
        for j, i in enumerate(batch):
            pair, pair_rewards = pair_from_samples(answers[n * j:n * j + n], rewards[n * j:n * j + n])
            if n > 2:
                meta[j]["sample_rewards"] = [float(r) for r in rewards[n * j:n * j + n]]
            records.append(self._record(i, pair, pair_rewards, **meta[j]))
        return records

    def dummy_batch(self) -> None:
        """Same collectives as a real batch, no output: keeps ZeRO-3 ranks in step when one runs out of work."""
        if self.generator is not None:
            self._sample([0])
        self.scorer.score([], [], self.score_calls)

    def _sample(self, batch: list[int]) -> tuple[list[str], list[dict]]:
        rows = [self.prompt_ids[i] for i in batch]
        width = max(len(r) for r in rows)
        pad = self.generator.pad_token_id
        ids, mask = pad_with_mask(rows, width, pad, left=True)
        device = getattr(self.generator.engine, "device", torch.device("cpu"))
        n = self.num_samples
        set_random_seed(derive_seed(self.settings.seed, min(batch)))
        start = time.time()
        sequences = self.generator.generate(ids.to(device), mask.to(device), num_samples=n).cpu()
        self.generate_seconds += time.time() - start
        # the answer is the run before its eos after the prompt; `finished`: it stopped by itself (False: cut
        # at --max_answer_seq_len)
        lengths, finished = (t.tolist() for t in answer_extent(sequences, width, self.generator.eos_token_id))
        body = sequences[:, width:].tolist()
        tokens = [row[:count] for row, count in zip(body, lengths)]
        answers = decode_continuations(self.tokenizer, [self.prompt_ids[i] for i in batch],
                                       [tokens[n * j:n * j + n] for j in range(len(batch))])
        self.answer_tokens += sum(lengths)
        meta = [{"answer_tokens": lengths[n * j:n * j + n], "finished": finished[n * j:n * j + n]}
                for j in range(len(batch))]
        return answers, meta

    def _record(self, index: int, answers: list[str], rewards: list[float], **extra: Any) -> dict:
        return {"index": index, "prompt": self.items[index]["prompt"], "responses": answers,
                "rewards": [float(r) for r in rewards], **extra}
