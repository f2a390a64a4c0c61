"""The MPO chain from one config file: assets -> SFT -> RM -> select -> DPO (easy) -> PPO (hard) -> eval.

A run config (YAML; the presets in `mpo_ext/configs/` are ones) is loaded into typed dataclasses and
checked before anything runs: an unknown key or a bad value is one line naming the key. The config becomes
a small DAG of stages. Each stage's identity is a hash of the settings that change its result (its flags
minus logging ones, the launcher's world, its external inputs) and of the identities of the stages it
reads; it writes into `OUT/<stage dir>-<identity[:8]>`, so another theta, `reference: sft` or
`order: reverse` writes beside the main run and reuses every upstream stage whose identity is unchanged.
A stage is complete only when its completion record (`stage.json`, written last, after the step exited
cleanly) carries that identity; a stage that died half-way is re-run with `--resume` (its saved states).

Owns the config schema, the stage plan and the driver that launches each step as its own process. It
imports no model or training-loop code (from `dschat.rlhf.health` only the exit code and file name of
the guards): stages run as `python -m <step module>` or under the `deepspeed` launcher, and `check_plan`
imports a step module only to run its flag checks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import queue
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import click
import yaml

import mpo_ext
from dschat.rlhf.health import COLLAPSE_EXIT_CODE, HEALTH_FILE
from dschat.utils.data.raw_datasets import read_data_text
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json, atomic_write_text
from dschat.utils.warm_start import launch as warm_launch
from dschat.utils.warm_start import module_command as warm_start_module
from mpo_ext import eval_cli
from mpo_ext.selection.settings import check_split
from mpo_ext.synthetic import SYNTHETIC_TASK_NAME, TASKS

CONFIG_PACKAGE = "mpo_ext.configs"
PRESET_ALIASES = {"llama2-7b": "llama2-7b-hh"}
STAGE_ORDER = ("assets", "sft", "rm", "select", "dpo", "ppo", "eval")
TRAINING_STAGES = ("sft", "rm", "select", "dpo", "ppo")
STAGE_DIRS = {"assets": "assets", "sft": "step1_sft", "rm": "step2_rm", "select": "step2.5_select",
              "dpo": "step3b_dpo", "ppo": "step3_ppo", "eval": "eval"}
#: The `python -m` module of each stage, inside the installed packages (no checkout needed).
STAGE_MODULES = {"sft": "dschat.steps.sft", "rm": "dschat.steps.reward", "select": "mpo_ext.selection",
                 "dpo": "mpo_ext.dpo", "ppo": "dschat.steps.ppo"}
#: The file a finished stage must have produced (besides its completion record).
PRODUCTS = {"assets": "tiny-llama/config.json", "sft": "config.json", "rm": "config.json",
            "select": "manifest.json", "dpo": "config.json", "ppo": "actor/config.json", "eval": "table.json"}
RESUMABLE = ("sft", "rm", "dpo", "ppo")
#: Flags the pipeline wires itself (inputs, outputs); a config sets them through models/data/mpo.
#: (`data_split` in a stage section replaces data.split for that stage.)
WIRED_FLAGS = frozenset({
    "output_dir", "data_path", "data_output_path", "model_name_or_path", "actor_model_name_or_path",
    "reference_model_name_or_path", "critic_model_name_or_path", "sft_model_name_or_path",
    "reward_model_name_or_path", "num_padding_at_beginning", "threshold", "easy_fraction", "resume", "model",
    "reward_model", "local_rank"})
#: Flags that change logs or checkpoint cadence, never results: left out of a stage's identity.
NO_RESULT_FLAGS = frozenset({
    "log_interval", "save_steps", "save_total_limit", "enable_tensorboard", "tensorboard_path", "report_to",
    "push_to_hub", "hub_model_id", "hub_private_repo", "print_answers",
    "print_answers_interval", "rebuild_data_cache", "rebuild_shards", "shard_size"})
COMPLETION_RECORD = "stage.json"


# ------------------------------------------------------------------------------------------- config


@dataclass
class AssetsConfig:
    """The embedded synthetic task and tiny Llama (`mpo assets`), built as the chain's first stage."""

    num_train: int = 2000
    num_test: int = 200
    seed: int = 1234
    task: str = SYNTHETIC_TASK_NAME  # mpo_ext.synthetic.TASKS: mpo-synthetic or mpo-sort


@dataclass
class ModelsConfig:
    """Base models: a hub id, a local directory, or `@<stage>[/sub/path]` (an upstream stage's output)."""

    sft: str = "@assets/tiny-llama"
    reward: str = "@sft"


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=lambda: ["@assets/data"])
    split: str | None = "2,4,4"
    eval_path: list[str] | None = None  #: evaluation prompt sets, together (default: the first of `path`)
    num_padding_at_beginning: int = 0


@dataclass
class LauncherConfig:
    """DeepSpeed's launcher: `deepspeed --num_gpus N` on one node, or `--hostfile` for several.

    `warm_start` (one-rank stages only, those run as `python -m MODULE`): start each stage as a fork of one
    server that imported torch, transformers, DeepSpeed and the step modules once per pipeline run
    (`dschat/utils/warm_start.py`), instead of a fresh interpreter that imports them again (~10 CPU-s per
    stage). Same outputs and stage identities either way; false = a fresh interpreter per stage."""

    num_gpus: int = 1
    hostfile: str | None = None
    num_nodes: int | None = None
    extra: list[str] = field(default_factory=list)  #: more launcher arguments, e.g. [--include, "localhost:0,1"]
    warm_start: bool = True  #: one-rank stages fork from a pre-imported server (false: fresh `python -m`)


@dataclass
class MpoConfig:
    threshold: float | None = 1.0  #: reward-gap theta; gap > theta is easy
    easy_fraction: float | None = None  #: instead of theta: this share of pairs is easy
    reference: str = "dpo"  #: dpo: KL to the previous stage's model (MPO); sft: to the SFT model (ablation)
    order: str = "mpo"  #: mpo: DPO on easy, then PPO on hard; reverse: PPO on hard, then DPO on easy


@dataclass
class PipelineConfig:
    """One run of the chain. Stage sections map flag names (without `--`) to values: true = bare flag,
    false/null = left out, a list = several values. `common` goes to every training stage."""

    name: str = "custom"
    output_dir: str | None = None
    base: str | None = None  #: a preset name or a config path this one edits
    assets: AssetsConfig | None = None
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    mpo: MpoConfig = field(default_factory=MpoConfig)
    progress_interval: float = 10.0  #: seconds between heartbeat lines on the console
    common: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    rm: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".yaml"))


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml12_floats(value):
    """YAML 1.1 (PyYAML) reads `5e-5` as a string; YAML 1.2 and every reader of a config mean a number."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml12_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml12_floats(v) for v in value]
    return value


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = _yaml12_floats(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping of keys")
    return data


def _load_raw(source: str, seen: tuple[str, ...] = ()) -> dict:
    """A config's keys with its `base` chain merged in (the base first, this file's keys on top)."""
    name = PRESET_ALIASES.get(source, source)
    if name in preset_names():
        where = f"preset {name}"
        data = _read_yaml(resources.files(CONFIG_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8"), where)
        here = None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"--config {source}: no such file and no preset of that name "
                            f"(presets: {', '.join(preset_names())})")
        where, here = str(path), path.parent
        data = _read_yaml(read_data_text(path), where)
    base = data.get("base")
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{where}: base: must be a preset name or a config path")
    if here is not None and PRESET_ALIASES.get(base, base) not in preset_names() and not Path(base).is_absolute():
        base = str(here / base)
    if base in seen:
        raise UserError(f"{where}: base: {base} includes itself")
    merged = _deep_merge(_load_raw(base, (*seen, source)), data)
    merged.pop("base", None)
    return merged


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: 5, 0.5, true, [x, y], null, text)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: write KEY=VALUE, e.g. --set dpo.learning_rate=5e-5")
    try:
        parsed = _yaml12_floats(yaml.safe_load(value)) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_override(raw: dict, keys: list[str], value: object) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def load_config(source: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Read a preset or config file, apply `KEY=VALUE` overrides, and check every key and value."""
    raw = _load_raw(source)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    config = _build(PipelineConfig, raw, "")
    validate(config)
    return config


def _build(cls, data: dict, prefix: str):
    """A dataclass from a mapping, each value checked against its annotation (one line per bad key)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"config key {prefix}{key}: unknown; known keys here: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _coerce(hints[f.name], data[f.name], f"{prefix}{f.name}")
    return cls(**values)


def _coerce(hint, value, key: str):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a section (mapping), got {value!r}")
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping of flag: value, got {value!r}")
        return dict(value)
    if hint is list or origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise UserError(f"config key {key}: expected a list of strings, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            if isinstance(value, bool) or (hint is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = hint(value)
        except (TypeError, ValueError):
            raise UserError(f"config key {key}: expected {'an integer' if hint is int else 'a number'}, "
                            f"got {value!r}") from None
        if hint is float and not math.isfinite(number):
            raise UserError(f"config key {key}: {value!r} is not a finite number")
        return number
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"config key {key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled annotation {hint} for {key}")


def validate(config: PipelineConfig) -> None:
    """Value checks that need no model or data (the steps' own flag checks run in `check_plan`)."""
    mpo = config.mpo
    if mpo.reference not in ("dpo", "sft"):
        raise UserError(f"config key mpo.reference: {mpo.reference!r}; choose dpo (MPO) or sft (ablation)")
    if mpo.order not in ("mpo", "reverse"):
        raise UserError(f"config key mpo.order: {mpo.order!r}; choose mpo or reverse")
    check_split(mpo.threshold, mpo.easy_fraction, threshold_key="config key mpo.threshold",
                easy_fraction_key="config key mpo.easy_fraction", require_one=True)
    if config.launcher.num_gpus < 1:
        raise UserError(f"config key launcher.num_gpus: {config.launcher.num_gpus}; must be >= 1")
    if config.progress_interval <= 0:
        raise UserError(f"config key progress_interval: {config.progress_interval}; must be > 0 seconds")
    if not config.data.path:
        raise UserError("config key data.path: empty; name at least one dataset")
    if config.assets is not None and config.assets.task not in TASKS:
        raise UserError(f"config key assets.task: {config.assets.task!r}; choose one of {', '.join(TASKS)}")
    for stage in ("common", *TRAINING_STAGES, "eval"):
        for flag, value in getattr(config, stage).items():
            key = f"{stage}.{flag}"
            if not isinstance(flag, str) or flag.startswith("-"):
                raise UserError(f"config key {key}: write flag names without dashes")
            if flag in WIRED_FLAGS:
                raise UserError(f"config key {key}: set by the pipeline (use models.*, data.*, mpo.* or output_dir)")
            if isinstance(value, dict):
                raise UserError(f"config key {key}: expected a value or a list, got a mapping")
    for ref in (config.models.sft, config.models.reward, *config.data.path, *(config.data.eval_path or [])):
        if ref and ref.startswith("@") and _ref_stage(ref) not in STAGE_ORDER:
            raise UserError(f"config value {ref}: @ names a stage output; stages: {', '.join(STAGE_ORDER)}")
        if ref and ref.startswith("@assets") and config.assets is None:
            raise UserError(f"config value {ref}: needs an `assets:` section (the embedded task), or name real "
                            "models/data")


def config_dict(config: PipelineConfig) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config_dict(config), sort_keys=False, default_flow_style=None, width=110)


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Ref:
    """An upstream stage's output (optionally a path inside it), resolved once identities are known."""

    stage: str
    sub: str = ""


def _ref_stage(text: str) -> str:
    return text[1:].split("/", 1)[0]


def _as_input(text: str) -> str | Ref:
    if text.startswith("@"):
        stage, _, sub = text[1:].partition("/")
        return Ref(stage, sub)
    return text


def flags_to_args(flags: dict) -> list[str]:
    """{"learning_rate": 5e-5, "gradient_checkpointing": True, "x": [1, 2]} -> --learning_rate 5e-05 ..."""
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        args.append(f"--{name}")
        if value is True:
            continue
        args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return args


@dataclass
class Stage:
    """One node of the DAG: its wiring (inputs, split: str or Ref), its own flags, and where it writes."""

    name: str
    wiring: list  # str | Ref | (name, Ref) for eval's --model name=path
    flags: dict
    module: str | None = None  # launched with `deepspeed --module`; None: a `python -m mpo_ext.cli` command
    identity: str = ""
    output: Path = Path()
    command: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[Ref]:
        refs = [a[1] if isinstance(a, tuple) else a for a in self.wiring]
        return [r for r in refs if isinstance(r, Ref)]

    def record(self) -> dict | None:
        try:
            data = json.loads((self.output / COMPLETION_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_complete(self) -> bool:
        """Complete = the completion record carries this identity and the product is there."""
        record = self.record()
        return bool(record and record.get("identity") == self.identity and (self.output / PRODUCTS[self.name]).exists())

    def shell(self) -> str:
        return shlex.join(self.command)


def build_plan(config: PipelineConfig, out: Path) -> list[Stage]:
    """The chain as stages with identities, output directories and command lines (nothing runs)."""
    mpo, data = config.mpo, config.data
    npb = ["--num_padding_at_beginning", str(data.num_padding_at_beginning)]
    data_args = ["--data_path", *map(_as_input, data.path)] + (["--data_split", data.split] if data.split else [])

    def train(name: str, wiring: list) -> Stage:
        return Stage(name, wiring, {**config.common, **getattr(config, name)}, STAGE_MODULES[name])

    plan: list[Stage] = []
    if config.assets is not None:
        a = config.assets
        plan.append(Stage("assets", ["--num_train", str(a.num_train), "--num_test", str(a.num_test),
                                     "--seed", str(a.seed), "--task", a.task], {}))
    plan.append(train("sft", [*data_args, "--model_name_or_path", _as_input(config.models.sft)]))
    plan.append(train("rm", [*data_args, "--model_name_or_path", _as_input(config.models.reward), *npb]))
    split = (["--threshold", str(mpo.threshold)] if mpo.threshold is not None
             else ["--easy_fraction", str(mpo.easy_fraction)])
    plan.append(train("select", [*data_args, "--sft_model_name_or_path", Ref("sft"), "--reward_model_name_or_path",
                                 Ref("rm"), *npb, *split]))
    easy, hard = Ref("select", "easy.jsonl"), Ref("select", "hard.jsonl")
    sft_reference = Ref("sft") if mpo.reference == "sft" else None  # None: the model the stage starts from
    if mpo.order == "mpo":
        plan.append(train("dpo", ["--data_path", easy, "--model_name_or_path", Ref("sft")]))
        plan.append(train("ppo", ["--data_path", hard, "--actor_model_name_or_path", Ref("dpo"),
                                  "--reference_model_name_or_path", sft_reference or Ref("dpo"),
                                  "--critic_model_name_or_path", Ref("rm"), *npb]))
        models = [("sft", Ref("sft")), ("dpo", Ref("dpo")), ("mpo", Ref("ppo", "actor"))]
    else:
        plan.append(train("ppo", ["--data_path", hard, "--actor_model_name_or_path", Ref("sft"),
                                  "--reference_model_name_or_path", Ref("sft"),
                                  "--critic_model_name_or_path", Ref("rm"), *npb]))
        plan.append(train("dpo", ["--data_path", easy, "--model_name_or_path", Ref("ppo", "actor"),
                                  "--reference_model_name_or_path", sft_reference or Ref("ppo", "actor")]))
        models = [("sft", Ref("sft")), ("ppo_hard", Ref("ppo", "actor")), ("mpo_reverse", Ref("dpo"))]
    model_args = [x for pair in models for x in ("--model", pair)]
    eval_data = [arg for path in (data.eval_path or data.path[:1]) for arg in ("--data_path", _as_input(path))]
    plan.append(Stage("eval", [*model_args, "--reward_model", Ref("rm"), *eval_data, *npb],
                      dict(config.eval)))
    _assign_identities(plan, config, out)
    return plan


def _assign_identities(plan: list[Stage], config: PipelineConfig, out: Path) -> None:
    """Identity = hash(settings that change the result, identities of the stages read); then commands."""
    by_name: dict[str, Stage] = {}
    launcher = {"num_gpus": config.launcher.num_gpus, "num_nodes": config.launcher.num_nodes,
                "hostfile": _file_digest(config.launcher.hostfile), "extra": config.launcher.extra}

    def token(arg, resolve_paths: bool):
        if isinstance(arg, tuple):  # eval's --model name=<ref>
            return f"{arg[0]}={token(arg[1], resolve_paths)}"
        if isinstance(arg, Ref):
            if arg.stage not in by_name:
                raise UserError(f"config value @{arg.stage}: that stage is not in this chain")
            upstream = by_name[arg.stage]
            if resolve_paths:
                return str(upstream.output / arg.sub if arg.sub else upstream.output)
            return f"@{upstream.identity}/{arg.sub}"
        return arg

    cache = str(out / "data_cache")
    for stage in plan:
        settings = {"stage": stage.name, "module": stage.module, "wiring": [token(a, False) for a in stage.wiring],
                    "flags": {k: v for k, v in stage.flags.items() if k not in NO_RESULT_FLAGS},
                    "launcher": launcher if stage.module else None}
        stage.identity = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        stage.output = out / f"{STAGE_DIRS[stage.name]}-{stage.identity[:8]}"
        by_name[stage.name] = stage
        args = [token(a, True) for a in stage.wiring] + flags_to_args(stage.flags)
        if stage.name == "assets":
            stage.command = [sys.executable, "-m", "mpo_ext.cli", "assets", "--root", str(stage.output), *args]
            continue
        args += ["--data_output_path", cache, "--output_dir", str(stage.output)]
        if stage.module and single_process(config.launcher):
            stage.command = [sys.executable, "-m", stage.module, *args]  # no launcher processes to start
        elif stage.module:
            stage.command = [*launcher_prefix(config.launcher), "--module", stage.module, *args]
        else:
            stage.command = [sys.executable, "-m", "mpo_ext.cli", "eval", *args]


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
    return launcher.num_gpus == 1 and not launcher.hostfile and not launcher.num_nodes and not launcher.extra


def launcher_prefix(launcher: LauncherConfig) -> list[str]:
    """`deepspeed` with the placement flags (a free rendezvous port on one node, so runs never collide)."""
    cmd = ["deepspeed"]
    if launcher.hostfile:
        cmd += ["--hostfile", launcher.hostfile] + (["--num_nodes", str(launcher.num_nodes)]
                                                    if launcher.num_nodes else [])
    else:
        cmd += ["--num_gpus", str(launcher.num_gpus)]
    return cmd + list(launcher.extra)


def check_plan(plan: list[Stage]) -> None:
    """Run each step's own flag checks on its command line before anything starts (one line on a bad flag)."""
    for stage in plan:
        if stage.name == "assets":
            continue
        argv = stage.command[stage.command.index(stage.module) + 1:] if stage.module else stage.command[4:]
        # Upstream outputs do not exist yet: give the checks names that do not look like local paths.
        argv = [_placeholder(a, stage) for a in argv]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                if stage.module:
                    importlib.import_module(stage.module).parse_args(argv)
                else:
                    eval_cli.eval_command.make_context("eval", list(argv), resilient_parsing=False)
        except SystemExit:
            message = " ".join(err.getvalue().replace("error:", "").split()) or "bad flags"
            raise UserError(f"config section {stage.name}: {message}") from None
        except UserError as e:
            raise UserError(f"config section {stage.name}: {e}") from None
        except click.ClickException as e:  # eval's usage errors
            raise UserError(f"config section {stage.name}: {e.format_message()}") from None


def _placeholder(arg: str, stage: Stage) -> str:
    out_root = str(stage.output.parent)
    if arg.startswith(out_root) and not Path(arg).exists():
        return "pending-upstream-output"
    if "=" in arg and arg.split("=", 1)[1].startswith(out_root):
        return arg.split("=", 1)[0] + "=pending-upstream-output"
    return arg


# ---------------------------------------------------------------------------------------------- run


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
    elif out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--output_dir {out}: not empty and not a pipeline run; choose another --output_dir "
                        "or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {"experiment": key, "name": config.name})


def package_root() -> Path:
    """The directory holding the installed `mpo_ext` and `dschat` (a checkout or site-packages)."""
    return Path(mpo_ext.__file__).resolve().parents[1]


_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


#: What the warm-start server imports once (launcher.warm_start): what every stage imports before its work,
#: the model classes of the tiny and Llama-family models, and the stage modules themselves.
WARM_PRELOAD = ("torch", "transformers", "deepspeed", "transformers.models.llama.modeling_llama",
                *STAGE_MODULES.values(), "mpo_ext.cli")


def _job_env() -> dict[str, str]:
    """Each stage is a job of its own: these packages importable, no rendezvous inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _with_free_port(command: list[str]) -> list[str]:
    if command[:1] != ["deepspeed"] or any(c.startswith(("--master_port", "--hostfile")) for c in command):
        return command
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [command[0], "--master_port", str(port), *command[1:]]


def run_plan(plan: list[Stage], out: Path, config: PipelineConfig, *, steps: typing.Sequence[str] = STAGE_ORDER,
             dry_run: bool = False) -> dict:
    """Run every stage in `steps` whose completion record is missing or stale; write OUT/summary.json."""
    summary = {"config": config.name, "stages": []}
    if dry_run:
        for stage in plan:
            if stage.name in steps:
                print(f"# {stage.name} -> {stage.output}\n{stage.shell()}\n", flush=True)
        return summary
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done, warned = set(), set()
    for stage in plan:
        if stage.is_complete():
            done.add(stage.name)
        if stage.name not in steps:
            continue
        entry = {"stage": stage.name, "identity": stage.identity, "output": str(stage.output)}
        summary["stages"].append(entry)
        if stage.name in done:
            print(f"[pipeline] {stage.name}: complete ({stage.output.name}), reused", flush=True)
            entry["status"] = "reused (complete)"
            _note_health(stage, entry)
            continue
        missing = sorted({r.stage for r in stage.inputs} - done)
        if missing:
            raise UserError(f"stage {stage.name} needs {', '.join(missing)}, which is not complete; add it to --steps")
        command = list(stage.command)
        resumed = stage.name in RESUMABLE and (stage.output / "checkpoints").is_dir()
        if resumed:
            command.append("--resume")
        log_path = logs / f"{stage.output.name}.log"
        print(f"[pipeline] ---=== {stage.name}{' (resuming)' if resumed else ''} -> {stage.output} ===--- "
              f"(log: {log_path})", flush=True)
        start = time.time()
        code = _run_stage(stage.name, _with_free_port(command), log_path, out, config.progress_interval, warned,
                          warm_start=config.launcher.warm_start)
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
        if not (stage.output / PRODUCTS[stage.name]).exists():
            raise UserError(f"stage {stage.name} exited cleanly but wrote no {PRODUCTS[stage.name]}; see {log_path}")
        write_completion_record(stage, config, command, elapsed)
        done.add(stage.name)
        print(f"[pipeline] ---=== {stage.name} finished in {_clock(elapsed)} ===---", flush=True)
        _note_health(stage, entry)
    atomic_write_json(out / "summary.json", summary)
    return summary


def stage_health(output: Path) -> str | None:
    """The health guards' verdict on a DPO/PPO stage from its health.json: "ok", or e.g. "warned
    (health/entropy)"; None where the stage keeps no such record."""
    try:
        record = json.loads((output / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    signals = sorted({str(w.get("signal")) for w in record.get("warnings") or [] if isinstance(w, dict)})
    return str(record.get("status", "unknown")) + (f" ({', '.join(signals)})" if signals else "")


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


# ------------------------------------------------------------------------------------------ progress

_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_STEP_LINE = re.compile(r"^\[(train|eval)\] step (\d+) \| (.*)")
_METRIC = re.compile(r"\b(loss|reward|actor_loss|critic_loss|reward_score|accuracy|kl)[^:|]*: (-?[\d.e+-]+|nan)")
_ECHO = ("error", "Traceback", "[eval]", "Resumed", "Saved training state", "| model", "easy", "saving")


class Progress:
    """Turns a step's output into heartbeat lines: stage, step/total, ETA, the latest loss or reward."""

    def __init__(self, stage: str, warned: set[str]):
        self.stage, self.bar, self.metrics, self.warned = stage, None, "", warned  # each warning once per run

    def feed(self, line: str) -> str | None:
        """Remember progress; return the line if a person should see it now (warnings once each)."""
        if line.startswith("*****"):  # a new training or evaluation phase: its bar starts afresh
            self.bar = None
        bar = _BAR.search(line)
        if bar and "%|" in line:
            self.bar = bar.groups()
            return None
        step = _STEP_LINE.match(line.strip())
        if step:
            found = _METRIC.findall(step.group(3))
            if found:
                self.metrics = ", ".join(f"{k} {v}" for k, v in found[:3])
            return line if step.group(1) == "eval" else None
        if "warning" in line.lower():
            text = re.sub(r"^\[[^\]]*\]\s*(\[[^\]]*\]\s*)*", "", line.strip())
            if text in self.warned:
                return None
            self.warned.add(text)
            return line
        return line if any(key in line for key in _ECHO) else None

    def heartbeat(self, elapsed: float) -> str:
        parts = [f"[pipeline] {self.stage}"]
        if self.bar:
            done, total, _, eta = self.bar
            parts.append(f"{done}/{total}, ETA {eta}")
        if self.metrics:
            parts.append(self.metrics)
        parts.append(f"{_clock(elapsed)} elapsed")
        return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _start_stage(command: list[str], cwd: Path, warm_start: bool):
    """The stage's process: forked from the warm-start server where the command is `python -m MODULE ...`
    and `warm_start` is on (falls back to a fresh interpreter where no server can run), else Popen. Both
    give `stdout` (text lines, stderr merged) and `wait()` -> exit code (negative: killed by that signal)."""
    env = _job_env()
    target = warm_start_module(command) if warm_start else None
    if target is not None:
        proc = warm_launch(*target, env=env, cwd=cwd, preload=WARM_PRELOAD)
        if proc is not None:
            return proc
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, cwd=cwd, bufsize=1)


def _run_stage(name: str, command: list[str], log_path: Path, cwd: Path, interval: float, warned: set[str],
               warm_start: bool = False) -> int:
    progress, lines = Progress(name, warned), queue.Queue()
    start = last_beat = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        proc = _start_stage(command, cwd, warm_start)
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        while True:
            try:
                line = lines.get(timeout=min(interval, 1.0))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                log.write(line)
                shown = progress.feed(line)
                if shown:
                    sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
                    sys.stdout.flush()
            if time.time() - last_beat >= interval:
                last_beat = time.time()
                print(progress.heartbeat(last_beat - start), flush=True)
        return proc.wait()


# -------------------------------------------------------------------------------------------- report


def print_final_report(plan: list[Stage], out: Path) -> None:
    print("\nArtefacts:")
    for stage in plan:
        health = stage_health(stage.output)
        print(f"  {stage.name:<8} {stage.output}" + (f"  (health: {health})" if health else ""))
    print(f"  {'logs':<8} {out / 'logs'}\n  {'config':<8} {out / 'config.yaml'}")
    evals = [s for s in plan if s.name == "eval"]
    table = evals[0].output / "table.json" if evals else None
    if table is None or not table.exists():
        return
    rows = json.loads(table.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    print("\nMean reward on held-out prompts:")
    has_gold = any(r.get("gold_mean") is not None for r in rows)
    print(f"  {'model':<14}{'reward model':>14}{'95% CI':>20}" + (f"{'gold':>10}" if has_gold else ""))
    for r in rows:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        line = f"  {r['name']:<14}{r['mean_reward']:>14.3f}{ci:>20}"
        if has_gold:
            line += f"{r.get('gold_mean', float('nan')):>10.3f}"
        print(line)


def save_config(out: Path, config: PipelineConfig) -> Path:
    """The resolved config the run used: OUT/config.yaml (latest) and OUT/configs/<hash>.yaml (every one)."""
    text = dump_config(config)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for path in (out / "configs" / f"{config.name}-{digest}.yaml", out / "config.yaml"):
        atomic_write_text(path, text)
    return out / "config.yaml"
