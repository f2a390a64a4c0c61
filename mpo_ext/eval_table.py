"""The evaluation table of `mpo eval`: its statistics, its rows' score columns and its markdown.

Why a module of its own: the table is read in three places (the console and `table.json` of `mpo eval`, the
model cards it is added to, and `mpo pipeline`'s final report) and must say the same everywhere; the
pipeline's driver imports no model code, so this module needs numpy only.

A row describes one model on the evaluation prompts: for each score of `SCORES` (the reward model's, and the
synthetic task's gold reward where defined) its mean with a bootstrap interval and, from the second model on,
the paired difference to the first model (the same prompts, so per-prompt differences, resampled by prompt),
then what tells a real gain from a reward model fooled by collapse: the share of degenerate answers
(`dschat.rlhf.health.is_degenerate`), the mean answer length and distinct-1/2. Another score (e.g. a second,
held-out reward model) is one more `Score` in `SCORES` and one more field in the generation records.

The statistics are pure functions, checked by hand in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DASH = "-"


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


def paired_difference(scores: Sequence[float], baseline: Sequence[float], seed: int, num_resamples: int = 1000,
                      confidence: float = 0.95) -> dict[str, float]:
    """Mean of the per-prompt differences `scores[i] - baseline[i]` with a paired bootstrap interval (prompts are
    resampled, each keeping both of its answers), so the prompt-to-prompt spread that both models share does not
    widen the interval. {"mean", "ci_low", "ci_high", "n"}."""
    if len(scores) != len(baseline):
        raise ValueError(f"need paired scores, got {len(scores)} and {len(baseline)}")
    diffs = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return {**mean_with_ci(diffs.tolist(), seed, num_resamples, confidence), "n": int(diffs.size)}


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


# --------------------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Score:
    """One score of the generation records (`key`: the record's field; None where it is not defined) and how
    its columns are headed (`label`). Row fields: `FIELD(what)` for what in mean, ci_low, ci_high, n, delta,
    delta_ci_low, delta_ci_high."""

    key: str
    label: str
    legacy: tuple[tuple[str, str], ...] = ()  # field names kept from earlier table.json rows

    def field(self, what: str) -> str:
        return dict(self.legacy).get(what, f"{self.key}_{what}")


# The reward model's score keeps the row names table.json always had (mean_reward, ci_low, ci_high).
REWARD = Score("reward", "RM reward", legacy=(("mean", "mean_reward"), ("ci_low", "ci_low"), ("ci_high", "ci_high")))
# The held-out reward model's (`mpo eval --heldout_reward_model`): its row names as table.json first had them.
HELDOUT = Score("reward_heldout", "held-out RM", legacy=(("mean", "heldout_mean"), ("ci_low", "heldout_ci_low"),
                                                        ("ci_high", "heldout_ci_high")))
GOLD = Score("gold", "gold")
SCORES: tuple[Score, ...] = (REWARD, HELDOUT, GOLD)


def score_fields(score: Score, records: Sequence[dict], baseline: Sequence[dict] | None, seed: int,
                 num_resamples: int = 1000, confidence: float = 0.95) -> dict[str, Any]:
    """A row's fields of one score: its mean and interval over the records that have it, and with `baseline`
    (the first model's records) the paired difference over the prompts both answered with a value."""
    values = [r[score.key] for r in records if r.get(score.key) is not None]
    if not values:
        return {}
    stats = mean_with_ci(values, seed, num_resamples, confidence)
    fields = {score.field("mean"): stats["mean"], score.field("ci_low"): stats["ci_low"],
              score.field("ci_high"): stats["ci_high"], score.field("n"): len(values)}
    if baseline is not None:
        theirs = {r["index"]: r.get(score.key) for r in baseline}
        pairs = [(r[score.key], theirs[r["index"]]) for r in records
                 if r.get(score.key) is not None and theirs.get(r["index"]) is not None]
        if pairs:
            diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs], seed, num_resamples, confidence)
            fields.update({score.field("delta"): diff["mean"], score.field("delta_ci_low"): diff["ci_low"],
                           score.field("delta_ci_high"): diff["ci_high"]})
    return fields


# --------------------------------------------------------------------------------------------- the table


def _interval(row: dict, mean: str, low: str, high: str, signed: bool = False) -> str:
    if row.get(mean) is None:
        return DASH
    sign = "+" if signed else ""
    return f"{row[mean]:{sign}.3f} [{row[low]:{sign}.3f}, {row[high]:{sign}.3f}]"


@dataclass(frozen=True)
class Column:
    """A column of the table: its header (given the confidence text and the baseline model's name), its cell
    for one row, and whether the table shows it at all (given every row)."""

    header: Callable[[str, str], str]
    cell: Callable[[dict], str]
    shown: Callable[[Sequence[dict]], bool] = lambda rows: True


def _score_columns(score: Score) -> list[Column]:
    def present(rows: Sequence[dict]) -> bool:
        return any(r.get(score.field("mean")) is not None for r in rows)

    return [
        Column(lambda pct, _: f"{score.label} [{pct} CI]",
               lambda r: _interval(r, score.field("mean"), score.field("ci_low"), score.field("ci_high")), present),
        Column(lambda pct, first: f"Δ {score.label} vs {first} [{pct} CI]",
               lambda r: _interval(r, score.field("delta"), score.field("delta_ci_low"), score.field("delta_ci_high"),
                                   signed=True),
               lambda rows: present(rows) and len(rows) > 1),
    ]


def _share(value: float | None) -> str:
    return DASH if value is None else f"{value:.0%}"


def _distinct(row: dict) -> str:
    if row.get("distinct_1") is None:
        return DASH
    return f"{row['distinct_1']:.2f} / {row['distinct_2']:.2f}"


COLUMNS: tuple[Column, ...] = (
    Column(lambda pct, first: "model", lambda r: str(r["name"])),
    *(column for score in SCORES for column in _score_columns(score)),
    Column(lambda pct, first: "degenerate", lambda r: _share(r.get("degenerate_share")),
           lambda rows: any("degenerate_share" in r for r in rows)),
    Column(lambda pct, first: "mean length", lambda r: f"{r['mean_length']:.1f}"),
    Column(lambda pct, first: "distinct-1 / 2", _distinct, lambda rows: any("distinct_1" in r for r in rows)),
    Column(lambda pct, first: "n", lambda r: str(r["n"])),
)


def format_table(rows: Sequence[dict], confidence: float = 0.95) -> str:
    """Markdown table in the layout of the paper's Table 3, with intervals, the paired difference to the first
    model, and the answers' degenerate share, mean length (tokens) and distinct-1/2."""
    pct = f"{confidence:.0%}"
    first = str(rows[0]["name"]) if rows else ""
    columns = [c for c in COLUMNS if c.shown(rows)]
    header = [c.header(pct, first) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.cell(row).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def prompts_phrase(count: int, held_out: bool) -> str:
    """"200 held-out prompts" or "50 training prompts (the data has no eval split)": what the scores are on."""
    return f"{count} held-out prompts" if held_out else f"{count} training prompts (the data has no eval split)"
