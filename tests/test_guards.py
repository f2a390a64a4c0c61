"""Over-optimisation guards: health signals against hand-computed values, the monitor's warnings, keep-best
bookkeeping, and real tiny PPO and DPO runs that trip the guards (and a healthy one that does not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dschat.rlhf.health import (
    COLLAPSE_EXIT_CODE,
    HealthMonitor,
    HealthThresholds,
    KeepBest,
    answer_token_lists,
    distinct_n,
    generation_health,
    is_degenerate,
    load_gold_reward,
    mean_gold,
    mean_token_entropy,
    repeat_share,
    repeated_ngrams,
    truncated_share,
)
from dschat.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PPO_MAIN = REPO / "training" / "step3_rlhf_finetuning" / "main.py"
DPO_MAIN = REPO / "step3b_dpo" / "main.py"
QUIET = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WARNING = "HEALTH WARNING"

# --------------------------------------------------------------------------------------------- pure signals


def test_answer_token_lists_cut_at_the_first_pad():
    seq = torch.tensor([[9, 9, 1, 2, 0, 0], [9, 8, 3, 0, 4, 0], [9, 9, 0, 0, 0, 0]])
    assert answer_token_lists(seq, 2, 0) == [[1, 2], [3], []]


def test_distinct_n_by_hand():
    answers = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(answers, 1) == pytest.approx(4 / 6)   # {1,2,3,4} of 6 tokens
    assert distinct_n(answers, 2) == pytest.approx(3 / 4)   # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[7, 7, 7, 7]], 1) == pytest.approx(1 / 4)
    assert distinct_n([[1], []], 2) == 0.0                  # no bigram at all


def test_repeat_share_and_degenerate_by_hand():
    # bigrams (5,6) (6,5) (5,6) (6,5) (5,6): the last three repeat earlier ones
    assert repeated_ngrams([5, 6, 5, 6, 5, 6], 2) == (3, 5)
    assert repeat_share([[5, 6, 5, 6, 5, 6]]) == pytest.approx(3 / 5)
    assert repeat_share([[1, 2, 3]]) == 0.0
    assert repeat_share([[5, 6, 5, 6, 5, 6], [1, 2, 3]]) == pytest.approx(3 / 7)  # pooled over answers
    # " apple, banana, cherry." has no repeated bigram although the comma repeats
    apple, comma, banana, cherry, period = 11, 12, 13, 14, 15
    assert repeat_share([[apple, comma, banana, comma, cherry, period]]) == 0.0
    assert is_degenerate([]) and is_degenerate([7, 7, 7, 7])   # (7,7) x3: 2 of 3 repeat
    assert is_degenerate([apple, comma] * 3)                   # "apple, apple, apple,": 3 of 5
    assert not is_degenerate([1, 2, 3, 4]) and not is_degenerate([1])


def test_truncated_share_entropy_and_batch_summary_by_hand():
    assert truncated_share(torch.tensor([12, 3, 12, 5]), 12) == 0.5
    assert truncated_share(torch.tensor([], dtype=torch.long), 12) == 0.0
    entropy = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_token_entropy(entropy, mask) == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    summary = generation_health([[1, 2, 3], [7, 7, 7, 7], []], max_new_tokens=4)
    assert summary["health/degenerate_share"] == pytest.approx(2 / 3)
    assert summary["health/truncated_share"] == pytest.approx(1 / 3)
    assert summary["health/distinct_1"] == pytest.approx(4 / 7)
    assert summary["health/repeat_share"] == pytest.approx(2 / 5)  # 0 of 2 and 2 of 3 bigrams


# --------------------------------------------------------------------------------------------- monitor


def test_monitor_warns_once_per_crossing_and_names_the_signal_and_step():
    monitor = HealthMonitor("step3", HealthThresholds(min_entropy_ratio=0.2, max_kl=25.0, max_degenerate_share=0.5))
    assert monitor.observe(1, {"health/entropy": 2.0, "objective/kl": 1.0, "health/degenerate_share": 0.0}) == []
    new = monitor.observe(2, {"health/entropy": 0.3, "objective/kl": 30.0, "health/degenerate_share": 0.75})
    assert sorted(w.signal for w in new) == ["health/degenerate_share", "health/entropy", "objective/kl"]
    line = monitor.format(next(w for w in new if w.signal == "health/entropy"))
    assert line.startswith("HEALTH WARNING [step3] step 2: health/entropy: entropy collapse")
    assert next(w for w in new if w.signal == "health/entropy").threshold == pytest.approx(0.4)  # 0.2 x 2.0
    assert monitor.observe(3, {"health/entropy": 0.3}) == []          # still collapsed: no second line
    assert monitor.observe(5, {"health/entropy": 1.0}) == []          # recovered
    again = monitor.observe(6, {"health/entropy": 0.1})
    assert [w.step for w in again] == [6]
    summary = monitor.summary()
    assert summary["status"] == "unhealthy" and summary["active"] == ["health/entropy"]
    assert summary["baseline"]["health/entropy"] == 2.0
    assert [w["step"] for w in summary["warnings"] if w["signal"] == "health/entropy"] == [2, 6]
    # a check set to 0 is off
    off = HealthMonitor("x", HealthThresholds(min_entropy_ratio=0, max_kl=0, max_degenerate_share=0))
    off.observe(1, {"health/entropy": 2.0})
    assert off.observe(2, {"health/entropy": 0.0, "objective/kl": 1e9, "health/degenerate_share": 1.0}) == []


def test_monitor_likelihood_displacement_needs_both_log_probs_falling():
    monitor = HealthMonitor("dpo", HealthThresholds(max_logp_drop=1.0))
    first = {"health/logps_chosen_per_token": -2.0, "health/logps_rejected_per_token": -3.0}
    assert monitor.observe(0, first) == []
    # the rejected answer falling alone is what DPO should do
    assert monitor.observe(1, {"health/logps_chosen_per_token": -2.2, "health/logps_rejected_per_token": -6.0}) == []
    new = monitor.observe(2, {"health/logps_chosen_per_token": -3.5, "health/logps_rejected_per_token": -4.5})
    assert [w.signal for w in new] == ["health/logps_chosen_per_token"]
    assert "likelihood displacement" in new[0].message and "1.5" in new[0].message


def test_keep_best_keeps_the_first_of_equal_scores_and_ignores_nan():
    best = KeepBest("eval/reward")
    assert best.consider(0, {"eval/reward": 1.0})
    assert not best.consider(2, {"eval/reward": 0.5})
    assert not best.consider(4, {"eval/reward": 1.0})
    assert not best.consider(5, {"eval/reward": math.nan})
    assert best.consider(6, {"eval/reward": 2.0, "eval/gold": -1.0})
    record = best.record(8, "best")
    assert record["best_step"] == 6 and record["best_score"] == 2.0 and len(record["evals"]) == 5
    assert "step 6" in record["reason"]
    restored = KeepBest("eval/reward")
    restored.load_state_dict(json.loads(json.dumps(best.state_dict())))
    assert restored.best_step == 6 and not restored.consider(10, {"eval/reward": 1.5})


def test_gold_reward_is_loaded_by_name():
    from mpo_ext import synthetic

    gold = load_gold_reward("mpo_ext.synthetic:gold_reward")
    assert gold is synthetic.gold_reward
    prompt = synthetic.format_prompt("Name two fruits.")
    assert mean_gold(gold, [prompt, "not a prompt"], [" apple, banana.", "x"]) == pytest.approx(2.5)
    for bad in ("mpo_ext.synthetic", "no_such_module_xyz:f", "mpo_ext.synthetic:nope", "mpo_ext.synthetic:CATEGORIES"):
        with pytest.raises(UserError, match="--gold_reward"):
            load_gold_reward(bad)
