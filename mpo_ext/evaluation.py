"""Reward-model evaluation of trained policies (the paper's Table 3) and the statistics around it.

Why: "mean reward-model score on held-out prompts" is the paper's headline metric. Every model is
asked the same prompts with the same decoding settings and seed, each answer is scored by the trained
reward model (and by the synthetic task's gold reward where the data defines one), and each mean gets
a seeded bootstrap interval so small differences are not over-read.

Reproducibility: prompts are cut into fixed global batches and batch k is generated with RNG seed
f(seed, k) on rank k % world_size, so the numbers do not depend on how many ranks ran the job.
The statistics are pure functions (unit-tested by hand).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dschat.rlhf.generation import Generator, answer_lengths, decode_answers
from dschat.utils.data.data_utils import get_raw_dataset
from dschat.utils.data.raw_datasets import read_data_text
from dschat.utils.dist import all_gather_objects, barrier, get_rank, get_world_size, is_rank_0
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json, atomic_write_jsonl, parse_jsonl
from dschat.utils.inference import (
    RewardScorer,
    load_policy,
    pad_with_mask,
    resolve_device,
    resolve_torch_dtype,
)
from dschat.utils.model_card import set_card_section
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.tokenizer import load_hf_tokenizer
from dschat.utils.trainer import MetricLogger
from mpo_ext import synthetic
from mpo_ext.eval_settings import EvalSettings

GENERATIONS_DIR = "generations"
TABLE_FILE = "table.json"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

# --------------------------------------------------------------------------------------------- statistics


def percentile_indices(num_resamples: int, confidence: float) -> tuple[int, int]:
    """Indices into the sorted bootstrap means that bound the central `confidence` mass.

    floor(alpha/2 * B) values lie strictly below the lower index and the same number strictly above
    the upper one, so the interval is symmetric in rank by construction (B=1000, 95%: 25 and 974).
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    low = int(math.floor(tail * num_resamples + 1e-9))
    low = min(low, (num_resamples - 1) // 2)
    return low, num_resamples - 1 - low


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, num_resamples: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; same inputs and seed give the same interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of numbers")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // x.size)  # bound the index matrix at ~16 MB
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    means.sort()
    low, high = percentile_indices(num_resamples, confidence)
    return float(means[low]), float(means[high])


def mean_with_ci(values: Sequence[float], seed: int, num_resamples: int = 1000,
                 confidence: float = 0.95) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high"} for a list of scores."""
    low, high = bootstrap_ci(values, confidence, num_resamples, seed)
    return {"mean": float(np.mean(np.asarray(values, dtype=np.float64))), "ci_low": low, "ci_high": high}


def win_tie_lose(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> dict[str, Any]:
    """Paired outcome counts for a against b: win if a - b > margin, lose if a - b < -margin, else tie.

    The margin is in reward units; a reward model is only trusted to order answers whose scores
    differ clearly, so a small margin keeps coin-flip differences out of the win column.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"need paired scores, got {len(scores_a)} and {len(scores_b)}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    win = tie = lose = 0
    for a, b in zip(scores_a, scores_b):
        diff = float(a) - float(b)
        if diff > tie_margin:
            win += 1
        elif diff < -tie_margin:
            lose += 1
        else:
            tie += 1
    n = win + tie + lose
    return {
        "win": win, "tie": tie, "lose": lose, "n": n, "tie_margin": tie_margin,
        "win_rate": win / n if n else None, "tie_rate": tie / n if n else None,
        "lose_rate": lose / n if n else None,
    }


# --------------------------------------------------------------------------------------------- sharding


def global_batches(num_items: int, batch_size: int) -> list[list[int]]:
    """Item indices cut into consecutive batches of `batch_size` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, num_items))) for s in range(0, num_items, batch_size)]


def rank_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """(global batch number, indices) of the batches rank `rank` works on: batch k goes to k % world."""
    return [(k, b) for k, b in enumerate(global_batches(num_items, batch_size)) if k % world_size == rank]


def batch_seed(seed: int, batch_number: int) -> int:
    """RNG seed for one global batch: independent of rank and world size."""
    return (int(seed) * 1_000_003 + int(batch_number)) % (2 ** 63 - 1)


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records on every rank (identity in a single process), ordered by "index"."""
    records = [r for part in all_gather_objects(records) for r in (part or [])]
    return sorted(records, key=lambda r: r["index"])


# --------------------------------------------------------------------------------------------- inputs


def parse_model_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` strings -> [(name, path)]; a bare PATH is named after its directory."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or "model", spec
        name, path = name.strip(), path.strip()
        if not name or not set(name) <= NAME_CHARS:
            raise UserError(f"--model {spec}: the name must use letters, digits, '_', '-' or '.' (NAME=PATH)")
        if not path:
            raise UserError(f"--model {spec}: empty path; use NAME=PATH")
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise UserError(f"--model {spec}: {path} does not exist")
        out.append((name, path))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"--model: duplicate model name(s) {', '.join(dupes)}; give each NAME=PATH a unique name")
    return out


def _open_raw_dataset(data_path: str, seed: int, data_output_path: str, tokenizer=None, column_map=None):
    return get_raw_dataset(data_path, data_output_path, seed, -1, tokenizer=tokenizer, column_map=column_map)


def load_eval_prompts(data_path: str | Sequence[str], num_prompts: int | None = None, seed: int = 1234,
                      data_output_path: str | None = None, tokenizer=None,
                      column_map: dict[str, str] | None = None) -> list[str]:
    """Held-out prompts of one or more datasets: each one's eval/test split (a local file without one: all
    its prompts), in the order given (e.g. HH's helpful-base and harmless-base test sets together).

    Conversational data is rendered with `tokenizer`'s chat template, as the training stages saw it.

    Duplicates are dropped (keeping first occurrence) so a prompt is not counted twice; with
    `num_prompts` a seeded random subset is taken, kept in dataset order.
    """
    seen: set[str] = set()
    prompts: list[str] = []
    for path in as_path_list(data_path):
        raw = _open_raw_dataset(path, seed, data_output_path, tokenizer, column_map)
        data = raw.get_eval_data()
        if data is None:
            if not raw.is_local_path:
                raise UserError(f"--data_path {path}: the dataset has no eval/test split; pass a local file "
                                "of held-out prompts instead")
            data = raw.get_train_data()
        found = len(prompts)
        for sample in data:
            prompt = raw.get_prompt(sample)
            if prompt and prompt.strip() and prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
        if len(prompts) == found:
            raise UserError(f"--data_path {path}: no prompts found in its eval split")
    if num_prompts is not None and 0 < num_prompts < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
        prompts = [prompts[i] for i in keep]
    return prompts


def as_path_list(data_path: str | Sequence[str]) -> list[str]:
    """One dataset or several, as a list (`mpo eval --data_path A --data_path B`)."""
    return [data_path] if isinstance(data_path, str) else list(data_path)


def find_gold_reward(data_path: str | Sequence[str], mode: str = "auto") -> Callable[[str, str], float] | None:
    """The gold reward function when the (first) data is the embedded synthetic task, else None.

    Detected from `manifest.json` (written by `mpo_ext.synthetic.make_synthetic_dataset`) in the data
    directory or beside the data file, whose `task` names the synthetic task.
    """
    if mode == "none":
        return None
    path = Path(as_path_list(data_path)[0])
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    task = None
    if manifest.is_file():
        try:
            task = json.loads(manifest.read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError, AttributeError):
            task = None
    if task in synthetic.TASKS:
        return synthetic.TASKS[task].gold_reward
    if mode == "synthetic":
        return synthetic.any_gold_reward
    return None


def safe_gold(gold: Callable[[str, str], float], prompt: str, answer: str) -> float | None:
    """Gold reward, or None for a prompt the task cannot parse (e.g. a foreign record in the file)."""
    try:
        return float(gold(prompt, answer))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- models


def encode_prompt(tokenizer, prompt: str, max_len: int) -> list[int]:
    """Token ids of a prompt, cut from the left to `max_len` (keeping a leading BOS) so the end of the
    conversation, the part the answer follows, survives."""
    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) <= max_len:
        return ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] == bos and max_len > 1:
        return [bos] + ids[len(ids) - (max_len - 1):]
    return ids[len(ids) - max_len:]


def make_generator(model, tokenizer, settings: EvalSettings):
    """The project's Generator (KV cache, eos handling) for a plain, replicated model."""
    return Generator(model, tokenizer, max_new_tokens=settings.max_new_tokens, sampling=settings.sampling)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], settings: EvalSettings, device: torch.device,
                     rank: int = 0, world_size: int = 1, on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """This rank's share of answers: [{"index", "answer", "length"}] (length in answer tokens); `on_batch` is
    told the size of each batch done (progress)."""
    generator = make_generator(model, tokenizer, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[dict] = []
    for number, indices in rank_batches(len(prompts), settings.batch_size, rank, world_size):
        rows = [encode_prompt(tokenizer, prompts[i], settings.max_prompt_seq_len) for i in indices]
        ids, mask = pad_with_mask(rows, max(len(r) for r in rows), pad, left=True)
        torch.manual_seed(batch_seed(settings.seed, number))
        sequences = generator.generate(ids.to(device), mask.to(device)).cpu()
        width = ids.shape[1]
        texts = decode_answers(tokenizer, sequences, width)
        lengths = answer_lengths(sequences, width, generator.eos_token_id).tolist()
        out.extend({"index": i, "answer": t, "length": int(n)} for i, t, n in zip(indices, texts, lengths))
        if on_batch is not None:
            on_batch(len(indices))
    return out


# --------------------------------------------------------------------------------------------- the evaluation


def summarize_model(name: str, records: Sequence[dict], seed: int, num_resamples: int = 1000,
                    confidence: float = 0.95) -> dict[str, Any]:
    """One Table-3 row from a model's scored generations."""
    rewards = [r["reward"] for r in records]
    stats = mean_with_ci(rewards, seed, num_resamples, confidence)
    row: dict[str, Any] = {
        "name": name,
        "mean_reward": stats["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "mean_length": float(np.mean([r["length"] for r in records])) if records else 0.0,
        "n": len(records),
    }
    golds = [r["gold"] for r in records if r.get("gold") is not None]
    if golds:
        g = mean_with_ci(golds, seed, num_resamples, confidence)
        row.update(gold_mean=g["mean"], gold_ci_low=g["ci_low"], gold_ci_high=g["ci_high"], gold_n=len(golds))
    return row


def summarize_heldout(records: Sequence[dict], seed: int, num_resamples: int = 1000,
                      confidence: float = 0.95) -> dict[str, Any]:
    """A row's held-out reward columns (`reward_heldout` of each record; empty when there is none)."""
    scores = [r["reward_heldout"] for r in records if r.get("reward_heldout") is not None]
    if not scores:
        return {}
    stats = mean_with_ci(scores, seed, num_resamples, confidence)
    return {"heldout_mean": stats["mean"], "heldout_ci_low": stats["ci_low"], "heldout_ci_high": stats["ci_high"]}


def add_heldout_rewards(scorer: RewardScorer, records: list[dict]) -> None:
    """Each record's `reward_heldout`: its answer scored by the held-out reward model."""
    for record, score in zip(records, scorer.score([r["prompt"] for r in records], [r["answer"] for r in records])
                             if records else []):
        record["reward_heldout"] = score


def format_table(rows: Sequence[dict], confidence: float = 0.95) -> str:
    """Markdown table in the layout of the paper's Table 3 (plus interval, held-out reward, gold and length
    columns)."""
    has_gold = any(r.get("gold_mean") is not None for r in rows)
    has_heldout = any(r.get("heldout_mean") is not None for r in rows)
    pct = f"{confidence:.0%}"
    header = (["model", f"RM reward [{pct} CI]"] + ([f"held-out RM [{pct} CI]"] if has_heldout else [])
              + ([f"gold [{pct} CI]"] if has_gold else []) + ["mean length", "n"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["name"], f"{r['mean_reward']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"]
        if has_heldout:
            cells.append(f"{r['heldout_mean']:.3f} [{r['heldout_ci_low']:.3f}, {r['heldout_ci_high']:.3f}]"
                         if r.get("heldout_mean") is not None else "-")
        if has_gold:
            cells.append(f"{r['gold_mean']:.3f} [{r['gold_ci_low']:.3f}, {r['gold_ci_high']:.3f}]"
                         if r.get("gold_mean") is not None else "-")
        cells += [f"{r['mean_length']:.1f}", str(r["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log(message: str) -> None:
    if is_rank_0():
        print(f"[eval] {message}", flush=True)


def generate_for_models(models: Sequence[tuple[str, str]], prompts: Sequence[str], settings: EvalSettings,
                        device: torch.device, dtype: torch.dtype,
                        progress: MetricLogger | None = None) -> dict[str, list[dict]]:
    """This rank's answers for every model; one model in memory at a time. `progress` gets the answers
    generated so far (all ranks, counted from this rank's share)."""
    rank, world = get_rank(), get_world_size()
    answers: dict[str, list[dict]] = {}
    done = [0]

    def count(batch: int) -> None:
        done[0] += batch * world
        if progress is not None:
            progress.progress(min(done[0], len(models) * len(prompts)), model=name)

    for name, path in models:
        start = time.time()
        model, tokenizer = load_policy(path, device, dtype)
        answers[name] = generate_answers(model, tokenizer, prompts, settings, device, rank, world, on_batch=count)
        del model
        n_tokens = sum(a["length"] for a in answers[name])
        elapsed = time.time() - start
        _log(f"{name}: generated {len(answers[name])} answers on rank {rank} in {elapsed:.1f}s "
             f"({n_tokens / max(elapsed, 1e-9):.1f} tokens/s incl. loading)")
    return answers


def score_records(scorer: RewardScorer, prompts: Sequence[str], answers: Sequence[dict],
                  gold: Callable[[str, str], float] | None) -> list[dict]:
    """Generation records with reward (and gold) filled in."""
    texts = [a["answer"] for a in answers]
    rewards = scorer.score([prompts[a["index"]] for a in answers], texts) if answers else []
    records = []
    for a, reward in zip(answers, rewards):
        prompt = prompts[a["index"]]
        record = {"index": a["index"], "prompt": prompt, "answer": a["answer"], "reward": reward,
                  "length": a["length"]}
        if gold is not None:
            record["gold"] = safe_gold(gold, prompt, a["answer"])
        records.append(record)
    return records


def evaluate(settings: EvalSettings) -> list[dict]:
    """Generate, score and summarise; rank 0 writes generations/NAME.jsonl and table.json.

    Every rank returns the same rows. Files are written one by one atomically; table.json comes last
    and is removed first, so its presence means the whole evaluation finished.
    """
    settings.require_inputs()
    models = parse_model_specs(settings.model)
    out = prepare_output_dir(settings.output_dir)
    if is_rank_0():
        (out / TABLE_FILE).unlink(missing_ok=True)
    torch_device = resolve_device(settings.device)
    torch_dtype = resolve_torch_dtype(settings.dtype, torch_device)
    data_paths = as_path_list(settings.data_path)
    # The chain's models share the SFT tokenizer; the first one renders conversational prompts.
    prompts = load_eval_prompts(data_paths, settings.num_prompts, settings.seed, settings.data_output_path,
                                tokenizer=load_hf_tokenizer(models[0][1]), column_map=settings.column_map)
    gold_fn = find_gold_reward(data_paths, settings.gold)
    _log(f"{len(prompts)} held-out prompts from {', '.join(data_paths)}; {len(models)} model(s); "
         f"gold reward: {'yes' if gold_fn else 'no'}; world size {get_world_size()}")

    progress = MetricLogger(str(out), None, "eval")  # the pipeline's heartbeat reads these records
    progress.start(0, len(models) * len(prompts), unit="answers", task="generating")
    answers = generate_for_models(models, prompts, settings, torch_device, torch_dtype, progress)
    def load_scorer(path: str) -> RewardScorer:
        return RewardScorer.from_path(path, torch_device, torch_dtype, settings.num_padding_at_beginning,
                                      settings.max_seq_len, settings.batch_size, end_text=settings.reward_end_text)

    scorer = load_scorer(settings.reward_model)
    reward_ending = scorer.ending
    progress.start(0, len(models) * len(prompts), unit="answers", task="scoring")
    scored = {}
    for number, (name, _) in enumerate(models, start=1):
        scored[name] = score_records(scorer, prompts, answers[name], gold_fn)
        progress.progress(number * len(prompts))
    del scorer  # one reward model in memory at a time
    if settings.heldout_reward_model:
        heldout = load_scorer(settings.heldout_reward_model)
        for records in scored.values():
            add_heldout_rewards(heldout, records)
        del heldout
    rows = []
    for name, _ in models:
        records = gather_records(scored[name])
        row = summarize_model(name, records, settings.seed, settings.num_bootstrap, settings.confidence)
        row.update(summarize_heldout(records, settings.seed, settings.num_bootstrap, settings.confidence))
        rows.append(row)
        if is_rank_0():
            atomic_write_jsonl(out / GENERATIONS_DIR / f"{name}.jsonl", records)
    if is_rank_0():
        recorded = {"data_path": data_paths[0] if len(data_paths) == 1 else data_paths,
                    "reward_model": settings.reward_model, "heldout_reward_model": settings.heldout_reward_model,
                    "models": dict(models), "num_prompts": len(prompts),
                    "decoding": settings.decoding_record(), "dtype": str(torch_dtype),
                    "confidence": settings.confidence, "num_resamples": settings.num_bootstrap,
                    "world_size": get_world_size(), "reward_ending": reward_ending}
        atomic_write_json(out / TABLE_FILE, {"rows": rows, "settings": recorded})
        table_text = format_table(rows, settings.confidence)
        print(table_text, flush=True)
        for _, path in models:  # each evaluated model's card gets the table it is part of
            set_card_section(path, "Evaluation (mpo eval)", f"Data: `{', '.join(data_paths)}`, reward model: "
                             f"`{settings.reward_model}`, {len(prompts)} prompts.\n\n```\n{table_text}\n```")
        _log(f"wrote {out / TABLE_FILE} and {out / GENERATIONS_DIR}/")
    barrier()
    return rows


# --------------------------------------------------------------------------------------------- files


def read_generations(path: str | os.PathLike) -> list[dict]:
    """Records of a generations file (JSON lines with at least prompt and answer)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such generations file; pass DIR/generations/NAME.jsonl from `mpo eval`")
    records = parse_jsonl(read_data_text(p), p)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
            raise UserError(f"{p}: record {number}: each record needs 'prompt' and 'answer' keys")
    if not records:
        raise UserError(f"{p}: contains no records")
    return records


def pair_by_prompt(records_a: Sequence[dict], records_b: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Records of a and b answering the same prompt, in a's order (the k-th repeat of a prompt in a
    pairs with the k-th repeat in b)."""
    pool: dict[str, list[dict]] = {}
    for record in records_b:
        pool.setdefault(record["prompt"], []).append(record)
    pairs = []
    for record in records_a:
        bucket = pool.get(record["prompt"])
        if bucket:
            pairs.append((record, bucket.pop(0)))
    return pairs
