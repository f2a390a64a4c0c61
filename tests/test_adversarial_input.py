"""Adversarial input (issue 12, input half): scripts that report failure, reward models that yield
NaN, thresholds that are not numbers, data files that are not UTF-8 or are torn, lengths too short to
hold an answer. Each bad input must end in one line naming it and the fix, a non-zero exit, and no
output written or damaged."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, run_command


def test_run_select_script_fails_when_the_run_fails(tmp_path):
    out = tmp_path / "select"
    result = run_command(["bash", "run_select.sh", str(tmp_path / "no-sft"), str(tmp_path / "no-rm"), str(out)],
                         cwd=REPO_ROOT / "step2.5_select", timeout=300)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no-sft" in (out / "select.log").read_text()  # the run did start and named the bad input


@pytest.fixture(scope="module")
def nan_reward_model(assets, tmp_path_factory):
    """A step-2 reward model whose value head is NaN: every score it gives is NaN."""
    import torch

    from dschat.utils.model.model_utils import create_critic_model
    from dschat.utils.utils import load_hf_tokenizer, save_reward_model

    root = tmp_path_factory.mktemp("nan_rm")
    tokenizer = load_hf_tokenizer(str(assets["model_dir"]))
    reward = create_critic_model(str(assets["model_dir"]), tokenizer, None)
    with torch.no_grad():
        reward.v_head.weight.fill_(float("nan"))
    save_reward_model(reward, tokenizer, root / "rm")
    return root / "rm"


def _previous_outputs(out: Path, names: tuple[str, ...]) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_text(f"previous {name}\n")
    return {name: (out / name).read_text() for name in names}


def test_select_refuses_a_nan_reward_model_before_writing(assets, nan_reward_model, run_ds, tmp_path):
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


def test_eval_refuses_a_nan_reward_model(assets, nan_reward_model, tmp_path):
    from mpo_ext.eval_cli import eval_command

    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_command, [
        "--model", f"sft={assets['model_dir']}", "--reward_model", str(nan_reward_model),
        "--data_path", str(assets["data_dir"]), "--num_prompts", "4", "--max_new_tokens", "2",
        "--output_dir", str(out)])
    assert result.exit_code == 2, result.output
    assert str(nan_reward_model) in result.output and "NaN" in result.output and "Traceback" not in result.output
    assert not (out / "table.json").exists() and not (out / "generations").exists()
