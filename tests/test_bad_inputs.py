"""The bad-input matrix: every entry point answers bad input with one clear line naming the input, exit
code 2, and no damaged output. Entry points run in-process (their real `main.py` via runpy) to keep the
matrix fast; each case fails before any training starts."""

from __future__ import annotations

import gzip
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
MAINS = {
    "step1": REPO_ROOT / "training/step1_supervised_finetuning/main.py",
    "step2": REPO_ROOT / "training/step2_reward_model_finetuning/main.py",
    "select": REPO_ROOT / "step2.5_select/main.py",
    "dpo": REPO_ROOT / "step3b_dpo/main.py",
    "step3": REPO_ROOT / "training/step3_rlhf_finetuning/main.py",
}


@pytest.fixture(scope="module")
def fixtures(assets, tmp_path_factory, tinystories_dir):
    root = tmp_path_factory.mktemp("bad")
    wrong_keys = root / "wrong_keys.jsonl"
    wrong_keys.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    empty = root / "easy.jsonl"
    empty.write_text("")
    unreadable = root / "unreadable.jsonl"
    unreadable.write_text("{not json\n")
    pair = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}
    latin1 = root / "latin1.jsonl"  # valid JSON lines, but the third holds a Latin-1 byte
    latin1.write_bytes(((json.dumps(pair) + "\n") * 2 + json.dumps(pair, ensure_ascii=False).replace("hello", "caf\u00e9")
                        + "\n").encode("latin-1"))
    torn_gz = root / "torn.jsonl.gz"  # a download cut short
    whole = gzip.compress(((json.dumps(pair) + "\n") * 200).encode())
    torn_gz.write_bytes(whole[: len(whole) // 2])
    # A model directory whose tokenizer belongs to another model (bigger vocabulary than the embedding).
    mismatched = root / "mismatched-model"
    shutil.copytree(assets["model_dir"], mismatched)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mismatched / name).unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (tinystories_dir / name).exists():
            shutil.copy(tinystories_dir / name, mismatched / name)
    # A model copy whose weights file was cut short (a full disk, an interrupted copy).
    truncated = root / "truncated-model"
    shutil.copytree(assets["model_dir"], truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    deep = root / "deep.json"  # valid JSON nested 100k deep
    deep.write_text("[" * 100_000 + "]" * 100_000)
    ds_configs = {}
    for name, config in {"bfloat16": {"bfloat16": {"enabled": True}}, "fp16_true": {"fp16": True},
                         "zero_scalar": {"zero_optimization": 2}}.items():
        ds_configs[name] = root / f"ds_{name}.json"
        ds_configs[name].write_text(json.dumps(config))
    return {
        "data": assets["data_dir"], "model": assets["model_dir"], "wrong_keys": str(wrong_keys),
        "empty": str(empty), "unreadable": str(unreadable), "mismatched": str(mismatched),
        "latin1": str(latin1), "torn_gz": str(torn_gz), "truncated": str(truncated), "deep": str(deep),
        **{f"ds_{name}": str(path) for name, path in ds_configs.items()},
        "cache": str(root / "cache"), "out": root / "out",
    }


def _run_main(step: str, argv: list[str], capsys) -> tuple[int, str]:
    old_argv = sys.argv
    sys.argv = [str(MAINS[step]), *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(MAINS[step]), run_name="__main__")
    finally:
        sys.argv = old_argv
    return exc.value.code, capsys.readouterr().err


def _cases(f: dict) -> list[tuple[str, str, list[str], str]]:
    """(case id, entry point, argv, text the one error line must contain)."""
    d, m, c = f["data"], f["model"], ["--data_output_path", f["cache"]]
    out = ["--output_dir", str(f["out"])]
    base1 = ["--model_name_or_path", m, "--max_seq_len", "64", *c, *out]
    lens = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "32"]
    return [
        ("step1-missing-data", "step1", ["--data_path", "/nonexistent/train.jsonl", *base1], "/nonexistent/train.jsonl"),
        ("step1-wrong-keys", "step1", ["--data_path", f["wrong_keys"], *base1], "wrong_keys.jsonl"),
        ("step1-unreadable-json", "step1", ["--data_path", f["unreadable"], *base1], "unreadable.jsonl"),
        ("step1-not-utf8", "step1", ["--data_path", f["latin1"], *base1], "latin1.jsonl:3: not UTF-8"),
        ("step1-truncated-gz", "step1", ["--data_path", f["torn_gz"], *base1], "torn.jsonl.gz: damaged"),
        ("step2-not-utf8", "step2", ["--data_path", f["latin1"], *base1], "latin1.jsonl:3: not UTF-8"),
        ("dpo-not-utf8", "dpo", ["--data_path", f["latin1"], *base1], "latin1.jsonl:3: not UTF-8"),
        ("select-not-utf8", "select", ["--data_path", f["latin1"], "--sft_model_name_or_path", m,
                                       "--reward_model_name_or_path", m, *lens, *c, *out], "latin1.jsonl:3: not UTF-8"),
        *[(f"{step}-max-seq-len-1", step, ["--data_path", d, *base1, "--max_seq_len", "1"], "--max_seq_len 1")
          for step in ("step1", "step2", "dpo")],
        ("step1-empty-split", "step1", ["--data_path", d, "--data_split", "0,0,10", *base1], "no usable samples"),
        ("step1-unknown-dataset", "step1", ["--data_path", "nobody/unknown-set", *base1], "--data_path"),
        ("step1-missing-model", "step1", ["--data_path", d, "--model_name_or_path", "/nonexistent/m", *c, *out],
         "--model_name_or_path"),
        ("step1-tokenizer-mismatch", "step1", ["--data_path", d, "--model_name_or_path", f["mismatched"], "--max_seq_len", "64",
                                                   *c, *out],
         "tokenizer"),
        ("step1-too-long", "step1", ["--data_path", d, *base1, "--max_seq_len", "4096"], "--max_seq_len"),
        ("step1-conflicting-lora", "step1", ["--data_path", d, "--only_optimize_lora", *base1],
         "--only_optimize_lora"),
        ("step1-deepspeed-config", "step1", ["--data_path", d, "--deepspeed_config", "x.json", *base1],
         "--deepspeed_config"),
        ("step2-fp16-cpu", "step2", ["--data_path", d, "--dtype", "fp16", *base1], "--dtype fp16"),
        ("step2-empty-pairs", "step2", ["--data_path", f["empty"], *base1], "easy.jsonl"),
        ("select-no-value-head", "select", ["--data_path", d, "--sft_model_name_or_path", m,
                                            "--reward_model_name_or_path", m, *lens, *c, *out], "v_head"),
        ("select-threshold-and-fraction", "select", ["--data_path", d, "--sft_model_name_or_path", m,
                                                     "--reward_model_name_or_path", m, "--threshold", "1",
                                                     "--easy_fraction", "0.5", *c, *out], "--easy_fraction"),
        *[(f"select-{flag[2:]}-{value}", "select", ["--data_path", d, "--sft_model_name_or_path", m,
                                                    "--reward_model_name_or_path", m, flag, value, *c, *out], flag)
          for flag, value in (("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "-3"),
                              ("--easy_fraction", "nan"), ("--easy_fraction", "1.5"))],
        ("dpo-beta-nan", "dpo", ["--data_path", d, "--beta", "nan", *base1], "--beta"),
        ("dpo-empty-easy-split", "dpo", ["--data_path", f["empty"], *base1], "easy.jsonl"),
        ("step3-critic-without-value-head", "step3", ["--data_path", d, "--actor_model_name_or_path", m,
                                                      "--critic_model_name_or_path", m, *lens, *c, *out], "v_head"),
        ("step3-too-long", "step3", ["--data_path", d, "--actor_model_name_or_path", m, "--critic_model_name_or_path",
                                     m, "--max_prompt_seq_len", "200", "--max_answer_seq_len", "200", *c, *out],
         "max_position_embeddings"),
        ("step3-tp-without-zero3", "step3", ["--data_path", d, "--actor_model_name_or_path", m,
                                             "--critic_model_name_or_path", m, "--inference_tp_size", "2", *lens, *c,
                                             *out],
         "--inference_tp_size"),
        # issue 22: counts, seeds, damaged files and DeepSpeed configs that got around the guards
        *[(f"step1{flag[1:]}-{value}", "step1", ["--data_path", d, *base1, flag, value], f"{flag} {value}")
          for flag, value in (("--max_steps", "-5"), ("--save_steps", "-1"), ("--log_interval", "0"),
                              ("--seed", "-1"), ("--seed", str(2**64)))],
        ("select-seed--1", "select", ["--data_path", d, "--sft_model_name_or_path", m, "--reward_model_name_or_path",
                                      m, "--seed", "-1", *c, *out], "--seed -1"),
        ("step1-truncated-safetensors", "step1", ["--data_path", d, "--model_name_or_path", f["truncated"],
                                                  "--max_seq_len", "64", *c, *out], "model.safetensors"),
        ("step1-deep-json", "step1", ["--data_path", f["deep"], *base1], "deep.json"),
        ("step1-ds-config-bfloat16", "step1", ["--data_path", d, "--deepspeed_config", f["ds_bfloat16"], *base1],
         "--dtype"),
        ("step1-ds-config-fp16-true", "step1", ["--data_path", d, "--deepspeed_config", f["ds_fp16_true"], *base1],
         "fp16 must be a JSON object"),
        ("step1-ds-config-zero-scalar", "step1", ["--data_path", d, "--deepspeed_config", f["ds_zero_scalar"],
                                                  *base1], "zero_optimization must be a JSON object"),
    ]


CASE_IDS = [
    "step1-missing-data", "step1-wrong-keys", "step1-unreadable-json", "step1-not-utf8", "step1-truncated-gz",
    "step2-not-utf8", "dpo-not-utf8", "select-not-utf8", "step1-max-seq-len-1", "step2-max-seq-len-1",
    "dpo-max-seq-len-1", "step1-empty-split", "step1-unknown-dataset",
    "step1-missing-model", "step1-tokenizer-mismatch", "step1-too-long", "step1-conflicting-lora",
    "step1-deepspeed-config", "step2-fp16-cpu", "step2-empty-pairs", "select-no-value-head",
    "select-threshold-and-fraction", "select-threshold-nan", "select-threshold-inf", "select-threshold--3",
    "select-easy_fraction-nan", "select-easy_fraction-1.5", "dpo-beta-nan", "dpo-empty-easy-split", "step3-critic-without-value-head", "step3-too-long",
    "step3-tp-without-zero3",
    "step1-max_steps--5", "step1-save_steps--1", "step1-log_interval-0", "step1-seed--1", f"step1-seed-{2**64}",
    "select-seed--1", "step1-truncated-safetensors", "step1-deep-json", "step1-ds-config-bfloat16",
    "step1-ds-config-fp16-true", "step1-ds-config-zero-scalar",
]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_entry_point_bad_input(case_id, fixtures, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # an unknown name is tried on the hub: none here
    case = {c[0]: c for c in _cases(fixtures)}[case_id]
    _, step, argv, needle = case
    out = fixtures["out"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    (out / "config.json").write_text('{"keep": true}')  # an existing output must survive a failed run
    code, err = _run_main(step, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert (out / "config.json").read_text() == '{"keep": true}'


def test_mpo_cli_bad_inputs(fixtures, tmp_path):
    from mpo_ext.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--model", f"sft={fixtures['model']}", "--reward_model", fixtures["model"],
                                  "--data_path", fixtures["data"], "--output_dir", str(tmp_path / "e")])
    assert result.exit_code == 2 and "v_head" in result.output, result.output
    result = runner.invoke(main, ["eval", "--model", "sft=/nonexistent/model", "--reward_model", fixtures["model"],
                                  "--data_path", fixtures["data"], "--output_dir", str(tmp_path / "e")])
    assert result.exit_code == 2 and "/nonexistent/model" in result.output, result.output
    # A huge --max_new_tokens would generate for ever: bounded by the model's position table, before anything runs.
    result = runner.invoke(main, ["eval", "--model", f"sft={fixtures['model']}", "--reward_model", fixtures["model"],
                                  "--data_path", fixtures["data"], "--max_new_tokens", str(10**12),
                                  "--output_dir", str(tmp_path / "e2")])
    assert result.exit_code == 2 and "--max_new_tokens" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "e2").exists()
    result = runner.invoke(main, ["eval", "--model", f"sft={fixtures['truncated']}", "--reward_model",
                                  fixtures["model"], "--data_path", fixtures["data"], "--output_dir", str(tmp_path / "e")])
    assert result.exit_code == 2 and "model.safetensors" in result.output, result.output
    for theta in ("nan", "inf", "-3"):
        result = runner.invoke(main, ["pipeline", "--threshold", theta, "--output_dir", str(tmp_path / "p"), "--dry_run"])
        assert result.exit_code == 2 and "--threshold" in result.output, result.output
        assert not (tmp_path / "p").exists()
    result = runner.invoke(main, ["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--tie_margin", "nan"])
    assert result.exit_code == 2 and "--tie_margin" in result.output, result.output
    result = runner.invoke(main, ["compare", fixtures["latin1"], fixtures["latin1"]])
    assert result.exit_code == 2 and "latin1.jsonl:3: not UTF-8" in result.output, result.output
    result = runner.invoke(main, ["pipeline", "--steps", "sft,nonsense", "--dry_run"])
    assert result.exit_code == 2 and "nonsense" in result.output, result.output
    result = runner.invoke(main, ["compare", str(tmp_path / "missing_a.jsonl"), str(tmp_path / "missing_b.jsonl")])
    assert result.exit_code == 2 and "missing_a.jsonl" in result.output, result.output
