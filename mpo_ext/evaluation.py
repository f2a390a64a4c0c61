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
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dschat.rlhf.generation import Generator, answer_token_lists, decode_answers
from dschat.rlhf.health import distinct_n, is_degenerate
from dschat.utils.build import check_context_length
from dschat.utils.data.data_utils import get_raw_dataset
from dschat.utils.data.raw_datasets import read_data_text
from dschat.utils.dist import all_gather_objects, barrier, get_rank, get_world_size, is_rank_0
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json, atomic_write_jsonl, parse_jsonl
from dschat.utils.fingerprint import check_weight_files
from dschat.utils.inference import (
    RewardScorer,
    load_policy,
    pad_with_mask,
    resolve_device,
    resolve_torch_dtype,
)
from dschat.utils.model_card import card_path, set_card_section
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.tokenizer import load_hf_tokenizer
from dschat.utils.trainer import MetricLogger
from mpo_ext import synthetic
from mpo_ext.eval_settings import EvalSettings
from mpo_ext.eval_table import (  # noqa: F401 - the statistics' names, also importable from here
    SCORES,
    bootstrap_ci,
    format_table,
    mean_with_ci,
    paired_difference,
    percentile_indices,
    prompts_phrase,
    score_fields,
    win_tie_lose,
)

GENERATIONS_DIR = "generations"
TABLE_FILE = "table.json"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

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
        check_weight_files(path, f"--model {name}")
        out.append((name, path))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"--model: duplicate model name(s) {', '.join(dupes)}; give each NAME=PATH a unique name")
    return out


def _open_raw_dataset(data_path: str, seed: int, data_output_path: str, tokenizer=None, column_map=None,
                      chat_format: str = "auto"):
    return get_raw_dataset(data_path, data_output_path, seed, -1, tokenizer=tokenizer, column_map=column_map,
                           chat_format=chat_format)


@dataclass(frozen=True)
class EvalPrompts:
    """The prompts an evaluation asks every model, and whether they are held out: each dataset's eval/test split
    (True), or, for a local file without one, all its prompts, the very ones the training stages saw (False)."""

    prompts: list[str]
    held_out: bool
    training_sources: tuple[str, ...] = ()  # the data paths that gave training prompts

    def describe(self) -> str:
        return prompts_phrase(len(self.prompts), self.held_out)


def eval_prompts(data_path: str | Sequence[str], num_prompts: int | None = None, seed: int = 1234,
                 data_output_path: str | None = None, tokenizer=None,
                 column_map: dict[str, str] | None = None, chat_format: str = "auto") -> EvalPrompts:
    """Held-out prompts of one or more datasets: each one's eval/test split (a local file without one: all
    its prompts, which then are not held out), in the order given (e.g. HH's helpful-base and harmless-base
    test sets together).

    Conversational data and HH dialogues are rendered with `tokenizer`'s chat template as `chat_format`
    (--chat_format) says, as the training stages saw them.

    Duplicates are dropped (keeping first occurrence) so a prompt is not counted twice; with
    `num_prompts` a seeded random subset is taken, kept in dataset order.
    """
    seen: set[str] = set()
    prompts: list[str] = []
    training: list[str] = []
    for path in as_path_list(data_path):
        raw = _open_raw_dataset(path, seed, data_output_path, tokenizer, column_map, chat_format)
        data = raw.get_eval_data()
        if data is None:
            if not raw.is_local_path:
                raise UserError(f"--data_path {path}: the dataset has no eval/test split; pass a local file "
                                "of held-out prompts instead")
            data = raw.get_train_data()
            training.append(path)
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
    return EvalPrompts(prompts, held_out=not training, training_sources=tuple(training))


def load_eval_prompts(data_path: str | Sequence[str], num_prompts: int | None = None, seed: int = 1234,
                      data_output_path: str | None = None, tokenizer=None,
                      column_map: dict[str, str] | None = None, chat_format: str = "auto") -> list[str]:
    """The prompts of `eval_prompts` alone."""
    return eval_prompts(data_path, num_prompts, seed, data_output_path, tokenizer, column_map, chat_format).prompts


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
    """This rank's share of answers: [{"index", "answer", "length", "degenerate", "tokens"}] (length in answer
    tokens; "tokens", the answer's ids, stays in memory for distinct-n); `on_batch` is told the size of each
    batch done (progress)."""
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
        tokens = answer_token_lists(sequences, width, generator.eos_token_id)
        out.extend({"index": i, "answer": t, "length": len(a), "degenerate": is_degenerate(a, text=t), "tokens": a}
                   for i, t, a in zip(indices, texts, tokens))
        if on_batch is not None:
            on_batch(len(indices))
    return out


# --------------------------------------------------------------------------------------------- the evaluation


def summarize_model(name: str, records: Sequence[dict], seed: int, num_resamples: int = 1000,
                    confidence: float = 0.95, baseline: Sequence[dict] | None = None) -> dict[str, Any]:
    """One Table-3 row from a model's scored generations: each score of `SCORES` with its interval (and, given
    the first model's records as `baseline`, the paired difference to it), the share of degenerate answers,
    the mean length in tokens and distinct-1/2 over the answers' tokens (where the records carry them)."""
    row: dict[str, Any] = {"name": name, "n": len(records)}
    for score in SCORES:
        row.update(score_fields(score, records, baseline, seed, num_resamples, confidence))
    row["mean_length"] = float(np.mean([r["length"] for r in records])) if records else 0.0
    if records and all("degenerate" in r for r in records):
        row["degenerate_share"] = sum(bool(r["degenerate"]) for r in records) / len(records)
    if records and all("tokens" in r for r in records):
        answers = [r["tokens"] for r in records]
        row.update(distinct_1=distinct_n(answers, 1), distinct_2=distinct_n(answers, 2))
    return row


def add_heldout_rewards(scorer: RewardScorer, records: list[dict]) -> None:
    """Each record's `reward_heldout`: its answer scored by the held-out reward model."""
    for record, score in zip(records, scorer.score([r["prompt"] for r in records], [r["answer"] for r in records])
                             if records else []):
        record["reward_heldout"] = score


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
    """Generation records with reward (and gold) filled in (and the answer's flags and tokens kept)."""
    texts = [a["answer"] for a in answers]
    rewards = scorer.score([prompts[a["index"]] for a in answers], texts) if answers else []
    records = []
    for a, reward in zip(answers, rewards):
        prompt = prompts[a["index"]]
        record = {"index": a["index"], "prompt": prompt, "answer": a["answer"], "reward": reward,
                  "length": a["length"], "degenerate": a["degenerate"], "tokens": a["tokens"]}
        if gold is not None:
            record["gold"] = safe_gold(gold, prompt, a["answer"])
        records.append(record)
    return records


def file_record(record: dict) -> dict:
    """A generation record as generations/NAME.jsonl keeps it (the answer's token ids stay in memory)."""
    return {k: v for k, v in record.items() if k != "tokens"}


def evaluate(settings: EvalSettings) -> list[dict]:
    """Generate, score and summarise; rank 0 writes generations/NAME.jsonl and table.json, and adds the table to
    each evaluated model's card.

    Every rank returns the same rows. Files are written one by one atomically; table.json comes last
    and is removed first, so its presence means the whole evaluation finished.
    """
    settings.require_inputs()
    models = parse_model_specs(settings.model)
    for name, path in models:  # a huge --max_new_tokens would generate for ever past the position table
        check_context_length(path, f"--model {name}", settings.max_new_tokens, "--max_new_tokens")
    out = prepare_output_dir(settings.output_dir)
    if is_rank_0():
        (out / TABLE_FILE).unlink(missing_ok=True)
    torch_device = resolve_device(settings.device)
    torch_dtype = resolve_torch_dtype(settings.dtype, torch_device)
    data_paths = as_path_list(settings.data_path)
    # The chain's models share the SFT tokenizer; the first one renders conversational prompts.
    chosen = eval_prompts(data_paths, settings.num_prompts, settings.seed, settings.data_output_path,
                          tokenizer=load_hf_tokenizer(models[0][1]), column_map=settings.column_map,
                          chat_format=settings.chat_format)
    prompts = chosen.prompts
    gold_fn = find_gold_reward(data_paths, settings.gold)
    _log(f"{chosen.describe()} from {', '.join(data_paths)}; {len(models)} model(s); "
         f"gold reward: {'yes' if gold_fn else 'no'}; world size {get_world_size()}")
    if chosen.training_sources:
        _log(f"note: {', '.join(chosen.training_sources)} has no eval split, so its prompts are the ones the stages "
             "trained on (not held out); pass a file of held-out prompts, or data with a test split")

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
    baseline = None
    for name, _ in models:
        records = gather_records(scored[name])
        rows.append(summarize_model(name, records, settings.seed, settings.num_bootstrap, settings.confidence,
                                    baseline=baseline))
        baseline = records if baseline is None else baseline
        if is_rank_0():
            atomic_write_jsonl(out / GENERATIONS_DIR / f"{name}.jsonl", [file_record(r) for r in records])
    if is_rank_0():
        recorded = {"data_path": data_paths[0] if len(data_paths) == 1 else data_paths,
                    "reward_model": settings.reward_model, "heldout_reward_model": settings.heldout_reward_model,
                    "models": dict(models), "num_prompts": len(prompts),
                    "held_out": chosen.held_out, "training_prompts_from": list(chosen.training_sources),
                    "baseline": models[0][0], "decoding": settings.decoding_record(), "dtype": str(torch_dtype),
                    "confidence": settings.confidence, "num_resamples": settings.num_bootstrap,
                    "world_size": get_world_size(), "reward_ending": reward_ending}
        atomic_write_json(out / TABLE_FILE, {"rows": rows, "settings": recorded})
        table_text = format_table(rows, settings.confidence)
        print(f"Scores on {chosen.describe()}:\n{table_text}", flush=True)
        for _, path in models:  # each evaluated model's card gets the table it is part of
            add_card_table(path, out, table_text, chosen, data_paths, settings)
        _log(f"wrote {out / TABLE_FILE} and {out / GENERATIONS_DIR}/")
    barrier()
    return rows


def add_card_table(model_dir: str, eval_dir: Path, table_text: str, chosen: EvalPrompts, data_paths: Sequence[str],
                   settings: EvalSettings) -> None:
    """The evaluation's section in a model's card, one per eval run (keyed by its output directory): a later
    `mpo eval` of the same model adds its own section beside this one, a re-run of the same eval replaces it.
    Paths are written relative to the run root the model sits in (or as names), never as absolute paths."""
    def where(path: str | os.PathLike) -> str:
        return f"`{card_path(path, model_dir)}`"

    decoding = (f"sampled (temperature {settings.temperature:g}, top-p {settings.top_p:g}, top-k {settings.top_k})"
                if settings.do_sample else "greedy")
    body = (f"Eval run {where(eval_dir)}: {chosen.describe()} of {', '.join(where(p) for p in data_paths)}, scored by "
            f"the reward model {where(settings.reward_model)}; {decoding} answers of at most {settings.max_new_tokens} "
            f"tokens, seed {settings.seed}. Differences are paired, per prompt, against the first model.\n\n"
            f"{table_text}")
    set_card_section(model_dir, f"Evaluation: {Path(eval_dir).name} (mpo eval)", body,
                     key=f"mpo-eval:{Path(eval_dir).resolve()}")


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
