"""The stage plan: a config becomes stages with identities, output directories and command lines.

A stage's identity is a hash of the settings that change its result (its flags minus logging ones, the
launcher's world, its wiring with upstream outputs written as their identities) so it names the result,
not the run: it writes into `OUT/<directory>-<identity[:8]>`, another theta or `order: reverse` writes
beside the main run and reuses every upstream stage whose identity is unchanged, and a run root made by
an earlier version keeps reusing its finished stages (tests/test_pipeline.py pins the identities).

Nothing here runs or writes anything.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dschat.utils.errors import UserError
from mpo_ext.pipeline.config import LauncherConfig, PipelineConfig, stage_flags
from mpo_ext.pipeline.nodes import hostfile_for
from mpo_ext.pipeline.stages import (
    NO_RESULT_FLAGS,
    STAGE_BY_NAME,
    STAGES,
    LocalPath,
    Ref,
    StageSpec,
    Wiring,
    flags_to_args,
    wiring_refs,
    wiring_tokens,
)

COMPLETION_RECORD = "stage.json"


@dataclass
class Stage:
    """One node of the plan: its wiring, its own flags, and (once identities are known) where it writes."""

    name: str
    wiring: Wiring
    flags: dict
    identity: str = ""
    output: Path = Path()
    command: list[str] = field(default_factory=list)
    given: bool = False  #: an existing output named with `--input NAME=PATH`: never run

    @property
    def spec(self) -> StageSpec:
        return STAGE_BY_NAME[self.name]

    @property
    def module(self) -> str | None:
        return self.spec.module

    @property
    def inputs(self) -> list[Ref]:
        return list(wiring_refs(self.wiring))

    def record(self) -> dict | None:
        try:
            data = json.loads((self.output / COMPLETION_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def has_product(self) -> bool:
        return (self.output / self.spec.product).exists()

    def is_complete(self) -> bool:
        """Complete = the completion record carries this identity and the product is there (a given output:
        its product is there)."""
        if self.given:
            return self.has_product()
        record = self.record()
        return bool(record and record.get("identity") == self.identity and self.has_product())

    def can_resume(self) -> bool:
        return self.spec.resumable and (self.output / "checkpoints").is_dir()

    def shell(self) -> str:
        return shlex.join(self.command)


def build_plan(config: PipelineConfig, out: Path, given: Mapping[str, Path] | None = None) -> list[Stage]:
    """The chain as stages in running order, with identities, output directories and command lines.

    `given` maps stage names to finished outputs used instead of running those stages."""
    given = dict(given or {})
    stages = [Stage(spec.name, spec.wiring(config), stage_flags(config, spec)) for spec in STAGES
              if spec.enabled(config)]
    unknown = sorted(set(given) - {stage.name for stage in stages})
    if unknown:
        raise UserError(f"--input {unknown[0]}=...: no such stage in this chain; stages: "
                        f"{', '.join(stage.name for stage in stages)}")
    plan = _running_order(stages)
    _assign_identities(plan, config, out, given)
    return plan


def _running_order(stages: list[Stage]) -> list[Stage]:
    """Each stage after the stages it reads; otherwise in registry order."""
    names = {stage.name for stage in stages}
    order: list[Stage] = []
    pending = list(stages)
    while pending:
        placed = {stage.name for stage in order}
        for stage in pending:
            needs = {ref.stage for ref in stage.inputs}
            if needs - names:
                raise UserError(f"config value @{sorted(needs - names)[0]}: that stage is not in this chain")
            if needs <= placed:
                order.append(stage)
                pending.remove(stage)
                break
        else:
            raise UserError(f"stages {', '.join(s.name for s in pending)} read each other's outputs in a cycle")
    return order


def _identity(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _assign_identities(plan: list[Stage], config: PipelineConfig, out: Path, given: dict[str, Path]) -> None:
    """Identity = hash(settings that change the result, identities of the stages read); then commands."""
    by_name: dict[str, Stage] = {}
    launcher = {"num_gpus": config.launcher.num_gpus, "num_nodes": config.launcher.num_nodes,
                "hostfile": _file_digest(config.launcher.hostfile), "extra": config.launcher.extra}

    def token(arg, resolve_paths: bool):
        if isinstance(arg, tuple):  # eval's --model name=<ref>
            return f"{arg[0]}={token(arg[1], resolve_paths)}"
        if isinstance(arg, Ref):
            upstream = by_name[arg.stage]
            if resolve_paths:
                return str(upstream.output / arg.sub if arg.sub else upstream.output)
            return f"@{upstream.identity}/{arg.sub}"
        if isinstance(arg, LocalPath) and resolve_paths:
            return arg.absolute
        return arg

    cache = str(out / "data_cache")
    for stage in plan:
        spec = stage.spec
        by_name[stage.name] = stage
        if stage.name in given:
            stage.output = Path(given[stage.name]).expanduser().resolve()
            stage.identity = _identity({"stage": stage.name, "given": str(stage.output)})
            stage.given = True
            continue
        tokens = wiring_tokens(stage.wiring)
        settings = {"stage": stage.name, "module": spec.module, "wiring": [token(a, False) for a in tokens],
                    "flags": {k: v for k, v in stage.flags.items() if k not in NO_RESULT_FLAGS},
                    "launcher": launcher if spec.module else None}
        stage.identity = _identity(settings)
        stage.output = out / f"{spec.directory}-{stage.identity[:8]}"
        args = [token(a, True) for a in tokens] + (spec.flags.command_args(stage.flags) if spec.flags is not None
                                                   else flags_to_args(stage.flags))
        if spec.data_cache:
            args += ["--data_output_path", cache]
        args += [spec.output_flag, str(stage.output)]
        if spec.module and single_process(config.launcher):
            stage.command = [sys.executable, "-m", spec.module, *args]  # no launcher processes to start
        elif spec.module:
            stage.command = [*launcher_prefix(config.launcher, out), "--module", spec.module, *args]
        else:
            stage.command = [sys.executable, "-m", "mpo_ext.cli", spec.command, *args]


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        raise UserError(f"config key launcher.hostfile: {path} cannot be read") from None


def single_process(launcher: LauncherConfig) -> bool:
    """One rank on this node with no launcher arguments: plain `python -m` does the same job without the
    launcher's two extra processes (each imports torch and DeepSpeed: ~10 CPU-seconds per stage)."""
    return (launcher.mode == "ssh" and launcher.num_gpus == 1 and not launcher.hostfile and not launcher.num_nodes
            and not launcher.extra)


def launcher_prefix(launcher: LauncherConfig, out: Path) -> list[str]:
    """`deepspeed` with the placement flags (the runner adds a free rendezvous port on one node). In per_node
    mode this is every node's command before its node placement (`nodes.node_command`)."""
    cmd = ["deepspeed"]
    if launcher.hostfile or launcher.mode == "per_node":
        cmd += ["--hostfile", str(hostfile_for(launcher, out))]
        cmd += ["--num_nodes", str(launcher.num_nodes)] if launcher.num_nodes else []
    else:
        cmd += ["--num_gpus", str(launcher.num_gpus)]
    if launcher.mode == "ssh":
        cmd += ["--master_addr", launcher.master_addr] if launcher.master_addr else []
        cmd += ["--master_port", str(launcher.master_port)] if launcher.master_port else []
    return cmd + list(launcher.extra)


def stage_status(stage: Stage) -> str:
    """What running the plan would do with this stage: reuse it, resume it, or run it."""
    if stage.is_complete():
        return "given (--input)" if stage.given else "done: reused"
    if stage.given:
        return f"given, but no {stage.spec.product} there"
    return "resumes from its saved state" if stage.can_resume() else "runs"
