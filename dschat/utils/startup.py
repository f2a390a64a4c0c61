"""Where a stage's start-up time goes: cheap per-process timers, reported once at the first optimizer step.

`timed(name)` wraps the start-up work (data preparation, model load, DeepSpeed initialisation); the
first `report()` prints one `[startup] {json}` line on rank 0 with wall and CPU seconds per part:
launcher (only when the caller exported `DSCHAT_LAUNCH_TIME`, a Unix time taken just before launching),
imports (process start to `init_distributed`), distributed init, data, model load, DeepSpeed init, the
evaluation before training, and other (the rest, the first step's own compute included). `benchmarks/startup.py` reads these lines.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict

LAUNCH_ENV = "DSCHAT_LAUNCH_TIME"
PREFIX = "[startup] "

_wall: dict[str, float] = defaultdict(float)
_cpu: dict[str, float] = defaultdict(float)
_marks: dict[str, tuple[float, float]] = {}
_active: list[str] = []
_reported = False


def process_start_time() -> float:
    """Unix time this process was created (falls back to now)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: timings start here
        return time.time()


def mark(name: str) -> None:
    """Remember (wall, CPU) now under `name` (the first call per name wins)."""
    _marks.setdefault(name, (time.time(), time.process_time()))


def timed(name: str):
    """Decorator: add the call's wall and CPU seconds to part `name` (outermost timed call only)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if _active or _reported:
                return fn(*args, **kwargs)
            _active.append(name)
            wall, cpu = time.time(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _wall[name] += time.time() - wall
                _cpu[name] += time.process_time() - cpu
                _active.pop()
        return inner
    return wrap


def summary(until: str = "first_step") -> dict:
    """Seconds per part from launch (or process start) to now; CPU seconds are this process's."""
    now_wall, now_cpu = time.time(), time.process_time()
    start = process_start_time()
    out: dict = {"until": until, "wall": {}, "cpu": {}}
    launch = os.environ.get(LAUNCH_ENV)
    if launch:
        try:
            out["wall"]["launcher"] = round(max(0.0, start - float(launch)), 3)
        except ValueError:
            pass
    imports_wall, imports_cpu = _marks.get("dist_init_start", (now_wall, now_cpu))
    out["wall"]["imports"] = round(imports_wall - start, 3)
    out["cpu"]["imports"] = round(imports_cpu, 3)
    for name in ("dist_init", "data", "model_load", "deepspeed_init", "initial_eval"):
        if name in _wall:
            out["wall"][name] = round(_wall[name], 3)
            out["cpu"][name] = round(_cpu[name], 3)
    counted_wall = sum(v for k, v in out["wall"].items() if k != "launcher")
    out["wall"]["other"] = round(max(0.0, now_wall - start - counted_wall), 3)
    out["cpu"]["other"] = round(max(0.0, now_cpu - sum(out["cpu"].values())), 3)
    out["wall"]["total"] = round(sum(out["wall"].values()), 3)
    out["cpu"]["total"] = round(now_cpu, 3)
    return out


def report(until: str = "first_step") -> None:
    """Print the `[startup]` line once per process (rank 0 only)."""
    global _reported
    if _reported:
        return
    _reported = True
    from dschat.utils.dist import is_rank_0

    if is_rank_0():
        print(PREFIX + json.dumps(summary(until)), flush=True)
