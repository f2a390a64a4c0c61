"""The MPO chain: the printed 8-GPU plan, the ablation wiring, and the tiny chain end to end (smoke size)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from click.testing import CliRunner

from mpo_ext.cli import main
from mpo_ext.pipeline import build_plan, llama2_7b_preset, override_flags, tiny_preset

REPO_ROOT = Path(__file__).resolve().parents[1]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_llama2_dry_run_prints_the_paper_plan():
    env = {**os.environ, "DRY_RUN": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(["bash", str(REPO_ROOT / "training/run_mpo_llama2_7b.sh"), "/tmp/mpo-plan"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for stage in ("# sft", "# rm", "# select", "# dpo", "# ppo", "# eval"):
        assert stage in text
    assert text.count("deepspeed --num_gpus 8") == 5
    assert "Anthropic/hh-rlhf/helpful-base Anthropic/hh-rlhf/harmless-base" in text
    assert not Path("/tmp/mpo-plan/step1_sft").exists()


def test_plan_carries_the_paper_settings_and_mpo_wiring(tmp_path):
    plan = {s.name: s for s in build_plan(llama2_7b_preset(tmp_path), tmp_path)}
    sft, rm, dpo, ppo = (plan[k].command for k in ("sft", "rm", "dpo", "ppo"))
    assert _flag(sft, "--learning_rate") == "5e-5" and _flag(sft, "--per_device_train_batch_size") == "16"
    assert _flag(sft, "--num_warmup_steps") == "500"
    assert _flag(rm, "--learning_rate") == "5e-6" and _flag(rm, "--weight_decay") == "0.1"
    assert _flag(dpo, "--beta") == "0.1" and _flag(dpo, "--gradient_accumulation_steps") == "8"
    assert _flag(dpo, "--data_path").endswith("step2.5_select/easy.jsonl")
    assert _flag(dpo, "--model_name_or_path") == str(tmp_path / "step1_sft")
    assert _flag(ppo, "--init_kl_coef") == "0.4" and _flag(ppo, "--actor_learning_rate") == "3e-6"
    assert _flag(ppo, "--data_path").endswith("step2.5_select/hard.jsonl")
    assert _flag(ppo, "--actor_model_name_or_path") == _flag(ppo, "--reference_model_name_or_path") == str(
        tmp_path / "step3b_dpo")
    assert _flag(plan["select"].command, "--threshold") == "1.0"


def test_ablation_wiring(tmp_path):
    preset = tiny_preset(tmp_path)
    sft_kl = {s.name: s for s in build_plan(preset, tmp_path, reference="sft")}
    assert _flag(sft_kl["ppo"].command, "--reference_model_name_or_path") == str(tmp_path / "step1_sft")
    assert _flag(sft_kl["ppo"].command, "--actor_model_name_or_path") == str(tmp_path / "step3b_dpo")
    reverse = build_plan(preset, tmp_path, order="reverse")
    names = [s.name for s in reverse]
    assert names.index("ppo") < names.index("dpo")
    ppo, dpo = reverse[names.index("ppo")].command, reverse[names.index("dpo")].command
    assert _flag(ppo, "--actor_model_name_or_path") == str(tmp_path / "step1_sft")
    assert _flag(dpo, "--model_name_or_path") == str(tmp_path / "step3_ppo" / "actor")


def test_override_flags():
    assert override_flags(["--a", "1", "--on", "--b", "2"], {"--b": "3", "--c": "4"}) == [
        "--a", "1", "--on", "--b", "3", "--c", "4"]


def test_tiny_chain_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["pipeline", "--preset", "smoke", "--output_dir", str(out)])
    assert result.exit_code == 0, result.output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["assets", "sft", "rm", "select", "dpo", "ppo", "eval"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary
    for marker in ("step1_sft/config.json", "step2_rm/pytorch_model.bin", "step2.5_select/manifest.json",
                   "step2.5_select/easy.jsonl", "step2.5_select/hard.jsonl", "step3b_dpo/config.json",
                   "step3_ppo/actor/config.json", "step3_ppo/run_info.json", "eval/table.json"):
        assert (out / marker).exists(), marker
    run_info = json.loads((out / "step3_ppo/run_info.json").read_text())
    assert str(out / "step3b_dpo") in json.dumps(run_info) and "hard.jsonl" in json.dumps(run_info)
    table = json.loads((out / "eval/table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["sft", "dpo", "mpo"]
    assert all(r["gold_mean"] is not None for r in table["rows"])
    assert "Mean reward on held-out prompts" in result.output and "step3_ppo" in result.output

    again = runner.invoke(main, ["pipeline", "--preset", "smoke", "--output_dir", str(out)])
    assert again.exit_code == 0, again.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["status"] == "skipped (complete)" for s in summary["stages"]), summary
