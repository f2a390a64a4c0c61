"""What a run leaves for people: stage health verdicts, the final report, the resolved config files.

Reads `health.json` (the guards' record, `dschat.rlhf.health`), `table.json` (`mpo eval`) and writes
OUT/config.yaml and OUT/configs/. Imports no model or training code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from dschat.rlhf.health import HEALTH_FILE
from dschat.utils.files import atomic_write_text
from mpo_ext.eval_table import format_table, prompts_phrase
from mpo_ext.pipeline.config import PipelineConfig, dump_config
from mpo_ext.pipeline.plan import Stage


def read_health(output: Path) -> dict | None:
    """A stage's health.json (DPO, PPO, the reward model), or None where it keeps none (or it is unreadable)."""
    try:
        record = json.loads((output / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def health_signals(record: dict) -> list[str]:
    return sorted({str(w.get("signal")) for w in record.get("warnings") or [] if isinstance(w, dict)})


def stage_health(output: Path) -> str | None:
    """The health guards' verdict on a stage from its health.json: "ok", or e.g. "warned (health/entropy)";
    None where the stage keeps no such record."""
    record = read_health(output)
    if record is None:
        return None
    signals = health_signals(record)
    return str(record.get("status", "unknown")) + (f" ({', '.join(signals)})" if signals else "")


def print_final_report(plan: Sequence[Stage], out: Path) -> None:
    print("\nArtefacts:")
    for stage in plan:
        if not stage.output.exists():  # not run yet (`--steps`, `mpo STAGE`)
            continue
        health = stage_health(stage.output)
        print(f"  {stage.name:<8} {stage.output}" + (f"  (health: {health})" if health else ""))
    print(f"  {'logs':<8} {out / 'logs'}\n  {'config':<8} {out / 'config.yaml'}")
    evals = [s for s in plan if s.name == "eval"]
    table = evals[0].output / "table.json" if evals else None
    if table is None or not table.exists():
        return
    recorded = json.loads(table.read_text())
    rows = recorded["rows"] if isinstance(recorded, dict) else recorded
    settings = recorded.get("settings", {}) if isinstance(recorded, dict) else {}
    count = settings.get("num_prompts", rows[0]["n"] if rows else 0)
    print(f"\nScores on {prompts_phrase(count, settings.get('held_out', True))} (the eval table, {table}):")
    print(format_table(rows, settings.get("confidence", 0.95)))


def save_config(out: Path, config: PipelineConfig) -> Path:
    """The resolved config the run used: OUT/config.yaml (latest) and OUT/configs/<hash>.yaml (every one)."""
    text = dump_config(config)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for path in (out / "configs" / f"{config.name}-{digest}.yaml", out / "config.yaml"):
        atomic_write_text(path, text)
    return out / "config.yaml"
