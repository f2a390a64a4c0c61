"""Reward-gap math of step 2.5: pure functions on rewards and gaps, unit-tested against hand-computed values.

Owns the pair rule (best and worst sample), the theta split, the threshold for a target easy fraction, the
tiny-split warnings, the accuracy-by-gap buckets and the orientation of a scored pair into an output record.
Must not import torch, models, the file protocol or the CLI: numbers and records in, numbers and records out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dschat.utils.errors import UserError

DEFAULT_THRESHOLD = 1.0
DEFAULT_GAP_EDGES = (0.0, 1.0, 2.0, 3.0)  # the paper's buckets: [0,1) [1,2) [2,3) >=3
TINY_FRACTION = 0.05
TINY_COUNT = 8


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

