"""`mpo eval` / `compare` / `plot-curves` and the upstream eval tools on tiny real models.

Models are random tiny Llamas (mpo_ext.bootstrap) and a reward model saved with save_reward_model, on the
synthetic task's data (which defines a gold reward). Statistics are checked against hand-computed cases.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import child_env

from dschat.utils.errors import UserError
from dschat.utils.inference import pad_with_mask
from mpo_ext.evaluation import (
    RewardScorer,
    batch_seed,
    bootstrap_ci,
    encode_prompt,
    eval_prompts,
    format_table,
    global_batches,
    load_eval_prompts,
    pair_by_prompt,
    paired_difference,
    parse_model_specs,
    percentile_indices,
    rank_batches,
    summarize_model,
    win_tie_lose,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("resamples, confidence, expected", [
    (1000, 0.95, (25, 974)),  # 25 means below the lower index, 25 above the upper one
    (100, 0.90, (5, 94)),
    (40, 0.95, (1, 38)),  # 0.025 * 40 = 1
    (10, 0.95, (0, 9)),  # 0.25 rounds down: the extremes
    (1, 0.95, (0, 0)),
])
def test_percentile_indices_hand_computed(resamples, confidence, expected):
    assert percentile_indices(resamples, confidence) == expected


def test_percentile_indices_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile_indices(0, 0.95)
    with pytest.raises(ValueError):
        percentile_indices(100, 1.0)


def test_bootstrap_constant_data_has_zero_width():
    assert bootstrap_ci([2.5] * 7, seed=3) == (2.5, 2.5)
    assert bootstrap_ci([-1.0], num_resamples=50) == (-1.0, -1.0)


def test_bootstrap_two_points_hand_computed():
    # Resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: about 250 of 1000 sorted
    # means are 0 and 250 are 1, so the 26th smallest (index 25) is 0 and index 974 is 1.
    assert bootstrap_ci([0.0, 1.0], 0.95, 1000, seed=0) == (0.0, 1.0)
    # At 40% confidence the bounds (indices 300 and 699) fall inside the ~500 middle values of 0.5.
    assert bootstrap_ci([0.0, 1.0], 0.40, 1000, seed=0) == (0.5, 0.5)


def test_bootstrap_is_seeded_and_sensible():
    values = [0.1 * i for i in range(30)]
    first = bootstrap_ci(values, seed=7)
    assert first == bootstrap_ci(values, seed=7)
    assert first != bootstrap_ci(values, seed=8)
    mean = sum(values) / len(values)
    low, high = first
    assert low < mean < high
    narrow = bootstrap_ci(values, confidence=0.5, seed=7)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_win_tie_lose_hand_computed():
    a = [1.0, 0.5, 0.0, 2.0, -1.0]
    b = [0.0, 0.45, 0.0, 3.0, -1.2]  # differences 1.0, 0.05, 0.0, -1.0, 0.2
    counts = win_tie_lose(a, b, tie_margin=0.1)
    assert (counts["win"], counts["tie"], counts["lose"], counts["n"]) == (2, 2, 1, 5)
    assert counts["win_rate"] == pytest.approx(0.4)
    strict = win_tie_lose(a, b)
    assert (strict["win"], strict["tie"], strict["lose"]) == (3, 1, 1)
    with pytest.raises(ValueError):
        win_tie_lose([1.0], [1.0, 2.0])


def test_summarize_model_and_table():
    records = [{"index": i, "reward": r, "length": n, "gold": g}
               for i, (r, n, g) in enumerate([(1.0, 4, 0.5), (3.0, 6, None), (2.0, 5, 1.5)])]
    row = summarize_model("mpo", records, seed=1, num_resamples=200)
    assert row["mean_reward"] == pytest.approx(2.0) and row["mean_length"] == pytest.approx(5.0)
    assert row["n"] == 3 and row["gold_n"] == 2 and row["gold_mean"] == pytest.approx(1.0)
    assert row["ci_low"] <= 2.0 <= row["ci_high"]
    table = format_table([row])
    assert table.splitlines()[0].startswith("| model") and "| mpo | 2.000 [" in table


def test_paired_difference_by_hand():
    # differences 1, 1, 1: every resample's mean is 1
    assert paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], seed=0) == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0,
                                                                          "n": 3}
    # the same prompts: the big spread between prompts (0, 10, 20) shared by both models does not widen it
    diff = paired_difference([0.5, 10.5, 20.5, 0.5], [0.0, 10.0, 20.0, 0.0], seed=3)
    assert diff["mean"] == pytest.approx(0.5) and diff["ci_low"] == diff["ci_high"] == pytest.approx(0.5)
    # differences 0 and 1 with B=1000 at 95%: the extremes of the resampled means, 0 and 1
    assert paired_difference([1.0, 1.0], [1.0, 0.0], seed=0) == {"mean": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 2}
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0], seed=0)


def test_degenerate_answers_show_in_the_table_beside_a_higher_reward():
    """The issue's case: a collapsed model answering ",,,,,,,,,,,," to every prompt scores higher on the reward
    model than SFT; the table must show it is degenerate, short and repetitive, and its paired difference."""
    from dschat.rlhf.health import is_degenerate

    sft = [{"index": i, "reward": -2.0 + 0.1 * i, "length": 5, "tokens": [10 + i, 20, 30 + i, 40, 50],
            "degenerate": False} for i in range(4)]
    commas = [{"index": i, "reward": 3.3 + 0.1 * i, "length": 1, "tokens": [99], "degenerate": is_degenerate(
        [99], text=",,,,,,,,,,,,")} for i in range(4)]
    first = summarize_model("sft", sft, seed=1, num_resamples=100)
    ppo = summarize_model("ppo", commas, seed=1, num_resamples=100, baseline=sft)
    assert first["degenerate_share"] == 0.0 and ppo["degenerate_share"] == 1.0
    assert ppo["reward_delta"] == pytest.approx(5.3) and ppo["reward_delta_ci_low"] == pytest.approx(5.3)
    assert ppo["distinct_1"] == pytest.approx(0.25) and ppo["distinct_2"] == 0.0  # one token, four times
    assert first["distinct_1"] == pytest.approx(11 / 20) and first["distinct_2"] == pytest.approx(13 / 16)
    assert "reward_delta" not in first
    table = format_table([first, ppo]).splitlines()
    assert table[0] == ("| model | RM reward [95% CI] | \u0394 RM reward vs sft [95% CI] | degenerate | mean length | "
                        "distinct-1 / 2 | n |")
    assert table[2].startswith("| sft | -1.850 [") and table[2].endswith(" | - | 0% | 5.0 | 0.55 / 0.81 | 4 |")
    assert table[3].startswith("| ppo | 3.450 [") and "| +5.300 [+5.300, +5.300] | 100% | 1.0 | 0.25 / 0.00 | 4 |" \
        in table[3]


def test_heldout_reward_column():
    """The held-out reward model's score is one more `Score` of the table: its mean, interval and column."""
    records = [{"reward": 1.0, "length": 3, "reward_heldout": 0.5}, {"reward": 2.0, "length": 3, "reward_heldout": 1.5}]
    row = summarize_model("mpo", records, seed=1, num_resamples=200)
    assert row["heldout_mean"] == pytest.approx(1.0) and row["heldout_ci_low"] <= 1.0 <= row["heldout_ci_high"]
    plain = summarize_model("sft", [{"reward": 0.0, "length": 1}], seed=1, num_resamples=10)
    assert "heldout_mean" not in plain
    lines = format_table([row]).splitlines()
    assert lines[0] == "| model | RM reward [95% CI] | held-out RM [95% CI] | mean length | n |"
    assert lines[2].startswith("| mpo | 1.500 [") and "| 1.000 [" in lines[2]
    assert format_table([row, plain]).splitlines()[3].startswith("| sft | 0.000 [0.000, 0.000] | - | - |")
    assert "held-out" not in format_table([plain])


def test_batches_are_independent_of_world_size():
    assert global_batches(5, 2) == [[0, 1], [2, 3], [4]]
    for world in (1, 2, 3):
        shards = [rank_batches(7, 2, r, world) for r in range(world)]
        flat = sorted(k for shard in shards for k, _ in shard)
        assert flat == [0, 1, 2, 3] and sorted(i for s in shards for _, b in s for i in b) == list(range(7))
    assert batch_seed(1234, 3) == batch_seed(1234, 3) != batch_seed(1234, 4)


def test_parse_model_specs():
    assert parse_model_specs(["sft=/tmp", "x.y-1=/tmp"]) == [("sft", "/tmp"), ("x.y-1", "/tmp")]
    with pytest.raises(UserError, match="duplicate"):
        parse_model_specs(["a=/tmp", "a=/tmp"])
    with pytest.raises(UserError, match="does not exist"):
        parse_model_specs(["a=/no/such/dir"])
    with pytest.raises(UserError, match="name"):
        parse_model_specs(["a b=/tmp"])


def test_pair_by_prompt_handles_order_and_repeats():
    a = [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}, {"prompt": "p1", "answer": "a3"}]
    b = [{"prompt": "p2", "answer": "b2"}, {"prompt": "p1", "answer": "b1"}, {"prompt": "p3", "answer": "b3"}]
    assert [(x["answer"], y["answer"]) for x, y in pair_by_prompt(a, b)] == [("a1", "b1"), ("a2", "b2")]


def test_pad_with_mask_and_encode_prompt(tiny_assets):
    ids, mask = pad_with_mask([[5, 6, 7], [8]], 3, 0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    from dschat.utils.utils import load_hf_tokenizer

    tok = load_hf_tokenizer(str(tiny_assets["policy_a"]))
    full = tok("\n\nHuman: Name two fruits.\n\nAssistant:")["input_ids"]
    cut = encode_prompt(tok, "\n\nHuman: Name two fruits.\n\nAssistant:", 4)
    assert len(cut) == 4 and cut[0] == tok.bos_token_id and cut[1:] == full[-3:]


# --------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """Synthetic data + two random tiny Llamas + a reward model with a fixed (saved) value head."""
    from dschat.utils.model.model_utils import create_critic_model
    from dschat.utils.utils import load_hf_tokenizer, save_reward_model
    from mpo_ext import bootstrap, synthetic

    root = tmp_path_factory.mktemp("eval_assets")
    synthetic.make_synthetic_dataset(root / "data", num_train=8, num_test=40, seed=5)
    texts = list(synthetic.corpus_texts())
    for name, seed in (("policy_a", 1), ("policy_b", 2)):
        bootstrap.build_tiny_model(root / name, texts, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    tok = load_hf_tokenizer(str(root / "policy_a"))
    torch.manual_seed(11)
    reward = create_critic_model(str(root / "policy_a"), tok, None)
    with torch.no_grad():
        reward.v_head.weight.normal_(0.0, 1.0)  # a clearly non-zero head, so scores differ between answers
    save_reward_model(reward, tok, root / "rm")
    return {"root": root, "data": root / "data", "policy_a": root / "policy_a", "policy_b": root / "policy_b",
            "rm": root / "rm"}


def test_load_eval_prompts_uses_test_split(tiny_assets):
    from mpo_ext import synthetic

    prompts = load_eval_prompts(str(tiny_assets["data"]))
    test_prompts = set(synthetic.all_prompts("test"))
    assert prompts and all(p in test_prompts for p in prompts)
    assert len(prompts) == len(set(prompts))  # duplicates dropped
    subset = load_eval_prompts(str(tiny_assets["data"]), num_prompts=5, seed=3)
    assert subset == load_eval_prompts(str(tiny_assets["data"]), num_prompts=5, seed=3)
    assert len(subset) == 5 and [p for p in prompts if p in subset] == subset  # dataset order kept


def test_eval_prompts_say_whether_they_are_held_out(tiny_assets, tmp_path):
    """A dataset's test split is held out; a local file without an eval split gives the very prompts the stages
    trained on, and the evaluation says "training prompts" then."""
    held = eval_prompts(str(tiny_assets["data"]))
    assert held.held_out and held.describe() == f"{len(held.prompts)} held-out prompts"
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": " y",
                                              "rejected": " n"}) + "\n" for i in range(3)))
    mixed = eval_prompts([str(tiny_assets["data"]), str(train_file)], data_output_path=str(tmp_path / "cache"))
    assert not mixed.held_out and mixed.training_sources == (str(train_file),)
    assert mixed.describe() == f"{len(mixed.prompts)} training prompts (the data has no eval split)"


def test_load_eval_prompts_joins_several_datasets_in_order(tmp_path):
    """`mpo eval --data_path A --data_path B` (the HH preset's helpful + harmless test sets): A's prompts, then
    B's new ones; a prompt in both counts once; a set with no prompts is named."""
    first, second, empty = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "empty.jsonl"
    rows = lambda qs: "".join(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": " y",  # noqa: E731
                                          "rejected": " n"}) + "\n" for q in qs)
    first.write_text(rows(["one", "two"]))
    second.write_text(rows(["two", "three"]))
    empty.write_text(json.dumps({"prompt": " ", "chosen": " y", "rejected": " n"}) + "\n")
    cache = str(tmp_path / "cache")
    prompts = load_eval_prompts([str(first), str(second)], data_output_path=cache)
    assert [p.split("Human: ")[1].split("\n")[0] for p in prompts] == ["one", "two", "three"]
    assert load_eval_prompts(str(first), data_output_path=cache) == prompts[:2]
    with pytest.raises(UserError, match="empty.jsonl"):
        load_eval_prompts([str(first), str(empty)], data_output_path=cache)


def test_reward_scorer_matches_single_sequence_end_score(tiny_assets):
    """Batched, left-padded scoring equals the reward model's own end score on each unpadded text."""
    scorer = RewardScorer.from_path(str(tiny_assets["rm"]), torch.device("cpu"), batch_size=3)
    prompts = ["\n\nHuman: Name two fruits.\n\nAssistant:", "\n\nHuman: Please help. List four colors.\n\nAssistant:",
               "\n\nHuman: Name three tools.\n\nAssistant:"]
    answers = [" apple, pear.", " red.", ""]
    batched = scorer.score(prompts, answers)
    tok = scorer.tokenizer
    for prompt, answer, score in zip(prompts, answers, batched):
        ids = torch.tensor([tok(prompt + answer + tok.eos_token)["input_ids"]])
        assert ids[0, -1].item() == tok.eos_token_id
        with torch.no_grad():
            values = scorer.model.forward_value(ids, torch.ones_like(ids), return_value_only=True)
        assert score == pytest.approx(float(values[0, -2]), abs=1e-5)  # the last answer token
    assert len(set(batched)) == 3


def _eval_args(assets, out: Path, *extra: str) -> list[str]:
    return ["--model", f"sft={assets['policy_a']}", "--model", f"mpo={assets['policy_b']}",
            "--reward_model", str(assets["rm"]), "--data_path", str(assets["data"]),
            "--max_new_tokens", "8", "--do_sample", "--temperature", "1.0", "--batch_size", "8",
            "--seed", "77", "--num_bootstrap", "200", "--output_dir", str(out), *extra]


def test_eval_writes_table_and_generations_reproducibly(tiny_assets, tmp_path):
    from mpo_ext.eval_cli import eval_command

    runner = CliRunner()
    first = runner.invoke(eval_command, _eval_args(tiny_assets, tmp_path / "run1", "--num_prompts", "20"))
    assert first.exit_code == 0, first.output
    assert "| model" in first.output and "| sft |" in first.output and "| mpo |" in first.output
    table = json.loads((tmp_path / "run1" / "table.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {"sft", "mpo"}
    for name, row in rows.items():
        records = [json.loads(x) for x in (tmp_path / "run1" / "generations" / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == row["n"] == 20
        assert {"prompt", "answer", "reward", "gold", "length"} <= set(records[0])
        assert row["mean_reward"] == pytest.approx(sum(r["reward"] for r in records) / 20)
        assert row["gold_mean"] == pytest.approx(sum(r["gold"] for r in records) / 20)
        assert row["ci_low"] <= row["mean_reward"] <= row["ci_high"]
        assert 0 < row["mean_length"] <= 8
    a = [json.loads(x)["prompt"] for x in (tmp_path / "run1/generations/sft.jsonl").read_text().splitlines()]
    b = [json.loads(x)["prompt"] for x in (tmp_path / "run1/generations/mpo.jsonl").read_text().splitlines()]
    assert a == b  # same held-out prompts for every model

    second = runner.invoke(eval_command, _eval_args(tiny_assets, tmp_path / "run2", "--num_prompts", "20"))
    assert second.exit_code == 0, second.output
    assert json.loads((tmp_path / "run2" / "table.json").read_text())["rows"] == table["rows"]
    for name in rows:
        assert (tmp_path / "run1/generations" / f"{name}.jsonl").read_text() == \
            (tmp_path / "run2/generations" / f"{name}.jsonl").read_text()

    # compare on the files just written: counts agree with the rewards in them
    from mpo_ext.eval_cli import compare_command

    result = runner.invoke(compare_command, [str(tmp_path / "run1/generations/mpo.jsonl"),
                                             str(tmp_path / "run1/generations/sft.jsonl"),
                                             "--tie_margin", "0.05", "--output_dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    mpo = [json.loads(x) for x in (tmp_path / "run1/generations/mpo.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "run1/generations/sft.jsonl").read_text().splitlines()]
    expected = win_tie_lose([r["reward"] for r in mpo], [r["reward"] for r in sft], 0.05)
    assert {k: summary["reward_model"][k] for k in ("win", "tie", "lose")} == \
        {k: expected[k] for k in ("win", "tie", "lose")}


def test_eval_adds_a_markdown_table_per_eval_run_to_each_model_card(tiny_assets, tmp_path):
    """Each evaluated model's card gets the table as markdown (no code fence), one section per eval run: a
    second `mpo eval` adds its own beside the first; on a file without an eval split it says "training prompts"."""
    from mpo_ext.eval_cli import eval_command

    model = tmp_path / "models" / "sft"
    shutil.copytree(tiny_assets["policy_a"], model)
    (model / "README.md").write_text("---\nlibrary_name: transformers\n---\n# sft model\n\n## Settings\n\nx\n")
    train_file = tmp_path / "prompts.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in load_eval_prompts(str(tiny_assets["data"]))[:6]))
    common = ["--model", f"sft={model}", "--model", f"mpo={tiny_assets['policy_b']}", "--reward_model",
              str(tiny_assets["rm"]), "--max_new_tokens", "4", "--num_bootstrap", "50", "--batch_size", "8"]
    first = CliRunner().invoke(eval_command, [*common, "--data_path", str(tiny_assets["data"]), "--num_prompts", "6",
                                              "--output_dir", str(tmp_path / "eval-a")])
    assert first.exit_code == 0, first.output
    assert "Scores on 6 held-out prompts:" in first.output and "| \u0394 RM reward vs sft [95% CI] |" in first.output
    second = CliRunner().invoke(eval_command, [*common, "--data_path", str(train_file), "--data_output_path",
                                               str(tmp_path / "cache"), "--output_dir", str(tmp_path / "eval-b")])
    assert second.exit_code == 0, second.output
    assert "Scores on 6 training prompts (the data has no eval split):" in second.output
    assert "has no eval split, so its prompts are the ones the stages trained on" in second.output
    table = json.loads((tmp_path / "eval-b" / "table.json").read_text())
    assert table["settings"]["held_out"] is False and table["settings"]["baseline"] == "sft"
    for row in table["rows"]:
        records = [json.loads(x) for x in (tmp_path / "eval-b/generations" / f"{row['name']}.jsonl").read_text().splitlines()]
        assert row["degenerate_share"] == sum(r["degenerate"] for r in records) / len(records)
        assert 0 < row["distinct_1"] <= 1 and "tokens" not in records[0]
    assert "reward_delta" in table["rows"][1] and "reward_delta" not in table["rows"][0]
    card = (model / "README.md").read_text()
    assert card.count("## Evaluation: ") == 2 and "```" not in card.split("## Settings")[1]
    assert "## Evaluation: eval-a (mpo eval)" in card and "## Evaluation: eval-b (mpo eval)" in card
    assert "6 held-out prompts of `data`" in card and "6 training prompts" in card
    assert "| model | RM reward [95% CI] |" in card and str(tmp_path) not in card
    again = CliRunner().invoke(eval_command, [*common, "--data_path", str(tiny_assets["data"]), "--num_prompts", "6",
                                              "--output_dir", str(tmp_path / "eval-a")])
    assert again.exit_code == 0 and (model / "README.md").read_text().count("## Evaluation: ") == 2  # replaced


def test_eval_scores_with_the_heldout_reward_model_too(tiny_assets, tmp_path):
    """--heldout_reward_model: every answer is also scored by the held-out reward model (its own scorer), and
    the table gets its column; the training reward model's scores are what they are without it."""
    from conftest import save_random_critic

    from dschat.utils.utils import load_hf_tokenizer
    from mpo_ext.eval_cli import eval_command

    heldout = save_random_critic(tiny_assets["policy_b"], load_hf_tokenizer(str(tiny_assets["policy_b"])),
                                 tmp_path / "rm_heldout", std=1.0, seed=4)
    runner = CliRunner()
    plain = runner.invoke(eval_command, _eval_args(tiny_assets, tmp_path / "plain", "--num_prompts", "12"))
    both = runner.invoke(eval_command, _eval_args(tiny_assets, tmp_path / "both", "--num_prompts", "12",
                                                  "--heldout_reward_model", str(heldout)))
    assert plain.exit_code == 0 and both.exit_code == 0, both.output
    assert "held-out RM [" in both.output and "held-out RM" not in plain.output
    table = json.loads((tmp_path / "both" / "table.json").read_text())
    assert table["settings"]["heldout_reward_model"] == str(heldout)
    scorer = RewardScorer.from_path(str(heldout), torch.device("cpu"), max_seq_len=512)
    for row, plain_row in zip(table["rows"], json.loads((tmp_path / "plain" / "table.json").read_text())["rows"]):
        records = [json.loads(x) for x in (tmp_path / "both/generations" / f"{row['name']}.jsonl").read_text().splitlines()]
        assert [r["reward_heldout"] for r in records] == pytest.approx(
            scorer.score([r["prompt"] for r in records], [r["answer"] for r in records]), abs=1e-5)
        assert row["heldout_mean"] == pytest.approx(sum(r["reward_heldout"] for r in records) / len(records))
        assert row["mean_reward"] == plain_row["mean_reward"] and row["heldout_mean"] != row["mean_reward"]


def test_eval_bad_input_is_one_line_error(tiny_assets, tmp_path):
    from mpo_ext.eval_cli import eval_command

    result = CliRunner().invoke(eval_command, ["--model", f"a={tiny_assets['policy_a']}", "--reward_model",
                                               str(tiny_assets["policy_a"]), "--data_path", str(tiny_assets["data"]),
                                               "--num_prompts", "2", "--max_new_tokens", "2",
                                               "--output_dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "v_head" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------- sampling flags


SAMPLED = ("temperature", "top_p", "top_k")


def _flag_defaults(parse, argv: list[str]) -> dict:
    settings = parse(argv)
    return {name: getattr(settings, name) for name in SAMPLED}


def test_sampling_flags_are_one_group_in_ppo_select_and_eval(tmp_path):
    """PPO, select and `mpo eval` define --temperature/--top_p/--top_k from one spec: same names and
    defaults everywhere, and the same values refused (eval at click parse time, the others at validation)."""
    from dschat.steps import ppo
    from dschat.utils.args import SamplingSettings
    from mpo_ext import selection
    from mpo_ext.eval_cli import eval_command

    defaults = {name: getattr(SamplingSettings(), name) for name in SAMPLED}
    assert defaults == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    ppo_argv = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", "out"]
    select_argv = ["--sft_model_name_or_path", "s", "--reward_model_name_or_path", "r", "--output_dir", str(tmp_path)]
    assert _flag_defaults(ppo.parse_args, ppo_argv) == defaults
    assert _flag_defaults(selection.parse_args, select_argv) == defaults
    options = {param.name: param for param in eval_command.params}
    assert {name: options[name].default for name in defaults} == defaults
    assert options["do_sample"].secondary_opts == ["--greedy"]

    bad = [("--top_k", "-1", "--top_k -1: must be >= 0"), ("--top_p", "0", "--top_p 0.0: must be in (0, 1]"),
           ("--top_p", "1.5", "--top_p 1.5: must be in (0, 1]"), ("--temperature", "0", "--temperature 0.0: must be > 0")]
    for flag, value, message in bad:
        for parse, argv in ((ppo.parse_args, ppo_argv + ["--do_sample"]), (selection.parse_args, select_argv)):
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
                parse(argv + [flag, value])
        result = CliRunner().invoke(eval_command, ["--model", "a=x", "--output_dir", str(tmp_path / "e"), "--do_sample",
                                                   flag, value])
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output
    # greedy PPO rollouts never read the temperature (as before); eval refuses it even with --greedy (as before)
    assert ppo.parse_args(ppo_argv + ["--temperature", "0"]).temperature == 0.0
    result = CliRunner().invoke(eval_command, ["--model", "a=x", "--output_dir", str(tmp_path / "e"), "--greedy",
                                               "--temperature", "0"])
    assert result.exit_code == 2 and "Invalid value for '--temperature'" in result.output


def test_sampling_settings_are_validated_once():
    """One sampling type for PPO rollouts, selection samples and `mpo eval` (what a Generator takes)."""
    from dschat.steps import ppo
    from dschat.utils.args import SamplingSettings
    from mpo_ext import selection
    from mpo_ext.eval_settings import EvalSettings

    settings = SamplingSettings(do_sample=True, temperature=0.7, top_p=0.9, top_k=40)
    with pytest.raises(AttributeError):
        settings.temperature = 1.0  # frozen: a stage cannot change what it was given
    assert SamplingSettings(do_sample=False, temperature=0.0, top_p=1.0, top_k=0).temperature == 0.0
    for bad in ({"temperature": float("nan")}, {"top_p": float("nan")}, {"top_k": -3}, {"temperature": -1.0}):
        with pytest.raises(UserError, match=f"--{next(iter(bad))} "):
            SamplingSettings(**{"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, **bad})
    ppo_settings = ppo.parse_args(["--output_dir", "out", "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                   "--do_sample", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "40"])
    select_settings = selection.parse_args(["--sft_model_name_or_path", "s", "--reward_model_name_or_path", "r",
                                            "--output_dir", "o", "--temperature", "0.7", "--top_p", "0.9",
                                            "--top_k", "40"])
    eval_settings = EvalSettings.from_mapping({"model": ["a=x"], "output_dir": "o", "do_sample": True,
                                               "temperature": 0.7, "top_p": 0.9, "top_k": 40})
    assert ppo_settings.sampling == select_settings.sampling == eval_settings.sampling == settings
    assert type(ppo_settings.sampling) is SamplingSettings


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_eval_two_ranks_gives_the_single_rank_numbers(tiny_assets, tmp_path):
    """Prompts sharded over 2 CPU ranks (gloo) and gathered: identical table and generations."""
    from mpo_ext.eval_cli import eval_command

    env = child_env()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m", "mpo_ext.eval_cli",
                           "eval", *_eval_args(tiny_assets, tmp_path / "two", "--num_prompts", "12",
                                               "--batch_size", "4")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    single4 = CliRunner().invoke(eval_command, _eval_args(tiny_assets, tmp_path / "one4", "--num_prompts", "12",
                                                          "--batch_size", "4"))
    assert single4.exit_code == 0, single4.output
    two = json.loads((tmp_path / "two" / "table.json").read_text())["rows"]
    assert json.loads((tmp_path / "one4" / "table.json").read_text())["rows"] == two
    for name in ("sft", "mpo"):
        assert (tmp_path / "two/generations" / f"{name}.jsonl").read_text() == \
            (tmp_path / "one4/generations" / f"{name}.jsonl").read_text()


# --------------------------------------------------------------------------------------------- curves


def _write_stage_metrics(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(x) + "\n" for x in records) + '{"step": 6, "pha'  # torn last line
    (folder / "metrics.jsonl").write_text(text)


def _pipeline_run(root: Path, scale: float) -> Path:
    """A pipeline run dir as `mpo pipeline` leaves it: stage folders with metrics, and select/eval without any
    training metrics (their progress records only)."""
    sft = [{"step": s, "phase": "train", "loss": scale / s, "lr": 0.1} for s in range(1, 6)]
    rm = [{"step": s, "phase": "train", "loss": scale / s, "accuracy": 0.5 + 0.05 * s, "rewards/margins": 0.1 * s}
          for s in range(1, 6)] + [{"step": 5, "phase": "eval", "loss": 0.4, "accuracy": 0.7}]
    dpo = [{"step": s, "phase": "train", "loss": scale / (s + 1), "rewards/accuracies": 0.6, "rewards/margins": 0.1 * s,
            "logps/chosen": -3.0} for s in range(1, 6)]
    dpo += [{"step": 0, "phase": "eval", "loss": 0.69, "eval/reward": 0.1}, {"step": 5, "phase": "eval", "loss": 0.5,
                                                                             "eval/reward": 0.4}]
    ppo = [{"step": s, "phase": "train", "loss/policy": 0.1, "reward/mean": scale * s, "objective/kl": 0.01 * s,
            "health/entropy": 1.0} for s in range(1, 6)] + [{"step": 3, "phase": "train", "reward/mean": 0.5}]
    ppo.insert(0, {"step": 0, "phase": "data", "train_rows": 40, "train_truncated": 3})  # counts, not curves
    for name, records in (("step1_sft-00000001", sft), ("step2_rm-00000002", rm), ("step3b_dpo-00000003", dpo),
                          ("step3_ppo-00000004", ppo)):
        _write_stage_metrics(root / name, records)
    for name in ("step2.5_select-00000005", "eval-00000006"):
        (root / name).mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text(json.dumps({"step": 0, "phase": "start", "total_steps": 4,
                                                               "unit": "prompts"}) + "\n")
    return root


def test_plot_curves_shows_key_panels_per_stage_in_pipeline_order(tmp_path):
    from mpo_ext.curves import collect_panels, find_metrics_files, metric_series, plot_training_curves

    run = _pipeline_run(tmp_path / "run", 1.0)
    files = find_metrics_files([str(run)])
    series = metric_series(json.loads(x) for x in (run / "step3_ppo-00000004/metrics.jsonl").read_text().splitlines()[:-1])
    steps, values = series[("reward/mean", "train")]
    assert steps == [1, 2, 3, 4, 5] and values[2] == 0.5  # a re-logged step keeps its last value
    plot = plot_training_curves(files, tmp_path / "curves.png")
    assert plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plot.left_out
    # a few key panels per stage, in pipeline order; DPO is there; no single-dot panel of select or eval
    assert plot.panels == ["SFT: loss", "reward model: loss", "reward model: accuracy", "reward model: rewards/margins",
                           "DPO: loss", "DPO: rewards/accuracies", "DPO: rewards/margins", "DPO: eval/reward",
                           "PPO: loss/policy", "PPO: reward/mean", "PPO: objective/kl"]
    dpo_loss = collect_panels(files)["dpo"]["loss"]  # training loss and its evaluations in one panel
    assert [(line.is_eval, line.steps) for line in dpo_loss] == [(False, [1, 2, 3, 4, 5]), (True, [0.0, 5.0])]


def test_plot_curves_overlays_runs_on_the_same_axes(tmp_path):
    from mpo_ext.curves import collect_panels, find_metrics_files, plot_training_curves
    from mpo_ext.eval_cli import plot_curves_command

    a, b = _pipeline_run(tmp_path / "a", 1.0), _pipeline_run(tmp_path / "b", 2.0)
    files = find_metrics_files([f"theta1={a}", f"theta2={b}"])
    panels = collect_panels(files)
    lines = panels["ppo"]["reward/mean"]
    assert [(line.label, line.run_index) for line in lines] == [("theta1", 0), ("theta2", 1)]  # one axes, two runs
    assert lines[1].values[0] == 2 * lines[0].values[0]
    plot = plot_training_curves(files, tmp_path / "both.png")
    assert len(plot.panels) == 11  # the same panels as one run: overlaid, not side by side
    said = CliRunner().invoke(plot_curves_command, [f"theta1={a}", f"theta2={b}", "--output", str(tmp_path / "cli.png"),
                                                    "--metric", "loss", "--metric", "objective/kl"])
    assert said.exit_code == 0, said.output
    assert "2 run(s) (theta1, theta2)" in said.output and "7 panels" not in said.output
    picked = collect_panels(files, ["loss", "objective/kl"])
    assert {stage: list(p) for stage, p in picked.items()} == {"sft": ["loss"], "rm": ["loss"], "dpo": ["loss"],
                                                                "ppo": ["objective/kl"]}
    one_stage = find_metrics_files([str(a / "step3b_dpo-00000003"), f"other={b / 'step3b_dpo-00000003'}"])
    assert list(collect_panels(one_stage)) == ["dpo"]
    bad = CliRunner().invoke(plot_curves_command, [str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no such run directory" in bad.output
    missing = CliRunner().invoke(plot_curves_command, [str(a), "--metric", "nope"])
    assert missing.exit_code == 2 and "--metric nope: not logged" in missing.output


def test_plot_curves_shows_the_heldout_reward_and_the_gap_in_the_ppo_row(tmp_path):
    from mpo_ext.curves import collect_panels, find_metrics_files, plot_training_curves

    lines = [{"step": s, "phase": "train", "loss/policy": 0.1, "reward/mean": 0.5 * s, "objective/kl": 0.01 * s}
             for s in range(1, 4)]
    lines += [{"step": s, "phase": "eval", "eval/reward": 0.5 * s, "eval/reward_heldout": 0.2 * s,
               "eval/reward_z": 0.5 * s, "eval/reward_heldout_z": 0.2 * s, "eval/reward_gap": 0.3 * s} for s in range(4)]
    _write_stage_metrics(tmp_path / "run" / "step3_ppo-00000001", lines)
    files = find_metrics_files([str(tmp_path / "run")])
    gap = collect_panels(files)["ppo"]["eval/reward_gap"]
    assert [(line.is_eval, line.values) for line in gap] == [(True, pytest.approx([0.0, 0.3, 0.6, 0.9]))]
    plot = plot_training_curves(files, tmp_path / "curves.png")
    assert plot.panels == ["PPO: loss/policy", "PPO: reward/mean", "PPO: objective/kl", "PPO: eval/reward",
                           "PPO: eval/reward_heldout", "PPO: eval/reward_gap"]


# --------------------------------------------------------------------------------------------- upstream tools


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_rw_eval_loads_the_trained_head_and_is_deterministic(tiny_assets, tmp_path):
    script = "training/step2_reward_model_finetuning/rw_eval.py"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "\n\nHuman: Name two fruits.\n\nAssistant:", "chosen": " apple, banana.",
                                 "rejected": " hammer."}) + "\n")
    outputs = []
    for i in range(2):
        proc = _run([script, "--model_name_or_path", str(tiny_assets["rm"]), "--num_padding_at_beginning", "0",
                     "--pairs_file", str(pairs), "--device", "cpu", "--output_json", str(tmp_path / f"s{i}.json")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "chosen scored higher" in proc.stdout
        outputs.append(json.loads((tmp_path / f"s{i}.json").read_text()))
    assert outputs[0] == outputs[1]
    scorer = RewardScorer.from_path(str(tiny_assets["rm"]), torch.device("cpu"))
    expected = scorer.score([outputs[0][0]["prompt"]] * 2, [" apple, banana.", " hammer."])
    assert [outputs[0][0]["chosen_reward"], outputs[0][0]["rejected_reward"]] == pytest.approx(expected, abs=1e-6)


def test_prompt_eval_side_by_side(tiny_assets, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prompt_eval", REPO / "training/step1_supervised_finetuning/prompt_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name two fruits.\nList three colors.\n")
    answers = module.main(["--model_name_or_path_baseline", str(tiny_assets["policy_a"]),
                           "--model_name_or_path_finetune", str(tiny_assets["policy_b"]),
                           "--prompts_file", str(prompts), "--max_new_tokens", "4", "--device", "cpu"])
    assert len(answers["baseline"]) == len(answers["finetune"]) == 2
    out = capsys.readouterr().out
    assert "prompt 2/2" in out and "baseline" in out and "finetune" in out
    with pytest.raises(UserError, match="num_beam_groups"):
        module.parse_args(["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b",
                           "--num_beam_groups", "2"])


def test_chat_answers_one_piped_line_then_quits(tiny_assets):
    proc = _run(["chat.py", "--path", str(tiny_assets["policy_a"]), "--max_new_tokens", "5", "--device", "cpu"],
                stdin="Name two fruits.\nquit\nthis line is never read\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Assistant:") == 1 and "Human: Name two fruits." in proc.stdout
    assert "this line is never read" not in proc.stdout
