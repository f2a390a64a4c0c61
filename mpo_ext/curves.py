"""Training curves from the `metrics.jsonl` every training loop writes (`{"step", "phase", ...}` lines).

Why: a two-stage run (DPO then PPO) is judged by looking at loss, reward and KL over time for each
stage side by side; reading TensorBoard event files needs TensorBoard, this needs only matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.utils import atomic_write

METRICS_FILE = "metrics.jsonl"
NON_METRIC_KEYS = frozenset({"step", "phase", "epoch", "time", "timestamp"})
MAX_PANELS = 24
SEARCH_DEPTH = 3


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of one metrics.jsonl; unreadable lines (a run killed mid-write) are skipped."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int | float):
                records.append(record)
    return records


def metric_series(records: Iterable[Mapping]) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """{(metric, phase): (steps, values)} for every finite numeric metric, in file order.

    A step logged twice (a resumed run that re-logged it) keeps its last value.
    """
    series: dict[tuple[str, str], dict[float, float]] = {}
    for record in records:
        phase = str(record.get("phase", "train"))
        for key, value in record.items():
            if key in NON_METRIC_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            series.setdefault((key, phase), {})[float(record["step"])] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items()}


def panel_name(metric: str, phase: str) -> str:
    """One panel per quantity: an eval-phase `loss` and a logged `eval/loss` land in the same panel."""
    if phase != "train" and "/" not in metric:
        return f"{phase}/{metric}"
    return metric


def find_metrics_files(run_dirs: Iterable[str]) -> dict[str, Path]:
    """{name: metrics.jsonl} for each argument: a metrics file, a run dir holding one, or a pipeline dir
    whose stage subdirectories hold them (searched a few levels deep). `NAME=PATH` sets the name."""
    found: dict[str, Path] = {}
    for spec in run_dirs:
        name, sep, raw = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, raw = "", spec
        path = Path(raw)
        if path.is_file():
            found[name or path.parent.name or str(path)] = path
            continue
        if not path.is_dir():
            raise UserError(f"{raw}: no such run directory or metrics file")
        if (path / METRICS_FILE).is_file():
            found[name or path.name] = path / METRICS_FILE
            continue
        nested = sorted(p for p in path.rglob(METRICS_FILE)
                        if len(p.relative_to(path).parts) <= SEARCH_DEPTH + 1)
        if not nested:
            raise UserError(f"{raw}: no {METRICS_FILE} in it or in its subdirectories; pass a training output dir")
        for p in nested:
            sub = str(p.parent.relative_to(path))
            found[f"{name}/{sub}" if name else sub] = p
    return found


def plot_training_curves(metrics_files: Mapping[str, str | os.PathLike], out_png: str | os.PathLike,
                         metrics: Iterable[str] | None = None) -> Path:
    """One PNG with a panel per metric (loss, rewards, KL, ...), a line per run and phase.

    `metrics` restricts the panels (names as in the file, eval-phase ones as `eval/<name>`).
    Written atomically; returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_files:
        raise UserError("no metrics files to plot")
    panels: dict[str, list[tuple[str, list[float], list[float], bool]]] = {}
    for run_name, path in metrics_files.items():
        if not Path(path).is_file():
            raise UserError(f"{path}: no such metrics file")
        for (metric, phase), (steps, values) in metric_series(read_metrics(path)).items():
            label = run_name if phase == "train" else f"{run_name} ({phase})"
            panels.setdefault(panel_name(metric, phase), []).append((label, steps, values, phase != "train"))
    wanted = list(metrics) if metrics else None
    if wanted:
        missing = [m for m in wanted if m not in panels]
        if missing:
            raise UserError(f"--metric {', '.join(missing)}: not logged; available: {', '.join(sorted(panels))}")
        names = wanted
    else:
        names = sorted(panels, key=_panel_order)[:MAX_PANELS]
    if not names:
        raise UserError(f"no numeric metrics in {', '.join(str(p) for p in metrics_files.values())}")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, steps, values, is_eval in panels[name]:
            ax.plot(steps, values, label=label, marker="o" if is_eval or len(steps) < 3 else None,
                    markersize=3, linestyle="--" if is_eval else "-", linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda fh: fig.savefig(fh, dpi=110, format="png"))
    plt.close(fig)
    return out


def _panel_order(name: str) -> tuple[int, str]:
    """Loss first, then rewards, KL, then the rest alphabetically."""
    lowered = name.lower()
    for rank, key in enumerate(("loss", "reward", "kl", "accuracy")):
        if key in lowered:
            return rank, lowered
    return 4, lowered
