"""The records a stage appends to its `metrics.jsonl` to say how far it is (beside its metrics).

Why: `mpo pipeline` shows a heartbeat per stage (step k of n, epoch, the current loss, an ETA). It reads
them from the stage's own `metrics.jsonl` rather than from the text a stage prints, so the numbers are the
ones the stage logged. Two phases carry no metrics and are skipped by every metrics reader
(`mpo plot-curves`, model cards):

- `start`, written at every (re)start, before the first step: `{"step": position at start, "phase":
  "start", "total_steps": n, "unit": "steps" | "prompts" | "answers", ...}`; a training loop adds
  `epochs` and `steps_per_epoch`, other stages a `task` ("generating", "scoring").
- `progress`, where a stage has no `train` records (selection, evaluation): `{"step": units done,
  "phase": "progress", ...}`.

`train` records (the training loops' metrics) carry the optimizer step and a fractional `epoch`.
Standard library only, so the light commands can import it.
"""

from __future__ import annotations

from collections.abc import Mapping

START_PHASE = "start"
PROGRESS_PHASE = "progress"
PROGRESS_PHASES = frozenset({START_PHASE, PROGRESS_PHASE})


def start_record(step: int, total_steps: int, unit: str = "steps", **fields) -> dict:
    """The record that opens a run (or a resumed run, or a new task of it): where it starts, how far it goes."""
    return {"step": int(step), "phase": START_PHASE, "total_steps": int(total_steps), "unit": unit, **fields}


def progress_record(step: int, **fields) -> dict:
    return {"step": int(step), "phase": PROGRESS_PHASE, **fields}


def is_metric_record(record: Mapping) -> bool:
    """True for records holding metrics (train, eval, ...), False for the progress records above."""
    return record.get("phase") not in PROGRESS_PHASES
