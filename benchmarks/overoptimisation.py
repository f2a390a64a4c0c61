"""Is reward over-optimisation flagged by the held-out reward model before the gold reward has fallen far?

    python benchmarks/overoptimisation.py            # writes benchmarks/results/overoptimisation.{json,md,png}
    python benchmarks/overoptimisation.py --task mpo-sort --output_dir runs/overopt-sort
    python benchmarks/overoptimisation.py --quick --results_dir benchmarks/results   # overoptimisation_quick.*

Why: a PPO run that games its reward model looks like success in every number it logs (the reward rises, the
loss is fine, the answers stay diverse enough for the collapse guards). Gao et al. (2022) show the picture with a
gold reward: the proxy reward keeps rising while the gold reward peaks and falls. A real user has no gold
reward; `heldout_rm: true` gives them a second reward model trained on the other half of the preference pairs,
and the stage logs the gap between the two (each standardised by the first evaluation). This benchmark checks,
on the embedded task whose gold reward is known (and never shown to training), whether that gap warns
(`--health_max_reward_gap`, `dschat.rlhf.health.reward_gap_widened`) before the gold reward has lost half of
its eventual drop.

Everything runs through `mpo_ext.pipeline` from the `tiny` preset with `heldout_rm: true` (the two reward
models each on half of the RM's pairs) and PPO as DeepSpeed-Chat's step 3 runs it: from SFT, on every phase-3
prompt (`mpo.threshold` above every gap, `mpo.order: reverse`), KL against SFT, greedy rollouts (DeepSpeed-Chat's
default), a constant learning rate, 3 passes over the 4000 prompts (375 steps). The arms differ in PPO only:

    dschat          DeepSpeed-Chat's step-3 defaults: a fixed KL coefficient 0.1; actor lr 3e-4 (the tiny preset's)
    dschat_lr1e-3   the same with the actor learning rate raised to 1e-3
    no_kl           the same as dschat without a KL penalty (init_kl_coef 0)
    kl_budget       dschat_lr1e-3 with the adaptive KL controller (`--kl_target 3 --kl_horizon 500`: the KL budget)
    dschat_kl_budget  dschat with the same KL budget (does it cost anything where nothing goes wrong?)

Every arm evaluates every `EVAL_STEPS` steps on the phase-3 prompts' first 200 (greedy answers, both reward
models and the gold reward) and never stops early, so the whole curve is drawn. The report also replays the
warning rule (`reward_gap_widened`) on each logged gap series at other thresholds and patiences. Results:
OUTPUT_DIR (one pipeline run root: the arms share assets, SFT and both reward models) and
`overoptimisation.{json,md,png}` in --results_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import machine_line, write_report  # noqa: E402

from dschat.rlhf.health import HEALTH_FILE, reward_gap_widened  # noqa: E402
from dschat.utils.errors import UserError, run_main  # noqa: E402
from dschat.utils.files import read_jsonl  # noqa: E402
from mpo_ext.pipeline import build_plan, dump_config, load_config, run_plan  # noqa: E402
from mpo_ext.synthetic import SYNTHETIC_TASK_NAME, TASKS  # noqa: E402

ALL_HARD = 1e9  # a theta above every reward gap: every prompt goes to PPO
EVAL_STEPS = 10
STEPS = ("assets", "sft", "rm", "rm_heldout", "select", "ppo")
#: PPO as DeepSpeed-Chat's step 3 on the whole phase-3 prompt set, evaluated with both reward models and gold.
COMMON = ("heldout_rm=true", f"mpo.threshold={ALL_HARD}", "mpo.order=reverse", "ppo.do_sample=false",
          "ppo.init_kl_coef=0.1", "ppo.actor_learning_rate=3e-4", "ppo.lr_scheduler_type=constant",
          "ppo.num_warmup_steps=0", "ppo.num_train_epochs=3", f"ppo.eval_steps={EVAL_STEPS}", "ppo.eval_prompts=200",
          "ppo.gold_reward=mpo_ext.synthetic:any_gold_reward", "ppo.log_interval=20")
ARMS: dict[str, tuple[str, ...]] = {
    "dschat": (),
    "dschat_lr1e-3": ("ppo.actor_learning_rate=1e-3",),
    "no_kl": ("ppo.init_kl_coef=0",),
    "kl_budget": ("ppo.actor_learning_rate=1e-3", "ppo.kl_target=3", "ppo.kl_horizon=500"),
    "dschat_kl_budget": ("ppo.kl_target=3", "ppo.kl_horizon=500"),
}
LABELS = {"dschat": "DeepSpeed-Chat's defaults: greedy rollouts, fixed KL 0.1 (actor lr 3e-4)",
          "dschat_lr1e-3": "the same, actor lr 1e-3",
          "no_kl": "the same as dschat without a KL penalty",
          "kl_budget": "actor lr 1e-3 with a KL budget (adaptive controller, target 3 nats, horizon 500)",
          "dschat_kl_budget": "dschat (actor lr 3e-4) with the same KL budget"}
QUICK = ("assets.num_train=6000", "sft.num_train_epochs=10", "rm.num_train_epochs=1", "ppo.max_steps=20",
         "ppo.eval_prompts=16")
#: The warning rule replayed on each logged gap series: (limit, patience) pairs (the defaults: 0.5, 2).
SENSITIVITY = ((0.3, 2), (0.5, 1), (0.5, 2), (0.5, 3), (0.7, 2))


# --------------------------------------------------------------------------------------------- analysis


def first_gap_warning(health: dict) -> int | None:
    """The step of the first reward-gap warning in a health.json, or None."""
    steps = [w["step"] for w in health.get("warnings", []) if w.get("signal") == "eval/reward_gap"]
    return min(steps) if steps else None


def analyse(evals: Sequence[dict], warning_step: int | None) -> dict[str, Any]:
    """The over-optimisation verdict of one run from its evaluations (`step`, `eval/reward`, `eval/reward_heldout`,
    `eval/gold`, `eval/reward_gap`, ...) and the step its reward-gap warning fired.

    Gold peaks at `peak_step`; its eventual drop is peak minus its value at the last evaluation; `half_drop_step`
    is the first evaluation after the peak at which it has lost half of that drop. The warning is in time when it
    fires before `half_drop_step` (or the run never lost half a drop: then there is nothing to be in time for)."""
    if not evals:
        raise UserError("no evaluations in the run's metrics.jsonl; was --eval_steps set?")
    steps = [int(e["step"]) for e in evals]
    gold = [float(e["eval/gold"]) for e in evals]
    peak_index = max(range(len(gold)), key=lambda i: (gold[i], -i))  # the first of equal maxima
    peak, final = gold[peak_index], gold[-1]
    drop = peak - final
    half_drop_step = next((steps[i] for i in range(peak_index + 1, len(gold)) if gold[i] <= peak - drop / 2), None) \
        if drop > 0 else None
    gold_at_warning = None if warning_step is None else next(g for s, g in zip(steps, gold) if s == warning_step)
    return {
        "steps": steps[-1],
        "evaluations": len(evals),
        "reward_first": evals[0]["eval/reward"], "reward_last": evals[-1]["eval/reward"],
        "reward_heldout_first": evals[0]["eval/reward_heldout"], "reward_heldout_last": evals[-1]["eval/reward_heldout"],
        "reward_z_last": evals[-1]["eval/reward_z"], "reward_heldout_z_last": evals[-1]["eval/reward_heldout_z"],
        "gap_last": evals[-1]["eval/reward_gap"],
        "gold_first": gold[0], "gold_peak": peak, "gold_peak_step": steps[peak_index], "gold_last": final,
        "gold_drop": drop, "half_drop_step": half_drop_step,
        "warning_step": warning_step, "gold_at_warning": gold_at_warning,
        "share_of_drop_at_warning": (None if warning_step is None or drop <= 0 else
                                     max(0.0, peak - gold_at_warning) / drop if warning_step > steps[peak_index]
                                     else 0.0),
        "over_optimised": drop > 0 and evals[-1]["eval/reward"] > evals[peak_index]["eval/reward"],
        "flagged_in_time": (warning_step is not None and (half_drop_step is None or warning_step < half_drop_step)),
        "sensitivity": {f"{limit}/{patience}": first_widening(steps, [e["eval/reward_gap"] for e in evals], limit,
                                                              patience) for limit, patience in SENSITIVITY},
    }


def first_widening(steps: Sequence[int], gaps: Sequence[float], limit: float, patience: int) -> int | None:
    """The first step at which `reward_gap_widened` holds on the gaps logged up to it (the warning's step)."""
    return next((steps[i] for i in range(len(gaps)) if reward_gap_widened(gaps[:i + 1], limit, patience)), None)


# --------------------------------------------------------------------------------------------- runs


def arm_config(root: Path, arm: str, task: str, quick: bool, extra: Sequence[str]):
    return load_config("tiny", [f"assets.task={task}", *COMMON, *ARMS[arm], *(QUICK if quick else ()), *extra,
                                f"output_dir={root}"])


def run_arm(root: Path, arm: str, task: str, quick: bool, extra: Sequence[str]) -> dict[str, Any]:
    """Train (or reuse) the arm's chain; its PPO evaluations, health verdict and analysis."""
    config = arm_config(root, arm, task, quick, extra)
    plan = build_plan(config, root)
    print(f"[overoptimisation] {arm}: {LABELS[arm]}", flush=True)
    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    run_plan(plan, root, config, steps=STEPS)
    ppo = next(stage.output for stage in plan if stage.name == "ppo")
    evals = [r for r in read_jsonl(ppo / "metrics.jsonl", skip_unreadable=True) if r.get("phase") == "eval"]
    health = json.loads((ppo / HEALTH_FILE).read_text(encoding="utf-8"))
    train = [r for r in read_jsonl(ppo / "metrics.jsonl", skip_unreadable=True) if r.get("phase") == "train"]
    return {
        "arm": arm, "label": LABELS[arm], "ppo_dir": str(ppo), "health": health["status"],
        "thresholds": {k: health["thresholds"][k] for k in ("max_reward_gap", "reward_gap_patience")},
        "evals": [{k: e[k] for k in ("step", "eval/reward", "eval/reward_heldout", "eval/reward_z",
                                     "eval/reward_heldout_z", "eval/reward_gap", "eval/gold",
                                     "health/repeat_share", "eval/answer_length") if k in e} for e in evals],
        "kl": [[r["step"], r["objective/kl"], r["objective/kl_coef"]] for r in train],
        "analysis": {**analyse(evals, first_gap_warning(health)),
                     "kl_last": mean_of_last([r["objective/kl"] for r in train]),
                     "kl_coef_last": train[-1]["objective/kl_coef"] if train else None},
        "wall_seconds": round(time.time() - start, 1),
        "config": dump_config(config),
    }


def mean_of_last(values: Sequence[float], share: float = 0.25) -> float | None:
    """Mean of the last quarter of a series (the KL a run settled at)."""
    tail = list(values)[-max(1, int(len(values) * share)):] if values else []
    return sum(tail) / len(tail) if tail else None


# --------------------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Reward over-optimisation and the held-out reward model",
        "",
        f"`{report['command']}` on the embedded task `{report['task']}`: PPO from SFT on every phase-3 prompt, "
        "the reward model and the held-out reward model each trained on one half of the RM's pairs; every "
        f"{EVAL_STEPS} steps greedy answers to {report['eval_prompts']} prompts are scored by both and by the gold "
        "reward (never seen by training). Rewards standardised by the first evaluation (z); gap = training z "
        f"minus held-out z; warning: the gap widened by more than {report['thresholds']['max_reward_gap']} from "
        f"its narrowest point at {report['thresholds']['reward_gap_patience']} evaluations in a row.",
        "",
        "| arm | steps | KL (last quarter) | training RM first -> last (z last) | held-out RM first -> last (z last) | "
        "gold first -> peak (step) -> last | gap warning at step | gold at warning (share of the drop) | gold "
        "half-drop step | in time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["arms"]:
        a = run["analysis"]
        share = "" if a["share_of_drop_at_warning"] is None else f" ({100 * a['share_of_drop_at_warning']:.0f}%)"
        warn = a["warning_step"] if a["warning_step"] is not None else "none"
        at_warning = "-" if a["gold_at_warning"] is None else f"{a['gold_at_warning']:.2f}{share}"
        lines.append(
            f"| {run['arm']}: {run['label']} | {a['steps']} | {a['kl_last']:.1f} (coef {a['kl_coef_last']:.3g}) | "
            f"{a['reward_first']:.2f} -> {a['reward_last']:.2f} "
            f"({a['reward_z_last']:+.2f}) | {a['reward_heldout_first']:.2f} -> {a['reward_heldout_last']:.2f} "
            f"({a['reward_heldout_z_last']:+.2f}) | {a['gold_first']:.2f} -> {a['gold_peak']:.2f} "
            f"({a['gold_peak_step']}) -> {a['gold_last']:.2f} | {warn} | {at_warning} | "
            f"{a['half_drop_step'] if a['half_drop_step'] is not None else '-'} | "
            f"{'yes' if a['flagged_in_time'] else 'no'} |")
    keys = [f"{limit}/{patience}" for limit, patience in SENSITIVITY]
    lines += ["", "The warning rule replayed on each logged gap series (limit/patience; the step it would warn at):", "",
              "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for run in report["arms"]:
        found = run["analysis"]["sensitivity"]
        lines.append(f"| {run['arm']} | " + " | ".join(str(found[k]) if found[k] is not None else "none" for k in keys)
                     + " |")
    lines += ["", f"Time: {report['wall_seconds'] / 60:.1f} min wall ({report['machine']}).", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per arm: the training and held-out reward (each standardised by the first evaluation) and their
    gap on the left axis, the gold reward on the right; the gap warning and the gold's half-drop step marked."""
    from mpo_ext.plots import pyplot, save_figure

    plt = pyplot()
    arms = report["arms"]
    cols = min(2, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.6 * rows), squeeze=False)
    for ax, run in zip(axes.flat, arms):
        evals, a = run["evals"], run["analysis"]
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["eval/reward_z"] for e in evals], "-", lw=1.4, color="#C44E52", label="training RM (z)")
        ax.plot(steps, [e["eval/reward_heldout_z"] for e in evals], "-", lw=1.4, color="#4C72B0",
                label="held-out RM (z)")
        ax.plot(steps, [e["eval/reward_gap"] for e in evals], "--", lw=1.0, color="black",
                label="gap = training z - held-out z")
        gold_axis = ax.twinx()
        gold_axis.plot(steps, [e["eval/gold"] for e in evals], "-", lw=1.4, color="#55A868", label="gold (right axis)")
        gold_axis.set_ylabel("gold reward", color="#55A868")
        if a["warning_step"] is not None:
            ax.axvline(a["warning_step"], color="#C44E52", linestyle=":", lw=1.6,
                       label=f"gap warning (step {a['warning_step']})")
        if a["half_drop_step"] is not None:
            ax.axvline(a["half_drop_step"], color="#55A868", linestyle=":", lw=1.6,
                       label=f"gold lost half its drop (step {a['half_drop_step']})")
        ax.grid(alpha=0.3)
        ax.set_xlabel("PPO step")
        ax.set_ylabel("z (first evaluation's mean and std)")
        ax.set_title(f"{run['arm']}: {run['label']}", fontsize=8.5)
        handles, labels = ax.get_legend_handles_labels()
        more = gold_axis.get_legend_handles_labels()
        ax.legend(handles + more[0], labels + more[1], fontsize=6.5, loc="upper left")
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, fmt="png")


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=None, help="Run directories (default runs/overoptimisation).")
    parser.add_argument("--results_dir", type=Path, default=None,
                        help="Where overoptimisation.{json,md,png} go (default benchmarks/results; OUTPUT_DIR with "
                             "--quick).")
    parser.add_argument("--task", choices=sorted(TASKS), default=SYNTHETIC_TASK_NAME, help="The embedded task.")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Comma list of arms ({', '.join(ARMS)}).")
    parser.add_argument("--quick", action="store_true", help="Small data and 20 PPO steps: a smoke run.")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="More pipeline overrides for every arm (e.g. ppo.actor_learning_rate=3e-4).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every stage (unless set).")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        raise UserError(f"--arms {','.join(unknown) or '(none)'}: choose from {', '.join(ARMS)}")
    default = "runs/overoptimisation" + ("-quick" if args.quick else "") + (
        "" if args.task == SYNTHETIC_TASK_NAME else "-" + args.task.removeprefix("mpo-"))
    args.output_dir = (args.output_dir or REPO / default).resolve()
    args.results_dir = (args.results_dir or (args.output_dir if args.quick else REPO / "benchmarks/results")).resolve()
    args.stem = "overoptimisation" + ("_quick" if args.quick else "") + (
        "" if args.task == SYNTHETIC_TASK_NAME else "_" + args.task.removeprefix("mpo-"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    # one run root: the arms share assets, SFT and both reward models (same identities), and differ in PPO only
    arms = [run_arm(args.output_dir, arm, args.task, args.quick, args.sets) for arm in args.arms]
    report = {
        "command": " ".join(["python benchmarks/overoptimisation.py", *(argv if argv is not None else sys.argv[1:])]),
        "task": args.task,
        "eval_prompts": arm_config(args.output_dir, args.arms[0], args.task, args.quick, args.sets).section("ppo")
        .get("eval_prompts"),
        "thresholds": arms[0]["thresholds"],
        "arms": arms,
        "wall_seconds": round(time.time() - start, 1),
        "machine": machine_line(),
    }
    write_report(args.results_dir, args.stem, report, markdown(report), plot, "overoptimisation")


if __name__ == "__main__":
    run_main(main)
