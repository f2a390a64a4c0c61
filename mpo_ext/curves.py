"""Training curves from the `metrics.jsonl` every training loop writes (`{"step", "phase", ...}` lines).

Why: a chain is judged by a few curves per stage (the loss, what the stage optimises, how far it moved from
its reference, the held-out score), read in the order the stages ran; and two runs (another theta, another
seed) are compared by laying their curves over each other on the same axes. Reading TensorBoard event files
needs TensorBoard, this needs only matplotlib.

The figure has one row per stage in pipeline order (SFT, reward model, DPO, PPO, then anything else) and a
few key panels per stage (`KEY_PANELS`): a panel holds one quantity, its training series as a line and its
evaluations as dashed lines with markers, one colour per run. `--metric` replaces the key panels by the
metrics named. Owns reading `metrics.jsonl`, finding a run's stages and laying out the panels; draws and
saves through `mpo_ext.plots`. Imports no training code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.files import read_jsonl
from dschat.utils.progress_records import is_metric_record
from mpo_ext.plots import pyplot, save_figure

METRICS_FILE = "metrics.jsonl"
NON_METRIC_KEYS = frozenset({"step", "phase", "epoch", "time", "timestamp"})
MAX_PANELS = 48
SEARCH_DEPTH = 3
# Stages in the order a chain runs them, how their output folders are named (pipeline and stage run labels,
# and the trainers' older names), and their key panels: (title, metric as logged). A panel shows the metric's
# training series and its evaluations (an eval-phase record's key, or `eval/<key>`). With a held-out reward
# model the DPO and PPO rows add its reward and the standardised gap (over-optimisation: the gap widening).
STAGE_ORDER = ("sft", "rm", "dpo", "ppo")
STAGE_DIRS = {"sft": ("step1_sft", "step1_model"), "rm": ("step2_rm", "step2_model"),
              "dpo": ("step3b_dpo",), "ppo": ("step3_ppo", "step3")}
STAGE_TITLES = {"sft": "SFT", "rm": "reward model", "dpo": "DPO", "ppo": "PPO"}
KEY_PANELS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "perplexity"),
    "rm": ("loss", "accuracy", "rewards/margins"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "eval/reward", "eval/reward_heldout", "eval/reward_gap",
            "eval/gold"),
    "ppo": ("loss/policy", "reward/mean", "objective/kl", "eval/reward", "eval/reward_heldout", "eval/reward_gap",
            "eval/gold"),
    "": ("loss", "reward/mean", "objective/kl", "eval/reward"),
}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Metric records of one metrics.jsonl; unreadable lines (a run killed mid-write) and progress and data
    records (`dschat.utils.progress_records`) are skipped."""
    return [record for record in read_jsonl(path, skip_unreadable=True)
            if isinstance(record, dict) and isinstance(record.get("step"), int | float) and is_metric_record(record)]


def metric_series(records: Iterable[Mapping]) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """{(metric, phase): (steps, values)} for every finite numeric metric, in file order.

    A step logged twice (a resumed run that re-logged it) keeps its last value.
    """
    series: dict[tuple[str, str], dict[float, float]] = {}
    for record in records:
        if not is_metric_record(record):  # progress and data records: no curves
            continue
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


def quantity(metric: str, phase: str) -> str:
    """The quantity a series shows, its training and evaluation series together: `loss` for the train-phase
    `loss`, the eval-phase `loss` and a logged `eval/loss` alike; `eval/reward` (only evaluated) stays itself."""
    name = panel_name(metric, phase)
    if name.startswith("eval/") and name != "eval/reward" and name != "eval/gold":
        return name[len("eval/"):]
    return name


def stage_of(folder: str, series: Mapping[tuple[str, str], object]) -> str:
    """The stage a metrics file belongs to: from its folder's name (`step3b_dpo-1a2b3c4d`, `step1_sft`, ...),
    else from what it logs (PPO's KL, DPO's pair accuracies, the reward model's accuracy; else SFT)."""
    for stage, prefixes in STAGE_DIRS.items():
        if any(re.fullmatch(rf"{re.escape(p)}(-[0-9a-f]{{8}})?", folder) for p in prefixes):
            return stage
    logged = {metric for metric, _ in series}
    if "objective/kl" in logged:
        return "ppo"
    if "rewards/accuracies" in logged:
        return "dpo"
    if "accuracy" in logged:
        return "rm"
    return "sft" if "loss" in logged else ""


@dataclass(frozen=True)
class MetricsFile:
    """One stage's metrics of one run: `run` (the argument it came from), `label` (its folder, where a run has
    several), `path`."""

    run: str
    label: str
    path: Path


def find_metrics_files(run_dirs: Iterable[str]) -> list[MetricsFile]:
    """The metrics files of each argument: a metrics file, a run dir holding one, or a pipeline dir whose stage
    subdirectories hold them (searched a few levels deep). `NAME=PATH` names the run."""
    found: list[MetricsFile] = []
    for spec in run_dirs:
        name, sep, raw = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, raw = "", spec
        path = Path(raw)
        if path.is_file():
            found.append(MetricsFile(name or path.parent.name or str(path), path.parent.name, path))
            continue
        if not path.is_dir():
            raise UserError(f"{raw}: no such run directory or metrics file")
        if (path / METRICS_FILE).is_file():
            found.append(MetricsFile(name or path.name, path.name, path / METRICS_FILE))
            continue
        nested = sorted(p for p in path.rglob(METRICS_FILE) if len(p.relative_to(path).parts) <= SEARCH_DEPTH + 1)
        if not nested:
            raise UserError(f"{raw}: no {METRICS_FILE} in it or in its subdirectories; pass a training output dir")
        found += [MetricsFile(name or path.name, str(p.parent.relative_to(path)), p) for p in nested]
    return found


@dataclass
class Line:
    """One series drawn in a panel."""

    label: str
    run_index: int
    steps: list[float]
    values: list[float]
    is_eval: bool


@dataclass
class CurvesPlot:
    """What plot_training_curves drew: the PNG, its panel titles (`STAGE: quantity`), the panels it left out."""

    path: Path
    panels: list[str]
    left_out: list[str] = field(default_factory=list)


def _as_files(metrics_files: Sequence[MetricsFile] | Mapping[str, str | os.PathLike]) -> list[MetricsFile]:
    if isinstance(metrics_files, Mapping):  # {name: path}: each its own run
        return [MetricsFile(name, Path(path).parent.name, Path(path)) for name, path in metrics_files.items()]
    return list(metrics_files)


def collect_panels(files: Sequence[MetricsFile], metrics: Sequence[str] | None = None
                   ) -> dict[str, dict[str, list[Line]]]:
    """{stage: {quantity: lines}} in pipeline order, each stage's key panels (or `metrics`) where logged."""
    runs = list(dict.fromkeys(f.run for f in files))
    per_stage: dict[str, list[tuple[MetricsFile, dict]]] = {}
    for metrics_file in files:
        if not metrics_file.path.is_file():
            raise UserError(f"{metrics_file.path}: no such metrics file")
        series = metric_series(read_metrics(metrics_file.path))
        if series:
            per_stage.setdefault(stage_of(metrics_file.label, series), []).append((metrics_file, series))
    if metrics:
        logged = {quantity(m, p) for entries in per_stage.values() for _, series in entries for m, p in series}
        logged |= {panel_name(m, p) for entries in per_stage.values() for _, series in entries for m, p in series}
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise UserError(f"--metric {', '.join(missing)}: not logged; available: {', '.join(sorted(logged))}")
    order = [s for s in (*STAGE_ORDER, *sorted(set(per_stage) - set(STAGE_ORDER))) if s in per_stage]
    panels: dict[str, dict[str, list[Line]]] = {}
    for stage in order:
        entries = per_stage[stage]
        wanted = list(metrics) if metrics else list(KEY_PANELS.get(stage, KEY_PANELS[""]))
        for metrics_file, series in entries:
            several = sum(1 for other, _ in entries if other.run == metrics_file.run) > 1
            parts = ([metrics_file.run] if len(runs) > 1 else []) + ([metrics_file.label] if several else [])
            label = ": ".join(parts)  # empty for one run's one stage: its lines are just "train" and "eval"
            for (metric, phase), (steps, values) in series.items():
                name = quantity(metric, phase)
                if name in wanted or panel_name(metric, phase) in wanted:
                    title = name if name in wanted else panel_name(metric, phase)
                    is_eval = phase != "train" or metric.startswith("eval/")
                    panels.setdefault(stage, {}).setdefault(title, []).append(
                        Line(_line_label(label, is_eval), runs.index(metrics_file.run), steps, values, is_eval))
        if stage in panels:
            panels[stage] = {t: panels[stage][t] for t in wanted if t in panels[stage]}
    return panels


def plot_training_curves(metrics_files: Sequence[MetricsFile] | Mapping[str, str | os.PathLike],
                         out_png: str | os.PathLike, metrics: Iterable[str] | None = None) -> CurvesPlot:
    """One PNG: a row per stage in pipeline order, its key panels (or `metrics`: names as logged, eval-phase
    ones as `eval/<name>`), every run's curves of a quantity overlaid on the same axes (a colour per run; eval
    series dashed, with markers). Beyond MAX_PANELS panels the rest are left out and named. Written atomically."""
    files = _as_files(metrics_files)
    if not files:
        raise UserError("no metrics files to plot")
    panels = collect_panels(files, list(metrics) if metrics else None)
    if not panels:
        raise UserError(f"no numeric metrics in {', '.join(str(f.path) for f in files)}")
    titles = [(stage, title) for stage, by_title in panels.items() for title in by_title]
    shown, rest = titles[:MAX_PANELS], titles[MAX_PANELS:]
    rows = list(dict.fromkeys(stage for stage, _ in shown))
    cols = max(sum(1 for s, _ in shown if s == stage) for stage in rows)
    plt = pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols, 3.0 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, stage in enumerate(rows):
        for col, (_, title) in enumerate((s, t) for s, t in shown if s == stage):
            ax = axes[row][col]
            ax.axis("on")
            lines = panels[stage][title]
            for line in lines:
                few = line.is_eval or len(line.steps) < 3
                ax.plot(line.steps, line.values, label=line.label, color=colours[line.run_index % len(colours)],
                        marker="o" if few else None, markersize=3, linestyle="--" if line.is_eval else "-",
                        linewidth=1.2)
            ax.set_title(_panel_title(stage, title), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(lines) > 1:
                ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png)
    save_figure(fig, out, dpi=100, fmt="png", tight=False)
    return CurvesPlot(out, [_panel_title(*k) for k in shown], [_panel_title(*k) for k in rest])


def _line_label(run: str, is_eval: bool) -> str:
    if not run:
        return "eval" if is_eval else "train"
    return f"{run} (eval)" if is_eval else run


def _panel_title(stage: str, title: str) -> str:
    return f"{STAGE_TITLES.get(stage, stage or 'other')}: {title}"
