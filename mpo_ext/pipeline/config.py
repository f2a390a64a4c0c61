"""The run config: YAML (a preset or a file, `base:` chains, `--set KEY=VALUE`) -> typed, checked `PipelineConfig`.

Everything that can be checked without running anything is checked here, at load time, so a bad config
fails before the first stage rather than minutes into the run: unknown keys (with a "did you mean"),
values, every local path the config names (models, data, hostfile), and each stage's section through
that stage's own flag checks (`StageSpec.flags`). Errors are one line naming the key or the file.

Hostile input: configs are YAML text files of at most `MAX_CONFIG_BYTES`; aliases (`*name`, hence merge
keys) are refused, since a few lines of nested aliases expand to gigabytes; `base:` chains are at most
`MAX_BASE_DEPTH` deep and a cycle is named.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import itertools
import math
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from dschat.utils.data.raw_datasets import read_data_text
from dschat.utils.errors import UserError
from mpo_ext.pipeline.nodes import MODES, PER_NODE_FLAGS, read_hostfile
from mpo_ext.pipeline.stages import (
    FLAG_SECTIONS,
    PENDING,
    PIPELINE_FLAGS,
    STAGE_NAMES,
    STAGES,
    Ref,
    StageSpec,
)
from mpo_ext.synthetic import SYNTHETIC_TASK_NAME, TASKS

CONFIG_PACKAGE = "mpo_ext.configs"
PRESET_ALIASES = {"llama2-7b": "llama2-7b-hh"}
MAX_CONFIG_BYTES = 1 << 20
MAX_BASE_DEPTH = 16
#: Home of `check_split`, selection's one rule for theta and the easy fraction (the `mpo:` keys follow it too).
#: Step code, so imported when a config is checked, like the stages' own section checks, never at import time.
SPLIT_RULE_MODULE = "mpo_ext.selection.settings"


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
    """DeepSpeed's launcher: `deepspeed --num_gpus N` on one node, or several nodes (`hostfile`, `num_nodes`).

    Several nodes start in one of two ways (`mode`, see `mpo_ext/pipeline/nodes.py`): `ssh` (DeepSpeed's
    default): `mpo pipeline` runs on one node and the launcher starts the ranks of every host of `hostfile`
    over ssh (pdsh), or through the backend `extra: [--launcher, openmpi|slurm|...]` names; `per_node`: a
    scheduler starts `mpo pipeline --node_rank R` on every node (e.g. `srun`; R defaults to $SLURM_NODEID),
    each node launches its own ranks (`deepspeed --no_ssh --node_rank R`), node 0 keeps the books and the
    other nodes follow it. Neither the mode nor the rendezvous address changes a stage's identity.

    `warm_start` (one-rank stages only, those run as `python -m MODULE`): start each stage as a fork of one
    server that imported torch, transformers, DeepSpeed and the step modules once per pipeline run
    (`dschat/utils/warm_start.py`), instead of a fresh interpreter that imports them again (~10 CPU-s per
    stage). Same outputs and stage identities either way; false = a fresh interpreter per stage."""

    num_gpus: int = 1  #: ranks per node (per_node without a hostfile: the slots of every node)
    hostfile: str | None = None  #: DeepSpeed hostfile (`host slots=N` lines); per_node: optional
    num_nodes: int | None = None  #: nodes to use (the first of the hostfile); per_node without a hostfile: required
    extra: list[str] = field(default_factory=list)  #: more launcher arguments, e.g. [--include, "localhost:0,1"]
    warm_start: bool = True  #: one-rank stages fork from a pre-imported server (false: fresh `python -m`)
    mode: str = "ssh"  #: ssh: one launcher on this node starts every node; per_node: one `mpo pipeline` per node
    master_addr: str | None = None  #: node 0's address as the other nodes reach it (per_node default: its hostname)
    master_port: int | None = None  #: rendezvous port (per_node default: a free port node 0 picks for each stage)


@dataclass
class MpoConfig:
    threshold: float | None = 1.0  #: reward-gap theta; gap > theta is easy
    easy_fraction: float | None = None  #: instead of theta: this share of pairs is easy
    reference: str = "dpo"  #: dpo: KL to the previous stage's model (MPO); sft: to the SFT model (ablation)
    order: str = "mpo"  #: mpo: DPO on easy, then PPO on hard; reverse: PPO on hard, then DPO on easy
    #: start stages from a reward model whose health.json says "unhealthy" (it learned nothing) anyway
    allow_unhealthy_reward_model: bool = False


@dataclass
class PipelineConfig:
    """One run of the chain. Stage sections (YAML: top-level keys named after the stages) map flag names
    (without `--`) to values: true = bare flag, false/null = left out, a list = several values. `common`
    goes to every training stage that has the flag."""

    name: str = "custom"
    output_dir: str | None = None
    base: str | None = None  #: a preset name or a config path this one edits
    assets: AssetsConfig | None = None
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    mpo: MpoConfig = field(default_factory=MpoConfig)
    progress_interval: float = 10.0  #: seconds between heartbeat lines on the console
    #: a second reward model (stage rm_heldout) on the other half of the RM's pairs; DPO, PPO and eval score with
    #: both (the over-optimisation signal). Off: one RM on every pair, and the stage identities of before.
    heldout_rm: bool = False
    common: dict = field(default_factory=dict)
    sections: dict[str, dict] = field(default_factory=dict)  #: {stage name: its flags} (FLAG_SECTIONS)

    def section(self, stage: str) -> dict:
        return self.sections.get(stage, {})

    def root(self) -> Path:
        """The run directory: `output_dir`, else runs/mpo-<name> (absolute, from the current directory)."""
        return Path(self.output_dir or f"runs/mpo-{self.name}").expanduser().resolve()


_OWN_KEYS = tuple(f.name for f in dataclasses.fields(PipelineConfig) if f.name != "sections")


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# --------------------------------------------------------------------------------------------- YAML


class _AliasRefused(yaml.composer.ComposerError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` (and so `<<: *name`) is refused where it appears.

    A few lines of nested aliases expand to gigabytes once the values are walked (an "alias bomb");
    a run config has no need for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(None, None, "aliases (*name) are not allowed in a run config; write the value out",
                                self.peek_event().start_mark)
        return super().compose_node(parent, index)


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


def parse_yaml(text: str, where: str):
    """One YAML document from `text`; errors name `where` (a file, a preset, a --set) with line and column."""
    loader = _ConfigLoader(text)
    loader.name = where  # the name marks carry (PyYAML says "<unicode string>" for text)
    try:
        return _yaml12_floats(loader.get_single_data())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise UserError(f"{at}: not valid YAML ({' '.join(str(err.problem or err.context).split())})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a run config") from None
    finally:
        loader.dispose()


def _read_mapping(text: str, where: str) -> dict:
    data = parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping of keys")
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _read_config_file(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        raise UserError(f"--config {path}: a run config is a plain YAML text file; decompress it first")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise UserError(f"--config {path}: cannot be read ({err.strerror}); check the path") from None
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"--config {path}: {size} bytes; a run config is at most {MAX_CONFIG_BYTES} bytes")
    return read_data_text(path)


def _open_source(source: str, here: Path | None) -> tuple[str, str, dict, Path | None]:
    """(identity key, display name, keys, directory for relative bases) of a preset or a config file."""
    name = PRESET_ALIASES.get(source, source)
    if name in preset_names():
        where = f"preset {name}"
        text = resources.files(CONFIG_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        return where, where, _read_mapping(text, where), None
    path = Path(source).expanduser()
    if here is not None and not path.is_absolute():
        path = here / path
    if not path.is_file():
        what = f"base: {source} (in a config in {here})" if here is not None else f"--config {source}"
        raise UserError(f"{what}: no such file and no preset of that name{did_you_mean(source, preset_names())} "
                        f"(presets: {', '.join(preset_names())})")
    resolved = path.resolve()
    return str(resolved), str(path), _read_mapping(_read_config_file(path), str(path)), resolved.parent


def _load_raw(source: str, chain: tuple[tuple[str, str], ...] = (), here: Path | None = None) -> dict:
    """A config's keys with its `base` chain merged in (the base first, this file's keys on top)."""
    key, where, data, folder = _open_source(source, here)
    if key in (k for k, _ in chain):
        cycle = " -> ".join([*(w for _, w in chain[[k for k, _ in chain].index(key):]), where])
        raise UserError(f"{chain[-1][1]}: base: {source} makes a cycle ({cycle}); remove one of the base: keys")
    chain = (*chain, (key, where))
    if len(chain) > MAX_BASE_DEPTH:
        raise UserError(f"{where}: base: chains are at most {MAX_BASE_DEPTH} configs deep")
    base = data.get("base")
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{where}: base: must be a preset name or a config path")
    merged = _deep_merge(_load_raw(base, chain, folder), data)
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
    if not value.strip():
        return key.strip().split("."), None
    try:
        parsed = parse_yaml(value, f"--set {key.strip()}")
    except UserError as err:
        if "aliases" in str(err) or "nested too deeply" in str(err):
            raise
        parsed = value  # not YAML: the text itself
    return key.strip().split("."), parsed


def apply_override(raw: dict, keys: list[str], value: object) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------- typing


def load_config(source: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a preset or config file, apply `KEY=VALUE` overrides, and check every key, value, local path
    and stage section (the stages' own flag checks): what `mpo pipeline` does before anything runs."""
    raw = _load_raw(source)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    config = _build_config(raw)
    validate(config)
    return config


def _build_config(raw: dict) -> PipelineConfig:
    known = (*_OWN_KEYS, *FLAG_SECTIONS)
    for key in raw:
        if key not in known:
            raise UserError(f"config key {key}: unknown{did_you_mean(key, known)}; known keys here: "
                            f"{', '.join(sorted(known))}")
    config = _build(PipelineConfig, {k: v for k, v in raw.items() if k in _OWN_KEYS}, "")
    config.sections = {name: {} if raw.get(name) is None else _coerce(dict, raw[name], name) for name in FLAG_SECTIONS}
    return config


def _build(cls, data: dict, prefix: str):
    """A dataclass from a mapping, each value checked against its annotation (one line per bad key)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "sections"]
    for key in data:
        if key not in names:
            raise UserError(f"config key {prefix}{key}: unknown{did_you_mean(key, names)}; known keys here: "
                            f"{', '.join(sorted(names))}")
    return cls(**{name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in names if name in data})


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
        except (TypeError, ValueError, OverflowError):
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


# --------------------------------------------------------------------------------------------- checks


def validate(config: PipelineConfig) -> None:
    """Every check that needs no model, data or run: values, references, local paths, stage sections."""
    mpo = config.mpo
    if mpo.reference not in ("dpo", "sft"):
        raise UserError(f"config key mpo.reference: {mpo.reference!r}; choose dpo (MPO) or sft (ablation)")
    if mpo.order not in ("mpo", "reverse"):
        raise UserError(f"config key mpo.order: {mpo.order!r}; choose mpo or reverse")
    check_split = importlib.import_module(SPLIT_RULE_MODULE).check_split
    check_split(mpo.threshold, mpo.easy_fraction, threshold_key="config key mpo.threshold",
                easy_fraction_key="config key mpo.easy_fraction", require_one=True)
    check_launcher(config.launcher)
    if config.progress_interval <= 0:
        raise UserError(f"config key progress_interval: {config.progress_interval}; must be > 0 seconds")
    if not config.data.path:
        raise UserError("config key data.path: empty; name at least one dataset")
    if config.assets is not None and config.assets.task not in TASKS:
        raise UserError(f"config key assets.task: {config.assets.task!r}; choose one of {', '.join(TASKS)}")
    check_inputs(config)
    check_sections(config)


def check_launcher(launcher: LauncherConfig) -> None:
    """Placement: ranks, nodes, the hostfile and, for several nodes, how they start (`nodes.py`)."""
    if launcher.num_gpus < 1:
        raise UserError(f"config key launcher.num_gpus: {launcher.num_gpus}; must be >= 1")
    if launcher.mode not in MODES:
        raise UserError(f"config key launcher.mode: {launcher.mode!r}; choose ssh (one launcher starts every node) "
                        "or per_node (one `mpo pipeline --node_rank R` per node)")
    if launcher.num_nodes is not None and launcher.num_nodes < 1:
        raise UserError(f"config key launcher.num_nodes: {launcher.num_nodes}; must be >= 1")
    if launcher.master_port is not None and not 0 < launcher.master_port < 65536:
        raise UserError(f"config key launcher.master_port: {launcher.master_port}; a TCP port is 1..65535")
    hostfile = launcher.hostfile
    if hostfile and not Path(hostfile).expanduser().is_file():
        raise UserError(f"config key launcher.hostfile: {hostfile}: no such file{_closest_path(hostfile)}")
    hosts = read_hostfile(hostfile) if hostfile else None
    if hosts and launcher.num_nodes and launcher.num_nodes > len(hosts):
        raise UserError(f"config key launcher.num_nodes: {launcher.num_nodes}; {hostfile} lists {len(hosts)} host(s)")
    if launcher.mode == "ssh":
        if (launcher.num_nodes or 1) > 1 and not hostfile:
            raise UserError(f"config key launcher.num_nodes: {launcher.num_nodes} nodes need launcher.hostfile (the "
                            "hosts the launcher starts over ssh), or launcher.mode: per_node")
        return
    if hosts is None and not launcher.num_nodes:
        raise UserError("config key launcher.num_nodes: launcher.mode per_node needs the number of nodes "
                        "(launcher.num_nodes, or a launcher.hostfile listing them)")
    clash = [arg for arg in launcher.extra if arg.split("=", 1)[0] in PER_NODE_FLAGS]
    if clash:
        raise UserError(f"config key launcher.extra: {clash[0]} is set by the pipeline in per_node mode (from "
                        "launcher.hostfile/num_nodes/num_gpus/master_addr/master_port and --node_rank); remove it")


def _inputs(config: PipelineConfig) -> list[tuple[str, str, int]]:
    """(config key, value, most parts of a hub id) of every model and dataset the config names."""
    return ([("models.sft", config.models.sft, 2), ("models.reward", config.models.reward, 2)]
            + [("data.path", p, 3) for p in config.data.path]
            + [("data.eval_path", p, 3) for p in config.data.eval_path or []])


def check_inputs(config: PipelineConfig) -> None:
    """Every model, dataset and hostfile the config names: an upstream stage, an existing local path, or
    (for models and data) something shaped like a hub id. See `local_path_error` for the rule."""
    for key, value, hub_parts in _inputs(config):
        if value.startswith("@"):
            stage = value[1:].split("/", 1)[0]
            if stage not in STAGE_NAMES:
                raise UserError(f"config key {key}: {value}: @ names a stage output{did_you_mean(stage, STAGE_NAMES)}; "
                                f"stages: {', '.join(STAGE_NAMES)}")
            if stage == "assets" and config.assets is None:
                raise UserError(f"config key {key}: {value} needs an `assets:` section (the embedded task), or "
                                "name real models/data")
            continue
        problem = local_path_error(value, hub_parts)
        if problem:
            raise UserError(f"config key {key}: {problem}")


_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Endings no hub id has: such a value is a local file.
LOCAL_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".arrow", ".txt", ".safetensors", ".bin")
#: DeepSpeed-Chat's name for the checkout's data/train.json + data/eval.json.
SPECIAL_NAMES = frozenset({"local/jsonfile"})


def local_path_error(value: str, hub_parts: int) -> str | None:
    """Why `value` is neither an existing local path nor a hub id, or None when it is fine.

    The rule: a value is a local path when it exists, starts with `/`, `.` or `~`, ends like a data or
    weights file (`.jsonl`, `.parquet`, `.safetensors`, ...) or its first component is an existing local
    directory (`data/hh.jsonl` where `data/` exists); a local path must exist. Anything else is a hub id
    and must look like one: `name` or `org/name` (datasets also `org/name/subset`), of letters, digits,
    `-`, `_` and `.`. Relative paths are read from the directory `mpo` runs in."""
    path = Path(value).expanduser()
    if value in SPECIAL_NAMES or path.exists():
        return None
    parts = Path(value).parts
    local = (value.startswith(("/", ".", "~")) or value.lower().endswith(LOCAL_SUFFIXES)
             or (len(parts) > 1 and Path(parts[0]).is_dir()))
    if local:
        return f"{value}: no such file or directory{_closest_path(value)}; fix the path"
    pieces = value.split("/")
    if len(pieces) <= hub_parts and all(_HUB_PART.fullmatch(p) for p in pieces):
        return None
    return (f"{value}: neither an existing local path nor a hub id (name, org/name"
            f"{', org/name/subset' if hub_parts > 2 else ''}); fix the path or the id")


def _closest_path(value: str) -> str:
    """' (did you mean P?)' for a missing path whose last existing folder holds a similar name."""
    path = Path(value).expanduser()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path.name)
        path = path.parent
    if not missing or not path.is_dir():
        return ""
    try:
        names = [p.name for p in itertools.islice(path.iterdir(), 10_000)]
    except OSError:
        return ""
    match = difflib.get_close_matches(missing[-1], names, n=1, cutoff=0.6)
    return f" (did you mean {Path(value).parent / match[0] if len(missing) == 1 else path / match[0]}?)" if match else ""


def _owned(spec: StageSpec, config: PipelineConfig) -> frozenset[str]:
    """Flags of `spec` the pipeline sets itself (a section may still override `data_split`)."""
    return (PIPELINE_FLAGS | {flag for flag, _ in spec.wiring(config)}) - {"data_split"}


def stage_flags(config: PipelineConfig, spec: StageSpec) -> dict:
    """The flags a stage runs with: the `common` keys it has a flag for, then its own section."""
    if spec.flags is None:
        return {}
    common = {k: v for k, v in config.common.items() if k in spec.flags.names()} if spec.takes_common else {}
    return {**common, **config.section(spec.section_name)}


def _check_keys(section: str, flags: dict, owned: frozenset[str], names: frozenset[str], missing: str) -> None:
    """Each key of a section is a flag (`missing`, with {flag}, says whose it is not) the pipeline does not set."""
    for flag, value in flags.items():
        key = f"{section}.{flag}"
        if not isinstance(flag, str) or flag.startswith("-"):
            raise UserError(f"config key {key}: write flag names without dashes")
        if flag in owned:
            raise UserError(f"config key {key}: set by the pipeline (use models.*, data.*, mpo.* or output_dir)")
        if flag not in names:
            raise UserError(f"config key {key}: {missing.format(flag=flag)}{did_you_mean(flag, names - owned)}")
        if isinstance(value, dict):
            raise UserError(f"config key {key}: expected a value or a list, got a mapping")


def check_sections(config: PipelineConfig) -> None:
    """Each stage section through its stage's flag checks, with the pipeline's wiring filled in (upstream
    outputs as placeholders); `common` keys must be flags of at least one training stage."""
    enabled = [spec for spec in STAGES if spec.flags is not None and spec.enabled(config)]
    for spec in enabled:
        _check_keys(spec.section_name, config.section(spec.section_name), _owned(spec, config), spec.flags.names(),
                    f"stage {spec.name} has no flag --{{flag}}")
    takers = [spec for spec in enabled if spec.takes_common]
    every_flag = frozenset().union(*(spec.flags.names() for spec in takers))
    _check_keys("common", config.common, frozenset().union(*(_owned(s, config) for s in takers)), every_flag,
                f"no training stage ({', '.join(s.name for s in takers)}) has a flag --{{flag}}")
    root = config.root()
    for spec in enabled:
        values = _placeholders(spec, config)
        values.update(stage_flags(config, spec))
        values[spec.output_flag.lstrip("-")] = str(root / spec.directory)
        if spec.data_cache:
            values["data_output_path"] = str(root / "data_cache")
        try:
            spec.flags.check(values)
        except UserError as err:
            raise UserError(f"config section {spec.name}: {err}") from None


def _placeholders(spec: StageSpec, config: PipelineConfig) -> dict:
    """The stage's wiring as {flag: value}, upstream outputs (which do not exist yet) as PENDING."""

    def fill(value):
        if isinstance(value, Ref):
            return PENDING
        if isinstance(value, tuple):
            return f"{value[0]}={fill(value[1])}"
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    values: dict = {}
    for flag, value in spec.wiring(config):
        if flag in values:  # a repeated flag (eval's --model, --data_path): several values
            values[flag] = [*(values[flag] if isinstance(values[flag], list) else [values[flag]]), fill(value)]
        else:
            values[flag] = fill(value)
    return values


# --------------------------------------------------------------------------------------------- output


def config_dict(config: PipelineConfig) -> dict:
    """The config as its YAML keys: the stage sections top-level, in chain order."""
    full = dataclasses.asdict(config)
    out = {name: full[name] for name in _OWN_KEYS}
    out.update({name: dict(config.section(name)) for name in FLAG_SECTIONS})
    return out


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config_dict(config), sort_keys=False, default_flow_style=None, width=110)
