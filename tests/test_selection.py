"""Step 2.5 (reward-gap selection): pure split functions by hand, the output writer, and real runs of
step2.5_select/main.py (2 ranks under the deepspeed launcher, a killed and resumed 1-rank run, dataset
pairs with human labels) on the tiny test Llama and a reward model built from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dschat.utils.errors import UserError
from mpo_ext import selection
from mpo_ext.selection import (
    accuracy_by_gap_bucket,
    assign_shards,
    balanced_threshold,
    derive_seed,
    length_sorted_batches,
    orient_record,
    shard_ranges,
    split_by_gap,
    split_warnings,
    threshold_for_fraction,
)

REPO = Path(__file__).resolve().parents[1]
SELECT = REPO / "step2.5_select" / "main.py"
QUIET = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# --------------------------------------------------------------------------------------------- pure functions


def test_orient_record_puts_higher_score_first_and_keeps_ties():
    def ordered(rewards):
        r = orient_record({"index": 0, "prompt": "P", "responses": ["a", "b"], "rewards": rewards}, "reward_model")
        return r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]

    assert ordered([0.1, 2.0]) == ("b", "a", 2.0, 0.1)
    assert ordered([3.0, -1.0]) == ("a", "b", 3.0, -1.0)
    assert ordered([1.0, 1.0]) == ("a", "b", 1.0, 1.0)


def test_split_by_gap_boundary_is_hard():
    gaps = [0.0, 0.5, 1.0, 1.0000001, 7.0]
    assert split_by_gap(gaps, 1.0).tolist() == [False, False, False, True, True]
    assert split_by_gap([], 1.0).tolist() == []


def test_threshold_for_fraction_hits_the_fraction():
    rng = np.random.default_rng(0)
    gaps = rng.exponential(1.0, size=1000)
    for fraction in (0.1, 0.25, 0.5, 0.9):
        theta = threshold_for_fraction(gaps, fraction)
        assert split_by_gap(gaps, theta).sum() == round(fraction * 1000)
    assert split_by_gap(gaps, threshold_for_fraction(gaps, 0.0)).sum() == 0
    assert split_by_gap(gaps, threshold_for_fraction(gaps, 1.0)).sum() == 1000
    # by hand: gaps 4,3,2,1 and half easy -> cut half-way between 3 and 2
    assert threshold_for_fraction([1.0, 4.0, 2.0, 3.0], 0.5) == 2.5


def test_balanced_threshold_is_the_median():
    assert balanced_threshold([5.0, 1.0, 3.0]) == 3.0
    assert balanced_threshold([1.0, 2.0, 3.0, 4.0]) == 2.5
    gaps = np.arange(10.0)
    assert split_by_gap(gaps, balanced_threshold(gaps)).sum() == 5


def test_accuracy_by_gap_bucket_by_hand():
    gaps = [0.2, 0.7, 1.5, 1.9, 2.5, 9.0, 3.0]
    agrees = [True, False, True, True, False, True, True]
    buckets = accuracy_by_gap_bucket(gaps, agrees, [0, 1, 2, 3])
    assert [(b["low"], b["high"], b["count"]) for b in buckets] == [
        (0.0, 1.0, 2), (1.0, 2.0, 2), (2.0, 3.0, 1), (3.0, None, 2)]
    assert [b["accuracy"] for b in buckets] == [0.5, 1.0, 0.0, 1.0]
    assert accuracy_by_gap_bucket([0.5], [True], [0, 1])[1] == {"low": 1.0, "high": None, "count": 0,
                                                                "accuracy": None}


def test_orient_record_label_policies():
    raw = {"index": 7, "prompt": "P", "responses": ["A", "B"], "rewards": [0.5, 2.0], "human_preferred": 0}
    rm = orient_record(raw, "reward_model")
    assert (rm["chosen"], rm["rejected"], rm["chosen_reward"], rm["rejected_reward"]) == ("B", "A", 2.0, 0.5)
    assert rm["gap"] == 1.5 and rm["human_label"] == 0 and rm["prompt_index"] == 7
    human = orient_record(raw, "human")
    assert (human["chosen"], human["human_label"], human["gap"]) == ("A", 1, 1.5)
    assert human["chosen_reward"] < human["rejected_reward"]  # the RM disagrees; the human label is kept
    assert orient_record(raw, "drop_disagreements") is None
    agree = dict(raw, rewards=[3.0, 1.0])
    assert orient_record(agree, "drop_disagreements")["chosen"] == "A"
    sampled = {"index": 0, "prompt": "P", "responses": ["A", "B"], "rewards": [1.0, 0.0]}
    assert "human_label" not in orient_record(sampled, "reward_model")
    with pytest.raises(UserError, match="human labels"):
        orient_record(sampled, "human")


def test_shards_batches_and_seeds_are_rank_independent():
    assert [list(r) for r in shard_ranges(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    pending = [0, 2, 3, 5, 6]
    assert assign_shards(pending, 0, 2) == [0, 3, 6] and assign_shards(pending, 1, 2) == [2, 5]
    assert sorted(sum((assign_shards(pending, r, 3) for r in range(3)), [])) == pending
    assert length_sorted_batches([4, 5, 6, 7], {4: 3, 5: 9, 6: 3, 7: 1}, 2) == [[5, 4], [6, 7]]
    assert derive_seed(1234, 5) == derive_seed(1234, 5) != derive_seed(1234, 6)
    assert 0 <= derive_seed(1, 2) < 2**31


def test_split_warnings_flag_tiny_and_empty_splits():
    assert split_warnings(50, 50, 1.0, 1.0) == []
    empty = split_warnings(0, 100, 5.0, 0.8)
    assert len(empty) == 1 and "easy split is EMPTY" in empty[0] and "--threshold 0.8" in empty[0]
    assert "hard split has only 4" in split_warnings(96, 4, 0.1, 1.2)[0]  # < 5%
    assert len(split_warnings(7, 13, 1.0, 1.0)) == 1  # < 8 pairs although 35%


def test_threshold_and_easy_fraction_are_exclusive(capsys):
    base = ["--reward_model_name_or_path", "rm", "--sft_model_name_or_path", "sft", "--output_dir", "o"]
    with pytest.raises(UserError, match="exclusive"):
        selection.parse_args([*base, "--threshold", "1", "--easy_fraction", "0.5"])
    with pytest.raises(UserError, match="human label"):
        selection.parse_args([*base, "--label_policy", "human"])
    settings = selection.parse_args(base)
    assert settings.threshold is None  # the flag as given; the split derived from it holds the default theta
    assert settings.split.threshold == 1.0
    with pytest.raises(UserError, match="--gap_bucket_edges 0,x"):
        selection.parse_args([*base, "--gap_bucket_edges", "0,x"])
    assert selection.parse_args([*base, "--gap_bucket_edges", "2,0"]).split.gap_edges == (0.0, 2.0)


def test_recorded_sampling_settings_are_the_sampling_flags():
    """The manifest and the shard fingerprint record every flag of the parser's "sampling" group (a new
    sampling flag cannot be silently left out of what a run records)."""
    import dataclasses

    base = ["--reward_model_name_or_path", "rm", "--sft_model_name_or_path", "sft", "--output_dir", "o",
            "--temperature", "0.7", "--num_samples", "3"]
    settings = selection.parse_args(base)
    group, = [g for g in selection.build_parser()._action_groups if g.title == "sampling"]
    flags_in_group = {action.dest for action in group._group_actions}
    assert flags_in_group == {f.name for f in dataclasses.fields(selection.AnswerSamplingSettings)}
    recorded = settings.sampling_record()
    assert recorded["temperature"] == 0.7 and recorded["num_samples"] == 3
    assert recorded == {name: getattr(settings, name) for name in flags_in_group}


def test_shards_of_a_different_run_are_refused_unless_rebuilt(tmp_path):
    selection.prepare_shard_dir(tmp_path, {"seed": 1}, rebuild=False)
    selection.shard_path(tmp_path, 0).write_text("{}\n")
    selection.prepare_shard_dir(tmp_path, {"seed": 1}, rebuild=False)  # same settings: shards kept
    assert selection.shard_path(tmp_path, 0).exists()
    with pytest.raises(UserError, match="different settings \\(seed\\).*--rebuild_shards"):
        selection.prepare_shard_dir(tmp_path, {"seed": 2}, rebuild=False)
    selection.prepare_shard_dir(tmp_path, {"seed": 2}, rebuild=True)
    assert not selection.shard_path(tmp_path, 0).exists()
    assert json.loads((tmp_path / "shards" / "config.json").read_text()) == {"seed": 2}


def _raw_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"index": i, "prompt": f"P{i}", "responses": [f"a{i}", f"b{i}"],
             "rewards": [float(rng.normal()), float(rng.normal() * 2)], "human_preferred": int(rng.integers(2))}
            for i in range(n)]


def _split_args(**overrides) -> selection.SelectionSettings:
    base = dict(threshold=None, easy_fraction=None, label_policy="reward_model", pair_source="dataset",
                gap_bucket_edges="0,1,2,3", sft_model_name_or_path=None, reward_model_name_or_path="rm",
                seed=1, max_prompt_seq_len=8, max_answer_seq_len=8, temperature=1.0, top_p=1.0, top_k=0,
                num_samples=2, per_device_generation_batch_size=2, output_dir="unused")
    base.update(overrides)
    return selection.SelectionSettings.from_mapping(base)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_write_split_outputs_threshold_split_invariants(tmp_path):
    raw = _raw_records(200)
    manifest = selection.write_split_outputs(_split_args(threshold=1.0), raw, tmp_path, {"extra": 1})
    easy, hard = _read_jsonl(tmp_path / "easy.jsonl"), _read_jsonl(tmp_path / "hard.jsonl")
    assert all(r["gap"] > 1.0 for r in easy) and all(r["gap"] <= 1.0 for r in hard)
    assert all(r["chosen_reward"] >= r["rejected_reward"] for r in easy + hard)
    assert all(math.isclose(r["gap"], r["chosen_reward"] - r["rejected_reward"]) for r in easy + hard)
    counts = manifest["counts"]
    assert counts["easy"] == len(easy) and counts["hard"] == len(hard)
    assert counts["easy"] + counts["hard"] + counts["dropped"] == counts["prompts"] == 200
    assert math.isclose(manifest["fractions"]["easy"] + manifest["fractions"]["hard"], 1.0)
    assert manifest["threshold"] == 1.0 and manifest["extra"] == 1
    accuracy = json.loads((tmp_path / "accuracy_by_gap.json").read_text())
    assert sum(b["count"] for b in accuracy["buckets"]) == 200
    for name in ("reward_gap_hist.png", "accuracy_by_gap.png", "manifest.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_write_split_outputs_quantile_mode_and_dropping(tmp_path):
    raw = _raw_records(300, seed=3)
    manifest = selection.write_split_outputs(_split_args(easy_fraction=0.3, label_policy="drop_disagreements"),
                                             raw, tmp_path, {})
    counts = manifest["counts"]
    assert counts["dropped"] > 0 and counts["pairs"] == 300 - counts["dropped"]
    assert counts["easy"] == round(0.3 * counts["pairs"])
    assert manifest["split_mode"] == "easy_fraction" and manifest["easy_fraction_requested"] == 0.3
    easy = _read_jsonl(tmp_path / "easy.jsonl")
    assert all(r["human_label"] == 1 and r["chosen_reward"] >= r["rejected_reward"] for r in easy)
    assert all(r["gap"] > manifest["threshold"] for r in easy)


def test_write_split_outputs_warns_on_an_empty_split(tmp_path, capsys):
    manifest = selection.write_split_outputs(_split_args(threshold=100.0), _raw_records(50), tmp_path, {})
    assert manifest["counts"]["easy"] == 0 and (tmp_path / "easy.jsonl").read_text() == ""
    assert any("easy split is EMPTY" in w for w in manifest["warnings"])
    assert "warning: the easy split is EMPTY" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def select_assets(tmp_path_factory, tinystories_dir):
    """A reward model built from the tiny Llama (random value head) and 40 synthetic prompt/pair records."""
    import torch
    from transformers import AutoModel

    from dschat.utils.model.reward_model import RewardModel
    from dschat.utils.utils import load_hf_tokenizer, save_reward_model
    from mpo_ext import synthetic

    root = tmp_path_factory.mktemp("select_assets")
    tokenizer = load_hf_tokenizer(str(tinystories_dir))
    reward = RewardModel(AutoModel.from_pretrained(str(tinystories_dir)), tokenizer)
    torch.manual_seed(0)
    torch.nn.init.normal_(reward.v_head.weight, std=0.5)
    save_reward_model(reward, tokenizer, root / "rm")
    records = synthetic.generate_records(40, "train", seed=7)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return {"rm": root / "rm", "data": root / "pairs.jsonl", "root": root}


def _select_args(assets, tinystories_dir, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(assets["data"]), "--sft_model_name_or_path", str(tinystories_dir),
            "--reward_model_name_or_path", str(assets["rm"]), "--num_padding_at_beginning", "0",
            "--max_prompt_seq_len", "64", "--max_answer_seq_len", "12", "--per_device_generation_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--shard_size", "8", "--threshold", "2.0",
            "--data_output_path", str(assets["root"] / "cache"), "--output_dir", str(out), *extra]


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _shard_stats(out: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes())
            for p in sorted((out / "shards").glob("shard-*.jsonl"))}


@pytest.mark.slow
def test_two_ranks_equal_one_killed_and_resumed_rank(select_assets, tinystories_dir, run_ds, tmp_path):
    two = tmp_path / "two_ranks"
    _check(run_ds(SELECT, _select_args(select_assets, tinystories_dir, two), num_ranks=2, env=QUIET))
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["data"]["prompt_too_long"] == 0
    assert manifest["counts"]["prompts"] == 40  # every record: a local file without eval split, as step 3 reads it
    assert manifest["shards"]["count"] == 5
    easy, hard = _read_jsonl(two / "easy.jsonl"), _read_jsonl(two / "hard.jsonl")
    assert len(easy) + len(hard) == 40 and easy and hard
    assert all(r["gap"] > 2.0 for r in easy) and all(r["gap"] <= 2.0 for r in hard)
    assert all(r["chosen_reward"] >= r["rejected_reward"] for r in easy + hard)
    assert (two / "reward_gap_hist.png").stat().st_size > 0

    one = tmp_path / "one_rank"
    killed = run_ds(SELECT, _select_args(select_assets, tinystories_dir, one), num_ranks=0,
                    env={**QUIET, "DSCHAT_KILL_AT": "after_shard:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _shard_stats(one)
    assert len(before) == 2 and not (one / "manifest.json").exists()

    resumed = run_ds(SELECT, _select_args(select_assets, tinystories_dir, one), num_ranks=0, env=QUIET)
    _check(resumed)
    assert "2 already done, 3 to do" in resumed.stdout
    after = _shard_stats(one)
    assert all(after[name] == stats for name, stats in before.items())  # finished shards untouched
    assert {n: s[2] for n, s in after.items()} == {n: s[2] for n, s in _shard_stats(two).items()}
    assert (one / "easy.jsonl").read_bytes() == (two / "easy.jsonl").read_bytes()
    assert (one / "hard.jsonl").read_bytes() == (two / "hard.jsonl").read_bytes()


@pytest.mark.slow
def test_dataset_pairs_with_human_labels(select_assets, tinystories_dir, run_ds, tmp_path):
    out = tmp_path / "dataset"
    args = _select_args(select_assets, tinystories_dir, out)
    args[args.index("--threshold"):args.index("--threshold") + 2] = ["--easy_fraction", "0.25"]
    proc = run_ds(SELECT, [*args, "--pair_source", "dataset", "--label_policy", "drop_disagreements",
                           "--max_answer_seq_len", "32"], num_ranks=0, env=QUIET)
    _check(proc)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["prompts"] == 40 and counts["easy"] + counts["hard"] + counts["dropped"] == 40
    assert counts["easy"] == round(0.25 * counts["pairs"])
    accuracy = json.loads((out / "accuracy_by_gap.json").read_text())
    assert sum(b["count"] for b in accuracy["buckets"]) == 40
    assert math.isclose(manifest["rm_accuracy_vs_human"], accuracy["overall_accuracy"])
    assert counts["dropped"] == round((1 - accuracy["overall_accuracy"]) * 40)  # no exact ties here
    assert (out / "accuracy_by_gap.png").stat().st_size > 0
    records = _read_jsonl(out / "easy.jsonl") + _read_jsonl(out / "hard.jsonl")
    assert all(r["human_label"] == 1 for r in records)
