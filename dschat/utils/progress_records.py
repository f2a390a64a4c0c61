"""The records a stage appends to its `metrics.jsonl` beside its metrics: how far it is, and what its data held.

Why: `mpo pipeline` shows a heartbeat per stage (step k of n, epoch, the current loss, an ETA). It reads
them from the stage's own `metrics.jsonl` rather than from the text a stage prints, so the numbers are the
ones the stage logged. Three phases carry no metrics and are skipped by every metrics reader
(`mpo plot-curves`, the model card's metric tables):

- `start`, written at every (re)start, before the first step: `{"step": position at start, "phase":
  "start", "total_steps": n, "unit": "steps" | "prompts" | "answers", ...}`; a training loop adds
  `epochs` and `steps_per_epoch`, other stages a `task` ("generating", "scoring").
- `progress`, where a stage has no `train` records (selection, evaluation): `{"step": units done,
  "phase": "progress", ...}`.
- `data`, written once by a training loop before its first step: `{"step": 0, "phase": "data",
  "train_rows": n, "train_truncated": k, ..., "keep_truncated": 0 | 1}`, the rows per split and what the data
  build left out (`dschat.utils.data.prompt_datasets.data_record`); the model card shows it in a section of
  its own (`is_data_record`).

`train` records (the training loops' metrics) carry the optimizer step and a fractional `epoch`.
Standard library only, so the light commands can import it.
"""

from __future__ import annotations

from collections.abc import Mapping

START_PHASE = "start"
PROGRESS_PHASE = "progress"
DATA_PHASE = "data"
PROGRESS_PHASES = frozenset({START_PHASE, PROGRESS_PHASE})
NON_METRIC_PHASES = PROGRESS_PHASES | {DATA_PHASE}


def start_record(step: int, total_steps: int, unit: str = "steps", **fields) -> dict:
    """The record that opens a run (or a resumed run, or a new task of it): where it starts, how far it goes."""
    return {"step": int(step), "phase": START_PHASE, "total_steps": int(total_steps), "unit": unit, **fields}


def progress_record(step: int, **fields) -> dict:
    return {"step": int(step), "phase": PROGRESS_PHASE, **fields}


def data_counts_record(step: int, counts: Mapping[str, int]) -> dict:
    """The record of what a run's data build kept and left out (counts, whole numbers)."""
    return {"step": int(step), "phase": DATA_PHASE, **{key: int(value) for key, value in counts.items()}}


def is_metric_record(record: Mapping) -> bool:
    """True for records holding metrics (train, eval, ...), False for the progress and data records above."""
    return record.get("phase") not in NON_METRIC_PHASES


def is_data_record(record: Mapping) -> bool:
    return record.get("phase") == DATA_PHASE
