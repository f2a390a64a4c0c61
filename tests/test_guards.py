"""Over-optimisation guards: health signals against hand-computed values, the monitor's warnings, keep-best
bookkeeping, and real tiny PPO and DPO runs that trip the guards (and a healthy one that does not)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_random_critic

from dschat.rlhf.health import (
    COLLAPSE_EXIT_CODE,
    HealthMonitor,
    HealthThresholds,
    KeepBest,
    RewardGap,
    cycle_period,
    degenerate_share,
    distinct_n,
    generation_health,
    identical_share,
    is_degenerate,
    load_gold_reward,
    mean_and_std,
    mean_gold,
    repeat_share,
    repeated_ngrams,
    reward_gap_widened,
    standardised,
    truncated_share,
    widened_gaps,
)
from dschat.utils.checkpoint import find_latest_state
from dschat.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PPO_MAIN = REPO / "training" / "step3_rlhf_finetuning" / "main.py"
DPO_MAIN = REPO / "step3b_dpo" / "main.py"
QUIET = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WARNING = "HEALTH WARNING"

# --------------------------------------------------------------------------------------------- pure signals


def test_answer_token_lists_cut_at_the_first_eos_after_the_prompt():
    from dschat.rlhf.generation import answer_token_lists

    # eos 0; the second prompt holds an eos (a chat turn end): content, not the end of the answer
    seq = torch.tensor([[9, 9, 1, 2, 0, 0], [0, 8, 3, 0, 4, 0], [9, 9, 0, 0, 0, 0], [9, 9, 5, 6, 7, 8]])
    assert answer_token_lists(seq, 2, 0) == [[1, 2], [3], [], [5, 6, 7, 8]]


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


def test_cycle_period_by_hand():
    assert cycle_period([7, 7, 7]) == 1
    assert cycle_period([1, 2, 1, 2, 1]) == 2            # a cut last repetition still has period 2
    assert cycle_period([1, 2, 3, 1, 2, 3, 1]) == 3
    assert cycle_period([1, 2, 3, 4, 5]) is None          # no period of at most 4 items
    assert cycle_period([1, 2, 3, 4, 5], max_period=5) == 5  # a sequence is trivially its own period
    assert cycle_period([1, 2, 2]) == 3 and cycle_period([]) is None


def test_one_repeated_token_or_a_tiny_cycle_is_degenerate():
    """The PPO collapse of the issue: ",,,,,,,,,,,," to every prompt. Each form it can take in tokens counts."""
    comma, apple, banana, cherry, period, yes = 12, 11, 13, 14, 15, 16
    assert is_degenerate([comma] * 12)                       # one token, repeated
    assert is_degenerate([comma] * 3)                        # three times is enough
    assert not is_degenerate([comma] * 2)                    # twice is not (e.g. "no no")
    assert is_degenerate([apple, comma] * 3)                 # a cycle of two, three times
    assert is_degenerate([1, 2, 3] * 3) and not is_degenerate([1, 2, 3] * 2)
    assert is_degenerate([1, 2, 3, 4] * 3)                   # a cycle of four
    assert not is_degenerate([1, 2, 3, 4, 5] * 2)            # five is no longer "tiny" (and 4 of 9 bigrams repeat)
    # a merged run: the tokenizer made ",,,,,,,,,,,," one token, or a few; the text shows the cycle
    assert is_degenerate([99], text=",,,,,,,,,,,,") and is_degenerate([98, 97], text=" ,,,, ,,,,,,,,")
    assert is_degenerate([96], text="hahaha") and not is_degenerate([96], text="haha")
    assert is_degenerate([95], text="   ")                    # only whitespace is empty
    # real answers are not
    assert not is_degenerate([apple, comma, banana, comma, cherry, period], text="apple, banana, cherry.")
    assert not is_degenerate([yes], text="Yes.") and not is_degenerate([1], text="1000")
    assert not is_degenerate([1, 2, 1, 3, 1, 4], text="a b a c a d")
    assert degenerate_share([[comma] * 5, [1, 2, 3], [99]], [",,,,,", "a b c", ",,,,,,,,"]) == pytest.approx(2 / 3)
    assert degenerate_share([]) == 0.0


def test_truncated_share_and_batch_summary_by_hand():
    assert truncated_share(torch.tensor([12, 3, 12, 5]), 12) == 0.5
    assert truncated_share(torch.tensor([], dtype=torch.long), 12) == 0.0
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
    # a signal is judged only on the calls that carry it: KL and degeneracy were last measured bad at step 2
    assert summary["status"] == "unhealthy"
    assert summary["active"] == ["health/degenerate_share", "health/entropy", "objective/kl"]
    assert summary["baseline"]["health/entropy"] == 2.0
    assert [w["step"] for w in summary["warnings"] if w["signal"] == "health/entropy"] == [2, 6]
    # a check set to 0 is off
    off = HealthMonitor("x", HealthThresholds(min_entropy_ratio=0, max_kl=0, max_degenerate_share=0))
    off.observe(1, {"health/entropy": 2.0})
    assert off.observe(2, {"health/entropy": 0.0, "objective/kl": 1e9, "health/degenerate_share": 1.0}) == []


def test_monitor_state_survives_a_resume():
    """A resumed run's health.json keeps the warnings, checks and active signals of the run before it."""
    monitor = HealthMonitor("step3", HealthThresholds(min_entropy_ratio=0.2, max_kl=25.0))
    monitor.observe(1, {"health/entropy": 2.0, "objective/kl": 1.0})
    monitor.observe(2, {"health/entropy": 0.3, "objective/kl": 1.0})
    saved = json.loads(json.dumps(monitor.state_dict()))  # as a training state stores it
    resumed = HealthMonitor("step3", HealthThresholds(min_entropy_ratio=0.2, max_kl=25.0))
    resumed.load_state_dict(saved)
    assert resumed.summary() == monitor.summary()
    assert resumed.observe(3, {"health/entropy": 0.3}) == []  # still the same crossing: no second warning
    old = HealthMonitor("step3", HealthThresholds())
    old.load_state_dict({"baseline": {"health/entropy": 2.0}})  # a state saved before warnings were kept
    assert old.summary()["baseline"] == {"health/entropy": 2.0} and old.summary()["checks"] == 0


def test_monitor_likelihood_displacement_needs_both_log_probs_falling():
    monitor = HealthMonitor("dpo", HealthThresholds(max_logp_drop=1.0))
    first = {"health/logps_chosen_per_token": -2.0, "health/logps_rejected_per_token": -3.0}
    assert monitor.observe(0, first) == []
    # the rejected answer falling alone is what DPO should do
    assert monitor.observe(1, {"health/logps_chosen_per_token": -2.2, "health/logps_rejected_per_token": -6.0}) == []
    new = monitor.observe(2, {"health/logps_chosen_per_token": -3.5, "health/logps_rejected_per_token": -4.5})
    assert [w.signal for w in new] == ["health/logps_chosen_per_token"]
    assert "likelihood displacement" in new[0].message and "1.5" in new[0].message


def rm_eval(accuracy: float, margin: float, identical: float = 0.0) -> dict[str, float]:
    return {"health/reward_accuracy": accuracy, "health/reward_margin": margin,
            "health/reward_identical_share": identical}


def test_reward_model_at_chance_is_judged_after_the_first_evaluation():
    def monitor():
        return HealthMonitor("step2_model", HealthThresholds(min_entropy_ratio=0, max_kl=0, max_degenerate_share=0,
                                                             max_logp_drop=0, rm_min_accuracy=0.55,
                                                             rm_max_identical_share=0.5))

    untrained = monitor()  # learning rate 0: every evaluation repeats the first, whatever it happens to be
    assert untrained.observe(0, rm_eval(0.62, 0.03)) == []  # before training: the baseline, not judged
    new = untrained.observe(10, rm_eval(0.62, 0.03))
    assert [w.signal for w in new] == ["reward_at_chance"] and "no better than before training" in new[0].message
    assert untrained.summary()["status"] == "unhealthy" and untrained.summary()["active"] == ["reward_at_chance"]
    coin = monitor()
    coin.observe(0, rm_eval(0.40, -0.1))
    assert [w.signal for w in coin.observe(5, rm_eval(0.52, 0.2))] == ["reward_at_chance"]  # a coin, even if better
    trained = monitor()
    trained.observe(0, rm_eval(0.50, 0.0))
    assert trained.observe(5, rm_eval(0.58, 0.1)) == [] and trained.observe(9, rm_eval(0.8, 0.9)) == []
    assert trained.summary()["status"] == "ok"
    # The SmolLM2 failure: the score read at a token the two answers share is the same for both, at once.
    reading = monitor()
    new = reading.observe(0, rm_eval(0.0, 0.0, identical=1.0))
    assert [w.signal for w in new] == ["reward_identical"] and "same score in 100%" in new[0].message
    # off when set to 0; policy stages never see these signals
    off = HealthMonitor("x", HealthThresholds())
    off.observe(0, rm_eval(0.5, 0.0, 1.0))
    assert off.observe(1, rm_eval(0.5, 0.0, 1.0)) == []


def test_identical_share_by_hand():
    chosen = torch.tensor([1.0, 2.0, -3.0, 1e6])
    rejected = torch.tensor([1.0, 2.5, -3.0, 1e6 + 1.0])  # equal, different, equal, equal up to rounding
    assert identical_share(chosen, rejected).item() == pytest.approx(0.75)


def test_reward_gap_rule_by_hand():
    # running narrowest gap: 0, -0.2, -0.2, -0.2, -0.2 -> widened 0, 0, 0.3, 0.7, 0.6
    gaps = [0.0, -0.2, 0.1, 0.5, 0.4]
    assert widened_gaps(gaps) == pytest.approx([0.0, 0.0, 0.3, 0.7, 0.6])
    assert reward_gap_widened(gaps, 0.5, 2)                  # 0.7 and 0.6 both above 0.5
    assert not reward_gap_widened(gaps[:4], 0.5, 2)          # 0.3, 0.7: only the last one
    assert reward_gap_widened(gaps[:4], 0.5, 1)
    assert not reward_gap_widened(gaps, 0.7, 1)              # 0.6 is not above 0.7
    assert not reward_gap_widened(gaps, 0, 1)                # 0: the check is off
    assert not reward_gap_widened([0.9], 0.5, 2)             # fewer evaluations than the patience
    # a held-out reward that first rises faster (negative gap) does not hide a later divergence
    assert reward_gap_widened([0.0, -1.0, -0.4, -0.3], 0.5, 2)
    # standardised by the first evaluation: train scores 1, 3 (mean 2, sd 1.414), held-out 0, 2 (mean 1)
    gap = RewardGap()
    first = gap.metrics([1.0, 3.0], [0.0, 2.0])
    assert first == pytest.approx({"eval/reward_z": 0.0, "eval/reward_heldout_z": 0.0, "eval/reward_gap": 0.0})
    later = gap.metrics([3.0, 5.0], [1.0, 1.0])              # train mean 4: +2/1.414; held-out mean 1: 0
    assert later["eval/reward_z"] == pytest.approx(2 / math.sqrt(2))
    assert later["eval/reward_heldout_z"] == pytest.approx(0.0)
    assert later["eval/reward_gap"] == pytest.approx(math.sqrt(2))
    assert standardised(3.0, 1.0, 0.0) == 2.0                # a first spread of ~0 counts as 1
    assert mean_and_std([2.0]) == (2.0, 0.0)


def test_monitor_warns_on_a_widening_reward_gap_and_keeps_other_signals():
    monitor = HealthMonitor("step3", HealthThresholds(max_reward_gap=0.5, reward_gap_patience=2, max_kl=25.0))
    assert monitor.observe(1, {"objective/kl": 30.0}) != []          # a rollout signal first
    for step, gap in ((0, 0.0), (5, 0.3), (10, 0.7)):
        assert monitor.observe(step, {"eval/reward_gap": gap}) == []
    new = monitor.observe(15, {"eval/reward_gap": 0.8})              # 0.7 and 0.8 above the narrowest 0 by > 0.5
    assert [w.signal for w in new] == ["eval/reward_gap"] and new[0].step == 15
    assert "over-optimisation" in new[0].message and "0.8" in new[0].message
    summary = monitor.summary()
    assert summary["active"] == ["eval/reward_gap", "objective/kl"]  # judged on different calls, both kept
    assert summary["reward_gaps"] == [[0, 0.0], [5, 0.3], [10, 0.7], [15, 0.8]]
    assert monitor.observe(16, {"objective/kl": 1.0}) == []          # KL recovers; the gap stays flagged
    assert monitor.summary()["active"] == ["eval/reward_gap"]
    restored = HealthMonitor("step3", HealthThresholds(max_reward_gap=0.5, reward_gap_patience=2))
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    # a resumed run carries on: the gap series and the warning already given (not repeated while it lasts)
    assert restored.summary()["reward_gaps"] == summary["reward_gaps"]
    assert restored.observe(20, {"eval/reward_gap": 0.9}) == [] and restored.summary()["active"] == ["eval/reward_gap"]


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


# --------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory, tinystories_dir, tiny_tokenizer) -> dict[str, Path]:
    """A step-2 style critic/reward model (random value head) and 32 prompts, as in tests/test_step3.py."""
    root = tmp_path_factory.mktemp("guards_ppo")
    save_random_critic(tinystories_dir, tiny_tokenizer, root / "critic")
    questions = ["Where did the cat go?", "What is the sky like?", "Tell me about a dog.", "Who is Lily?",
                 "What did Tom eat?", "Why is the sun hot?", "Can you sing a song?", "How big is the tree?"]
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for q in questions * 4:
            fh.write(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:"}) + "\n")
    return {"root": root, "critic": root / "critic", "prompts": root / "prompts.jsonl", "actor": tinystories_dir}


def _ppo_argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--actor_model_name_or_path", str(setup["actor"]), "--critic_model_name_or_path", str(setup["critic"]),
            "--data_path", str(setup["prompts"]), "--data_output_path", str(setup["root"] / "cache"),
            "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
            "--max_prompt_seq_len", "48", "--max_answer_seq_len", "12", "--num_padding_at_beginning", "0",
            "--critic_learning_rate", "1e-3", "--num_warmup_steps", "0", "--seed", "1", "--do_sample",
            "--output_dir", str(out), *extra]


def _records(out: Path, phase: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["phase"] == phase]


def _best_healthy(evals: list[dict], metric: str, health: dict) -> int:
    """The step keep-best must keep: highest `metric`, earliest on ties, skipping flagged steps."""
    flagged = {w["step"] for w in health["warnings"]}
    candidates = [e for e in evals if e["step"] not in flagged]
    top = max(e[metric] for e in candidates)
    return min(e["step"] for e in candidates if e[metric] == top)


def _assert_stopped(proc, out: Path, stage: str) -> dict:
    log = proc.stdout + proc.stderr
    assert proc.returncode == COLLAPSE_EXIT_CODE, f"exit {proc.returncode}\n{log[-5000:]}"
    warnings = [line for line in log.splitlines() if line.startswith(f"{WARNING} [{stage}] step ")]
    assert warnings, log[-4000:]
    health = json.loads((out / "health.json").read_text())
    assert health["status"] == "stopped" and health["active"]
    step = health["last_step"]
    assert all(f"step {step}:" in line for line in warnings), warnings
    assert f"--stop_on_collapse: stopping at step {step}" in log
    assert find_latest_state(out) == out / "checkpoints" / f"step-{step}"  # complete and resumable
    return health


def test_overoptimised_ppo_warns_and_stops_with_a_saved_state(ppo_setup, run_ds, tmp_path):
    """Actor lr 3e-2, no KL penalty, 4 PPO epochs per batch: within a few steps the answers collapse; the run
    names the signals and the step, saves a state and exits with COLLAPSE_EXIT_CODE, writing no model."""
    out = tmp_path / "ppo_collapse"
    argv = _ppo_argv(ppo_setup, out, "--actor_learning_rate", "3e-2", "--init_kl_coef", "0", "--ppo_epochs", "4",
                     "--lr_scheduler_type", "constant", "--max_steps", "5", "--stop_on_collapse")
    proc = run_ds(PPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    health = _assert_stopped(proc, out, "step3")
    step = health["last_step"]
    assert step < 5 and not (out / "actor").exists()
    train = {r["step"]: r for r in _records(out, "train")}
    # the warning matches the logged metrics of that step
    for signal in health["active"]:
        logged = train[step][signal]
        limit = next(w["threshold"] for w in health["warnings"] if w["signal"] == signal)
        assert logged < limit if signal == "health/entropy" else logged > limit, (signal, logged, limit)
    assert {"health/entropy", "health/distinct_1", "health/distinct_2", "health/repeat_share",
            "health/degenerate_share", "health/truncated_share"} <= set(train[1])


def test_healthy_ppo_does_not_warn_and_keeps_the_best_evaluated_actor(ppo_setup, run_ds, tmp_path):
    """A gentle run warns about nothing; with --keep_best, actor/ is the step whose held-out reward was the
    highest in the logged evaluations, and re-scoring the saved actor reproduces that score."""
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import Generator
    from dschat.rlhf.held_out import HeldOutEvaluator
    from dschat.steps import ppo
    from dschat.utils.inference import RewardScorer
    from dschat.utils.utils import load_hf_tokenizer

    out = tmp_path / "ppo_best"
    argv = _ppo_argv(ppo_setup, out, "--actor_learning_rate", "1e-3", "--max_steps", "3", "--eval_steps", "2",
                     "--eval_prompts", "4", "--keep_best")
    proc = run_ds(PPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert WARNING not in log
    health = json.loads((out / "health.json").read_text())
    assert health["status"] == "ok" and health["warnings"] == [] and health["checks"] == 3
    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [0, 2, 3]  # every 2 steps, and the last step (--max_steps 3) too
    best = json.loads((out / "best.json").read_text())
    assert best["best_step"] == _best_healthy(evals, "eval/reward", health)
    assert best["best_score"] == pytest.approx(max(e["eval/reward"] for e in evals), abs=1e-5)
    info = json.loads((out / "run_info.json").read_text())
    assert info["kept_step"] == best["best_step"] and info["health"] == "ok"
    assert not (out / "best_actor").exists()

    # re-score the kept actor on the same held-out prompts, outside the training engines
    args = ppo.parse_args(argv)
    _, prompts, _, held_out = ppo.prepare(args)
    batch = ppo.held_out_prompt_batch(args, held_out, prompts, load_hf_tokenizer(str(out / "actor")))
    tok = load_hf_tokenizer(str(out / "actor"))
    actor = AutoModelForCausalLM.from_pretrained(str(out / "actor")).eval()
    scorer = RewardScorer.from_path(str(ppo_setup["critic"]), torch.device("cpu"))
    evaluator = HeldOutEvaluator(batch["prompt"], batch["prompt_att_mask"], tok, scorer=scorer)
    again = evaluator.evaluate(actor, Generator(actor, tok, max_new_tokens=12))
    assert again["eval/reward"] == pytest.approx(best["best_score"], abs=1e-3)


def negated_reward_model(source: Path, out: Path) -> Path:
    """A copy of the reward model at `source` whose value head is negated: it scores every answer exactly minus
    the original's, the held-out reward model that disagrees most (its standardised score is the negative of the
    training one's, so the gap is twice the training reward's)."""
    shutil.copytree(source, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    state["v_head.weight"] = -state["v_head.weight"]
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_ppo_scores_with_the_heldout_reward_model_and_stops_on_a_widening_gap(ppo_setup, run_ds, tmp_path):
    """--heldout_reward_model_name_or_path: each evaluation scores the same answers with both reward models
    (here the held-out one is the training one negated, so its score is exactly minus the training score) and logs
    the standardised gap; with --stop_on_collapse the run stops at the first evaluation where the logged gaps
    satisfy the widening rule, and health.json keeps the series."""
    heldout = negated_reward_model(ppo_setup["critic"], tmp_path / "heldout_rm")
    out = tmp_path / "ppo_gap"
    argv = _ppo_argv(ppo_setup, out, "--actor_learning_rate", "2e-3", "--max_steps", "4", "--eval_steps", "1",
                     "--eval_prompts", "8", "--heldout_reward_model_name_or_path", str(heldout),
                     "--health_max_reward_gap", "0.01", "--health_reward_gap_patience", "1", "--health_max_kl", "0",
                     "--health_min_entropy_ratio", "0", "--health_max_degenerate_share", "0", "--stop_on_collapse")
    proc = run_ds(PPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    log = proc.stdout + proc.stderr
    evals = _records(out, "eval")
    for e in evals:
        assert e["eval/reward_heldout"] == pytest.approx(-e["eval/reward"], abs=1e-4)
        assert e["eval/reward_gap"] == pytest.approx(2 * e["eval/reward_z"], abs=1e-4)
    assert evals[0]["eval/reward_gap"] == 0.0
    gaps = [e["eval/reward_gap"] for e in evals]
    fires = [e["step"] for i, e in enumerate(evals) if reward_gap_widened(gaps[:i + 1], 0.01, 1)]
    assert fires, f"the training reward never rose over 4 steps: {gaps}"  # PPO on a fixed reward raises it
    health = _assert_stopped(proc, out, "step3")
    assert health["last_step"] == fires[0] and health["active"] == ["eval/reward_gap"], log[-3000:]
    assert health["reward_gaps"] == [[e["step"], pytest.approx(e["eval/reward_gap"])] for e in evals]
    assert "reward over-optimisation" in log
    info = json.loads((out / "run_info.json").read_text())  # written at the start: what the run was held to
    assert info["kl_budget"] == {"controller": "fixed", "kl_coef": 0.1, "kl_target": None}


def test_run_info_records_the_kl_budget(tinystories_dir):
    from dschat.steps import ppo

    base = ["--actor_model_name_or_path", str(tinystories_dir), "--critic_model_name_or_path", str(tinystories_dir),
            "--output_dir", str(tinystories_dir / "unused")]
    adaptive = ppo.parse_args([*base, "--kl_target", "4", "--kl_horizon", "1000", "--init_kl_coef", "0.05"])
    assert ppo.kl_budget(adaptive, 0.2) == {"controller": "adaptive", "kl_target": 4.0, "kl_horizon": 1000,
                                            "init_kl_coef": 0.05, "kl_coef": 0.2}
    assert ppo.kl_budget(ppo.parse_args(base), 0.1)["controller"] == "fixed"


def _dpo_argv(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data / "easy.jsonl"), "--model_name_or_path", str(model), "--max_seq_len", "64",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--beta", "0.1",
            "--num_warmup_steps", "0", "--lr_scheduler_type", "constant", "--log_interval", "1",
            "--eval_prompts", "4", "--gold_reward", "mpo_ext.synthetic:gold_reward",
            "--data_output_path", str(data / "cache"), "--output_dir", str(out), *extra]


def test_high_lr_dpo_warns_and_stops_with_a_saved_state(easy_pairs, tinystories_dir, run_ds, tmp_path):
    """DPO at lr 5e-2: by the first periodic eval the held-out answers repeat themselves and both log-probs
    have collapsed (likelihood displacement); --stop_on_collapse saves a state and exits."""
    out = tmp_path / "dpo_collapse"
    argv = _dpo_argv(easy_pairs, tinystories_dir, out, "--learning_rate", "5e-2", "--eval_steps", "3",
                     "--num_train_epochs", "1", "--stop_on_collapse")
    proc = run_ds(DPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    health = _assert_stopped(proc, out, "step3b_dpo")
    assert health["last_step"] == 3 and not (out / "model.safetensors").exists()
    assert "health/degenerate_share" in health["active"] or "health/logps_chosen_per_token" in health["active"]
    first = _records(out, "eval")[0]
    assert first["step"] == 0 and {"health/logps_chosen_per_token", "eval/gold", "health/entropy"} <= set(first)


def test_dpo_keep_best_by_the_heldout_reward(easy_pairs, tinystories_dir, tiny_tokenizer, run_ds, tmp_path):
    """DPO's evaluations score with both reward models; --best_metric reward_heldout keeps the evaluated step the
    held-out reward model likes best."""
    rm = save_random_critic(tinystories_dir, tiny_tokenizer, tmp_path / "rm", seed=1)
    heldout = save_random_critic(tinystories_dir, tiny_tokenizer, tmp_path / "rm_heldout", seed=2)
    out = tmp_path / "dpo_heldout"
    argv = _dpo_argv(easy_pairs, tinystories_dir, out, "--learning_rate", "2e-3", "--eval_steps", "2",
                     "--max_steps", "6", "--reward_model_name_or_path", str(rm), "--heldout_reward_model_name_or_path",
                     str(heldout), "--keep_best", "--best_metric", "reward_heldout")
    proc = run_ds(DPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    evals = _records(out, "eval")
    assert {"eval/reward", "eval/reward_heldout", "eval/reward_z", "eval/reward_heldout_z", "eval/reward_gap"} <= \
        set(evals[0]) and evals[0]["eval/reward_gap"] == 0.0
    health = json.loads((out / "health.json").read_text())
    assert [g[0] for g in health["reward_gaps"]] == [e["step"] for e in evals]
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "eval/reward_heldout"
    assert best["best_step"] == _best_healthy(evals, "eval/reward_heldout", health)


def test_dpo_keep_best_by_gold_keeps_the_best_healthy_step(easy_pairs, tinystories_dir, run_ds, tmp_path):
    """--keep_best --best_metric gold: the output directory's model is the evaluated step with the highest
    held-out gold reward (checked against the logged evals and by re-generating with the saved model)."""
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import Generator
    from dschat.rlhf.held_out import HeldOutEvaluator
    from dschat.utils.build import end_of_text
    from dschat.utils.data.prompt_datasets import create_prompt_dataset
    from dschat.utils.utils import load_hf_tokenizer
    from mpo_ext import synthetic
    from mpo_ext.dpo import held_out_prompts, parse_args

    out = tmp_path / "dpo_best"
    argv = _dpo_argv(easy_pairs, tinystories_dir, out, "--learning_rate", "2e-3", "--eval_steps", "2",
                     "--max_steps", "5", "--keep_best", "--best_metric", "gold")
    proc = run_ds(DPO_MAIN, argv, num_ranks=0, env=QUIET, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    health = json.loads((out / "health.json").read_text())
    evals = _records(out, "eval")
    # --max_steps 5 stops between two evaluations: the last step is evaluated too, so the health verdict and the
    # card's final eval metrics describe the trained model
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert health["last_step"] == 5 and health["checks"] == 4
    best = json.loads((out / "best.json").read_text())
    card = (out / "README.md").read_text()  # the kept step's card: its final eval is that step's
    assert f"## Final eval metrics\n\n| metric | value |\n|---|---|\n| step | {best['best_step']} |" in card
    best = json.loads((out / "best.json").read_text())
    assert best["best_step"] == _best_healthy(evals, "eval/gold", health)
    assert (out / "model.safetensors").is_file() and not (out / "best_model").exists()

    args = parse_args(argv)
    tok = load_hf_tokenizer(str(out))
    train_data, eval_data = create_prompt_dataset(0, args.data_path, args.data_split, args.data_output_path, 2,
                                                  args.seed, tok, args.max_seq_len,
                                                  end_of_conversation_token=end_of_text(args, tok))
    ids, mask = held_out_prompts(eval_data if len(eval_data) else train_data, 4, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    evaluator = HeldOutEvaluator(ids, mask, tok, gold=synthetic.gold_reward)
    again = evaluator.evaluate(model, Generator(model, tok, max_new_tokens=min(64, 64 - ids.shape[1])))
    assert again["eval/gold"] == pytest.approx(best["best_score"], abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--health_max_kl", "-1"], "--health_max_kl"),
    (["--health_min_entropy_ratio", "-0.5"], "--health_min_entropy_ratio"),
    (["--keep_best"], "--keep_best needs periodic evaluations"),
    (["--eval_steps", "2", "--keep_best", "--eval_prompts", "0"], "--keep_best needs held-out evaluations"),
    (["--eval_steps", "2", "--keep_best", "--best_metric", "gold"], "--best_metric gold needs --gold_reward"),
    (["--gold_reward", "mpo_ext.synthetic"], "--gold_reward mpo_ext.synthetic: expected MODULE:FUNCTION"),
    (["--eval_steps", "2", "--best_metric", "reward_heldout"],
     "--best_metric reward_heldout needs --heldout_reward_model_name_or_path"),
    (["--heldout_reward_model_name_or_path", "./no/such/rm"], "--heldout_reward_model_name_or_path ./no/such/rm"),
    (["--health_reward_gap_patience", "0"], "--health_reward_gap_patience"),
])
def test_guard_flags_bad_input_names_the_flag(tinystories_dir, tmp_path, extra, message):
    from dschat.steps import ppo
    from mpo_ext.dpo import parse_args as dpo_parse_args

    base = ["--actor_model_name_or_path", str(tinystories_dir), "--critic_model_name_or_path", str(tinystories_dir),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        ppo.parse_args(base + extra)
    if "--eval_steps" not in extra and extra != ["--keep_best"]:
        with pytest.raises(UserError, match=message):
            dpo_parse_args(["--output_dir", "out", "--model_name_or_path", str(tinystories_dir), *extra])
    with pytest.raises(UserError, match="--keep_best --best_metric reward needs --reward_model_name_or_path"):
        dpo_parse_args(["--output_dir", "out", "--model_name_or_path", str(tinystories_dir), "--keep_best"])
