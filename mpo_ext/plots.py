"""Figures: the selection stage's reward-gap histogram and RM accuracy by gap (the paper's Figure 2).

Owns the one matplotlib set-up (`pyplot`: Agg backend, no display needed) and the one figure saver
(`save_figure`, atomic like every artefact); `mpo_ext.curves` draws through them. Imports only numpy and
dschat's atomic writer: no training code, no model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dschat.utils.files import atomic_write


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only, no display)."""
    # Lazy: matplotlib takes about a second to import and only the commands that draw need it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, fmt: str | None = None, tight: bool = True) -> None:
    """Write `fig` to `path` atomically (format: `fmt`, else the file's suffix, else png) and close it."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "png"
    extra = {"bbox_inches": "tight"} if tight else {}
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, **extra))
    finally:
        pyplot().close(fig)


def plot_reward_gap_histogram(gaps: Sequence[float], theta: float, path: str | os.PathLike,
                              title: str | None = None, bins: int = 50) -> None:
    """Histogram of |r(a) - r(b)| per pair with theta marked; easy pairs lie right of the line."""
    plt = pyplot()
    gaps = np.asarray(gaps, dtype=float)
    n_easy = int((gaps > theta).sum())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if gaps.size:
        upper = max(float(gaps.max()), theta) * 1.02 + 1e-9
        ax.hist(gaps, bins=bins, range=(0.0, upper), color="#4C72B0", edgecolor="white")
    ax.axvline(theta, color="#C44E52", linestyle="--", linewidth=1.5,
               label=f"theta = {theta:.4g}: easy {n_easy} / hard {gaps.size - n_easy}")
    ax.set_xlabel("reward gap |r(a) - r(b)|")
    ax.set_ylabel("pairs")
    ax.set_title(title or f"Reward gaps of {gaps.size} pairs")
    ax.legend(loc="upper right")
    save_figure(fig, path)


def plot_accuracy_by_gap(buckets: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Bar per gap bucket: share of pairs where the RM prefers the human-chosen answer (with counts)."""
    plt = pyplot()
    labels = [_bucket_label(b) for b in buckets]
    accuracies = [b["accuracy"] if b["accuracy"] is not None else 0.0 for b in buckets]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bars = ax.bar(range(len(buckets)), [100.0 * a for a in accuracies], color="#55A868")
    for bar, bucket in zip(bars, buckets):
        text = f"n={bucket['count']}" if bucket["count"] else "empty"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.axhline(50.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 105)
    ax.set_xlabel("reward gap bucket")
    ax.set_ylabel("RM agrees with human label (%)")
    ax.set_title(title or "Reward-model accuracy by reward gap")
    save_figure(fig, path)


def _bucket_label(bucket: dict) -> str:
    low, high = bucket["low"], bucket["high"]
    return f">={low:g}" if high is None or high == float("inf") else f"[{low:g},{high:g})"
