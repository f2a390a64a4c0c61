"""The console while a stage runs: a heartbeat read from the stage's own `metrics.jsonl`, and the few
lines of its output a person should see.

The heartbeat's numbers are the ones the stage logged (`dschat.utils.progress_records`): the step and
its total from the `start` record (`--max_steps` included), the epoch and training loss from the last
`train` record, units done from `progress` records (selection: prompts; evaluation: answers), and an ETA
from the rate at which the steps came in. Nothing is parsed from the stage's printed text; that text only
passes through a filter (warnings once per run, errors, evaluations, resume and save notes).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from dschat.utils.files import parse_jsonl
from dschat.utils.progress_records import PROGRESS_PHASE, START_PHASE

METRICS_FILE = "metrics.jsonl"
#: Training-record metrics the heartbeat shows (the first three present), with their short names.
SHOWN_METRICS = (("loss", "loss"), ("accuracy", "acc"), ("rewards/accuracies", "acc"), ("reward/mean", "reward"),
                 ("objective/kl", "kl"))


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsTail:
    """The records appended to a metrics.jsonl since the last call.

    Starts at the file's end (records of an earlier attempt are not this run's); a file replaced by a
    resumed run (which rewrites it without the records after its state) is read again from its start. A
    line is taken only once it is complete."""

    def __init__(self, path: Path):
        self.path = path
        self.inode, self.offset = self._identity()
        self.pending = b""

    def _identity(self) -> tuple[int | None, int]:
        try:
            info = os.stat(self.path)
        except OSError:
            return None, 0
        return info.st_ino, info.st_size

    def records(self) -> list[dict]:
        inode, size = self._identity()
        if inode is None:
            return []
        if inode != self.inode or size < self.offset:  # replaced or truncated: read it afresh
            self.inode, self.offset, self.pending = inode, 0, b""
        if size == self.offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(size - self.offset)
        except OSError:
            return []
        self.offset += len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        text = b"\n".join(lines).decode("utf-8", errors="replace")  # a line cut by a kill is skipped, not fatal
        return [record for record in parse_jsonl(text, self.path, skip_unreadable=True)
                if isinstance(record, dict) and isinstance(record.get("step"), (int, float))]


class StageProgress:
    """A stage's progress as its records tell it, and the heartbeat line that shows it."""

    def __init__(self, stage: str, metrics_path: Path):
        self.stage = stage
        self.tail = MetricsTail(metrics_path)
        self.start: dict | None = None
        self.step: float | None = None
        self.epoch: float | None = None
        self.shown = ""
        self.detail = ""
        self.origin: tuple[float, float] | None = None  # (time, step) the rate is measured from
        self.latest: tuple[float, float] | None = None

    def poll(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for record in self.tail.records():
            self._take(record, now)

    def _take(self, record: dict, now: float) -> None:
        phase, step = record.get("phase"), float(record["step"])
        if phase == START_PHASE:
            self.start, self.step, self.origin, self.latest = record, step, None, None
            self.detail = str(record.get("task", ""))
            if step == 0:
                self.shown, self.epoch = "", None
            return
        if phase not in ("train", PROGRESS_PHASE):
            return
        self.step = step
        if phase == "train":
            if isinstance(record.get("epoch"), (int, float)):
                self.epoch = float(record["epoch"])
            shown, names = [], set()
            for key, name in SHOWN_METRICS:
                if isinstance(record.get(key), (int, float)) and name not in names and len(shown) < 3:
                    shown.append(f"{name} {record[key]:.4g}")
                    names.add(name)
            self.shown = ", ".join(shown)
        elif record.get("model"):
            self.detail = f"{self.start.get('task', '') if self.start else ''} {record['model']}".strip()
        if self.origin is None:
            self.origin = (now, step)
        self.latest = (now, step)

    def _rate(self) -> float | None:
        if self.origin is None or self.latest is None or self.latest[0] <= self.origin[0]:
            return None
        rate = (self.latest[1] - self.origin[1]) / (self.latest[0] - self.origin[0])
        return rate if rate > 0 else None

    def summary(self) -> str:
        """What the records say: "step 12/40, epoch 2/3 | loss 1.23 | 3.1 steps/s, ETA 0:00:09" (or '')."""
        if self.start is None:
            return "starting" if self.step is None else ""
        total, unit = int(self.start.get("total_steps", 0)), str(self.start.get("unit", "steps"))
        done = int(self.step or 0)
        count = f"step {done}/{total}" if unit == "steps" else f"{done}/{total} {unit}"
        parts = [f"{self.detail}: {count}" if self.detail else count]
        epochs = self.start.get("epochs")
        if isinstance(epochs, int) and epochs > 1 and self.epoch is not None:
            parts[0] += f", epoch {min(epochs, max(1, math.ceil(self.epoch)))}/{epochs}"
        if self.shown:
            parts.append(self.shown)
        rate = self._rate()
        if rate is not None:
            per = "steps" if unit == "steps" else unit
            eta = f", ETA {clock(max(0, total - done) / rate)}" if done < total else ""
            parts.append(f"{rate:.3g} {per}/s{eta}")
        return " | ".join(parts)

    def heartbeat(self, elapsed: float) -> str:
        return " | ".join(p for p in (f"[pipeline] {self.stage}", self.summary(), f"{clock(elapsed)} elapsed") if p)


_ECHO = ("error", "Traceback", "[eval]", "Resumed", "Saved training state", "received: saving", "| model", "easy",
         "saving")
_PREFIXES = re.compile(r"^(\[[^\]]*\]\s*)+")


class ConsoleFilter:
    """Which of a stage's output lines reach the console: warnings (each once per run), errors,
    evaluations and resume/save notes. Everything goes to the stage's log file regardless."""

    def __init__(self):
        self.warned: set[str] = set()

    def shown(self, line: str) -> str | None:
        if "warning" in line.lower():
            text = _PREFIXES.sub("", line.strip())
            if text in self.warned:
                return None
            self.warned.add(text)
            return line
        if "%|" in line:  # a progress bar's redraw: the heartbeat says it better
            return None
        return line if any(key in line for key in _ECHO) else None
