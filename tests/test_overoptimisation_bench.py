"""benchmarks/overoptimisation.py's analysis on hand-made evaluation series (the benchmark itself is not run
in the suite: `python benchmarks/overoptimisation.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from overoptimisation import analyse, first_gap_warning, first_widening  # noqa: E402


def _evals(gold, gaps, rewards=None):
    rewards = rewards or [1.0 + 0.1 * i for i in range(len(gold))]
    return [{"step": 10 * i, "eval/gold": g, "eval/reward_gap": d, "eval/reward": r, "eval/reward_heldout": 0.0,
             "eval/reward_z": d, "eval/reward_heldout_z": 0.0} for i, (g, d, r) in enumerate(zip(gold, gaps, rewards))]


def test_analysis_by_hand():
    # gold peaks at step 20 (3.0) and ends at 1.0: drop 2.0, half-drop level 2.0, first reached at step 40
    evals = _evals(gold=[2.0, 2.5, 3.0, 2.6, 1.9, 1.0], gaps=[0.0, 0.1, 0.2, 0.7, 0.8, 0.9])
    # widened gaps 0, .1, .2, .7, .8, .9: above 0.5 at steps 30 and 40 -> the default rule warns at 40
    assert first_widening([e["step"] for e in evals], [e["eval/reward_gap"] for e in evals], 0.5, 2) == 40
    result = analyse(evals, warning_step=30)
    assert result["gold_peak"] == 3.0 and result["gold_peak_step"] == 20 and result["gold_drop"] == pytest.approx(2.0)
    assert result["half_drop_step"] == 40 and result["gold_at_warning"] == 2.6
    assert result["share_of_drop_at_warning"] == pytest.approx(0.2) and result["flagged_in_time"]
    assert result["over_optimised"] and result["sensitivity"]["0.5/2"] == 40 and result["sensitivity"]["0.5/1"] == 30
    late = analyse(evals, warning_step=40)
    assert not late["flagged_in_time"] and late["share_of_drop_at_warning"] == pytest.approx(0.55)
    assert not analyse(evals, warning_step=None)["flagged_in_time"]
    # a run whose gold never falls: nothing to be in time for, a warning is early by definition
    rising = analyse(_evals(gold=[1.0, 2.0, 3.0], gaps=[0.0, 0.6, 0.7]), warning_step=20)
    assert rising["gold_drop"] == 0 and rising["half_drop_step"] is None and not rising["over_optimised"]
    assert first_gap_warning({"warnings": [{"signal": "objective/kl", "step": 5},
                                           {"signal": "eval/reward_gap", "step": 30},
                                           {"signal": "eval/reward_gap", "step": 90}]}) == 30


def test_result_names_and_bad_arms():
    from overoptimisation import parse_args

    from dschat.utils.errors import UserError

    assert parse_args([]).stem == "overoptimisation" and parse_args(["--quick"]).stem == "overoptimisation_quick"
    assert parse_args(["--task", "mpo-sort"]).stem == "overoptimisation_sort"
    assert parse_args(["--arms", "dschat, kl_budget"]).arms == ["dschat", "kl_budget"]
    with pytest.raises(UserError, match="--arms nope"):
        parse_args(["--arms", "dschat,nope"])
