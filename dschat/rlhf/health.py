"""Training health: signals that a stage is destroying its policy, warnings, and keeping the best model.

Why: reward-model over-optimisation (PPO) and likelihood displacement (DPO) look like success in the
loss and the reward-model score while the answers collapse into one repeated word. These signals
make that visible while it happens:

- `health/entropy`: mean per-token entropy (nats) of the policy's next-token distribution over the
  answer tokens; a collapse to one answer drives it towards 0.
- `health/distinct_1`, `health/distinct_2`: distinct n-grams / all n-grams over a batch of answers.
- `health/repeat_share`: share of answer bigrams that already occurred earlier in the same answer
  ("apple, apple, apple" and ",,,," score high; a list of distinct items scores 0).
- `health/degenerate_share`: share of degenerate answers (`is_degenerate`): empty, one token or a tiny cycle
  repeated (",,,,", "no no no", also when the tokenizer merged the run into one token: the text is checked
  too), or repeating at least half their bigrams.
- `health/truncated_share`: share of answers that hit the length limit without ending.
- DPO: `health/logps_chosen_per_token` / `..._rejected_...` at each eval; both falling far below
  their first value is likelihood displacement.
- Reward model (step 2): `health/reward_accuracy`, `health/reward_margin` (held-out pairwise accuracy and
  mean margin) and `health/reward_identical_share` (share of held-out pairs whose chosen and rejected
  scores are equal). Signals `reward_at_chance` (from the second evaluation on, the first being before
  training: accuracy at or below a coin's allowance, or accuracy and margin no better than before training)
  and `reward_identical` (the reward is read where the two answers are the same, e.g. a turn-end token
  inside the prompt). The pipeline will not start selection from a reward model whose health.json says
  `unhealthy` with one of them.
- With a held-out reward model (trained on pairs the training reward model never saw): `eval/reward_gap`,
  the training reward minus the held-out reward at each evaluation, each standardised by its own mean and
  standard deviation at the first evaluation (`RewardGap`). Both models see the same answers, so while the
  policy really improves they rise together; a gap that keeps widening means the policy is learning what
  only the training reward model likes (Gao et al. 2022's proxy-vs-gold picture, with the held-out model
  standing in for the gold reward a real user does not have). `reward_gap_widened` is the rule.

`HealthMonitor` compares them with documented thresholds and prints one warning line per signal when
it crosses; `health_summary()` is what a run writes to `OUTPUT/health.json`. `KeepBest` tracks the
held-out score of periodic evaluations and says when a new best was reached (the evaluations themselves:
`dschat.rlhf.held_out.HeldOutEvaluator`).

The functions on tensors and token lists are pure and unit-tested against hand-computed values.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json

if TYPE_CHECKING:
    import torch

# torch and the rank helpers are imported where used: the flag groups (dschat.utils.args) import this module for
# its thresholds, and a step's --help must not wait for torch.

HEALTH_FILE = "health.json"
BEST_FILE = "best.json"
# Exit status of a run stopped by --stop_on_collapse (2 is a user error, 143 SIGTERM).
COLLAPSE_EXIT_CODE = 3
DEGENERATE_REPEAT_SHARE = 0.5
# Step 2's defaults: a coin's 0.5 plus an allowance for the noise of a small held-out set, and half the pairs.
REWARD_MIN_ACCURACY = 0.55
REWARD_MAX_IDENTICAL_SHARE = 0.5

# A degenerate cycle: a unit of at most this many tokens (or characters) repeated at least this many times.
DEGENERATE_MAX_PERIOD = 4
DEGENERATE_MIN_REPEATS = 3


# --------------------------------------------------------------------------------------------- pure signals


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(answers: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over the answers (0 when no answer has n tokens)."""
    grams = [g for tokens in answers for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngrams(tokens: Sequence[int], n: int = 2) -> tuple[int, int]:
    """(n-grams that already occurred earlier in the same answer, all n-grams) of one answer."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    grams = _ngrams(tokens, n)
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated, len(grams)


def repeat_share(answers: Sequence[Sequence[int]], n: int = 2) -> float:
    """Repeated n-grams / all n-grams, pooled over the answers (0 when there are none)."""
    counts = [repeated_ngrams(tokens, n) for tokens in answers]
    total = sum(c for _, c in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def cycle_period(units: Sequence, max_period: int = DEGENERATE_MAX_PERIOD) -> int | None:
    """The smallest period p <= `max_period` of a sequence: every item equals the one p places before it, so the
    sequence is its first p items repeated (the last repetition may be cut). None when no such p exists."""
    for period in range(1, min(max_period, len(units)) + 1):
        if all(units[i] == units[i - period] for i in range(period, len(units))):
            return period
    return None


def is_degenerate(tokens: Sequence[int], n: int = 2, limit: float = DEGENERATE_REPEAT_SHARE, *,
                  text: str | None = None, max_period: int = DEGENERATE_MAX_PERIOD,
                  min_repeats: int = DEGENERATE_MIN_REPEATS) -> bool:
    """Whether an answer says nothing: it is empty (no tokens, or `text` only whitespace); or it is one token or
    a tiny cycle of at most `max_period` tokens repeated at least `min_repeats` times (",,,,", "no no no"); or
    its text without whitespace is such a cycle of characters (a run the tokenizer merged into one or two
    tokens: ",,,,,,,,,,,," as a single token); or at least `limit` of its n-grams repeat earlier ones (a loop
    after a normal start)."""
    if not tokens or (text is not None and not text.strip()):
        return True
    candidates = [list(tokens)] + ([[c for c in text if not c.isspace()]] if text is not None else [])
    for units in candidates:
        period = cycle_period(units, max_period)
        if period is not None and len(units) >= min_repeats * period:
            return True
    repeated, total = repeated_ngrams(tokens, n)
    return total > 0 and repeated / total >= limit


def truncated_share(lengths: Sequence[int], max_new_tokens: int) -> float:
    """Share of answers that used the whole length budget (they were cut, not ended); `lengths` a list or a
    1-D tensor of answer lengths."""
    values = [int(n) for n in lengths]
    return sum(n >= max_new_tokens for n in values) / len(values) if values else 0.0


def generation_health(answers: Sequence[Sequence[int]], max_new_tokens: int,
                      texts: Sequence[str] | None = None) -> dict[str, float]:
    """The answer-text signals of one batch of answers (token ids, and their decoded `texts` where known, so a
    run the tokenizer merged into one token still counts as degenerate), under their logged names."""
    lengths = [len(a) for a in answers]
    return {
        "health/distinct_1": distinct_n(answers, 1),
        "health/distinct_2": distinct_n(answers, 2),
        "health/repeat_share": repeat_share(answers, 2),
        "health/degenerate_share": degenerate_share(answers, texts),
        "health/truncated_share": truncated_share(lengths, max_new_tokens),
    }


def degenerate_share(answers: Sequence[Sequence[int]], texts: Sequence[str | None] | None = None) -> float:
    """Share of `is_degenerate` answers (0 for no answers)."""
    texts = list(texts) if texts is not None else [None] * len(answers)
    return sum(is_degenerate(a, text=t) for a, t in zip(answers, texts)) / max(1, len(answers))


# --------------------------------------------------------------------------------------------- reward over-optimisation


#: Below this, a first evaluation's score spread is taken as 1 (raw units): its answers scored alike, and
#: dividing by a spread of ~0 would turn every later change into an arbitrarily large number.
MIN_SCORE_STD = 1e-3


def mean_and_std(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two scores)."""
    n = len(scores)
    if n == 0:
        return float("nan"), 0.0
    mean = sum(scores) / n
    var = sum((x - mean) ** 2 for x in scores) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def standardised(value: float, mean: float, std: float) -> float:
    """(value - mean) / std, with a spread below MIN_SCORE_STD taken as 1."""
    return (value - mean) / (std if std >= MIN_SCORE_STD else 1.0)


def widened_gaps(gaps: Sequence[float]) -> list[float]:
    """How far each gap is above the narrowest gap up to and including it (so >= 0)."""
    out, narrowest = [], math.inf
    for gap in gaps:
        narrowest = min(narrowest, gap)
        out.append(gap - narrowest)
    return out


def reward_gap_widened(gaps: Sequence[float], max_widening: float, patience: int) -> bool:
    """The over-optimisation rule on the series of reward gaps (training minus held-out, standardised): the
    gap has widened by more than `max_widening` from its narrowest point at each of the last `patience`
    evaluations. Widening from the narrowest point, not from zero, so a held-out model that first rises faster
    than the training one (a negative gap) does not hide a later divergence; several evaluations in a row, so
    one noisy evaluation does not warn."""
    if max_widening <= 0 or patience < 1 or len(gaps) < patience:
        return False
    return all(w > max_widening for w in widened_gaps(gaps)[-patience:])


@dataclass
class RewardGap:
    """Training and held-out reward of one evaluation's answers, each standardised by its own first
    evaluation (the policy the stage starts from): `baseline` holds both models' mean and std then."""

    baseline: dict[str, float] = field(default_factory=dict)

    def metrics(self, train_scores: Sequence[float], heldout_scores: Sequence[float]) -> dict[str, float]:
        """`eval/reward_z`, `eval/reward_heldout_z` and `eval/reward_gap` (their difference) of these answers."""
        train_mean, train_std = mean_and_std(train_scores)
        heldout_mean, heldout_std = mean_and_std(heldout_scores)
        if not self.baseline:
            self.baseline = {"reward_mean": train_mean, "reward_std": train_std,
                             "reward_heldout_mean": heldout_mean, "reward_heldout_std": heldout_std}
        b = self.baseline
        train_z = standardised(train_mean, b["reward_mean"], b["reward_std"])
        heldout_z = standardised(heldout_mean, b["reward_heldout_mean"], b["reward_heldout_std"])
        return {"eval/reward_z": train_z, "eval/reward_heldout_z": heldout_z, "eval/reward_gap": train_z - heldout_z}


# --------------------------------------------------------------------------------------------- thresholds


@dataclass
class HealthThresholds:
    """When a signal counts as unhealthy (0 disables a check); the defaults of the `--health_*` flags
    (`dschat.utils.args.HealthSettings`, whose `health_thresholds` builds this; step 2's
    `RewardHealthSettings.health_thresholds` sets only the `rm_*` ones, to REWARD_MIN_ACCURACY and
    REWARD_MAX_IDENTICAL_SHARE by default)."""

    min_entropy_ratio: float = 0.2      # health/entropy below this fraction of its first value
    max_kl: float = 25.0                # objective/kl (nats per answer) above this
    max_degenerate_share: float = 0.5   # health/degenerate_share above this
    max_logp_drop: float = 1.0          # DPO: chosen AND rejected per-token log-probs fell by more (nats)
    rm_min_accuracy: float = 0.0        # step 2: held-out accuracy at or below this is at chance (0.55 there)
    rm_max_identical_share: float = 0.0  # step 2: this share of held-out pairs scored equal or more (0.5 there)
    max_reward_gap: float = 0.5         # eval/reward_gap widened by more (first-eval std units) ...
    reward_gap_patience: int = 2        # ... at this many evaluations in a row


#: The metrics each signal is judged on (a call to `HealthMonitor.observe` without them leaves it as it was).
SIGNAL_INPUTS: dict[str, tuple[str, ...]] = {
    "health/entropy": ("health/entropy",),
    "objective/kl": ("objective/kl",),
    "health/degenerate_share": ("health/degenerate_share",),
    "health/logps_chosen_per_token": ("health/logps_chosen_per_token", "health/logps_rejected_per_token"),
    "eval/reward_gap": ("eval/reward_gap",),
    "reward_at_chance": ("health/reward_accuracy", "health/reward_margin"),
    "reward_identical": ("health/reward_identical_share",),
}
#: The held-out evaluation's reward-gap metrics (`RewardGap.metrics` and the two means).
GAP_KEYS = ("eval/reward", "eval/reward_heldout", "eval/reward_z", "eval/reward_heldout_z", "eval/reward_gap")


REWARD_BASELINE_KEYS = ("health/reward_accuracy", "health/reward_margin")
# Signals of a reward model that learned nothing: `mpo pipeline` refuses to select with one flagged so.
REWARD_SIGNALS = ("reward_at_chance", "reward_identical")


def reward_model_problems(t: HealthThresholds, metrics: dict[str, float], baseline: dict[str, float] | None
                          ) -> list[tuple[str, float, float, str]]:
    """(signal, value, threshold, message) of a reward model's held-out evaluation. `baseline` holds the first
    evaluation's values (before training) and is None at that first evaluation: at-chance is judged only
    after training began, identical scores at every evaluation (they are a reading error, not a lack of
    training)."""
    found = []
    accuracy, margin = metrics.get("health/reward_accuracy"), metrics.get("health/reward_margin")
    if t.rm_min_accuracy and accuracy is not None and margin is not None and baseline is not None:
        first_accuracy = baseline.get("health/reward_accuracy", accuracy)
        first_margin = baseline.get("health/reward_margin", margin)
        coin = accuracy <= t.rm_min_accuracy
        no_gain = accuracy <= first_accuracy and margin <= first_margin
        if coin or no_gain:
            why = (f"at or below {t.rm_min_accuracy:g}" if coin else
                   f"no better than before training ({first_accuracy:.3f}, margin {first_margin:.4g})")
            found.append(("reward_at_chance", accuracy, t.rm_min_accuracy,
                          f"the reward model is at chance: held-out accuracy {accuracy:.3f}, mean margin "
                          f"{margin:.4g}, {why}; it learned nothing a selection could use (check that the reward "
                          "is read at each answer's end, the learning rate, and that the pairs differ)"))
    identical = metrics.get("health/reward_identical_share")
    if t.rm_max_identical_share and identical is not None and identical >= t.rm_max_identical_share:
        found.append(("reward_identical", identical, t.rm_max_identical_share,
                      f"chosen and rejected get the same score in {identical:.0%} of held-out pairs (limit "
                      f"{t.rm_max_identical_share:.0%}): the reward is read where the two answers are the same, "
                      "e.g. at a turn-end token inside the prompt"))
    return found


def identical_share(chosen: torch.Tensor, rejected: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Share of pairs whose two scores are equal up to `rtol` of their size (float scalar)."""
    import torch  # see the note at the imports

    scale = torch.maximum(chosen.abs(), rejected.abs()).clamp(min=1.0)
    return ((chosen - rejected).abs() <= rtol * scale).float().mean()


@dataclass
class HealthWarning:
    step: int
    signal: str
    value: float
    threshold: float
    message: str


@dataclass
class HealthMonitor:
    """Checks logged metrics against `HealthThresholds`; one warning per signal each time it crosses."""

    stage: str
    thresholds: HealthThresholds
    baseline: dict[str, float] = field(default_factory=dict)
    warnings: list[HealthWarning] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    last: dict[str, float] = field(default_factory=dict)
    last_step: int = 0
    checks: int = 0
    reward_gaps: list[list[float]] = field(default_factory=list)  #: [step, eval/reward_gap] of every evaluation

    def _problems(self, metrics: dict[str, float]) -> list[tuple[str, float, float, str]]:
        t = self.thresholds
        found = []
        if "eval/reward_gap" in metrics:
            gaps = [gap for _, gap in self.reward_gaps]
            if reward_gap_widened(gaps, t.max_reward_gap, t.reward_gap_patience):
                widened = widened_gaps(gaps)[-1]
                found.append(("eval/reward_gap", gaps[-1], t.max_reward_gap,
                              f"reward over-optimisation: the training reward model's score has risen {widened:.3g} "
                              f"standard deviations more than the held-out reward model's since their gap was "
                              f"narrowest (limit {t.max_reward_gap:g}, {t.reward_gap_patience} evaluations in a row)"))
        reward_judged = "health/reward_accuracy" in self.baseline  # the first evaluation is the baseline
        for key in ("health/entropy", "health/logps_chosen_per_token", "health/logps_rejected_per_token",
                    *REWARD_BASELINE_KEYS):
            if key in metrics and key not in self.baseline:
                self.baseline[key] = metrics[key]
        found += reward_model_problems(t, metrics, self.baseline if reward_judged else None)
        entropy = metrics.get("health/entropy")
        first = self.baseline.get("health/entropy")
        if t.min_entropy_ratio and entropy is not None and first and first > 0:
            limit = t.min_entropy_ratio * first
            if entropy < limit:
                found.append(("health/entropy", entropy, limit,
                              f"entropy collapse: {entropy:.4g} nats/token, below {t.min_entropy_ratio:g} x its "
                              f"first value {first:.4g}"))
        kl = metrics.get("objective/kl")
        if t.max_kl and kl is not None and kl > t.max_kl:
            found.append(("objective/kl", kl, t.max_kl,
                          f"KL to the reference {kl:.4g} nats per answer, above the budget {t.max_kl:g}"))
        degenerate = metrics.get("health/degenerate_share")
        if t.max_degenerate_share and degenerate is not None and degenerate > t.max_degenerate_share:
            found.append(("health/degenerate_share", degenerate, t.max_degenerate_share,
                          f"{degenerate:.0%} of the answers are degenerate (empty, one token or a tiny cycle "
                          f"repeated, or repeating half their bigrams; limit {t.max_degenerate_share:.0%})"))
        drops = [self.baseline[k] - metrics[k] for k in ("health/logps_chosen_per_token",
                                                          "health/logps_rejected_per_token")
                 if k in metrics and k in self.baseline]
        if t.max_logp_drop and len(drops) == 2 and min(drops) > t.max_logp_drop:
            found.append(("health/logps_chosen_per_token", -drops[0], -t.max_logp_drop,
                          f"likelihood displacement: chosen and rejected log-probs fell {drops[0]:.3g} and "
                          f"{drops[1]:.3g} nats/token since the first eval (limit {t.max_logp_drop:g})"))
        return found

    def observe(self, step: int, metrics: dict[str, float]) -> list[HealthWarning]:
        """New warnings at `step` (a signal warns again only after it has recovered in between). Only the signals
        `metrics` carries are re-judged: PPO checks its rollouts each step and its reward gap at evaluations."""
        self.checks += 1
        self.last_step = step
        self.last.update({k: float(v) for k, v in metrics.items()
                          if k.startswith("health/") or k in ("objective/kl", "reward/mean") or k in GAP_KEYS})
        if "eval/reward_gap" in metrics:
            self.reward_gaps.append([step, float(metrics["eval/reward_gap"])])
        problems = self._problems(metrics)
        now = {signal for signal, *_ in problems}
        new = [HealthWarning(step, s, float(v), float(th), msg) for s, v, th, msg in problems if s not in self.active]
        checked = {signal for signal, keys in SIGNAL_INPUTS.items() if any(k in metrics for k in keys)}
        self.active = (self.active - checked) | now
        self.warnings.extend(new)
        return new

    def state_dict(self) -> dict:
        """What a resumed run carries on from (saved with every training state): without it, a resumed run's
        health.json would forget the warnings and checks made before the interruption, and the reward-gap
        series its over-optimisation rule judges."""
        return {"baseline": dict(self.baseline), "warnings": [asdict(w) for w in self.warnings],
                "active": sorted(self.active), "last": dict(self.last), "last_step": self.last_step,
                "checks": self.checks, "reward_gaps": [list(x) for x in self.reward_gaps]}

    def load_state_dict(self, state: dict) -> None:
        """`state_dict()`'s output, or a training state of an earlier version (`{"baseline": ...}` only)."""
        self.baseline.update(state.get("baseline", {}))
        self.warnings = [HealthWarning(**w) for w in state.get("warnings", [])]
        self.active = set(state.get("active", []))
        self.last = dict(state.get("last", {}))
        self.last_step = int(state.get("last_step", 0))
        self.checks = int(state.get("checks", 0))
        self.reward_gaps = [list(x) for x in state.get("reward_gaps", [])]

    def format(self, warning: HealthWarning) -> str:
        return f"HEALTH WARNING [{self.stage}] step {warning.step}: {warning.signal}: {warning.message}"

    @property
    def collapsed(self) -> bool:
        return bool(self.active)

    def summary(self, stopped: bool = False) -> dict:
        status = "stopped" if stopped else ("unhealthy" if self.active else ("warned" if self.warnings else "ok"))
        return {
            "stage": self.stage,
            "status": status,
            "checks": self.checks,
            "last_step": self.last_step,
            "active": sorted(self.active),
            "warnings": [asdict(w) for w in self.warnings],
            "last": self.last,
            "baseline": self.baseline,
            "thresholds": asdict(self.thresholds),
            "reward_gaps": self.reward_gaps,
        }


def write_health(output_dir: str | None, monitor: HealthMonitor, stopped: bool = False) -> None:
    """OUTPUT/health.json (rank 0): what the pipeline and a reader check after a stage."""
    from dschat.utils.dist import is_rank_0

    if output_dir and is_rank_0():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(output_dir) / HEALTH_FILE, monitor.summary(stopped))


def check_health(monitor: HealthMonitor, step: int, metrics: dict[str, float], output_dir: str | None,
                 stop_on_collapse: bool, save_state: Callable[[], None]) -> None:
    """Print a warning line per newly crossed threshold and record health.json; with `stop_on_collapse`,
    save a training state and exit with COLLAPSE_EXIT_CODE. Every rank calls it with the same (reduced)
    metrics, so every rank decides alike and the state save stays collective."""
    from dschat.utils.printing import print_rank_0

    new = monitor.observe(step, metrics)
    for warning in new:
        print_rank_0(monitor.format(warning))
    stop = bool(new) and stop_on_collapse
    write_health(output_dir, monitor, stopped=stop)
    if not stop:
        return
    save_state()
    print_rank_0(f"--stop_on_collapse: stopping at step {step} ({', '.join(sorted(monitor.active))}); a training "
                 f"state was saved under {Path(output_dir or '.') / 'checkpoints'} and no final model was written; "
                 f"see {Path(output_dir or '.') / HEALTH_FILE} (exit status {COLLAPSE_EXIT_CODE})")
    raise SystemExit(COLLAPSE_EXIT_CODE)


# --------------------------------------------------------------------------------------------- keep the best


def load_gold_reward(spec: str) -> Callable[[str, str], float]:
    """`package.module:function` -> the function; a clear error when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--gold_reward {spec}: expected MODULE:FUNCTION, e.g. mpo_ext.synthetic:gold_reward")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--gold_reward {spec}: cannot import it ({err})") from err
    if not callable(fn):
        raise UserError(f"--gold_reward {spec}: not a function")
    return fn


def mean_gold(gold: Callable[[str, str], float], prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Mean gold reward over the answers it accepts (one that makes it raise is skipped); NaN if none."""
    values = []
    for prompt, answer in zip(prompts, answers):
        try:
            values.append(float(gold(prompt, answer)))
        except Exception:  # noqa: BLE001 - a user's function; one bad answer must not end the run
            continue
    return sum(values) / len(values) if values else float("nan")


@dataclass
class KeepBest:
    """Held-out scores of periodic evaluations and the best one so far (ties keep the earlier step)."""

    metric: str = "eval/reward"
    evals: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_score: float = -math.inf

    def consider(self, step: int, scores: dict[str, float], healthy: bool = True) -> bool:
        """Record an evaluation's `eval/*` scores (other keys of `scores` are ignored); True when it is a new
        best (the caller then saves its weights). A step the health checks flag is never kept: a collapsed
        policy can score well on a reward model it exploits."""
        scores = {k: v for k, v in scores.items() if k.startswith("eval/")}
        self.evals.append({"step": step, **scores, "healthy": healthy})
        score = scores.get(self.metric)
        if not healthy or score is None or not math.isfinite(score) or score <= self.best_score:
            return False
        self.best_step, self.best_score = step, float(score)
        return True

    def record(self, last_step: int, kept: str) -> dict:
        return {
            "metric": self.metric,
            "best_step": self.best_step,
            "best_score": None if self.best_step is None else self.best_score,
            "last_step": last_step,
            "kept": kept,
            "reason": (f"step {self.best_step} had the highest held-out {self.metric} "
                       f"({self.best_score:.4f}) of the {sum(e['healthy'] for e in self.evals)} healthy ones among "
                       f"{len(self.evals)} evaluations"
                       if self.best_step is not None else "no healthy evaluation produced a finite score"),
            "evals": self.evals,
        }

    def state_dict(self) -> dict:
        return {"evals": self.evals, "best_step": self.best_step, "best_score": self.best_score}

    def load_state_dict(self, state: dict) -> None:
        self.evals = list(state.get("evals", []))
        self.best_step = state.get("best_step")
        self.best_score = float(state.get("best_score", -math.inf))
