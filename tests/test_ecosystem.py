"""What users of other tools expect around the training code: trackers, model cards, hub upload, a
DeepSpeed JSON config, `mpo --version`, and --help texts that show every default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dschat.steps import ppo, reward, sft
from dschat.utils import args as flags
from dschat.utils import model_card
from dschat.utils.ds_utils import get_train_ds_config, merge_ds_config, set_batch_sizes
from dschat.utils.errors import UserError
from mpo_ext import __version__, dpo, selection
from mpo_ext.cli import main as mpo_main

# --------------------------------------------------------------------------------------------- --deepspeed_config


def built_config(stage=2, micro=4, gas=2):
    return set_batch_sizes(get_train_ds_config(offload=False, dtype="fp32", stage=stage), micro, gas, 1)


def test_user_ds_config_merges_over_defaults_and_auto_defers():
    merged = merge_ds_config(built_config(), {
        "gradient_clipping": 0.3, "train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 7},
        "flops_profiler": {"enabled": True}}, "ds.json")
    assert merged["gradient_clipping"] == 0.3 and merged["flops_profiler"] == {"enabled": True}
    assert merged["zero_optimization"]["reduce_bucket_size"] == 7 and merged["zero_optimization"]["stage"] == 2
    assert merged["train_batch_size"] == 8  # "auto": the flags' 4 x 1 rank x 2
    same = merge_ds_config(built_config(), {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2},
                           "ds.json")
    assert same["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(("user", "key"), [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
])
def test_user_ds_config_conflicting_with_a_flag_is_one_line(user, key):
    with pytest.raises(UserError) as err:
        merge_ds_config(built_config(), user, "ds.json")
    assert key in str(err.value) and "ds.json" in str(err.value) and "\n" not in str(err.value)


def test_unreadable_ds_config_is_refused_at_parse_time(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="--deepspeed_config .*not valid JSON"):
        sft.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--deepspeed_config", str(bad)])


# --------------------------------------------------------------------------------------------- trackers


def test_report_to_choices():
    args = sft.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--enable_tensorboard"])
    assert flags.trackers(args) == ["tensorboard"] and args.report_to == ["none"]
    args = sft.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--report_to", "wandb", "tensorboard"])
    assert flags.trackers(args) == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="'none' excludes"):
        sft.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--report_to", "none", "wandb"])
    for parse in (reward.parse_args, dpo.parse_args):
        assert "report_to" in vars(parse(["--output_dir", "out", "--model_name_or_path", "m", "--report_to", "tensorboard"]))
    assert ppo.parse_args(["--output_dir", "out", "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                           "--report_to", "tensorboard"]).report_to == ["tensorboard"]


def test_tracker_runs_are_named_by_stage_and_identity(tmp_path):
    """The pipeline's stage folder names a run (stage and the pipeline's identity); else the stage and a hash of the
    settings that change the result: logging and checkpoint cadence do not, a learning rate does."""
    from dschat.utils.trainer import tracker_dir, tracker_run_name

    def settings(out: str, *extra: str):
        return dpo.parse_args(["--model_name_or_path", "m", "--output_dir", out, *extra])

    assert tracker_run_name(settings(str(tmp_path / "step3b_dpo-1a2b3c4d")), "x") == "step3b_dpo-1a2b3c4d"
    name = tracker_run_name(settings(str(tmp_path / "mine")), "step3b_dpo")
    assert re.fullmatch(r"step3b_dpo-[0-9a-f]{8}", name)
    assert tracker_run_name(settings(str(tmp_path / "other"), "--log_interval", "3", "--report_to", "tensorboard",
                                     "--save_steps", "5"), "step3b_dpo") == name
    assert tracker_run_name(settings(str(tmp_path / "mine"), "--learning_rate", "0.1"), "step3b_dpo") != name
    assert tracker_dir(str(tmp_path / "runs" / "sft")) == (tmp_path / "runs").resolve()  # beside the model folder
    assert sft.SFTSettings.run_label == "step1_sft" and ppo.PPOSettings.run_label == "step3_ppo"


# --------------------------------------------------------------------------------------------- model cards


def test_card_carries_run_numbers_and_selection_manifest(tmp_path):
    """A DPO card in a pipeline run: hub metadata (base model and license from the SFT card it descends from),
    the run's last numbers, the selection's manifest, a usage snippet, versions, and no absolute path."""
    from huggingface_hub import ModelCard

    (tmp_path / "pipeline.json").write_text("{}")  # the run root
    select_dir = tmp_path / "step2.5_select-1234abcd"
    select_dir.mkdir()
    (select_dir / "easy.jsonl").write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    (select_dir / "manifest.json").write_text(json.dumps({
        "stage": "step2.5_select", "threshold": 1.0, "counts": {"pairs": 10, "easy": 6, "hard": 4},
        "data": {"prompt_too_long": 3, "keep_truncated": False}}))
    sft_dir = tmp_path / "step1_sft-0000aaaa"
    sft_dir.mkdir()
    (sft_dir / "README.md").write_text("---\nbase_model: org/base-7b\nlicense: apache-2.0\n---\n# sft\n")
    out = tmp_path / "step3b_dpo-5678abcd"
    out.mkdir()
    (out / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "phase": "data", "train_rows": 9, "train_truncated": 17, "keep_truncated": 0}) + "\n"
        + json.dumps({"step": 1, "phase": "train", "loss": 0.7}) + "\n"
        + json.dumps({"step": 2, "phase": "train", "loss": 0.5}) + "\n"
        + json.dumps({"step": 2, "phase": "eval", "rewards/accuracies": 0.75}) + "\n" + '{"step": 3, "ph')
    settings = dpo.DPOSettings.from_mapping({"output_dir": str(out), "data_path": [str(select_dir / "easy.jsonl")],
                                             "model_name_or_path": str(sft_dir), "beta": 0.1, "local_rank": 0,
                                             "learning_rate": 5e-7})
    card = model_card.card_files(settings, "step3b DPO", str(sft_dir))["README.md"]
    meta = ModelCard(card).data.to_dict()
    assert meta["base_model"] == "org/base-7b" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and {"dschat-mpo", "dpo"} <= set(meta["tags"])
    assert all(re.fullmatch(r"[a-z0-9-]+", tag) for tag in meta["tags"])  # valid hub tags
    assert "step3b DPO" in card and "| initialised from | `step1_sft-0000aaaa` |" in card
    assert "| DPO reference (the implicit KL is taken against it) | `step1_sft-0000aaaa` |" in card
    assert "| loss | 0.5 |" in card and "| rewards/accuracies | 0.75 |" in card  # last records; torn line skipped
    assert "| threshold | 1.0 |" in card and "| count: easy | 6 |" in card and "| count: hard | 4 |" in card
    assert "| beta | 0.1 |" in card and "local_rank" not in card and "| dtype | fp32 |" in card  # resolved
    # what the data build dropped, here and in the selection that made the data
    assert "## Data: rows used and left out" in card and "| train_truncated | 17 |" in card
    assert "| data: prompt_too_long | 3 |" in card and "## Final data metrics" not in card
    assert 'AutoModelForCausalLM.from_pretrained("step3b_dpo-5678abcd")' in card and "| transformers |" in card
    assert str(tmp_path) not in card  # paths relative to the run root
    (out / "README.md").write_text(card)
    model_card.set_card_section(out, "Evaluation (mpo eval)", "table one")
    model_card.set_card_section(out, "Evaluation (mpo eval)", "table two")
    text = (out / "README.md").read_text()
    assert "table two" in text and "table one" not in text and text.count("## Evaluation (mpo eval)") == 1
    # keyed sections (one per eval run) live side by side; a re-run of the same key replaces its own
    model_card.set_card_section(out, "Evaluation: eval-1", "run one", key="/runs/a/eval-1")
    model_card.set_card_section(out, "Evaluation: eval-1", "run two", key="/runs/b/eval-1")
    model_card.set_card_section(out, "Evaluation: eval-1", "run one again", key="/runs/a/eval-1")
    text = (out / "README.md").read_text()
    assert "run one again" in text and "run two" in text and "run one\n" not in text
    assert "## Settings" in text and "table two" in text and "/runs/a" not in text


def test_ppo_and_reward_model_cards_name_what_they_were_measured_against(tmp_path):
    """PPO's card names its reward model and its KL reference; a reward model's usage is the reward scorer."""
    (tmp_path / "pipeline.json").write_text("{}")
    for name in ("dpo", "rm", "select"):
        (tmp_path / name).mkdir()
    (tmp_path / "select" / "hard.jsonl").write_text('{"prompt": "p"}\n')
    settings = ppo.PPOSettings.from_mapping({
        "output_dir": str(tmp_path / "ppo"), "data_path": [str(tmp_path / "select" / "hard.jsonl")],
        "actor_model_name_or_path": str(tmp_path / "dpo"), "critic_model_name_or_path": str(tmp_path / "rm"),
        "reference_model_name_or_path": str(tmp_path / "dpo")})
    card = model_card.card_files(settings, "step3 PPO actor", str(tmp_path / "dpo"),
                                 model_dir=tmp_path / "ppo" / "actor")["README.md"]
    assert "| reward model (and critic initialisation) | `rm` |" in card and "| KL reference | `dpo` |" in card
    assert "reward model `rm`" in card and "KL penalty was taken against `dpo`" in card
    assert 'from_pretrained("ppo/actor")' in card and str(tmp_path) not in card
    critic = model_card.card_files(settings, "step3 PPO critic", str(tmp_path / "rm"), reward_layout=True,
                                   model_dir=tmp_path / "ppo" / "critic")["README.md"]
    assert 'RewardScorer.from_path("ppo/critic"' in critic and "pipeline_tag" not in critic


def test_push_to_hub_offline_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        model_card.push_to_hub(sft.SFTSettings(model_name_or_path="m", output_dir=str(tmp_path), push_to_hub=True,
                                               hub_model_id="someone/tiny"), tmp_path)
    message = str(err.value)
    assert "--push_to_hub" in message and "someone/tiny" in message and "saved locally" in message
    with pytest.raises(SystemExit):  # --output_dir is required (the model is saved there first, then uploaded)
        sft.parse_args(["--model_name_or_path", "m", "--push_to_hub"])


# --------------------------------------------------------------------------------------------- CLI texts


def test_mpo_version():
    result = CliRunner().invoke(mpo_main, ["--version"])
    assert result.exit_code == 0 and f"dschat-mpo) {__version__}" in result.output and "torch" in result.output


def _option_blocks(help_text: str) -> dict[str, str]:
    """{--flag: its help block} from argparse's --help output."""
    blocks, current = {}, None
    for line in help_text.split("\ndefaults that differ from DeepSpeed-Chat")[0].splitlines():  # not the epilog
        match = re.match(r"^  (--\w+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("parse", [sft.parse_args, reward.parse_args, ppo.parse_args, dpo.parse_args,
                                   selection.parse_args], ids=["sft", "rm", "ppo", "dpo", "select"])
def test_every_flag_has_help_and_one_default(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    blocks = _option_blocks(capsys.readouterr().out)
    assert len(blocks) > 20
    for flag, block in blocks.items():
        if flag in ("--no_group_by_length", "--help") or "alias of" in block:  # no default of their own
            continue
        assert block.lower().count("default") >= 1, block
        assert block.count("(default:") <= 1, block
    for flag in ("--learning_rate", "--per_device_train_batch_size", "--zero_stage", "--seed"):
        if flag in blocks and "alias of" not in blocks[flag]:
            assert "(default:" in blocks[flag], blocks[flag]
    if "--threshold" in blocks:
        assert blocks["--threshold"].count("default") == 1 and "1.0" in blocks["--threshold"]
        assert "required" in blocks["--output_dir"]


@pytest.mark.parametrize("main_py", ["training/step1_supervised_finetuning/main.py",
                                     "training/step2_reward_model_finetuning/main.py",
                                     "training/step3_rlhf_finetuning/main.py", "step3b_dpo/main.py"])
def test_a_steps_help_imports_neither_torch_nor_deepspeed(main_py):
    """A step's --help (and a bad flag) is answered from its settings module alone: no torch, no DeepSpeed (whose
    import printed its accelerator warning), no models."""
    import subprocess
    import sys

    from conftest import child_env

    script = Path(__file__).resolve().parents[1] / main_py
    probe = ("import runpy, sys\nsys.argv = [sys.argv[1], '--help']\ntry:\n    runpy.run_path(sys.argv[0], "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('heavy:', sorted(m for m in ('torch', "
             "'deepspeed', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe, str(script)], capture_output=True, text=True, env=child_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--output_dir OUTPUT_DIR" in proc.stdout and "heavy: []" in proc.stdout, proc.stdout[-500:]
    assert "WARNING" not in proc.stdout + proc.stderr


def test_every_mpo_option_has_help_and_shows_its_default():
    for name, command in mpo_main.commands.items():
        ctx = click.Context(command, parent=click.Context(mpo_main, show_default=True), info_name=name)
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, (name, param.opts)
            if isinstance(param, click.Option) and not param.hidden and isinstance(param.default, (str, int, float)) \
                    and not isinstance(param.default, bool):
                assert "[default: " in param.get_help_record(ctx)[1], (name, param.opts)


# --------------------------------------------------------------------------------------------- TRL's names


def test_trl_names_are_aliases_of_ours_everywhere(tmp_path):
    """TRL's names set our settings on the command line and in a pipeline section alike (aliases in the fields'
    metadata); --warmup_ratio is an alternative to --num_warmup_steps, not a second warm-up."""
    from mpo_ext.stage_settings import stage_settings

    trl = sft.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--max_length", "64", "--logging_steps", "5",
                          "--eval_steps", "7", "--resume_from_checkpoint", "--warmup_ratio", "0.1", "--lora_r", "4",
                          "--dataset_name", "Anthropic/hh-rlhf", "--logging_dir", "tb"])
    assert (trl.max_seq_len, trl.log_interval, trl.eval_interval, trl.resume, trl.lora_dim, trl.tensorboard_path) == \
        (64, 5, 7, True, 4, "tb") and trl.data_path == ["Anthropic/hh-rlhf"]
    assert trl.warmup_steps(95) == 10 and sft.parse_args(["--model_name_or_path", "m", "--output_dir", "o",
                                                          "--num_warmup_steps", "3"]).warmup_steps(95) == 3
    with pytest.raises(UserError, match="--warmup_ratio 0.1 --num_warmup_steps 3: two ways"):
        sft.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--warmup_ratio", "0.1", "--num_warmup_steps", "3"])
    ppo_trl = stage_settings("ppo", {"actor_model_name_or_path": "a", "critic_model_name_or_path": "c",
                                     "output_dir": "o", "max_prompt_length": 32, "response_length": 16,
                                     "kl_coef": 0.05, "num_ppo_epochs": 2, "warmup_ratio": 0.2})
    assert (ppo_trl.max_prompt_seq_len, ppo_trl.max_answer_seq_len, ppo_trl.init_kl_coef, ppo_trl.ppo_epochs) == \
        (32, 16, 0.05, 2) and ppo_trl.warmup_steps(10) == 2  # PPO's own default warm-up (100) gives way
    assert stage_settings("select", {"sft_model_name_or_path": "s", "reward_model_name_or_path": "r", "output_dir": "o",
                                     "max_prompt_length": 24, "max_new_tokens": 8}).max_answer_seq_len == 8
    assert {"max_length", "logging_steps", "warmup_ratio", "resume_from_checkpoint"} <= sft.build_parser().flag_names()


def test_ppo_per_device_train_batch_size_is_the_generation_batch_with_one_warning(capsys):
    """Upstream's pre-#698 step-3 name still works (its scripts run unchanged), with one warning naming the
    flag it sets; in a pipeline section it is refused, since there it would mean the training batch."""
    from mpo_ext.stage_settings import stage_settings

    settings = ppo.parse_args(["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir",
                               "o", "--per_device_train_batch_size", "4"])
    assert settings.per_device_generation_batch_size == 4 and settings.per_device_training_batch_size == 16
    warnings = [line for line in capsys.readouterr().err.splitlines() if "per_device_train_batch_size" in line]
    assert warnings == ["warning: --per_device_train_batch_size is deprecated; use --per_device_generation_batch_size"]
    from mpo_ext.pipeline.stages import SettingsFlags

    assert "per_device_train_batch_size" not in SettingsFlags("ppo").names()  # a config's ppo section refuses it
    assert stage_settings("sft", {"model_name_or_path": "m", "output_dir": "o",
                                  "per_device_train_batch_size": 4}).per_device_train_batch_size == 4


def test_own_data_through_a_word_level_tokenizer_warns_once(assets, hh_file, tmp_path, run_ds):
    """The tiny preset's 129-word tokenizer on one's own data: one warning line with the share of unknown tokens
    and the fix, before training (the synthetic task it was built for gives none)."""
    from dschat.utils.data.prompt_datasets import create_prompt_dataset, warn_unknown_tokens
    from dschat.utils.tokenizer import load_hf_tokenizer

    step1 = Path(__file__).resolve().parents[1] / "training/step1_supervised_finetuning/main.py"
    out = tmp_path / "sft"
    proc = run_ds(step1, ["--model_name_or_path", assets["model_dir"], "--data_path", str(hh_file),
                          "--max_length", "64", "--per_device_train_batch_size", "8", "--max_steps", "1",
                          "--logging_steps", "1", "--data_output_path", str(tmp_path / "cache"),
                          "--output_dir", str(out)], num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "unknown token" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and str(hh_file) in lines[0], lines
    share = int(re.search(r"warning: (\d+)% of the tokens", lines[0]).group(1))
    assert share > 20 and "use a real tokenizer and model" in lines[0]
    tok = load_hf_tokenizer(assets["model_dir"])
    train, _ = create_prompt_dataset(0, [assets["data_dir"]], "1,0,0", str(tmp_path / "cache"), 1, 1234, tok, 64)
    assert warn_unknown_tokens(train, tok, [assets["data_dir"]]) == 0.0  # the synthetic task: every word known
