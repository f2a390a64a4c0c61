"""Settings as typed data (issue 24): every flag of every stage is a field of its frozen settings type, the
parsers are generated from the fields, and a pipeline stage section builds the same type (`from_mapping`)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dschat.utils import args as flags
from dschat.utils.errors import UserError
from dschat.utils.settings import Settings, flag
from mpo_ext.stage_settings import STAGE_SETTINGS, stage_settings

# The fewest values each stage needs (its required flags).
REQUIRED = {
    "sft": {"model_name_or_path": "m", "output_dir": "o"},
    "rm": {"model_name_or_path": "m", "output_dir": "o"},
    "select": {"reward_model_name_or_path": "r", "sft_model_name_or_path": "s", "output_dir": "o"},
    "dpo": {"model_name_or_path": "m", "output_dir": "o"},
    "ppo": {"actor_model_name_or_path": "a", "critic_model_name_or_path": "c", "output_dir": "o"},
    "eval": {"model": ["sft=m"], "output_dir": "o"},
}

# DeepSpeed-Chat's own step flags (its main.py files), which its users' commands pass unchanged.
UPSTREAM_STEP_FLAGS = {
    "sft": "data_path data_split sft_only_data_path data_output_path model_name_or_path per_device_train_batch_size "
           "per_device_eval_batch_size max_seq_len learning_rate weight_decay num_train_epochs "
           "gradient_accumulation_steps lr_scheduler_type num_warmup_steps output_dir seed local_rank "
           "gradient_checkpointing dropout offload dtype zero_stage lora_dim lora_module_name only_optimize_lora "
           "lora_learning_rate compute_fp32_loss enable_tensorboard tensorboard_path add_eot_token eot_token "
           "print_loss deepspeed deepspeed_config deepscale deepscale_config",
    "rm": "data_path data_split data_output_path model_name_or_path num_padding_at_beginning "
          "per_device_train_batch_size per_device_eval_batch_size max_seq_len learning_rate weight_decay "
          "num_train_epochs gradient_accumulation_steps lr_scheduler_type num_warmup_steps output_dir seed local_rank "
          "gradient_checkpointing dropout offload dtype zero_stage lora_dim lora_module_name only_optimize_lora "
          "lora_learning_rate enable_tensorboard tensorboard_path add_eot_token eot_token compute_fp32_loss "
          "eval_interval eval_iters deepspeed deepspeed_config",
    "ppo": "data_path data_split data_output_path unsupervised_dataset_name unsupervised_dataset_config_name "
           "unsup_coef actor_model_name_or_path critic_model_name_or_path num_padding_at_beginning "
           "per_device_generation_batch_size per_device_training_batch_size generation_batches ppo_epochs "
           "max_prompt_seq_len max_answer_seq_len actor_learning_rate critic_learning_rate actor_weight_decay "
           "critic_weight_decay num_train_epochs lr_scheduler_type gradient_accumulation_steps num_warmup_steps seed "
           "preprocessing_num_workers local_rank enable_hybrid_engine unpin_actor_parameters release_inference_cache "
           "inference_tp_size tp_gather_partition_size offload offload_reference_model actor_zero_stage "
           "critic_zero_stage actor_gradient_checkpointing critic_gradient_checkpointing actor_dropout critic_dropout "
           "actor_lora_dim actor_lora_module_name critic_lora_dim critic_lora_module_name only_optimize_lora "
           "actor_lora_learning_rate critic_lora_learning_rate enable_mixed_precision_lora compute_fp32_loss "
           "enable_tensorboard tensorboard_path enable_ema enable_test_mode test_stop_step add_eot_token eot_token "
           "print_answers print_answers_interval output_dir dtype align_overflow end_of_conversation_token "
           "per_device_train_batch_size per_device_mini_train_batch_size generation_batch_numbers deepspeed",
}


def _argparse_dests(settings_type: type[Settings]) -> tuple[set[str], set[str]]:
    """(destinations, option strings) of a settings type's generated parser (without --help)."""
    actions = [a for a in settings_type.build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    return {a.dest for a in actions}, {o for a in actions for o in a.option_strings}


@pytest.mark.parametrize("stage", sorted(STAGE_SETTINGS))
def test_every_flag_is_a_field_and_every_field_a_flag(stage):
    settings_type = STAGE_SETTINGS[stage]
    fields = {f.name for f in dataclasses.fields(settings_type)}
    if stage == "eval":  # a click command: its options are generated from the same fields
        from mpo_ext.eval_cli import eval_command

        options = {p.name for p in eval_command.params if p.name != "help"}
        assert options == fields
        return
    dests, options = _argparse_dests(settings_type)
    assert dests == fields  # no flag without a field, no field without a flag
    assert {f"--{name}" for name in fields} <= options
    for name in UPSTREAM_STEP_FLAGS.get(stage, "").split():
        assert f"--{name}" in options, f"{stage}: upstream's --{name} is missing"


def test_deepspeeds_own_flags_are_fields():
    """DeepSpeed's `add_config_arguments` flags are fields of every stage that offers them (not added by
    DeepSpeed at parse time), so a DeepSpeed release that changes them shows here."""
    import deepspeed

    parser = argparse.ArgumentParser()
    deepspeed.add_config_arguments(parser)
    theirs = {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}
    for stage in ("sft", "rm", "select", "dpo", "ppo"):
        assert theirs <= _argparse_dests(STAGE_SETTINGS[stage])[1], stage


@pytest.mark.parametrize("stage", sorted(STAGE_SETTINGS))
def test_settings_are_frozen_and_derived_values_are_not_written_back(stage):
    settings = STAGE_SETTINGS[stage].from_mapping(REQUIRED[stage])
    name = dataclasses.fields(settings)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, name, getattr(settings, name))
    before = settings.flag_values()
    settings.record()  # derived values (e.g. the resolved dtype) are computed, never stored
    assert settings.flag_values() == before


def test_from_mapping_builds_the_parsed_settings():
    """A pipeline stage section gives the same settings as the command line it stands for."""
    from dschat.steps.sft import SFTSettings

    section = {"zero_stage": 3, "offload": True, "dtype": "bf16", "learning_rate": "5e-5", "data_path": "d.jsonl",
               "report_to": ["tensorboard"], "group_by_length": False, "gradient_checkpointing": True}
    built = stage_settings("sft", {**section, "model_name_or_path": "m", "output_dir": "o"})
    parsed = SFTSettings.parse_args(["--output_dir", "o", "--model_name_or_path", "m", "--zero_stage", "3", "--offload",
                                     "--dtype", "bf16",
                                     "--learning_rate", "5e-5", "--data_path", "d.jsonl", "--report_to",
                                     "tensorboard", "--no_group_by_length", "--gradient_checkpointing"])
    assert built == parsed and built.learning_rate == 5e-5 and built.data_path == ["d.jsonl"]
    assert stage_settings("sft", {"model_name_or_path": "m", "output_dir": "o", "dtype": None}).dtype is None  # null: the default
    # aliases are accepted under their own names
    assert stage_settings("dpo", {"model_name_or_path": "m", "output_dir": "o", "eval_steps": 5}).eval_interval == 5
    assert stage_settings("select", {"reward_model_name_or_path": "r", "sampling_model_name_or_path": "s",
                                     "output_dir": "o"}).sft_model_name_or_path == "s"


@pytest.mark.parametrize(("stage", "values", "message"), [
    ("sft", {"zero_stag": 3}, "config key sft.zero_stag: not a setting of SFTSettings; did you mean zero_stage?"),
    ("ppo", {"actor_learnin_rate": 1e-5}, "config key ppo.actor_learnin_rate: .*did you mean actor_learning_rate?"),
    ("eval", {"num_prompt": 5}, "config key eval.num_prompt: .*did you mean num_prompts?"),
    ("sft", {"zero_stage": 7}, "config key sft.zero_stage: 7 is not one of 0, 1, 2, 3"),
    ("sft", {"offload": "yes"}, "config key sft.offload: 'yes' is not true or false"),
    ("rm", {"learning_rate": "fast"}, "config key rm.learning_rate: 'fast' is not a finite float"),
    ("rm", {"num_train_epochs": 1.5}, "config key rm.num_train_epochs: 1.5 is not a int"),
    ("dpo", {"beta": 0}, "--beta 0.0: must be positive"),
    ("select", {"threshold": 1.0, "easy_fraction": 0.5}, "exclusive"),
    ("dpo", {"eval_steps": 2, "eval_interval": 3}, "eval_interval is given twice"),
])
def test_from_mapping_refuses_bad_keys_and_values(stage, values, message):
    with pytest.raises(UserError, match=message):
        stage_settings(stage, {**REQUIRED[stage], **values})


def test_from_mapping_names_a_missing_required_setting():
    with pytest.raises(UserError, match="config key ppo.critic_model_name_or_path: required"):
        stage_settings("ppo", {"actor_model_name_or_path": "a"})


def test_ranges_in_field_metadata_are_checked_at_construction():
    @dataclass_settings
    class Ranged(Settings):
        fraction: float = flag(0.5, "A share.", low=0.0, high=1.0, high_open=True)
        switch: bool = flag(False, "Whether the range below applies.")
        gated: float = flag(1.0, "Checked only with --switch.", low=0.0, low_open=True, when="switch")

    assert Ranged(fraction=0.0, gated=-1.0).gated == -1.0  # `when` off: not checked
    with pytest.raises(UserError, match=r"--fraction 1.0: must be in \[0, 1\)"):
        Ranged(fraction=1.0)
    with pytest.raises(UserError, match="--gated -1.0: must be > 0"):
        Ranged(switch=True, gated=-1.0)


def dataclass_settings(cls):
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def test_split_rule_is_shared_by_selection_and_the_pipeline():
    """theta and the easy fraction are checked by one rule (`check_split`) in both places."""
    from mpo_ext import pipeline

    for mpo, message in (({"threshold": -1.0}, "config key mpo.threshold -1.0: .*theta must be a finite number"),
                         ({"threshold": None, "easy_fraction": 1.0}, "config key mpo.easy_fraction 1.0: must be "
                                                                     "between 0 and 1"),
                         ({"threshold": None, "easy_fraction": None}, "set one")):
        with pytest.raises(UserError, match=message):  # load_config validates
            pipeline.load_config("smoke", [f"mpo.{k}={'null' if v is None else v}" for k, v in mpo.items()])
    with pytest.raises(UserError, match="--easy_fraction 1.0: must be between 0 and 1"):
        stage_settings("select", {**REQUIRED["select"], "easy_fraction": 1.0})


def test_flag_groups_compose_flat():
    """A stage's settings type inherits its flag groups: one attribute namespace, one check per group."""
    from dschat.steps.ppo_args import PPOSettings
    from dschat.steps.sft import SFTSettings

    assert issubclass(SFTSettings, flags.TrainStageSettings) and issubclass(PPOSettings, flags.SamplingSettings)
    sft = SFTSettings.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--learning_rate", "0.01"])
    assert sft.learning_rate == 0.01 and sft.tensorboard_path == "step1_tensorboard" and sft.eval_iters == 0
    assert SFTSettings.group_names("lora") == ("lora_dim", "lora_module_name", "only_optimize_lora",
                                               "lora_learning_rate")
    with pytest.raises(UserError, match="--only_optimize_lora needs --lora_dim > 0"):
        SFTSettings.from_mapping({"model_name_or_path": "m", "output_dir": "o", "only_optimize_lora": True})
