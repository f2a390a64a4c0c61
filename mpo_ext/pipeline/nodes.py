"""Several nodes: what each node runs, and how the nodes of a per-node launch keep in step.

A multi-node run starts in one of two ways (`launcher.mode`):

- `ssh` (DeepSpeed's default): `mpo pipeline` runs on one node and each stage is one `deepspeed --hostfile H`
  command there; DeepSpeed's launcher starts the ranks of every host over ssh (pdsh), or through the backend
  that `launcher.extra: [--launcher, openmpi|slurm|...]` names. Nothing in this module is involved.
- `per_node`: a scheduler starts `mpo pipeline` once on every node (`srun`, a job array, one command per
  node by hand), each with its node rank (`--node_rank`, default `$SLURM_NODEID`). Each stage is then one
  `deepspeed --no_ssh --node_rank R` command per node, all with the same hostfile, rendezvous address and port.
  Node 0 (the head) keeps the pipeline's books exactly as on one node (run lock, pipeline.json, configs,
  stage.json, summary.json, the console report) and publishes in `OUT/nodes/launch.json` each stage it
  starts (name, identity, attempt, rendezvous address and port, resume or not) and how the stage and the
  run ended. Every other node follows that record (`follow_head`): it starts its share of each announced
  stage, stops the share at once when node 0 says the stage or the run failed (rather than waiting out the
  rendezvous timeout), and ends when node 0's run ends. The record is all the other nodes read from node 0;
  they write nothing in the run root but their own logs (`OUT/logs/<stage dir>.node<R>.log`).

One-process stages (`assets`, `eval`) run on node 0 only. The run root must be on a filesystem every node
mounts at the same path: stages save per-rank training states and selection shards there.

Imports the standard library and dschat's light helpers only (the pipeline driver must stay light).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.utils import atomic_write_json, atomic_write_text

NODES_DIR = "nodes"
LAUNCH_RECORD = "launch.json"
GENERATED_HOSTFILE = "hostfile"
MODES = ("ssh", "per_node")
#: Where a node's rank comes from when `--node_rank` is not given (Slurm's node index within the job).
NODE_RANK_ENV = "SLURM_NODEID"
#: Launcher flags the pipeline sets itself in per_node mode: refused in `launcher.extra`.
PER_NODE_FLAGS = ("--no_ssh", "--node_rank", "--master_addr", "--master_port", "--hostfile", "--num_nodes",
                  "--num_gpus", "--include", "--exclude", "--launcher", "--force_multi", "--ssh_port")
POLL_S = 1.0
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # as DeepSpeed reads it (the rest of the line ignored)


# ---------------------------------------------------------------------------------------------- placement


def read_hostfile(path: str | os.PathLike, key: str = "launcher.hostfile") -> list[tuple[str, int]]:
    """(host, slots) of a DeepSpeed hostfile (`host slots=N` per line; blank lines and `#` comments skipped)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"config key {key}: {path} cannot be read ({getattr(err, 'strerror', None) or err})") from None
    hosts: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise UserError(f"config key {key}: {path}:{number}: {line!r} is not `HOST slots=N` (N >= 1)")
        if match.group(1) in (host for host, _ in hosts):
            raise UserError(f"config key {key}: {path}:{number}: host {match.group(1)} is listed twice")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise UserError(f"config key {key}: {path} lists no host; write one `HOST slots=N` line per node")
    return hosts


def node_count(launcher) -> int | None:
    """Nodes a per-node run uses: `num_nodes`, else every host of the hostfile (None when neither is set)."""
    if launcher.num_nodes:
        return launcher.num_nodes
    return len(read_hostfile(launcher.hostfile)) if launcher.hostfile else None


def hostfile_for(launcher, out: Path) -> Path:
    """The hostfile the stages name: the config's, else (per_node) one node 0 writes in OUT/nodes/."""
    return Path(launcher.hostfile).expanduser().absolute() if launcher.hostfile else out / NODES_DIR / GENERATED_HOSTFILE


def write_generated_hostfile(launcher, out: Path) -> None:
    """per_node without a hostfile: `node-I slots=num_gpus` per node. With `--no_ssh` DeepSpeed never resolves
    these names; it only numbers the ranks from them."""
    if launcher.mode == "per_node" and not launcher.hostfile:
        lines = [f"node-{i} slots={launcher.num_gpus}" for i in range(node_count(launcher))]
        atomic_write_text(hostfile_for(launcher, out), "\n".join(lines) + "\n")


def node_command(command: Sequence[str], node_rank: int, master_addr: str, master_port: int | str) -> list[str]:
    """A stage's `deepspeed ...` command as node `node_rank` runs it in per_node mode."""
    return [command[0], "--no_ssh", "--node_rank", str(node_rank), "--master_addr", str(master_addr),
            "--master_port", str(master_port), *command[1:]]


def resolve_node_rank(flag: int | None, launcher) -> int | None:
    """This node's rank: `--node_rank`, else $SLURM_NODEID in per_node mode; None in ssh mode (one launcher)."""
    if launcher.mode != "per_node":
        if flag is not None:
            raise UserError(f"--node_rank {flag}: only with launcher.mode: per_node (one `mpo pipeline` per node); "
                            "in ssh mode the launcher on this node starts every node")
        return None
    source = "--node_rank"
    if flag is None:
        text = os.environ.get(NODE_RANK_ENV, "").strip()
        if not text:
            raise UserError(f"--node_rank: launcher.mode per_node needs this node's rank; pass --node_rank N "
                            f"(0 on the node that keeps the books), or run under Slurm (${NODE_RANK_ENV})")
        source = f"${NODE_RANK_ENV}={text}"
        try:
            flag = int(text)
        except ValueError:
            raise UserError(f"{source}: not an integer; pass --node_rank N") from None
    nodes = node_count(launcher)
    if not 0 <= flag < nodes:
        raise UserError(f"{source}: node rank {flag} is outside the run's {nodes} nodes (0..{nodes - 1})")
    return flag


def default_master_addr(launcher) -> str:
    """Node 0's address as the other nodes reach it: `launcher.master_addr`, else node 0's hostname."""
    return launcher.master_addr or socket.gethostname()


# ---------------------------------------------------------------------------------------------- the record


def read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("run"), str) else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class HeadRecord:
    """Node 0's side of a per-node run: the launch record every other node follows (`OUT/nodes/launch.json`).

    A run begins with a fresh run id; each stage node 0 starts gets a fresh attempt id and a rendezvous
    port (the configured one, or a free one on node 0), so a node that is still in an older attempt can never
    join a newer one's rendezvous."""

    def __init__(self, out: Path, launcher, free_port: Callable[[], int]):
        self.path = out / NODES_DIR / LAUNCH_RECORD
        self.launcher = launcher
        self.free_port = free_port
        self.record = {"run": uuid.uuid4().hex, "state": "running", "num_nodes": node_count(launcher),
                       "head": {"host": socket.gethostname(), "pid": os.getpid()}, "started": _now(), "stage": None}

    def _write(self) -> None:
        atomic_write_json(self.path, self.record)

    def begin(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def stage_started(self, stage, resume: bool) -> tuple[str, int]:
        """Announce `stage` (a plan Stage) and return the rendezvous (address, port) its ranks use."""
        address = default_master_addr(self.launcher)
        port = self.launcher.master_port or self.free_port()
        self.record["stage"] = {"name": stage.name, "identity": stage.identity, "attempt": uuid.uuid4().hex,
                                "master_addr": address, "master_port": port, "resume": resume, "state": "running",
                                "started": _now()}
        self._write()
        return address, port

    def stage_ended(self, ok: bool, message: str = "") -> None:
        self.record["stage"].update(state="ok" if ok else "failed", message=message, ended=_now())
        self._write()

    def end(self, state: str, message: str = "") -> None:
        """`finished`, `failed` or `interrupted`; a stage still marked running failed with the run."""
        stage = self.record.get("stage")
        if stage and stage.get("state") == "running":
            stage.update(state="failed", message=message, ended=_now())
        self.record.update(state=state, message=message, ended=_now())
        self._write()


def follow_head(out: Path, plan: Sequence, steps: Sequence[str], node_rank: int,
                run_share: Callable[[object, list[str], Callable[[], str | None]], int]) -> str:
    """A node other than 0: run this node's share of every stage node 0 announces, until node 0's run ends.

    `run_share(stage, command, watch)` runs one share and returns its exit code; it must stop the share when
    `watch()` returns a reason. Returns how the run ended (a line to print); raises UserError when node 0's
    run or this node's share failed. A record left by an earlier run (finished or failed before this node
    started) is not this run's: the node waits for node 0 to begin a new one. A stage announced as running
    when this node starts is joined (a node may start late). Before it has run a share, a node whose module
    stages of `steps` are all complete ends at once (node 0 reuses them); after, only node 0's run ends it."""
    path = out / NODES_DIR / LAUNCH_RECORD
    by_name = {stage.name: stage for stage in plan}
    wanted = [stage for stage in plan if stage.name in steps and stage.spec.module and not stage.given]
    first = read_record(path)
    stale_run = first["run"] if first and first.get("state") != "running" else None
    ran: set[str] = set()
    print(f"[pipeline node {node_rank}] following node 0 through {path}", flush=True)
    while True:
        record = read_record(path)
        if record is not None and record["run"] != stale_run:
            stage_info = record.get("stage") or {}
            attempt = stage_info.get("attempt")
            if record.get("state") == "running" and stage_info.get("state") == "running" and attempt not in ran:
                ran.add(attempt)
                _run_announced(record, stage_info, by_name, node_rank, run_share, path)
                continue
            if record.get("state") == "finished":
                return f"node 0 finished the run; outputs under {out}"
            if record.get("state") in ("failed", "interrupted"):
                raise UserError(f"node 0's run {record['state']}: {record.get('message') or 'see its console'}; "
                                f"this node (node {node_rank}) stops too")
        if not ran and all(stage.is_complete() for stage in wanted):  # node 0 will reuse them all
            return f"every stage of --steps is complete under {out}; nothing for node {node_rank} to run"
        time.sleep(POLL_S)


def _run_announced(record: dict, stage_info: dict, by_name: dict, node_rank: int, run_share, path: Path) -> None:
    name = stage_info.get("name")
    stage = by_name.get(name)
    if stage is None or not stage.spec.module:
        raise UserError(f"node 0 started stage {name}, which this node's plan does not run; start every node with "
                        "the same --config, --set options and --steps")
    if stage.identity != stage_info.get("identity"):
        raise UserError(f"stage {name}: node 0 runs identity {str(stage_info.get('identity'))[:8]}, this node's config "
                        f"gives {stage.identity[:8]}; start every node with the same --config and --set options")
    command = list(stage.command) + (["--resume"] if stage_info.get("resume") else [])
    command = node_command(command, node_rank, stage_info["master_addr"], stage_info["master_port"])

    def watch() -> str | None:
        """Why this share must stop now (node 0 gave up on it), else None."""
        current = read_record(path)
        if current is None:
            return None
        if current["run"] != record["run"]:
            return "node 0 began another run"
        if current.get("state") in ("failed", "interrupted"):
            return f"node 0's run {current['state']}: {current.get('message') or 'see its console'}"
        now = current.get("stage") or {}
        if now.get("attempt") == stage_info["attempt"] and now.get("state") == "failed":
            return f"node 0's {name} failed: {now.get('message') or 'see its console'}"
        return None

    code = run_share(stage, command, watch)
    if code != 0:
        reason = watch()
        raise UserError(f"stage {name}: this node's share (node {node_rank}) exited with code {code}"
                        f"{f' ({reason})' if reason else ''}; see its log under {path.parent.parent / 'logs'}")


def per_node_header(launcher) -> str:
    """What a per_node dry run's placeholders stand for."""
    return (f"# launcher.mode per_node: run `mpo pipeline` with this config on each of the {node_count(launcher)} "
            "nodes, with --node_rank R (or $SLURM_NODEID); node R runs the lines marked `node R`"
            + ("" if launcher.master_addr else "; NODE0_HOST: node 0's hostname (launcher.master_addr)")
            + ("" if launcher.master_port else "; PORT: a free port node 0 picks for each stage (launcher.master_port)")
            + "\n")


def dry_run_lines(stage, launcher, num_nodes: int) -> list[str]:
    """Each node's command for `stage` in per_node mode (what `--dry_run` prints)."""
    address = launcher.master_addr or "NODE0_HOST"
    port = launcher.master_port or "PORT"
    lines = []
    for rank in range(num_nodes):
        who = "node 0 (keeps the books: locks, stage.json, summary)" if rank == 0 else f"node {rank}"
        lines.append(f"#   {who}:")
        lines.append(shlex.join(node_command(stage.command, rank, address, port)))
    return lines


@contextlib.contextmanager
def head_run(record: HeadRecord | None):
    """Mark node 0's run in the record: begun, then finished, failed or interrupted with the reason."""
    if record is None:
        yield
        return
    record.begin()
    try:
        yield
    except UserError as err:
        record.end("failed", " ".join(str(err).split())[:500])
        raise
    except (KeyboardInterrupt, SystemExit) as stop:
        code = getattr(stop, "code", 130)
        record.end("interrupted" if code in (130, 143) or isinstance(stop, KeyboardInterrupt) else "failed",
                   f"exit code {code}")
        raise
    except BaseException as err:
        record.end("failed", f"{type(err).__name__}: {err}"[:500])
        raise
    record.end("finished")
