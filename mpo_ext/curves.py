"""Training curves from the `metrics.jsonl` every training loop writes (`{"step", "phase", ...}` lines).

Why: a two-stage run (DPO then PPO) is judged by looking at loss, reward and KL over time for each
stage side by side; reading TensorBoard event files needs TensorBoard, this needs only matplotlib.
Owns reading `metrics.jsonl` and laying out the panels; draws and saves through `mpo_ext.plots`.
Imports no training code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.files import read_jsonl
from dschat.utils.progress_records import is_metric_record
from mpo_ext.plots import pyplot, save_figure

METRICS_FILE = "metrics.jsonl"
NON_METRIC_KEYS = frozenset({"step", "phase", "epoch", "time", "timestamp"})
MAX_PANELS = 48
SEARCH_DEPTH = 3
#: Panels that draw several metrics of one run together (label = the metric): the training and the held-out
#: reward model's scores, each standardised by the first evaluation, and their gap (over-optimisation: the
#: training curve rising away from the held-out one).
OVERLAYS: dict[str, tuple[str, ...]] = {
    "reward vs held-out reward (z)": ("eval/reward_z", "eval/reward_heldout_z", "eval/reward_gap"),
}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Metric records of one metrics.jsonl; unreadable lines (a run killed mid-write) and progress records
    (`dschat.utils.progress_records`) are skipped."""
    return [record for record in read_jsonl(path, skip_unreadable=True)
            if isinstance(record, dict) and isinstance(record.get("step"), int | float) and is_metric_record(record)]


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


def overlay_panels(series: Mapping[tuple[str, str], tuple[list[float], list[float]]],
                   ) -> dict[str, list[tuple[str, list[float], list[float], bool]]]:
    """The `OVERLAYS` panels a run's eval-phase series fill (every metric of the panel logged)."""
    panels = {}
    for title, keys in OVERLAYS.items():
        if all((key, "eval") in series for key in keys):
            panels[title] = [(key, *series[(key, "eval")], True) for key in keys]
    return panels


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


@dataclass
class CurvesPlot:
    """What plot_training_curves drew: the PNG, its panel titles, and the panels it left out."""

    path: Path
    panels: list[str]
    left_out: list[str]


def plot_training_curves(metrics_files: Mapping[str, str | os.PathLike], out_png: str | os.PathLike,
                         metrics: Iterable[str] | None = None) -> CurvesPlot:
    """One PNG with a panel per metric and run (stage): SFT's and the reward model's losses never share a
    panel. Beyond MAX_PANELS panels the rest are left out and named in the result.

    `metrics` restricts the panels (names as in the file, eval-phase ones as `eval/<name>`).
    Written atomically.
    """
    if not metrics_files:
        raise UserError("no metrics files to plot")
    panels: dict[tuple[str, str], list[tuple[str, list[float], list[float], bool]]] = {}
    for run_name, path in metrics_files.items():
        if not Path(path).is_file():
            raise UserError(f"{path}: no such metrics file")
        series = metric_series(read_metrics(path))
        for (metric, phase), (steps, values) in series.items():
            panels.setdefault((run_name, panel_name(metric, phase)), []).append((phase, steps, values, phase != "train"))
        for title, lines in overlay_panels(series).items():
            panels[(run_name, title)] = lines
    wanted = list(metrics) if metrics else None
    if wanted:
        logged = {name for _, name in panels}
        missing = [m for m in wanted if m not in logged]
        if missing:
            raise UserError(f"--metric {', '.join(missing)}: not logged; available: {', '.join(sorted(logged))}")
        panels = {key: lines for key, lines in panels.items() if key[1] in wanted}
    runs = list(metrics_files)
    keys = sorted(panels, key=lambda k: (runs.index(k[0]), _panel_order(k[1])))
    if not keys:
        raise UserError(f"no numeric metrics in {', '.join(str(p) for p in metrics_files.values())}")

    def title(key: tuple[str, str]) -> str:
        return f"{key[0]}: {key[1]}" if len(runs) > 1 else key[1]

    shown, rest = keys[:MAX_PANELS], keys[MAX_PANELS:]
    plt = pyplot()
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, shown):
        for label, steps, values, is_eval in panels[key]:
            ax.plot(steps, values, label=label, marker="o" if is_eval or len(steps) < 3 else None,
                    markersize=3, linestyle="--" if is_eval else "-", linewidth=1.2)
        ax.set_title(title(key), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panels[key]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    save_figure(fig, out, dpi=100, fmt="png", tight=False)
    return CurvesPlot(out, [title(k) for k in shown], [title(k) for k in rest])


def _panel_order(name: str) -> tuple[int, str]:
    """Loss first, then rewards, KL, then the rest alphabetically."""
    lowered = name.lower()
    for rank, key in enumerate(("loss", "reward", "kl", "accuracy")):
        if key in lowered:
            return rank, lowered
    return 4, lowered
