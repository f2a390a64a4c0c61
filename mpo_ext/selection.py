"""Step 2.5 of two-stage MPO (Gou & Nguyen 2024): split preference pairs by reward-model confidence.

For every prompt (by default the prompts PPO would see: phase 3 of the split) two answers are sampled
from the SFT model and scored by the reward model (the paper's Algorithm 1); alternatively the
dataset's own chosen/rejected pairs are scored. A pair whose reward gap exceeds theta is "easy" (the
RM is confident, so its label is reliable enough for offline DPO); the rest are "hard" (left to PPO,
whose on-line exploration can cope with an unsure RM). Gaps are absolute RM-score differences.

Work is cut into shards of `--shard_size` prompts. Shards are dealt to ranks round-robin, each is
written atomically when finished, and a restarted run only does the missing ones. The samples of a
prompt depend only on --seed, the prompt's index and the (deterministic) batch it falls into, never on
which rank ran it, so any number of ranks gives the same shards. Shards hold raw scored pairs; theta,
--easy_fraction and --label_policy are applied afterwards, so re-splitting reuses them.
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

import numpy as np
import torch

from dschat.utils import args as flags
from dschat.utils import startup
from dschat.utils.checkpoint import maybe_inject_kill
from dschat.utils.dist import barrier, get_rank, get_world_size, init_distributed, is_rank_0
from dschat.utils.errors import UserError, run_main
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.utils import atomic_write_json, atomic_write_jsonl, print_rank_0

PAIR_SOURCES = ("samples", "dataset")
LABEL_POLICIES = ("reward_model", "human", "drop_disagreements")
DEFAULT_THRESHOLD = 1.0
DEFAULT_GAP_EDGES = (0.0, 1.0, 2.0, 3.0)  # the paper's buckets: [0,1) [1,2) [2,3) >=3
TINY_FRACTION = 0.05
TINY_COUNT = 8
SHARD_DIR = "shards"
SHARD_CONFIG = "config.json"

# --------------------------------------------------------------------------------------------- pure functions


def best_worst_indices(rewards: Sequence[float]) -> tuple[int, int]:
    """(best, worst) sample indices of one prompt: the first highest and the last lowest reward, so the two
    differ whenever there are at least two samples (all tied: first and last)."""
    values = [float(r) for r in rewards]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    worst = min(range(len(values)), key=lambda i: (values[i], -i))
    return best, worst


def pair_from_samples(answers: Sequence[str], rewards: Sequence[float]) -> tuple[list[str], list[float]]:
    """The pair a prompt contributes: its best and worst sample by reward, kept in sample order (with two
    samples this is simply both, as in the paper)."""
    best, worst = best_worst_indices(rewards)
    first, second = sorted((best, worst))
    return [answers[first], answers[second]], [float(rewards[first]), float(rewards[second])]


def split_by_gap(gaps: Sequence[float] | np.ndarray, theta: float) -> np.ndarray:
    """Boolean easy mask: gap > theta is easy, gap <= theta is hard (a gap equal to theta is hard)."""
    return np.asarray(gaps, dtype=float) > theta


def threshold_for_fraction(gaps: Sequence[float] | np.ndarray, easy_fraction: float) -> float:
    """The theta that makes round(easy_fraction * n) pairs easy (the largest gaps).

    The cut lies half-way between the last easy and the first hard gap, so it survives float noise;
    with ties at the cut the easy side gets fewer pairs (tied gaps cannot be told apart).
    """
    if not 0.0 <= easy_fraction <= 1.0:
        raise ValueError(f"easy_fraction must be in [0, 1], got {easy_fraction}")
    ordered = np.sort(np.asarray(gaps, dtype=float))[::-1]
    n = ordered.size
    if n == 0:
        return DEFAULT_THRESHOLD
    k = int(round(easy_fraction * n))
    if k <= 0:
        return float(ordered[0])
    if k >= n:
        return float(np.nextafter(ordered[-1], -np.inf))
    last_easy, first_hard = float(ordered[k - 1]), float(ordered[k])
    return (last_easy + first_hard) / 2.0 if last_easy > first_hard else first_hard


def balanced_threshold(gaps: Sequence[float] | np.ndarray) -> float:
    """The median gap: the theta that splits the pairs into two halves (suggested when a split is tiny)."""
    gaps = np.asarray(gaps, dtype=float)
    return float(np.median(gaps)) if gaps.size else DEFAULT_THRESHOLD


def accuracy_by_gap_bucket(gaps: Sequence[float] | np.ndarray, agrees: Sequence[bool] | np.ndarray,
                           edges: Sequence[float] = DEFAULT_GAP_EDGES) -> list[dict[str, Any]]:
    """RM accuracy against human labels per gap bucket [e_i, e_i+1), the last bucket open: >= e_k.

    Each bucket: low, high (None for the open one), count, accuracy (None when empty). Gaps below the
    first edge fall into the first bucket.
    """
    gaps = np.asarray(gaps, dtype=float)
    agrees = np.asarray(agrees, dtype=bool)
    edges = sorted(float(e) for e in edges)
    if not edges:
        raise ValueError("at least one bucket edge is needed")
    buckets = []
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else None
        inside = gaps >= low if high is None else (gaps >= low) & (gaps < high)
        if i == 0:
            inside |= gaps < low
        count = int(inside.sum())
        buckets.append({"low": low, "high": high, "count": count,
                        "accuracy": float(agrees[inside].mean()) if count else None})
    return buckets


def split_warnings(n_easy: int, n_hard: int, theta: float, suggested_theta: float) -> list[str]:
    """Warnings for an empty or tiny split (<5% or <8 pairs) naming the theta that would balance it."""
    total = n_easy + n_hard
    if total == 0:
        return ["no pairs at all (every pair was dropped or no prompt was usable); both splits are empty"]
    out = []
    for name, count, stage in (("easy", n_easy, "DPO (step3b)"), ("hard", n_hard, "PPO (step 3)")):
        if count < TINY_COUNT or count < TINY_FRACTION * total:
            what = "is EMPTY" if count == 0 else f"has only {count} of {total} pairs ({count / total:.1%})"
            out.append(f"the {name} split {what} at theta={theta:.4g}; {stage} needs it. "
                       f"--threshold {suggested_theta:.4g} would give a balanced split (or use --easy_fraction)")
    return out


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


def orient_record(raw: dict[str, Any], policy: str) -> dict[str, Any] | None:
    """Output record (prompt, chosen, rejected, rewards, gap, human_label) from a scored shard record.

    `reward_model`: the higher-scored answer is chosen (the paper; a tie keeps the sampled order). `human`: keep the dataset's label.
    `drop_disagreements`: keep the dataset's label, but drop the pair (None) when the RM strictly
    prefers the other answer. `human_label` (where known) is 1 when humans preferred `chosen`.
    """
    (a, b), (ra, rb) = raw["responses"], raw["rewards"]
    human = raw.get("human_preferred")  # index (0/1) of the human-preferred answer, None for samples
    if policy != "reward_model" and human is None:
        raise UserError(f"--label_policy {policy}: needs human labels; use --pair_source dataset")
    rm_prefers = 1 if rb > ra else 0
    if policy == "drop_disagreements" and rm_prefers != human and ra != rb:
        return None
    if policy == "reward_model":
        chosen_idx = rm_prefers
    else:
        chosen_idx = int(human)
    answers, rewards = (a, b), (float(ra), float(rb))
    record = {
        "prompt": raw["prompt"],
        "chosen": answers[chosen_idx],
        "rejected": answers[1 - chosen_idx],
        "chosen_reward": rewards[chosen_idx],
        "rejected_reward": rewards[1 - chosen_idx],
        "gap": abs(rewards[0] - rewards[1]),
        "prompt_index": raw["index"],
    }
    if human is not None:
        record["human_label"] = int(chosen_idx == human)
    return record


def human_agreement(raw_records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, agrees) over records with a human label: agrees = RM scores the human-chosen answer strictly higher."""
    gaps, agrees = [], []
    for raw in raw_records:
        human = raw.get("human_preferred")
        if human is None:
            continue
        ra, rb = raw["rewards"]
        gaps.append(abs(ra - rb))
        agrees.append((ra > rb) if human == 0 else (rb > ra))
    return np.asarray(gaps, dtype=float), np.asarray(agrees, dtype=bool)


def gap_summary(gaps: np.ndarray) -> dict[str, float]:
    if gaps.size == 0:
        return {}
    quantiles = np.quantile(gaps, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"mean": float(gaps.mean()), "min": float(gaps.min()), "max": float(gaps.max()),
            **{f"p{int(q * 100)}": float(v) for q, v in zip((0.1, 0.25, 0.5, 0.75, 0.9), quantiles)}}


def items_hash(items: Sequence[dict]) -> str:
    """Identity of the selected prompts (and dataset answers) in order: part of the shard fingerprint."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item["prompt"], item.get("chosen"), item.get("rejected")]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None):
    parser = flags.new_parser(
        "Step 2.5 of two-stage MPO (Gou & Nguyen 2024): score answer pairs with the reward model and split "
        "them by reward gap into easy (-> DPO, step3b) and hard (-> PPO, step 3).")
    flags.add_data_args(parser, max_seq_len=None, padding=False, pad_mask=False)  # generation pads itself
    group = parser.add_argument_group("models")
    group.add_argument("--sft_model_name_or_path", type=str, default=None,
                       help="The SFT (step 1) model that samples the answers (not needed with --pair_source dataset).")
    group.add_argument("--reward_model_name_or_path", type=str, required=True,
                       help="A step-2 reward model output (ours or upstream DeepSpeed-Chat's).")
    group.add_argument("--num_padding_at_beginning", type=int, default=1,
                       help="Passed to the reward model (OPT: 1, Llama: 0); scoring reads the last answer token.")
    flags.add_reward_ending_arg(group)
    group = parser.add_argument_group("selection")
    group.add_argument("--threshold", type=float, default=None,
                       help=f"theta: pairs with |r(a) - r(b)| > theta are easy (default: {DEFAULT_THRESHOLD}, the "
                            "paper's best). Exclusive with --easy_fraction." + flags.OWN_DEFAULT)
    group.add_argument("--easy_fraction", type=float, default=None,
                       help="Instead of a fixed theta, put this fraction of pairs (the largest gaps) in easy.")
    group.add_argument("--pair_source", choices=PAIR_SOURCES, default="samples",
                       help="samples: two SFT samples per prompt (the paper's Algorithm 1); dataset: score the "
                            "dataset's own chosen/rejected pairs.")
    group.add_argument("--label_policy", choices=LABEL_POLICIES, default="reward_model",
                       help="reward_model: the higher-scored answer is chosen (the paper); human: keep the dataset "
                            "label; drop_disagreements: drop pairs where RM and human disagree (dataset pairs).")
    group.add_argument("--data_phase", type=int, choices=(1, 2, 3), default=3,
                       help="Which --data_split slice to read (3: the prompts step 3 would see).")
    group.add_argument("--max_prompts", type=int, default=0, help="Use only the first N prompts (0: all).")
    group.add_argument("--gap_bucket_edges", type=str, default=",".join(f"{e:g}" for e in DEFAULT_GAP_EDGES),
                       help="Lower edges of the gap buckets of accuracy_by_gap (last bucket open).")
    group = parser.add_argument_group("sampling and throughput")
    group.add_argument("--max_prompt_seq_len", type=int, default=256, help="Prompts longer than this are dropped.")
    group.add_argument("--max_answer_seq_len", type=int, default=256, help="Maximum new tokens per answer.")
    group.add_argument("--num_samples", type=int, default=2,
                       help="Answers sampled per prompt (2: the paper's); the pair is the best and the worst of "
                            "them by reward. The prompt's prefill is computed once for all of its samples.")
    group.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature of the answers.")
    group.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass of the answers.")
    group.add_argument("--top_k", type=int, default=0, help="0 disables top-k filtering.")
    group.add_argument("--per_device_generation_batch_size", type=int, default=16,
                       help="Prompts per generate call (each yields --num_samples answers).")
    group.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Sequences per reward-model call.")
    group.add_argument("--shard_size", type=int, default=256,
                       help="Prompts per resumable shard (OUTPUT_DIR/shards/shard-NNNNN.jsonl).")
    group.add_argument("--rebuild_shards", action="store_true",
                       help="Discard shards of an earlier run with different settings instead of refusing.")
    group.add_argument("--enable_hybrid_engine", action="store_true",
                       help="Generate with the DeepSpeed Hybrid Engine where it works (GPU, supported model).")
    group.add_argument("--output_dir", type=str, required=True,
                       help="Where easy.jsonl, hard.jsonl, manifest.json, the plots and shards/ go (required).")
    group.add_argument("--seed", type=int, default=1234, help="Seed of the data split and of the sampling.")
    flags.add_deepspeed_args(parser)
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args) -> None:
    if args.threshold is not None and args.easy_fraction is not None:
        raise UserError("--threshold and --easy_fraction are exclusive: give one (a fixed theta or a target "
                        "easy share)")
    if args.easy_fraction is not None and not 0.0 < args.easy_fraction < 1.0:  # also refuses nan
        raise UserError(f"--easy_fraction {args.easy_fraction}: must be between 0 and 1 (exclusive)")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UserError(f"--threshold {args.threshold}: gaps are absolute, so theta must be a finite number >= 0")
    if args.threshold is None and args.easy_fraction is None:
        args.threshold = DEFAULT_THRESHOLD
    if args.pair_source == "samples":
        if not args.sft_model_name_or_path:
            raise UserError("--sft_model_name_or_path is required with --pair_source samples (it samples the answers)")
        if args.label_policy != "reward_model":
            raise UserError(f"--label_policy {args.label_policy}: sampled pairs have no human label; use "
                            "--label_policy reward_model or --pair_source dataset")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be > 0 (two greedy answers would be identical)")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        raise UserError(f"--top_k {args.top_k}: must be >= 0")
    if args.num_samples < 2:
        raise UserError(f"--num_samples {args.num_samples}: a pair needs at least 2 samples per prompt")
    flags.check_positive(args, "per_device_generation_batch_size", "per_device_eval_batch_size", "shard_size",
                         "max_prompt_seq_len", "max_answer_seq_len")
    if args.max_prompts < 0:
        raise UserError(f"--max_prompts {args.max_prompts}: must be >= 0")
    if getattr(args, "deepspeed_config", None):
        raise UserError("--deepspeed_config: the DeepSpeed config is built from the flags here; drop it")
    try:
        args.gap_edges = sorted(float(e) for e in args.gap_bucket_edges.split(","))
    except ValueError as err:
        raise UserError(f"--gap_bucket_edges {args.gap_bucket_edges}: expected comma-separated numbers") from err
    flags.check_path_exists("--sft_model_name_or_path", args.sft_model_name_or_path, "model directory")
    flags.check_path_exists("--reward_model_name_or_path", args.reward_model_name_or_path, "model directory")


# --------------------------------------------------------------------------------------------- prompts


def load_items(args, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Prompt items of the chosen phase slice, in the order step 3 would see them.

    The data module's own phase slicing (`phase_rows`) and blending, on raw text (the output files need
    text, not token ids). Prompts longer than --max_prompt_seq_len tokens are dropped, as step 3 drops them; with
    --pair_source dataset, samples without both answers are skipped.
    """
    from dschat.utils.data import data_utils

    local_rank = data_utils.resolve_local_rank(args.local_rank)
    need_pairs = args.pair_source == "dataset"
    parts: list[list[dict]] = []
    stats = {"skipped": 0, "filtered": 0, "answers_truncated": 0}
    for name in args.data_path:
        data_utils.check_data_path(name)
        raw = data_utils.get_raw_dataset(name, args.data_output_path, args.seed, local_rank, tokenizer=tokenizer,
                                         column_map=flags.column_map(args))
        rows, _ = data_utils.phase_rows(raw, args.data_split, args.data_phase, args.seed, args.data_output_path,
                                        local_rank)
        items = []
        for sample in rows:
            prompt = raw.get_prompt(sample)
            chosen = raw.get_chosen(sample) if need_pairs else None
            rejected = raw.get_rejected(sample) if need_pairs else None
            if prompt is None or (need_pairs and (chosen is None or rejected is None)):
                stats["skipped"] += 1
                continue
            items.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        lengths = prompt_lengths(tokenizer, [it["prompt"] for it in items])
        kept = [(it, n) for it, n in zip(items, lengths) if 0 < n <= args.max_prompt_seq_len]
        stats["filtered"] += len(items) - len(kept)
        if need_pairs:  # dataset answers longer than the room left after the prompt are cut when scored
            answer_lengths = prompt_lengths(tokenizer, [it[k] for it, _ in kept for k in ("chosen", "rejected")])
            room = args.max_prompt_seq_len + args.max_answer_seq_len
            stats["answers_truncated"] += sum(n + max(answer_lengths[2 * i:2 * i + 2]) > room
                                              for i, (_, n) in enumerate(kept))
        parts.append([it for it, _ in kept])
    merged = [it for part in parts for it in part]
    if len(parts) > 1:
        merged = [merged[i] for i in data_utils.get_shuffle_idx(args.seed, len(merged)).tolist()]
    if args.max_prompts:
        merged = merged[:args.max_prompts]
    if not merged:
        raise UserError(f"--data_path {' '.join(args.data_path)}: no usable prompts in phase {args.data_phase} "
                        f"(skipped {stats['skipped']}, longer than --max_prompt_seq_len {args.max_prompt_seq_len}: "
                        f"{stats['filtered']}); check --data_split/--data_phase and the prompt length limit")
    for i, item in enumerate(merged):
        item["index"] = i
    if stats["answers_truncated"]:
        print_rank_0(f"warning: {stats['answers_truncated']} pair(s) have an answer longer than "
                     f"--max_prompt_seq_len + --max_answer_seq_len ({args.max_prompt_seq_len} + "
                     f"{args.max_answer_seq_len}) tokens with their prompt; it is cut when scored (raise "
                     "--max_answer_seq_len to score it whole)")
    return merged, stats


def prompt_lengths(tokenizer, prompts: list[str], batch_size: int = 1000) -> list[int]:
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(len(ids) for ids in tokenizer(prompts[start:start + batch_size])["input_ids"])
    return out


# --------------------------------------------------------------------------------------------- models


def decode_continuations(tokenizer, prompt_ids: Sequence[list[int]],
                         answer_ids: Sequence[Sequence[list[int]]]) -> list[str]:
    """Each answer's text as it continues its prompt (keeps the leading space many tokenizers drop when an
    answer is decoded on its own), for every answer of every prompt (answer_ids[i]: the answers of prompt
    i), flat in that order; batched, and each prompt is decoded once however many answers it has."""
    heads = tokenizer.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)
    flat = [(i, list(a)) for i, answers in enumerate(answer_ids) for a in answers]
    fulls = tokenizer.batch_decode([list(prompt_ids[i]) + a for i, a in flat], skip_special_tokens=True)
    alone = tokenizer.batch_decode([a for _, a in flat], skip_special_tokens=True)
    return [full[len(heads[i]):] if full.startswith(heads[i]) else own
            for (i, _), full, own in zip(flat, fulls, alone)]


class PairScorer:
    """Scores (prompt, answer) texts with a reward model exactly as step 2 saw its training texts."""

    def __init__(self, engine, tokenizer, end_of_text: str, max_len: int, batch_size: int):
        self.engine = engine
        self.model = getattr(engine, "module", engine)
        self.tokenizer = tokenizer
        self.end_of_text = end_of_text
        self.max_len = max_len
        self.batch_size = batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = getattr(engine, "device", torch.device("cpu"))

    def encode(self, prompts: list[str], answers: list[str]) -> list[tuple[list[int], int]]:
        """(prompt + answer + ending ids, prompt length) per pair, laid out by dschat's `reward_layouts` (one
        tokenizer call for the batch)."""
        from dschat.utils.inference import reward_layouts

        return [(head + tail, len(head))
                for head, tail in reward_layouts(self.tokenizer, prompts, answers, self.end_of_text, self.max_len)]

    @torch.no_grad()
    def score_rows(self, rows: list[tuple[list[int], int]]) -> list[float]:
        """One reward per row, one forward call (dschat's `score_layouts`, the rule PPO reads by). An empty
        list still runs a dummy forward (ZeRO-3 lockstep)."""
        from dschat.utils.inference import score_layouts

        real = len(rows)
        layouts = [(row[:n], row[n:]) for row, n in rows] or [([self.pad], [self.pad])]
        return score_layouts(self.model, layouts, self.pad, self.device, share_prompts=True)[:real]

    def score(self, prompts: list[str], answers: list[str], calls: int | None = None) -> list[float]:
        """Rewards in input order; rows are length-sorted into batches. `calls` pads the number of forward
        calls (ranks must issue the same number under ZeRO-3)."""
        rows = self.encode(prompts, answers)
        # longest first, the answers of one prompt side by side (a batch reads each prompt once)
        order = sorted(range(len(rows)), key=lambda i: (-rows[i][1], rows[i][0][:rows[i][1]], -len(rows[i][0]), i))
        scores = [0.0] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for _ in range(max(0, (calls or 0) - len(batches))):
            batches.append([])
        for batch in batches:
            for i, s in zip(batch, self.score_rows([rows[i] for i in batch])):
                scores[i] = s
        return scores


def _frozen_engine(model, ds_config: dict):
    from dschat.utils.build import initialize_frozen_engine

    return initialize_frozen_engine(model, ds_config)


def build_actor(args, tokenizer, ds_config: dict):
    """Frozen SFT engine for sampling; a Hybrid Engine only where DeepSpeed can run one."""
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import hybrid_engine_unavailable_reason
    from dschat.utils.model.model_utils import create_hf_model

    model = create_hf_model(AutoModelForCausalLM, args.sft_model_name_or_path, tokenizer, ds_config)
    if args.enable_hybrid_engine and hybrid_engine_unavailable_reason(model) is None:
        import deepspeed

        from dschat.utils.ds_utils import get_train_ds_config, set_batch_sizes

        config = get_train_ds_config(offload=False, dtype=args.dtype, stage=args.zero_stage, enable_hybrid_engine=True,
                                     max_out_tokens=args.max_prompt_seq_len + args.max_answer_seq_len)
        config = set_batch_sizes(config, args.per_device_generation_batch_size, 1, get_world_size())
        model.requires_grad_(False)
        try:
            engine, *_ = deepspeed.initialize(model=model, config=config)
            return engine
        except Exception as err:  # noqa: BLE001 - the flag is a request; never fail the stage on it
            print_rank_0(f"warning: --enable_hybrid_engine: building the Hybrid Engine failed "
                         f"({type(err).__name__}: {err}); generating with Hugging Face generate")
    return _frozen_engine(model, ds_config)


def build_reward(args, tokenizer, ds_config: dict):
    from dschat.utils.model.model_utils import create_critic_model

    model = create_critic_model(args.reward_model_name_or_path, tokenizer, ds_config, args.num_padding_at_beginning,
                                rlhf_training=True, zero_stage=args.zero_stage)
    return _frozen_engine(model, ds_config)


def reward_tokenizer(args, fallback):
    """The reward model's own tokenizer; upstream step-2 outputs may lack one, then the SFT tokenizer."""
    from dschat.utils.utils import load_hf_tokenizer

    try:
        return load_hf_tokenizer(args.reward_model_name_or_path)
    except UserError:
        if fallback is None:
            raise
        print_rank_0(f"warning: no tokenizer in {args.reward_model_name_or_path}; scoring with the SFT tokenizer")
        return fallback


# --------------------------------------------------------------------------------------------- shards


class ShardWorker:
    """Generates and scores one shard at a time (both answers of a prompt come from one batch)."""

    def __init__(self, args, items: list[dict], prompt_tokenizer, scorer: PairScorer, generator=None,
                 lockstep: bool = False):
        self.args = args
        self.items = items
        self.tokenizer = prompt_tokenizer
        self.scorer = scorer
        self.generator = generator
        self.lockstep = lockstep
        self.prompt_ids = (prompt_tokenizer([it["prompt"] for it in items])["input_ids"]
                           if generator is not None else None)
        self.lengths = ([len(x) for x in self.prompt_ids] if self.prompt_ids is not None
                        else [len(it["prompt"]) for it in items])
        self.num_samples = num_samples(args) if generator is not None else 2
        self.score_calls = math.ceil(self.num_samples * args.per_device_generation_batch_size
                                     / args.per_device_eval_batch_size)
        self.answer_tokens = 0
        self.generate_seconds = 0.0

    def batches(self, shard: range) -> list[list[int]]:
        return length_sorted_batches(list(shard), self.lengths, self.args.per_device_generation_batch_size)

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
        from dschat.rlhf.generation import answer_mask
        from dschat.utils.utils import set_random_seed

        rows = [self.prompt_ids[i] for i in batch]
        width = max(len(r) for r in rows)
        pad = self.generator.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[j, width - len(row):] = 1
        device = getattr(self.generator.engine, "device", torch.device("cpu"))
        n = self.num_samples
        set_random_seed(derive_seed(self.args.seed, min(batch)))
        start = time.time()
        sequences = self.generator.generate(ids.to(device), mask.to(device), num_samples=n).cpu()
        self.generate_seconds += time.time() - start
        keep = answer_mask(sequences, width, pad)
        lengths = keep.sum(dim=1).tolist()
        body = sequences[:, width:].tolist()
        tokens = [row[:count] for row, count in zip(body, lengths)]  # the answer is the run before the first pad
        eos = self.tokenizer.eos_token_id
        # an answer that stopped by itself (False: cut at --max_answer_seq_len)
        finished = ((sequences[:, width:] == eos).any(dim=1).tolist() if eos is not None
                    else [False] * len(tokens))
        answers = decode_continuations(self.tokenizer, [self.prompt_ids[i] for i in batch],
                                       [tokens[n * j:n * j + n] for j in range(len(batch))])
        self.answer_tokens += sum(lengths)
        meta = [{"answer_tokens": lengths[n * j:n * j + n], "finished": finished[n * j:n * j + n]}
                for j in range(len(batch))]
        return answers, meta

    def _record(self, index: int, answers: list[str], rewards: list[float], **extra: Any) -> dict:
        return {"index": index, "prompt": self.items[index]["prompt"], "responses": answers,
                "rewards": [float(r) for r in rewards], **extra}


def shard_fingerprint(args, items_digest: str, num_items: int) -> dict:
    from mpo_ext.dpo import model_signature

    return {
        "pair_source": args.pair_source,
        "sft_model": model_signature(args.sft_model_name_or_path) if args.pair_source == "samples" else None,
        "reward_model": model_signature(args.reward_model_name_or_path),
        "end_of_conversation_token": args.end_of_conversation_token,
        "reward_end_text": args.reward_end_text,
        "seed": args.seed,
        "items": [num_items, items_digest],
        "sampling": sampling_settings(args),
        "shard_size": args.shard_size,
        "dtype": args.dtype,
    }


def sampling_settings(args) -> dict:
    return {"max_prompt_seq_len": args.max_prompt_seq_len, "max_answer_seq_len": args.max_answer_seq_len,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "num_samples": num_samples(args),
            "per_device_generation_batch_size": args.per_device_generation_batch_size}


def num_samples(args) -> int:
    """Samples per prompt (args from before --num_samples existed mean the paper's two)."""
    return int(getattr(args, "num_samples", 2))


PAIR_RULE = ("samples: the best and the worst of --num_samples answers per prompt by reward (first highest, "
             "last lowest), kept in sample order; dataset: the dataset's chosen and rejected answers")


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


def broadcast_object(obj: Any) -> Any:
    if torch.distributed.is_initialized() and get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def run_shards(args, worker: ShardWorker, shards: list[range], mine: list[int], all_assignments: list[list[int]],
               output_dir: Path) -> int:
    """Process this rank's shards; returns the number of prompts done. Under lockstep every rank runs as
    many batches as the busiest one."""
    from tqdm.auto import tqdm

    my_batches = sum(len(worker.batches(shards[s])) for s in mine)
    busiest = max(sum(len(worker.batches(shards[s])) for s in assigned) for assigned in all_assignments)
    total_prompts = sum(len(shards[s]) for s in mine)
    bar = tqdm(total=total_prompts, unit="prompt", disable=not is_rank_0(), dynamic_ncols=True,
               desc=f"select (rank 0 of {get_world_size()})")
    done, start = 0, time.time()
    with bar:  # closed (its line ended) also when a batch fails, so an error starts on a line of its own
        for count, shard_id in enumerate(mine, start=1):
            records: list[dict] = []
            for batch in worker.batches(shards[shard_id]):
                records.extend(worker.run_batch(batch))
                startup.report(until="first_batch")  # no optimizer here: the first scored batch (once)
                bar.update(len(batch))
                done += len(batch)
                rate = done / max(time.time() - start, 1e-9)
                bar.set_postfix(all_ranks=f"{rate * get_world_size():.1f} prompts/s")
            records.sort(key=lambda r: r["index"])
            atomic_write_jsonl(shard_path(output_dir, shard_id), records)
            maybe_inject_kill("after_shard", count)  # crash tests: DSCHAT_KILL_AT=after_shard:N
        if worker.lockstep:
            for _ in range(busiest - my_batches):
                worker.dummy_batch()
    return done


def read_shards(output_dir: Path, num_shards: int) -> list[dict]:
    records: list[dict] = []
    for shard_id in range(num_shards):
        path = shard_path(output_dir, shard_id)
        if not path.is_file():
            raise UserError(f"{path}: missing after all ranks finished; --output_dir must be on storage shared by "
                            "all nodes")
        records.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return sorted(records, key=lambda r: r["index"])


# --------------------------------------------------------------------------------------------- outputs


def finalize(args, raw_records: list[dict], output_dir: Path, extra_manifest: dict) -> dict:
    """Apply the label policy and theta; write easy/hard, figures and (last) the manifest. Rank 0 only."""
    from mpo_ext import plots

    manifest_path = output_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # the manifest marks a complete output: drop a stale one first
    records = [orient_record(r, args.label_policy) for r in raw_records]
    kept = [r for r in records if r is not None]
    gaps = np.asarray([r["gap"] for r in kept], dtype=float)
    theta = (threshold_for_fraction(gaps, args.easy_fraction) if args.easy_fraction is not None
             else float(args.threshold))
    easy_mask = split_by_gap(gaps, theta)
    easy = [r for r, e in zip(kept, easy_mask) if e]
    hard = [r for r, e in zip(kept, easy_mask) if not e]
    atomic_write_jsonl(output_dir / "easy.jsonl", easy)
    atomic_write_jsonl(output_dir / "hard.jsonl", hard)
    suggested = balanced_threshold(gaps)
    warnings = split_warnings(len(easy), len(hard), theta, suggested)
    identical = sum(1 for r in raw_records if len(set(r["responses"])) == 1)
    if identical:
        warnings.append(f"{identical} of {len(raw_records)} prompts have two identical answers (reward gap 0: "
                        "they go to the hard split and give DPO no signal)")
    for message in warnings:
        print_rank_0(f"warning: {message}")
    plots.plot_reward_gap_histogram(gaps, theta, output_dir / "reward_gap_hist.png",
                                    title=f"Reward gaps ({args.pair_source}, {len(kept)} pairs)")
    files = ["easy.jsonl", "hard.jsonl", "reward_gap_hist.png"]
    accuracy = None
    human_gaps, agrees = human_agreement(raw_records)
    if human_gaps.size:
        buckets = accuracy_by_gap_bucket(human_gaps, agrees, args.gap_edges)
        accuracy = {"overall_accuracy": float(agrees.mean()), "pairs": int(agrees.size), "buckets": buckets,
                    "note": "share of dataset pairs where the reward model scores the human-chosen answer "
                            "strictly higher, by |reward gap| bucket (paper Figure 2)"}
        atomic_write_json(output_dir / "accuracy_by_gap.json", accuracy)
        plots.plot_accuracy_by_gap(buckets, output_dir / "accuracy_by_gap.png")
        files += ["accuracy_by_gap.json", "accuracy_by_gap.png"]
    total = len(kept)
    manifest = {
        "stage": "step2.5_select",
        "method": "two-stage MPO (Gou & Nguyen 2024): reward-gap split, easy gap > theta, hard gap <= theta",
        "split_mode": "easy_fraction" if args.easy_fraction is not None else "threshold",
        "threshold": theta,
        "easy_fraction_requested": args.easy_fraction,
        "balanced_threshold": suggested,
        "counts": {"prompts": len(raw_records), "pairs": total, "dropped": len(records) - total,
                   "easy": len(easy), "hard": len(hard), "identical_answers": identical},
        "fractions": {"easy": len(easy) / total if total else 0.0, "hard": len(hard) / total if total else 0.0},
        "gap": gap_summary(gaps),
        "rm_accuracy_vs_human": accuracy["overall_accuracy"] if accuracy else None,
        "pair_source": args.pair_source,
        "pair_rule": PAIR_RULE,
        "num_samples": num_samples(args) if args.pair_source == "samples" else 2,
        "label_policy": args.label_policy,
        "models": {"sft": args.sft_model_name_or_path if args.pair_source == "samples" else None,
                   "reward": args.reward_model_name_or_path},
        "seed": args.seed,
        "sampling": sampling_settings(args),
        "warnings": warnings,
        "files": files,
        **extra_manifest,
    }
    atomic_write_json(manifest_path, manifest)
    print_rank_0(f"split at theta={theta:.4g}: easy {len(easy)} ({manifest['fractions']['easy']:.1%}), "
                 f"hard {len(hard)} ({manifest['fractions']['hard']:.1%}), dropped {len(records) - total}; "
                 f"written to {output_dir}")
    return manifest


# --------------------------------------------------------------------------------------------- driver


def run(args) -> dict | None:
    """The whole stage (call on every rank after init_distributed); returns the manifest on rank 0."""
    from dschat.utils.ds_utils import get_eval_ds_config, resolve_dtype, set_batch_sizes
    from dschat.utils.model.reward_model import ending_text, resolve_reward_ending
    from dschat.utils.utils import load_hf_tokenizer

    args.dtype = resolve_dtype(args.dtype)
    rank, world = get_rank(), get_world_size()
    output_dir = prepare_output_dir(args.output_dir)
    sft_tokenizer = load_hf_tokenizer(args.sft_model_name_or_path) if args.pair_source == "samples" else None
    rm_tokenizer = reward_tokenizer(args, sft_tokenizer)
    items, load_stats = load_items(args, sft_tokenizer or rm_tokenizer)
    digest = items_hash(items)
    shards = shard_ranges(len(items), args.shard_size)
    fingerprint = shard_fingerprint(args, digest, len(items))
    error = None
    if is_rank_0():
        try:
            prepare_shard_dir(output_dir, fingerprint, args.rebuild_shards)
        except UserError as err:
            error = str(err)
    pending = broadcast_object(
        (error, [s for s in range(len(shards)) if not shard_path(output_dir, s).is_file()] if is_rank_0() else None))
    error, pending = pending
    if error:
        raise UserError(error)
    done_before = len(shards) - len(pending)
    print_rank_0(f"{len(items)} prompts in {len(shards)} shards of {args.shard_size}; {done_before} already done, "
                 f"{len(pending)} to do on {world} rank(s)")
    worker_stats: dict[str, Any] = {}
    if pending:
        stage = 3 if args.zero_stage == 3 else 0
        ds_config = set_batch_sizes(get_eval_ds_config(offload=args.offload, dtype=args.dtype, stage=stage),
                                    args.per_device_eval_batch_size, 1, world)
        generator = None
        if args.pair_source == "samples":
            from dschat.rlhf.generation import Generator

            actor = build_actor(args, sft_tokenizer, ds_config)
            generator = Generator(actor, sft_tokenizer, max_new_tokens=args.max_answer_seq_len, do_sample=True,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  zero_stage=args.zero_stage, enable_hybrid_engine=args.enable_hybrid_engine)
        reward = build_reward(args, rm_tokenizer, ds_config)
        ending = resolve_reward_ending(args.reward_model_name_or_path,
                                       args.reward_end_text or args.end_of_conversation_token)
        scorer = PairScorer(reward, rm_tokenizer, ending_text(ending, rm_tokenizer),
                            args.max_prompt_seq_len + args.max_answer_seq_len, args.per_device_eval_batch_size)
        worker = ShardWorker(args, items, sft_tokenizer or rm_tokenizer, scorer, generator,
                             lockstep=args.zero_stage == 3 and world > 1)
        assignments = [assign_shards(pending, r, world) for r in range(world)]
        start = time.time()
        done = run_shards(args, worker, shards, assignments[rank], assignments, output_dir)
        elapsed = time.time() - start
        worker_stats = {"prompts_this_run": sum(len(shards[s]) for s in pending),
                        "seconds": round(elapsed, 2),
                        "prompts_per_second": round(done * world / max(elapsed, 1e-9), 3),
                        "generation_path": generator.path if generator is not None else None}
    barrier()
    manifest, error = None, None
    if is_rank_0():
        try:
            manifest = _finish(args, output_dir, shards, digest, load_stats, done_before, worker_stats)
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)  # the other ranks must not wait forever on a failed rank 0
    if error:
        raise UserError(error)
    return manifest


def _finish(args, output_dir: Path, shards: list[range], digest: str, load_stats: dict, done_before: int,
            worker_stats: dict) -> dict:
    """Rank 0: merge the shards and write the outputs."""
    raw_records = read_shards(output_dir, len(shards))
    extra = {
        "data": {"data_path": args.data_path, "data_split": args.data_split, "data_phase": args.data_phase,
                 "max_prompts": args.max_prompts, "hash": digest, **load_stats},
        "shards": {"size": args.shard_size, "count": len(shards), "done_before_this_run": done_before},
        "world_size": get_world_size(),
        "dtype": args.dtype,
        "run": worker_stats,
    }
    return finalize(args, raw_records, output_dir, extra)


def main() -> None:
    """Step 2.5 entry point: `deepspeed --module mpo_ext.selection ...` (step2.5_select/main.py calls it too)."""
    args = parse_args()
    init_distributed(args.local_rank)
    run(args)


if __name__ == "__main__":
    run_main(main)
