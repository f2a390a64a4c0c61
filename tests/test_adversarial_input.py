"""Adversarial input (issue 12, input half): scripts that report failure, reward models that yield
NaN, thresholds that are not numbers, data files that are not UTF-8 or are torn, lengths too short to
hold an answer. Each bad input must end in one line naming it and the fix, a non-zero exit, and no
output written or damaged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, run_command


@pytest.mark.slow
def test_run_select_script_fails_when_the_run_fails(tmp_path):
    out = tmp_path / "select"
    result = run_command(["bash", "run_select.sh", str(tmp_path / "no-sft"), str(tmp_path / "no-rm"), str(out)],
                         cwd=REPO_ROOT / "step2.5_select", timeout=300)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no-sft" in (out / "select.log").read_text()  # the run did start and named the bad input


@pytest.fixture(scope="module")
def reward_models(assets, tmp_path_factory) -> dict[str, Path]:
    """Two step-2 reward models on the tiny Llama: `ok` (a random value head) and `nan` (a NaN value
    head: every score it gives is NaN)."""
    import torch

    from dschat.utils.model.model_utils import create_critic_model
    from dschat.utils.utils import load_hf_tokenizer, save_reward_model

    root = tmp_path_factory.mktemp("reward_models")
    tokenizer = load_hf_tokenizer(str(assets["model_dir"]))
    torch.manual_seed(3)
    reward = create_critic_model(str(assets["model_dir"]), tokenizer, None)
    with torch.no_grad():
        reward.v_head.weight.normal_(0.0, 1.0)
        save_reward_model(reward, tokenizer, root / "ok")
        reward.v_head.weight.fill_(float("nan"))
        save_reward_model(reward, tokenizer, root / "nan")
    return {"ok": root / "ok", "nan": root / "nan"}


def _previous_outputs(out: Path, names: tuple[str, ...]) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_text(f"previous {name}\n")
    return {name: (out / name).read_text() for name in names}


@pytest.mark.slow
def test_select_refuses_a_nan_reward_model_before_writing(assets, reward_models, run_ds, tmp_path):
    nan_reward_model = reward_models["nan"]
    out = tmp_path / "select"
    before = _previous_outputs(out, ("easy.jsonl", "hard.jsonl", "manifest.json"))
    proc = run_ds(REPO_ROOT / "step2.5_select/main.py", [
        "--data_path", str(assets["data_dir"]), "--pair_source", "dataset", "--max_prompts", "8",
        "--sft_model_name_or_path", str(assets["model_dir"]), "--reward_model_name_or_path", str(nan_reward_model),
        "--max_prompt_seq_len", "64", "--max_answer_seq_len", "32", "--per_device_eval_batch_size", "4",
        "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)], num_ranks=0, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and str(nan_reward_model) in errors[0] and "NaN" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {name: (out / name).read_text() for name in before} == before
    assert not list((out / "shards").glob("shard-*.jsonl"))  # no shard of NaN scores to resume from
    assert not (out / "shards").exists()  # nor a shard fingerprint (config.json) of a run that wrote nothing


def test_eval_refuses_a_nan_reward_model(assets, reward_models, tmp_path):
    nan_reward_model = reward_models["nan"]
    from mpo_ext.eval_cli import eval_command

    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_command, [
        "--model", f"sft={assets['model_dir']}", "--reward_model", str(nan_reward_model),
        "--data_path", str(assets["data_dir"]), "--num_prompts", "4", "--max_new_tokens", "2",
        "--output_dir", str(out)])
    assert result.exit_code == 2, result.output
    assert str(nan_reward_model) in result.output and "NaN" in result.output and "Traceback" not in result.output
    assert not (out / "table.json").exists() and not (out / "generations").exists()


@pytest.mark.slow
def test_select_counts_identical_and_cut_answers(assets, reward_models, run_ds, tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    rows = [{"prompt": f"\n\nHuman: name color {i}\n\nAssistant:", "chosen": f" red {i}", "rejected": f" blue {i}"}
            for i in range(8)]
    rows[1]["rejected"] = rows[1]["chosen"]  # identical answers
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[2]["chosen"] = " green" * 200  # far longer than 32 + 64 tokens
    rows[6]["rejected"] = " blue" * 200
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "select"
    proc = run_ds(REPO_ROOT / "step2.5_select/main.py", [
        "--data_path", str(data), "--pair_source", "dataset", "--sft_model_name_or_path", str(assets["model_dir"]),
        "--reward_model_name_or_path", str(reward_models["ok"]), "--max_prompt_seq_len", "64",
        "--max_answer_seq_len", "32", "--per_device_eval_batch_size", "4", "--data_split", "10,0,0",
        "--data_phase", "1", "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)],
        num_ranks=0, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["prompts"] == 8
    assert manifest["counts"]["identical_answers"] == 2 and manifest["data"]["answers_truncated"] == 2
    console = proc.stdout + proc.stderr
    assert "2 of 8 prompts have two identical answers" in console and "2 pair(s) have an answer longer" in console


@pytest.mark.slow
def test_ppo_refuses_a_nan_reward_model_at_its_first_batch(assets, reward_models, run_ds, tmp_path):
    prompts = tmp_path / "hard.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: say {w}\n\nAssistant:"}) + "\n"
                               for w in ("yes", "no", "hi", "bye")))
    out = tmp_path / "ppo"
    proc = run_ds(REPO_ROOT / "training/step3_rlhf_finetuning/main.py", [
        "--actor_model_name_or_path", str(assets["model_dir"]), "--critic_model_name_or_path", str(reward_models["nan"]),
        "--data_path", str(prompts), "--data_output_path", str(tmp_path / "cache"),
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
        "--max_prompt_seq_len", "32", "--max_answer_seq_len", "4", "--num_padding_at_beginning", "0",
        "--max_steps", "1", "--output_dir", str(out)], num_ranks=0, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # (the trainer's progress bar does not end its line before the error: match the line's tail)
    errors = [line[line.index("error:"):] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and str(reward_models["nan"]) in errors[0] and "NaN" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "actor").exists() and not (out / "run_info.json").exists()


TEMPLATE_PROBE = """
import sys
from transformers import AutoTokenizer
from dschat.utils.data.raw_datasets import ChatRenderer
from dschat.utils.errors import run_main

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
tokenizer.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                           "{{ messages[0]['content'] }}")
run_main(lambda: ChatRenderer(tokenizer).prompt([{"role": "user", "content": "hi"}]))
"""


def test_a_chat_template_that_loops_for_hours_is_one_line(assets):
    """Nested range(100000) loops in a tokenizer's template rendered for hours; now a budget per rendering
    (1 s here, DSCHAT_TEMPLATE_BUDGET_S) ends it with one line. A child process, so that a regression fails
    by its generous timeout instead of hanging the suite."""
    proc = run_command([sys.executable, "-c", TEMPLATE_PROBE, str(assets["model_dir"])], timeout=300,
                       env={"DSCHAT_TEMPLATE_BUDGET_S": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "chat template took more than 1 s" in errors[0] and "Traceback" not in proc.stderr
