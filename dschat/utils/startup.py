"""Where a stage's start-up time goes: cheap per-process timers, reported once at the first optimizer step.

`timed(name)` wraps the start-up work (data preparation, model load, DeepSpeed initialisation); the
first `report()` prints one `[startup] {json}` line on rank 0 with wall and CPU seconds per part:
launcher (only when the caller exported `DSCHAT_LAUNCH_TIME`, a Unix time taken just before launching),
imports (process start to `init_distributed`), distributed init, data, model load, DeepSpeed init, the
evaluation before training, and other (the rest, the first step's own compute included). `benchmarks/startup.py` reads these lines.

With `DSCHAT_STARTUP_IMPORTS=1` (set by `benchmarks/startup.py`) the imports made after `init_distributed`
began are counted too, as `lazy_imports`, and taken out of the part they happened in: transformers loads a
model's configuration and modeling classes (and through them torch.distributed.tensor, torch._dynamo and
accelerate) only when the first `AutoConfig`/`AutoModel` call asks for them, which is most of what used to
show up as "other".
"""

from __future__ import annotations

import builtins
import functools
import importlib
import json
import os
import time
from collections import defaultdict

LAUNCH_ENV = "DSCHAT_LAUNCH_TIME"
IMPORTS_ENV = "DSCHAT_STARTUP_IMPORTS"
PREFIX = "[startup] "
PARTS = ("dist_init", "data", "model_load", "deepspeed_init", "initial_eval")

_wall: dict[str, float] = defaultdict(float)
_cpu: dict[str, float] = defaultdict(float)
_marks: dict[str, tuple[float, float]] = {}
_active: list[str] = []
_reported = False
_importing = [0]  # depth of counted imports: only the outermost import statement is timed
_inner_imports: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # lazy imports inside a part


def process_start_time() -> float:
    """Unix time this process was created (falls back to now)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: timings start here
        return time.time()


def mark(name: str) -> None:
    """Remember (wall, CPU) now under `name` (the first call per name wins)."""
    if name == "dist_init_start" and name not in _marks and os.environ.get(IMPORTS_ENV) == "1":
        count_lazy_imports()
    _marks.setdefault(name, (time.time(), time.process_time()))


def _counted_import(real):
    @functools.wraps(real)
    def inner(*args, **kwargs):
        if _importing[0] or _reported:
            return real(*args, **kwargs)
        _importing[0] += 1
        wall, cpu = time.time(), time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            wall, cpu = time.time() - wall, time.process_time() - cpu
            _importing[0] -= 1
            _wall["lazy_imports"] += wall
            _cpu["lazy_imports"] += cpu
            if _active:  # taken out of the timed part it happened in (summary subtracts it)
                _inner_imports[_active[-1]][0] += wall
                _inner_imports[_active[-1]][1] += cpu
    inner.counted_import = True
    return inner


def count_lazy_imports() -> None:
    """Time every import from now to the report (opt-in, see the module docstring; restored by `report`).

    Both entry points are wrapped: `import` statements and `importlib.import_module`, which transformers'
    lazy modules call."""
    if not getattr(builtins.__import__, "counted_import", False):
        builtins.__import__ = _counted_import(builtins.__import__)
        importlib.import_module = _counted_import(importlib.import_module)


def _restore_imports() -> None:
    for owner, name in ((builtins, "__import__"), (importlib, "import_module")):
        fn = getattr(owner, name)
        if getattr(fn, "counted_import", False):
            setattr(owner, name, fn.__wrapped__)


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
    for name in (*PARTS, "lazy_imports"):
        if name in _wall:
            inner_wall, inner_cpu = _inner_imports[name] if name in _inner_imports else (0.0, 0.0)
            out["wall"][name] = round(_wall[name] - inner_wall, 3)
            out["cpu"][name] = round(_cpu[name] - inner_cpu, 3)
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
    _restore_imports()
    from dschat.utils.dist import is_rank_0

    if is_rank_0():
        print(PREFIX + json.dumps(summary(until)), flush=True)
