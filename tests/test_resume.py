"""Resumable training states for step 1 and step 3b (the shared loop; step 3 is covered in
test_step3.py): a run killed after a saved state and resumed ends with the same weights and the same
logged losses as an uninterrupted run; a kill during a state write leaves the previous state usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP1 = REPO_ROOT / "training/step1_supervised_finetuning/main.py"
DPO = REPO_ROOT / "step3b_dpo/main.py"


def _flags(assets, out: Path, cache: Path, zero_stage: int, extra: list[str]) -> list[str]:
    return [
        "--data_path", assets["data_dir"], "--data_split", "2,4,4", "--model_name_or_path", assets["model_dir"],
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_seq_len", "64",
        "--learning_rate", "3e-3", "--num_train_epochs", "1", "--max_steps", "8", "--num_warmup_steps", "2",
        "--log_interval", "1", "--save_steps", "3", "--save_total_limit", "3", "--zero_stage", str(zero_stage),
        "--data_output_path", str(cache), "--output_dir", str(out), *extra,
    ]


CASES = {
    "sft-zero0": (STEP1, 0, []),
    "sft-zero3": (STEP1, 3, []),
    "dpo-zero0": (DPO, 0, ["--precompute_ref_log_probs", "--learning_rate", "1e-3"]),
    "dpo-zero3": (DPO, 3, ["--learning_rate", "1e-3"]),  # resident ZeRO-3 reference model
}


def _train_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["phase"] == "train"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_then_resumed_equals_uninterrupted(case, assets, tmp_path, run_ds):
    script, zero_stage, extra = CASES[case]
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_ds(script, _flags(assets, straight, cache, zero_stage, extra), num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Killed (SIGKILL) right after optimizer step 5: the newest complete state is step 3.
    proc = run_ds(script, _flags(assets, resumed, cache, zero_stage, extra), num_ranks=0,
                  env={"DSCHAT_KILL_AT": "after_step:5"})
    assert proc.returncode != 0
    assert (resumed / "checkpoints/step-3/trainer_state.json").exists()
    assert not (resumed / "config.json").exists()

    # Killed while writing the step-6 state: step 3 must stay the newest usable state.
    proc = run_ds(script, _flags(assets, resumed, cache, zero_stage, extra) + ["--resume"], num_ranks=0,
                  env={"DSCHAT_KILL_AT": "during_save:6"})
    assert proc.returncode != 0
    assert not (resumed / "checkpoints/step-6").exists()
    assert "Resumed from" in proc.stdout

    proc = run_ds(script, _flags(assets, resumed, cache, zero_stage, extra) + ["--resume"], num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-3" in proc.stdout and "optimizer step 3" in proc.stdout

    a, b = _train_losses(straight), _train_losses(resumed)
    assert [s for s, _ in a] == list(range(1, 9)) and [s for s, _ in b] == [s for s, _ in a]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    states = sorted(p.name for p in (resumed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert states == ["step-3", "step-6"]


def test_sigterm_saves_a_state_and_exits_143(assets, tmp_path, run_ds):
    out = tmp_path / "run"
    flags = _flags(assets, out, tmp_path / "cache", 0, ["--save_steps", "0"])
    proc = run_ds(STEP1, flags, num_ranks=0, env={"DSCHAT_KILL_AT": "sigterm_after_step:2"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "SIGTERM received" in proc.stdout
    assert (out / "checkpoints/step-2/trainer_state.json").exists()
    # another batch size would replay or skip samples: refused with one line, the state left as it was
    proc = run_ds(STEP1, flags + ["--resume", "--per_device_train_batch_size", "4"], num_ranks=0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: --resume:" in proc.stderr and "--per_device_train_batch_size 8 (now" in proc.stderr
    proc = run_ds(STEP1, flags + ["--resume"], num_ranks=0)
    assert proc.returncode == 0 and "optimizer step 2" in proc.stdout, proc.stderr[-3000:]
    assert [s for s, _ in _train_losses(out)] == list(range(1, 9))


def test_torchrun_launch(assets, tmp_path):
    """`torchrun main.py ...` works too (upstream needed the deepspeed launcher's --local_rank)."""
    from conftest import free_port, run_command

    out = tmp_path / "run"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(STEP1),
           *_flags(assets, out, tmp_path / "cache", 0, ["--save_steps", "0", "--max_steps", "2"])]
    proc = run_command(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists()
