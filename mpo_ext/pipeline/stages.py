"""The stage registry: every stage of the chain described once, as a `StageSpec`.

Order, output directories, the module each stage runs, the file that proves it finished, whether it
resumes, which config section it reads (and how that section is checked), what it is wired to, and
which `mpo STAGE` command runs it alone are all read from `STAGES`. Adding a stage (a second selection
round; the held-out reward model, `rm_heldout`, is one) is one `StageSpec` here plus its module.

Wiring is the part of a stage's command line the pipeline sets itself (inputs, upstream outputs): a list
of `(flag, value)` pairs, a value being a string, a `Ref` to an upstream stage's output, a list of
those (one flag, several values) or `(name, Ref)` (eval's `--model name=path`). The pairs are also what a
stage's identity hashes, so their order and spelling are part of every existing run's identity: change
a wiring function only where the stage's result changes.

Imports no model or training code; a section's flag checks import the stages' settings types
(`mpo_ext.stage_settings`, which imports the step modules) when first used.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

if typing.TYPE_CHECKING:  # the config module imports this one
    from mpo_ext.pipeline.config import PipelineConfig


@dataclass(frozen=True)
class Ref:
    """An upstream stage's output (optionally a path inside it), resolved once identities are known."""

    stage: str
    sub: str = ""


#: What a stage's flag checks see in place of an upstream output that does not exist yet.
PENDING = "pending-upstream-output"
#: The stage name -> settings type registry (imported by a section check when first used: it imports step code).
SETTINGS_REGISTRY = "mpo_ext.stage_settings"

WiringValue = str | Ref | list | tuple
Wiring = list[tuple[str, WiringValue]]


class LocalPath(str):
    """A relative (or `~`) local path from the config: hashed as written, so identities do not depend on
    where `mpo` runs, and given to the stage as `absolute` (stages run in the run directory)."""

    absolute: str


def as_input(text: str) -> str | Ref:
    """A config value naming a model or data: `@stage[/sub/path]` is an upstream output; an existing relative
    path a `LocalPath`; anything else (absolute paths, hub ids, dataset names) as is."""
    if text.startswith("@"):
        stage, _, sub = text[1:].partition("/")
        return Ref(stage, sub)
    expanded = os.path.expanduser(text)
    if (text.startswith("~") or not os.path.isabs(expanded)) and os.path.exists(expanded):
        local = LocalPath(text)
        local.absolute = os.path.abspath(expanded)
        return local
    return text


def flags_to_args(flags: Mapping[str, object], repeat_lists: bool = False) -> list[str]:
    """{"learning_rate": 5e-5, "gradient_checkpointing": True, "x": [1, 2]} -> --learning_rate 5e-05 ...

    true = a bare flag, false/null = left out, a list = several values (`repeat_lists`: the flag repeated
    before each value, as click's `multiple` options take them)."""
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, list) and repeat_lists:
            args += [part for item in value for part in (f"--{name}", str(item))]
        else:
            args += [f"--{name}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return args


# ------------------------------------------------------------------------------------------ section checks


class StageFlags(typing.Protocol):
    """How a stage's config section is checked, one hook per stage.

    Every stage with flags has a typed settings type, so the hook is `SettingsFlags` (`names` = the options of
    the parser generated from its fields, `check` = building it from the mapping). The pipeline calls it at
    config load time, before anything runs."""

    def names(self) -> frozenset[str]:
        """Every flag the stage takes (without dashes): the keys its section (and `common`) may set."""

    def check(self, values: Mapping[str, object]) -> None:
        """Check a whole command line given as {flag: value} (wiring included); UserError naming the flag."""

    def command_args(self, values: Mapping[str, object]) -> list[str]:
        """The stage's command-line arguments for checked section values {flag: value}."""


@contextlib.contextmanager
def _quiet_deepspeed_logs():
    """DeepSpeed logs its accelerator choice to stdout the first time it is asked for it; checking a config
    (`--print_config` prints YAML on stdout) should print nothing else. (Building a step's parser is what
    first asks DeepSpeed for its accelerator.)"""
    logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed configures on import

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)


@dataclass(frozen=True)
class SettingsFlags:
    """A stage with a typed settings type (`mpo_ext.stage_settings.STAGE_SETTINGS[stage]`, fields = flags): the
    section's keys are the type's option names (its fields and their aliases; deprecated names and the
    `--no_x` of a switch left out, as a parser's `flag_names()` leaves them), and the check builds the settings
    from the mapping (`Settings.from_mapping`: the values' types, choices and ranges, then the checks the
    stage's settings run when it starts). UserError naming the flag."""

    stage: str

    @cached_property
    def settings_type(self):
        with _quiet_deepspeed_logs():
            return importlib.import_module(SETTINGS_REGISTRY).STAGE_SETTINGS[self.stage]

    @cached_property
    def _names(self) -> frozenset[str]:
        with _quiet_deepspeed_logs():
            return self.settings_type.build_parser().flag_names()

    def names(self) -> frozenset[str]:
        return self._names

    def check(self, values: Mapping[str, object]) -> None:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_deepspeed_logs():
            self.settings_type.from_mapping(values)

    def command_args(self, values: Mapping[str, object]) -> list[str]:
        """`flags_to_args`, except that `false` for a switch not off by default (`group_by_length`, PPO's
        `compute_fp32_loss`) becomes its `--no_x` option: leaving the flag out would leave it on."""
        index = self.settings_type.option_index()
        specs = {spec.name: spec for spec in self.settings_type.flag_specs()}
        args: list[str] = []
        for key, value in values.items():
            spec = specs.get(index.get(key, ""))
            if value is False and spec is not None and spec.meta["negative"] and spec.default() is not False:
                args.append(spec.meta["negative"])
            else:
                args += flags_to_args({key: value})
        return args


# ------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class StageSpec:
    """One stage of the chain. The config section named `name` holds its flags (`flags` checks them)."""

    name: str  #: config section, `--steps` name, `@name` reference and `mpo NAME` command
    directory: str  #: it writes OUT/<directory>-<identity[:8]>
    product: str  #: the file a finished stage must have written (besides its completion record)
    wiring: Callable[[PipelineConfig], Wiring]  #: the flags the pipeline sets (inputs, upstream outputs)
    flags: StageFlags | None = None  #: checks its config section; None: a typed section of its own (assets)
    module: str | None = None  #: a step: `python -m MODULE` (or `deepspeed --module MODULE`) with the launcher
    command: str | None = None  #: otherwise an `mpo` command: `python -m mpo_ext.cli COMMAND`
    output_flag: str = "--output_dir"
    data_cache: bool = True  #: passes --data_output_path OUT/data_cache (the tokenised data shared by stages)
    resumable: bool = False  #: re-run with --resume where it left saved states (OUT/.../checkpoints)
    takes_common: bool = False  #: `common:` keys apply to it (those it has a flag for)
    reward_model: bool = False  #: a reward model: stages reading it refuse one whose health.json says unhealthy
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    summary: str = ""  #: one line for `mpo NAME --help`
    section: str | None = None  #: the config section it runs with, when not its own (`name`): rm_heldout reads rm

    @property
    def section_name(self) -> str:
        return self.section or self.name


def _data(config: PipelineConfig) -> Wiring:
    data = config.data
    return [("data_path", [as_input(p) for p in data.path])] + ([("data_split", data.split)] if data.split else [])


def _padding(config: PipelineConfig) -> Wiring:
    return [("num_padding_at_beginning", str(config.data.num_padding_at_beginning))]


def _kl_reference(config: PipelineConfig, own: Ref) -> Ref:
    """The KL reference of the second RL stage: its starting model (MPO), or SFT (`mpo.reference: sft`)."""
    return Ref("sft") if config.mpo.reference == "sft" else own


EASY, HARD = Ref("select", "easy.jsonl"), Ref("select", "hard.jsonl")


def _assets_wiring(config: PipelineConfig) -> Wiring:
    a = config.assets
    return [("num_train", str(a.num_train)), ("num_test", str(a.num_test)), ("seed", str(a.seed)), ("task", a.task)]


def _sft_wiring(config: PipelineConfig) -> Wiring:
    return [*_data(config), ("model_name_or_path", as_input(config.models.sft))]


#: `--data_part` of the training and the held-out reward model (`heldout_rm: true`): two disjoint halves of
#: the RM's pairs, cut by the RM's seed (`dschat.utils.data.splits.part_indices`), that together are every pair.
TRAINING_HALF, HELDOUT_HALF = "1/2", "2/2"


def _reward_model(config: PipelineConfig) -> Wiring:
    return [*_data(config), ("model_name_or_path", as_input(config.models.reward)), *_padding(config)]


def _rm_wiring(config: PipelineConfig) -> Wiring:
    # without a held-out RM: every pair, and the wiring (so the identity) of before
    return _reward_model(config) + ([("data_part", TRAINING_HALF)] if config.heldout_rm else [])


def _rm_heldout_wiring(config: PipelineConfig) -> Wiring:
    """The training RM's command line (its section, data, seed) on the other half of its pairs."""
    return [*_reward_model(config), ("data_part", HELDOUT_HALF)]


def _heldout_scorer(config: PipelineConfig, flag: str = "heldout_reward_model_name_or_path") -> Wiring:
    """The held-out reward model for DPO's/PPO's evaluations and `mpo eval` (nothing when it is off)."""
    return [(flag, Ref("rm_heldout"))] if config.heldout_rm else []


def _select_wiring(config: PipelineConfig) -> Wiring:
    mpo = config.mpo
    split = ("threshold", str(mpo.threshold)) if mpo.threshold is not None else ("easy_fraction", str(mpo.easy_fraction))
    return [*_data(config), ("sft_model_name_or_path", Ref("sft")), ("reward_model_name_or_path", Ref("rm")),
            *_padding(config), split]


def _dpo_wiring(config: PipelineConfig) -> Wiring:
    # Its evaluations score with both reward models when there is a held-out one (else they have no reward model).
    scorers = [("reward_model_name_or_path", Ref("rm")), *_heldout_scorer(config)] if config.heldout_rm else []
    if config.mpo.order == "mpo":  # DPO first, from SFT; its reference is its starting model (the default)
        return [("data_path", EASY), ("model_name_or_path", Ref("sft")), *scorers]
    start = Ref("ppo", "actor")  # reverse: DPO second, from the PPO actor
    return [("data_path", EASY), ("model_name_or_path", start),
            ("reference_model_name_or_path", _kl_reference(config, start)), *scorers]


def _ppo_wiring(config: PipelineConfig) -> Wiring:
    if config.mpo.order == "mpo":  # PPO second, from DPO, KL against DPO (MPO) or SFT (ablation)
        start, reference = Ref("dpo"), _kl_reference(config, Ref("dpo"))
    else:
        start = reference = Ref("sft")
    return [("data_path", HARD), ("actor_model_name_or_path", start), ("reference_model_name_or_path", reference),
            ("critic_model_name_or_path", Ref("rm")), *_padding(config), *_heldout_scorer(config)]


def _eval_wiring(config: PipelineConfig) -> Wiring:
    if config.mpo.order == "mpo":
        models = [("sft", Ref("sft")), ("dpo", Ref("dpo")), ("mpo", Ref("ppo", "actor"))]
    else:
        models = [("sft", Ref("sft")), ("ppo_hard", Ref("ppo", "actor")), ("mpo_reverse", Ref("dpo"))]
    data = config.data
    return ([("model", model) for model in models] + [("reward_model", Ref("rm"))]
            + [("data_path", as_input(path)) for path in (data.eval_path or data.path[:1])] + _padding(config)
            + _heldout_scorer(config, "heldout_reward_model"))


STAGES: tuple[StageSpec, ...] = (
    StageSpec("assets", "assets", "tiny-llama/config.json", _assets_wiring, command="assets", output_flag="--root",
              data_cache=False, enabled=lambda config: config.assets is not None,
              summary="The embedded synthetic task and tiny Llama (`mpo assets`)."),
    StageSpec("sft", "step1_sft", "config.json", _sft_wiring, SettingsFlags("sft"),
              module="dschat.steps.sft", resumable=True, takes_common=True,
              summary="Step 1: supervised fine-tuning of models.sft on data.path."),
    StageSpec("rm", "step2_rm", "config.json", _rm_wiring, SettingsFlags("rm"),
              module="dschat.steps.reward", resumable=True, takes_common=True, reward_model=True,
              summary="Step 2: the Bradley-Terry reward model from models.reward."),
    StageSpec("rm_heldout", "step2_rm_heldout", "config.json", _rm_heldout_wiring, SettingsFlags("rm"),
              module="dschat.steps.reward", resumable=True, takes_common=True, reward_model=True, section="rm",
              enabled=lambda config: config.heldout_rm,
              summary="Step 2, held out (heldout_rm: true): a second reward model, trained like rm on the other half "
                      "of its pairs; DPO, PPO and eval also score with it (the over-optimisation signal)."),
    StageSpec("select", "step2.5_select", "manifest.json", _select_wiring, SettingsFlags("select"),
              module="mpo_ext.selection", takes_common=True,
              summary="Step 2.5: two SFT samples per prompt scored by the RM, split at theta into easy and hard."),
    StageSpec("dpo", "step3b_dpo", "config.json", _dpo_wiring, SettingsFlags("dpo"), module="mpo_ext.dpo",
              resumable=True, takes_common=True, summary="Step 3b: DPO on the easy pairs."),
    StageSpec("ppo", "step3_ppo", "actor/config.json", _ppo_wiring, SettingsFlags("ppo"),
              module="dschat.steps.ppo", resumable=True, takes_common=True,
              summary="Step 3: PPO on the hard prompts, KL against the DPO model."),
    StageSpec("eval", "eval", "table.json", _eval_wiring, SettingsFlags("eval"),
              command="eval", summary="The evaluation table (`mpo eval`) of the chain's models."),
)

STAGE_BY_NAME: dict[str, StageSpec] = {spec.name: spec for spec in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(STAGE_BY_NAME)
#: Sections of step flags (one per stage with a `flags` hook), in chain order.
FLAG_SECTIONS: tuple[str, ...] = tuple(spec.name for spec in STAGES if spec.flags is not None and spec.section is None)

#: Flags the pipeline sets itself for every stage (inputs, outputs, placement); a config sets them through
#: models/data/mpo/launcher/output_dir. (`data_split` in a stage section replaces data.split for that stage.)
PIPELINE_FLAGS = frozenset({
    "output_dir", "data_path", "data_output_path", "model_name_or_path", "actor_model_name_or_path",
    "reference_model_name_or_path", "critic_model_name_or_path", "sft_model_name_or_path",
    "reward_model_name_or_path", "num_padding_at_beginning", "threshold", "easy_fraction", "resume", "model",
    "reward_model", "local_rank", "heldout_reward_model_name_or_path", "heldout_reward_model"})
#: Flags that change logs or checkpoint cadence, never results: left out of a stage's identity.
NO_RESULT_FLAGS = frozenset({
    "log_interval", "save_steps", "save_total_limit", "enable_tensorboard", "tensorboard_path", "report_to",
    "push_to_hub", "hub_model_id", "hub_private_repo", "print_answers",
    "print_answers_interval", "rebuild_data_cache", "rebuild_shards", "shard_size"})


def wiring_tokens(wiring: Wiring) -> list:
    """The wiring as a command line whose inputs are still `Ref`s (what identities hash, in this order)."""
    tokens: list = []
    for flag, value in wiring:
        tokens.append(f"--{flag}")
        tokens += value if isinstance(value, list) else [value]
    return tokens


def wiring_refs(wiring: Wiring) -> Iterable[Ref]:
    for token in wiring_tokens(wiring):
        ref = token[1] if isinstance(token, tuple) else token
        if isinstance(ref, Ref):
            yield ref
