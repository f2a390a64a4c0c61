"""The driver: runs a plan's stages one after the other, each as its own process, in a locked run root.

Before anything runs, the run root must be ours (not owned by another user, not writable by group or
others: stages resume from the states they find there) and is locked for the whole run (a second
`mpo pipeline` into it refuses, naming the holder). A stage runs when its completion record is missing or
names another identity; a stage that died with saved states is re-run with `--resume`; a stage whose
reward model's health.json says "unhealthy" does not start unless `mpo.allow_unhealthy_reward_model`.
While a stage runs, the console shows its heartbeat (`progress.py`) and the lines a person should see;
the full output goes to OUT/logs/<stage dir>.log. Ctrl-C (or SIGTERM) lets the stage save its state,
then says where it is and how to resume. In `launcher.mode: per_node` node 0 runs exactly this and announces
each stage to the other nodes, which run their share of it and keep no books (`nodes.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import mpo_ext
from dschat.rlhf.health import COLLAPSE_EXIT_CODE, HEALTH_FILE
from dschat.utils.checkpoint import find_latest_state
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json
from dschat.utils.output_dir import LOCK_FILE, held_run_lock
from dschat.utils.safe_paths import ensure_private_dir, open_append
from dschat.utils.warm_start import launch as warm_launch
from dschat.utils.warm_start import module_command as warm_start_module
from mpo_ext.pipeline.config import LauncherConfig, PipelineConfig
from mpo_ext.pipeline.nodes import (
    HeadRecord,
    dry_run_lines,
    follow_head,
    head_run,
    node_command,
    node_count,
    per_node_header,
    resolve_node_rank,
    write_generated_hostfile,
)
from mpo_ext.pipeline.plan import COMPLETION_RECORD, Stage, build_plan, stage_status
from mpo_ext.pipeline.progress import METRICS_FILE, ConsoleFilter, StageProgress, clock
from mpo_ext.pipeline.report import health_signals, print_final_report, read_health, save_config, stage_health
from mpo_ext.pipeline.stages import STAGE_NAMES, STAGES

#: What the warm-start server imports once (launcher.warm_start): what every stage imports before its work,
#: the model classes of the tiny and Llama-family models, and the step modules. Not `mpo_ext.cli` (assets,
#: eval): when the pipeline itself runs as `python -m mpo_ext.cli`, each child re-imports its parent's main
#: module, and runpy warns in every stage if a copy of it was preloaded.
WARM_PRELOAD = ("torch", "transformers", "deepspeed", "transformers.models.llama.modeling_llama",
                *(spec.module for spec in STAGES if spec.module))
WATCH_INTERVAL_S = 2.0  #: how often a per_node share checks whether node 0 gave its stage up
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


#: A stage's exit status when SIGINT / SIGTERM stopped it (its handler saves a state, then exits 128 + signal;
#: negative: killed by the signal itself) -> that signal. The terminal's Ctrl-C reaches the stage and the
#: pipeline together, and the stage may be done before the pipeline sees its own; either way it is an
#: interruption to resume from, not a failure.
STOPPED_BY_SIGNAL = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM,
                     -signal.SIGINT: signal.SIGINT, -signal.SIGTERM: signal.SIGTERM}


class Interrupted(Exception):
    """The pipeline got SIGINT or SIGTERM while a stage ran (the stage was let finish saving)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def run_pipeline(config: PipelineConfig, steps: Sequence[str] = STAGE_NAMES, *, force: bool = False,
                 dry_run: bool = False, given: Mapping[str, Path] | None = None,
                 node_rank: int | None = None) -> dict | None:
    """`mpo pipeline` (and `mpo STAGE`) after the config is loaded: plan, then print it or run it.

    In `launcher.mode: per_node` every node runs this: node 0 runs the plan as on one node and publishes
    each stage it starts (`nodes.HeadRecord`); the other nodes follow it (`nodes.follow_head`)."""
    out = config.root()
    plan = build_plan(config, out, given)
    if node_rank is not None or not dry_run:
        node_rank = resolve_node_rank(node_rank, config.launcher)
    if dry_run:
        print_dry_run(plan, steps, config.launcher)
        return None
    check_upstream(plan, steps, config, out)
    prepare_root(out)
    if node_rank:
        return _follow(plan, out, config, steps, node_rank)
    head = HeadRecord(out, config.launcher, free_port) if node_rank == 0 else None
    with held_run_lock(out):
        claim_output_dir(out, config, force)
        save_config(out, config)
        with head_run(head):
            if head is not None:
                write_generated_hostfile(config.launcher, out)
            try:
                summary = run_plan(plan, out, config, steps=steps, head=head)
            except Interrupted as stop:
                print(f"[pipeline] {stop}", flush=True)
                raise SystemExit(128 + stop.signum) from None
    print_final_report(plan, out)
    return summary


def _follow(plan: list[Stage], out: Path, config: PipelineConfig, steps: Sequence[str], node_rank: int) -> None:
    """A node other than 0 (per_node mode): its share of each stage node 0 starts; no books of its own."""
    console = ConsoleFilter()

    def run_share(stage: Stage, command: list[str], watch) -> int:
        log_path = out / "logs" / f"{stage.output.name}.node{node_rank}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[pipeline node {node_rank}] ---=== {stage.name} -> {stage.output} ===--- (log: {log_path})",
              flush=True)
        progress = StageProgress(stage.name, stage.output / METRICS_FILE)
        return run_stage(command, log_path, out, config.progress_interval, console, progress, watch=watch)

    try:
        print(f"[pipeline node {node_rank}] {follow_head(out, plan, steps, node_rank, run_share)}", flush=True)
    except Interrupted as stop:
        print(f"[pipeline node {node_rank}] {stop}", flush=True)
        raise SystemExit(128 + stop.signum) from None


def print_dry_run(plan: Sequence[Stage], steps: Sequence[str], launcher: LauncherConfig | None = None) -> None:
    """Each stage of `steps`, what a run would do with it (reuse, resume, run) and the command it would run
    (in per_node mode: each node's command); and whether the stages they read (not in `steps`) are done."""
    read = {ref.stage for stage in plan if stage.name in steps for ref in stage.inputs}
    per_node = launcher is not None and launcher.mode == "per_node"
    if per_node:
        print(per_node_header(launcher), flush=True)
    for stage in plan:
        if stage.name not in steps:
            if stage.name in read:
                done = "given (--input)" if stage.given else "done" if stage.is_complete() else "NOT done"
                print(f"# {stage.name} -> {stage.output} (not in --steps; {done})\n", flush=True)
            continue
        status = stage_status(stage)
        print(f"# {stage.name} -> {stage.output} ({status})", flush=True)
        if per_node and stage.module:
            print("\n".join(dry_run_lines(stage, launcher, node_count(launcher))) + "\n", flush=True)
        elif per_node and stage.command:
            print(f"#   node 0 only:\n{stage.shell()}\n", flush=True)
        else:
            print(f"{stage.shell()}\n" if stage.command else "", flush=True)


def prepare_root(out: Path) -> None:
    """The run root must be ours alone, as the data cache must: its stages resume from the states found in
    it, so a root another user owns or that group/others may write is refused (created 0755 if missing;
    `safe_paths.check_dir_is_yours`, the one such check, as for output directories and caches)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: is a file, not a directory; choose another --output_dir")
    ensure_private_dir(out, "--output_dir", mode=0o755)


def experiment_key(config: PipelineConfig) -> dict:
    """What makes a run directory one experiment: its base models, data and embedded assets."""
    return {"models": dataclasses.asdict(config.models), "data": dataclasses.asdict(config.data),
            "assets": dataclasses.asdict(config.assets) if config.assets else None}


def claim_output_dir(out: Path, config: PipelineConfig, force: bool) -> None:
    """Refuse a directory that holds another experiment (or something that is not a pipeline run)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: is a file, not a directory; choose another --output_dir")
    record_path = out / "pipeline.json"
    key = experiment_key(config)
    if record_path.exists():
        try:
            held = json.loads(record_path.read_text(encoding="utf-8")).get("experiment")
        except (OSError, ValueError):
            held = None
        if held != key and not force:
            raise UserError(f"--output_dir {out}: holds a run of another config (base models/data differ); "
                            "choose another --output_dir, or pass --force to add this one there")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not force:
        raise UserError(f"--output_dir {out}: not empty and not a pipeline run; choose another --output_dir "
                        "or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {"experiment": key, "name": config.name})


# ---------------------------------------------------------------------------------------------- run


def run_plan(plan: list[Stage], out: Path, config: PipelineConfig, *, steps: Sequence[str] = STAGE_NAMES,
             dry_run: bool = False, head: HeadRecord | None = None) -> dict:
    """Run every stage in `steps` whose completion record is missing or stale; write OUT/summary.json.
    `head`: node 0 of a per_node run announces each stage there."""
    if dry_run:
        print_dry_run(plan, steps, config.launcher)
        return {"config": config.name, "stages": []}
    with held_run_lock(out):
        return _run_stages(plan, out, config, steps, head)


def _run_stages(plan: list[Stage], out: Path, config: PipelineConfig, steps: Sequence[str],
                head: HeadRecord | None = None) -> dict:
    summary = {"config": config.name, "stages": []}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = ConsoleFilter()
    by_name = {stage.name: stage for stage in plan}
    check_upstream(plan, steps, config, out)
    for stage in plan:
        if stage.name not in steps:
            continue
        entry = {"stage": stage.name, "identity": stage.identity, "output": str(stage.output)}
        summary["stages"].append(entry)
        if stage.given:
            entry["status"] = "given"
            continue
        if stage.is_complete():
            print(f"[pipeline] {stage.name}: complete ({stage.output.name}), reused", flush=True)
            entry["status"] = "reused (complete)"
            _note_health(stage, entry)
            continue
        check_reward_models(stage, by_name, config)
        _run_one(stage, out, config, console, entry, summary, head)
    atomic_write_json(out / "summary.json", summary)
    return summary


def check_upstream(plan: Sequence[Stage], steps: Sequence[str], config: PipelineConfig, out: Path) -> None:
    """Before anything runs: outputs given with --input are finished ones, every stage to run reads only
    stages that are complete (or given) or run before it, and no finished reward model it reads is unhealthy."""
    for stage in plan:
        if stage.given and not stage.is_complete():
            raise UserError(f"--input {stage.name}={stage.output}: no {stage.spec.product} there; give a finished "
                            f"{stage.name} output")
    ready = {stage.name for stage in plan if stage.is_complete()}
    by_name = {stage.name: stage for stage in plan}
    for stage in plan:
        if stage.name not in steps:
            continue
        if stage.name not in ready:
            check_reward_models(stage, by_name, config)
        missing = [name for name in dict.fromkeys(r.stage for r in stage.inputs) if name not in ready]
        if missing:
            raise UserError(f"stage {stage.name} needs {', '.join(missing)}, not complete under {out}; add "
                            f"{'it' if len(missing) == 1 else 'them'} to --steps (`mpo {stage.name}`: give finished "
                            f"outputs with --input {missing[0]}=PATH)")
        ready.add(stage.name)


def check_reward_models(stage: Stage, by_name: Mapping[str, Stage], config: PipelineConfig) -> None:
    """Refuse to start a stage from a finished reward model whose health.json says it learned nothing."""
    if config.mpo.allow_unhealthy_reward_model:
        return
    for name in dict.fromkeys(ref.stage for ref in stage.inputs):
        upstream = by_name[name]
        finished = upstream.spec.reward_model and upstream.is_complete()  # a crashed one's record is not its verdict
        record = read_health(upstream.output) if finished else None
        if record and record.get("status") == "unhealthy":
            signals = ", ".join(health_signals(record)) or "see the file"
            raise UserError(f"stage {stage.name}: the reward model {upstream.output} is unhealthy "
                            f"({signals}) per {upstream.output / HEALTH_FILE}; fix its data or settings and "
                            "re-run, or pass --allow_unhealthy_reward_model (mpo.allow_unhealthy_reward_model: "
                            "true) to use it anyway")


def _run_one(stage: Stage, out: Path, config: PipelineConfig, console: ConsoleFilter, entry: dict,
             summary: dict, head: HeadRecord | None = None) -> None:
    command = list(stage.command)
    resumed = stage.can_resume()
    if resumed:
        command.append("--resume")
    if head is not None and stage.module:  # node 0 of a per_node run: tell the other nodes, then run its share
        command = node_command(command, 0, *head.stage_started(stage, resumed))
    log_path = out / "logs" / f"{stage.output.name}.log"
    print(f"[pipeline] ---=== {stage.name}{' (resuming)' if resumed else ''} -> {stage.output} ===--- "
          f"(log: {log_path})", flush=True)
    start = time.time()
    progress = StageProgress(stage.name, stage.output / METRICS_FILE)
    try:
        code = run_stage(_with_free_port(command), log_path, out, config.progress_interval, console, progress,
                         warm_start=config.launcher.warm_start)
    except Interrupted as stop:
        entry.update(status="interrupted", seconds=round(time.time() - start, 1), log=str(log_path))
        atomic_write_json(out / "summary.json", summary)
        raise Interrupted(stop.signum, f"{stop}; {_resume_note(stage)}") from None
    elapsed = time.time() - start
    entry.update(status="ok" if code == 0 else f"failed ({code})", seconds=round(elapsed, 1), log=str(log_path),
                 command=shlex.join(command))
    if code == COLLAPSE_EXIT_CODE:
        _note_health(stage, entry)
        atomic_write_json(out / "summary.json", summary)
        raise UserError(f"stage {stage.name} was stopped by a health guard (--stop_on_collapse): "
                        f"{entry.get('health', 'see its log')}; see {stage.output / HEALTH_FILE} and {log_path}; "
                        "lower the learning rate or raise the KL coefficient, then re-run")
    if code != 0:
        atomic_write_json(out / "summary.json", summary)
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise UserError(f"stage {stage.name} failed with exit code {code}; see {log_path}; re-run to "
                        f"continue. Last lines:\n{tail}")
    if not stage.has_product():
        raise UserError(f"stage {stage.name} exited cleanly but wrote no {stage.spec.product}; see {log_path}")
    write_completion_record(stage, config, command, elapsed)
    if head is not None and stage.module:
        head.stage_ended(ok=True)
    progress.poll()
    where = progress.summary() if progress.start is not None else ""  # stages that log no progress (assets)
    print(f"[pipeline] ---=== {stage.name} finished in {clock(elapsed)}{f' ({where})' if where else ''} ===---",
          flush=True)
    _note_health(stage, entry)


def _resume_note(stage: Stage) -> str:
    """Where an interrupted stage stands and how to go on (printed as the pipeline's last line)."""
    if stage.spec.resumable:
        state = find_latest_state(stage.output)
        if state is not None:
            return (f"{stage.name} saved a training state in {state}; run the same command again to resume "
                    "from it (finished stages are reused)")
        return f"{stage.name} had saved no training state yet; run the same command again to start it afresh"
    return f"run the same command again to continue (finished stages are reused, {stage.name} runs again)"


def _note_health(stage: Stage, entry: dict) -> None:
    """Show and record a stage's health verdict (summary.json and the final report carry it)."""
    health = stage_health(stage.output)
    if health is not None:
        entry["health"] = health
        print(f"[pipeline] {stage.name} health: {health}", flush=True)


def write_completion_record(stage: Stage, config: PipelineConfig, command: list[str], seconds: float) -> None:
    """Written last, after the step exited cleanly: the proof that this output is this identity's."""
    atomic_write_json(stage.output / COMPLETION_RECORD, {
        "stage": stage.name, "identity": stage.identity, "command": command, "flags": stage.flags,
        "config": config.name, "mpo": dataclasses.asdict(config.mpo), "seconds": round(seconds, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})


# ---------------------------------------------------------------------------------------------- processes


def package_root() -> Path:
    """The directory holding the installed `mpo_ext` and `dschat` (a checkout or site-packages)."""
    return Path(mpo_ext.__file__).resolve().parents[1]


def _job_env() -> dict[str, str]:
    """Each stage is a job of its own: these packages importable, no rendezvous inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on this node now (probed on loopback; nothing stays bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_free_port(command: list[str]) -> list[str]:
    if command[:1] != ["deepspeed"] or any(c.startswith(("--master_port", "--hostfile")) for c in command):
        return command
    return [command[0], "--master_port", str(free_port()), *command[1:]]


def start_stage(command: list[str], cwd: Path, warm_start: bool):
    """The stage's process: forked from the warm-start server where the command is `python -m MODULE ...`
    and `warm_start` is on (falls back to a fresh interpreter where no server can run), else Popen. Both
    give `stdout` (text lines, stderr merged), `pid` and `wait()` -> exit code (negative: killed by that signal)."""
    env = _job_env()
    target = warm_start_module(command) if warm_start else None
    if target is not None:
        proc = warm_launch(*target, env=env, cwd=cwd, preload=WARM_PRELOAD)
        if proc is not None:
            return proc
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, cwd=cwd, bufsize=1)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a stage's process and everything it started (launcher, per-node launcher, ranks).

    Every process is stopped (SIGSTOP) before any is killed, so none can start a child that would outlive
    the kill (a launcher half-way through spawning its rank)."""
    import psutil  # lazy: only a per_node share that node 0 gave up needs it (a DeepSpeed dependency)

    stopped: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        pending = [psutil.Process(pid)]
        while pending:
            for process in pending:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.suspend()
                    stopped[process.pid] = process
            pending = []
            for process in list(stopped.values()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    pending += [child for child in process.children() if child.pid not in stopped]
    for process in stopped.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal API
    raise _Terminated


def run_stage(command: list[str], log_path: Path, cwd: Path, interval: float, console: ConsoleFilter,
              progress: StageProgress, warm_start: bool = False, watch: Callable[[], str | None] | None = None) -> int:
    """Run one stage to its end: its output to the log (line by line) and through `console`, a heartbeat
    every `interval` seconds. On Ctrl-C (which the terminal sends to the stage too) or SIGTERM (forwarded
    to it), wait for the stage to save its state and exit, then raise `Interrupted`; so also when the stage
    exits 130/143 on its own (`STOPPED_BY_SIGNAL`). `watch` (a node's share of a per_node stage) is asked
    every few seconds; when it gives a reason, the stage's processes are killed (node 0 has given the stage
    up: there is nothing left to save on this node)."""
    lines: queue.Queue = queue.Queue()
    with open_append(log_path, buffering=1) as log:
        log.write(f"$ {shlex.join(command)}\n")
        proc = start_stage(command, cwd, warm_start)
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        start = time.time()
        try:
            try:
                code = _pump(proc, lines, log, console, progress, interval, start, watch)
                if code not in STOPPED_BY_SIGNAL:
                    return code
                # Ctrl-C or SIGTERM reached the stage first (or only): it saved and stopped
                raise Interrupted(STOPPED_BY_SIGNAL[code], f"interrupted: {progress.stage} stopped (exit code {code})")
            except KeyboardInterrupt:
                signum = signal.SIGINT
            except _Terminated:
                signum = signal.SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
            print(f"\n[pipeline] {signal.Signals(signum).name}: waiting for {progress.stage} to save its state and "
                  "stop (Ctrl-C again to stop at once)", flush=True)
            try:
                code = _pump(proc, lines, log, console, progress, interval, start)
            except (KeyboardInterrupt, _Terminated):
                code = proc.wait()
            raise Interrupted(signum, f"interrupted: {progress.stage} stopped (exit code {code})")
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _pump(proc, lines: queue.Queue, log, console: ConsoleFilter, progress: StageProgress, interval: float,
          start: float, watch: Callable[[], str | None] | None = None) -> int:
    last_beat = last_watch = time.time()
    while True:
        if watch is not None and time.time() - last_watch >= WATCH_INTERVAL_S:
            last_watch = time.time()
            reason = watch()
            if reason:
                print(f"[pipeline] {progress.stage}: {reason}; stopping this node's share", flush=True)
                kill_process_tree(proc.pid)
                watch = None
        try:
            line = lines.get(timeout=min(interval, 1.0))
        except queue.Empty:
            line = ""
        if line is None:
            return proc.wait()
        if line:
            log.write(line)
            shown = console.shown(line)
            if shown:
                sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
                sys.stdout.flush()
        progress.poll()
        if time.time() - last_beat >= interval:
            last_beat = time.time()
            print(progress.heartbeat(last_beat - start), flush=True)
