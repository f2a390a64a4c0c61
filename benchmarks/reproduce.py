"""Reproduce the MPO paper's comparison (Gou & Nguyen 2024, Table 3 and ablations) from a pipeline config.

    python benchmarks/reproduce.py                    # the tiny preset, 5 seeds (~30 min on 2 cores)
    python benchmarks/reproduce.py --quick --output_dir /tmp/rq   # 1 seed, small sizes: a smoke run (minutes)
    python benchmarks/reproduce.py --task mpo-sort    # the second embedded task
    python benchmarks/reproduce.py --preset llama2-7b-hh --seeds 1,2,3   # the paper's setting (8 GPUs)
    python benchmarks/reproduce.py --config my.yaml --set ppo.actor_learning_rate=1e-5

Every method is a variant of ONE pipeline config (`--preset` or `--config`, `--set` overrides, as `mpo pipeline`
takes them), run by `mpo_ext.pipeline`; all methods of a seed share one run directory, where stages with the
same identity (assets, SFT, both reward models, and for the ablations the MPO selection/DPO) are reused, and an
interrupted benchmark resumes where it stopped. Per seed (`common.seed`, `eval.seed` and, on the embedded task,
the data draw `assets.seed`):

    SFT          the step-1 model
    DPO-base     DPO on the dataset's own human-labelled pairs (the RM's split; as many pairs as DPO gets)
    DPO          DPO on two SFT samples per prompt, ordered by the RM, all pairs (theta = 0)
    PPO          PPO on all prompts, initialised from and KL-anchored to SFT
    MPO (theta)  DPO on the easy pairs (gap > theta), then PPO on the hard prompts, init = reference = DPO
    MPO-sft-kl   as MPO (first theta) but the PPO reference is SFT
    MPO-reverse  PPO on the hard prompts from SFT first, then DPO on the easy pairs from the PPO actor

Three scores per method, on the same held-out prompts (`mpo eval`, greedy answers and T=1 samples): the reward
model every method optimised (RM), the held-out reward model (`heldout_rm: true`: trained on the other half of
the RM's pairs, never optimised: the signal a real user has), and on the embedded tasks the gold reward (the
truth, never shown to training). The paper's claims are checked per seed on gold where there is one, and on
the held-out reward model in every case; the report says where the two verdicts agree.
Results: OUTPUT_DIR/seed*/eval/table.json per seed and `reproduce*.{json,md,png}` (benchmarks/results/ by
default; OUTPUT_DIR for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import machine_line, write_report  # noqa: E402

from dschat.utils.errors import UserError, run_main  # noqa: E402
from dschat.utils.files import atomic_write_json, read_jsonl  # noqa: E402
from mpo_ext.pipeline import PipelineConfig, Stage, build_plan, dump_config, load_config, run_plan  # noqa: E402
from mpo_ext.synthetic import SYNTHETIC_TASK_NAME, TASKS, any_gold_reward  # noqa: E402

ALL_HARD = 1e9  # a theta above every gap: every prompt goes to PPO
# Quick mode (the embedded task only): the tiny sizes shrunk so that every method still runs end to end in minutes.
QUICK = ("assets.num_train=6000", "sft.num_train_epochs=10", "rm.num_train_epochs=1", "select.max_prompts=300",
         "dpo.num_train_epochs=2", "ppo.num_train_epochs=1", "eval.num_prompts=32")
#: Every run: the held-out reward model, scored beside the RM in every table.
ALWAYS = ("heldout_rm=true",)
# The paper's Table 3 (HH-RLHF, Llama-2-7B, mean RM score) for the report.
PAPER_HH = {"sft": 0.938, "dpo_base": 1.499, "dpo": 1.859, "ppo": 2.513, "mpo_theta2": 2.22, "mpo_theta1": 2.801}


def method_labels(thetas: tuple[str, str]) -> dict[str, str]:
    """Row keys (also eval model names and run directories) -> printed labels, in table order."""
    a, b = thetas
    return {
        "sft": "SFT",
        "dpo_base": "DPO-base",
        "dpo": "DPO",
        "ppo": "PPO",
        "mpo_a": f"MPO (θ={a})",
        "mpo_b": f"MPO (θ={b})",
        "mpo_sft_kl": f"MPO-sft-kl (θ={a})",
        "mpo_reverse": f"MPO-reverse (θ={a})",
        "mpo_a_stage1": f"  MPO stage 1 only (DPO on easy, θ={a})",
    }


# Paper claims, checked per seed on the gold reward (first theta = the paper's best MPO).
CLAIMS = (
    ("MPO > PPO", "mpo_a", "ppo"),
    ("PPO > DPO", "ppo", "dpo"),
    ("DPO > DPO-base", "dpo", "dpo_base"),
    ("DPO-base > SFT", "dpo_base", "sft"),
    ("MPO > MPO-sft-kl", "mpo_a", "mpo_sft_kl"),
    ("MPO > MPO-reverse", "mpo_a", "mpo_reverse"),
    ("MPO (first θ) > MPO (second θ)", "mpo_a", "mpo_b"),
    ("MPO stage 2 (PPO on hard) adds to stage 1", "mpo_a", "mpo_a_stage1"),
)


# --------------------------------------------------------------------------------------------- presets


def make_config(source: str, run_dir: Path, seed: int, quick: bool, user_sets: tuple[str, ...] = (), *sets: str,
                task: str | None = None) -> PipelineConfig:
    """The config `source` for one seed (and, on the embedded task, its data draw and task), with the held-out
    reward model, the --quick sizes, the user's --set overrides and the method's own `sets`, in that order."""
    embedded = load_config(source, user_sets).assets is not None
    if (task or quick) and not embedded:
        raise UserError(f"--{'task' if task else 'quick'}: only for a config with the embedded task (an assets: "
                        f"section); {source} has none")
    seeds = (f"common.seed={seed}", f"eval.seed={seed}",
             *((f"assets.seed={seed}",) if embedded else ()), *((f"assets.task={task}",) if task else ()))
    return load_config(source, [*seeds, *ALWAYS, *(QUICK if quick else ()), *user_sets, *sets, f"output_dir={run_dir}"])


def fingerprint(source: str, quick: bool, thetas: tuple[str, str], task: str | None,
                user_sets: tuple[str, ...]) -> dict[str, Any]:
    """What decides the results of a run directory (not seeds or threads)."""
    return {"source": source, "quick": quick, "thetas": list(thetas), "task": task, "sets": list(user_sets),
            "config": dump_config(make_config(source, Path("RUN"), 0, quick, user_sets, task=task))}


# --------------------------------------------------------------------------------------------- runs


class SeedRun:
    """All methods of one seed in the run directory OUTPUT_DIR/seed<N>; each method is a config variant."""

    def __init__(self, root: Path, seed: int, args: argparse.Namespace):
        self.root, self.seed, self.args = root, seed, args
        self.quick, self.theta_specs, self.task = args.quick, args.thetas, args.task
        self.thetas: dict[str, float] = {}

    def config(self, *sets: str) -> PipelineConfig:
        return make_config(self.args.source, self.root, self.seed, self.quick, self.args.sets, *sets, task=self.task)

    def _run(self, name: str, steps: tuple[str, ...], *sets: str, shards_from: Path | None = None) -> dict[str, Path]:
        """Run one method's stages (the others are reused); {stage: output directory}."""
        config = self.config(*sets)
        plan = build_plan(config, self.root)
        outputs = {stage.name: stage.output for stage in plan}
        if shards_from is not None:
            reuse_shards(shards_from, outputs["select"])
        print(f"[reproduce] seed {self.seed}: {name}", flush=True)
        self._run_plan(plan, config, steps)
        return outputs

    def _run_plan(self, plan: list[Stage], config: PipelineConfig, steps: tuple[str, ...]) -> None:
        """run_plan, then keep the seconds of the stages that ran (summary.json only holds the last call)."""
        self.root.mkdir(parents=True, exist_ok=True)
        run_plan(plan, self.root, config, steps=steps)
        path = self.root / "stage_seconds.json"
        seconds = read_json(path) if path.exists() else {}
        for entry in read_json(self.root / "summary.json")["stages"]:
            if "seconds" in entry:
                seconds[Path(entry["output"]).name] = entry["seconds"]
        atomic_write_json(path, seconds)

    def run(self) -> dict[str, Any]:
        """Train every method of this seed, evaluate them together, return the seed's figures."""
        start = time.time()
        # theta 0: every pair with a reward gap is "easy"
        first = ("assets", "sft", "rm", "rm_heldout", "select", "dpo")
        dpo = self._run("dpo (with SFT and both reward models)", first, "mpo.threshold=0")
        self.base = dpo
        all_pairs = dpo["select"]
        self.thetas = {spec: resolve_theta(spec, all_pairs / "manifest.json") for spec in self.theta_specs}
        theta_a, theta_b = (f"mpo.threshold={self.thetas[s]}" for s in self.theta_specs)
        mpo_a = self._run("mpo_a", ("select", "dpo", "ppo"), theta_a, shards_from=all_pairs)
        mpo_b = self._run("mpo_b", ("select", "dpo", "ppo"), theta_b, shards_from=all_pairs)
        ppo = self._run("ppo", ("select", "ppo"), f"mpo.threshold={ALL_HARD}", "mpo.order=reverse",
                        shards_from=all_pairs)
        sft_kl = self._run("mpo_sft_kl", ("ppo",), theta_a, "mpo.reference=sft")
        reverse = self._run("mpo_reverse", ("ppo", "dpo"), theta_a, "mpo.order=reverse")
        num_pairs = read_json(all_pairs / "manifest.json")["counts"]["pairs"]
        dpo_base = self._run("dpo_base", ("select", "dpo"), "mpo.threshold=0", "select.pair_source=dataset",
                             "select.label_policy=human", "select.data_phase=2", f"select.max_prompts={num_pairs}")
        self.selects = {"mpo_a": mpo_a["select"], "mpo_b": mpo_b["select"], "dpo_base": dpo_base["select"]}
        models = {
            "sft": dpo["sft"],
            "dpo_base": dpo_base["dpo"],
            "dpo": dpo["dpo"],
            "ppo": ppo["ppo"] / "actor",
            "mpo_a": mpo_a["ppo"] / "actor",
            "mpo_b": mpo_b["ppo"] / "actor",
            "mpo_sft_kl": sft_kl["ppo"] / "actor",
            "mpo_reverse": reverse["dpo"],
            "mpo_a_stage1": mpo_a["dpo"],
        }
        # the chain's own evaluation command (its data, both reward models, its eval section) on these models
        eval_stage = next(stage for stage in build_plan(self.config(), self.root) if stage.name == "eval")
        common = [*without_flags(eval_stage.command, "--model", "--output_dir"),
                  *(flag for name, path in models.items() for flag in ("--model", f"{name}={path}"))]
        # Greedy answers (as `mpo eval` and the paper's table) and samples at T=1 (the policy RLHF optimises).
        for eval_name, decoding in (("eval", ["--greedy"]), ("eval_sampled", ["--do_sample", "--temperature", "1.0"])):
            eval_dir = self.root / eval_name
            if (eval_dir / "table.json").exists():
                continue
            print(f"[reproduce] seed {self.seed}: {eval_name}", flush=True)
            subprocess.run([*common, *decoding, "--output_dir", str(eval_dir)], check=True)
        return self.summary(time.time() - start)

    def summary(self, seconds: float) -> dict[str, Any]:
        rows = {r["name"]: r for r in read_json(self.root / "eval/table.json")["rows"]}
        sampled = {r["name"]: r for r in read_json(self.root / "eval_sampled/table.json")["rows"]}
        selects = {name: read_json(path / "manifest.json") for name, path in self.selects.items()}
        return {
            "seed": self.seed,
            "thetas": {spec: self.thetas[spec] for spec in self.theta_specs},
            "easy_fraction": {spec: selects[key]["fractions"]["easy"]
                              for spec, key in zip(self.theta_specs, ("mpo_a", "mpo_b"))},
            **{metric: {k: r.get(column) for k, r in table.items()} for metric, column, table in (
                ("gold", "gold_mean", rows), ("reward", "mean_reward", rows), ("reward_heldout", "heldout_mean", rows),
                ("gold_sampled", "gold_mean", sampled), ("reward_sampled", "mean_reward", sampled),
                ("reward_heldout_sampled", "heldout_mean", sampled))},
            "length": {k: r["mean_length"] for k, r in rows.items()},
            "num_eval_prompts": next(iter(rows.values()))["n"],
            "rm_vs_gold": rm_gold_agreement(self.selects["mpo_a"]) if "assets" in self.base else None,
            "rm_vs_human_dataset_pairs": selects["dpo_base"].get("rm_accuracy_vs_human"),
            "max_gold": (read_json(self.base["assets"] / "data/manifest.json")["test"]["mean_max_gold"]
                         if "assets" in self.base else None),
            "stage_seconds": stage_seconds(self.root),
            "stage_seconds_total": round(sum(stage_seconds(self.root).values()), 1),
            "wall_seconds": round(seconds, 1),
        }


def without_flags(command: list[str], *flags: str) -> list[str]:
    """`command` without each occurrence of `flags` and the value after it."""
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def reuse_shards(source: Path, dest: Path) -> None:
    """Give a selection run the scored pairs of another over the same SFT/RM/prompts: the selection
    stage then only re-splits them at its own theta (shards do not depend on theta)."""
    if (dest / "manifest.json").exists() or (dest / "shards").exists() or not (source / "shards").is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".tmp-shards-{os.getpid()}"
    shutil.copytree(source / "shards", tmp)
    os.replace(tmp, dest / "shards")


def resolve_theta(spec: str, manifest: Path) -> float:
    """A number, or `pNN`: that percentile of the reward gaps of all SFT sample pairs (p10..p90)."""
    if spec.startswith("p"):
        gaps = read_json(manifest)["gap"]
        if spec not in gaps:
            raise UserError(f"--thetas {spec}: percentile not recorded; use one of p10, p25, p50, p75, p90")
        return round(float(gaps[spec]), 4)
    return float(spec)


def rm_gold_agreement(sel: Path) -> dict[str, float | None]:
    """How often the RM's ordering of two SFT samples agrees with the gold reward, over all pairs and
    over the easy / hard split of the first theta (pairs with equal gold are left out): the premise of MPO."""

    def accuracy(files: list[Path]) -> float | None:
        agree = total = 0
        for path in files:
            for rec in read_jsonl(path):
                gc, gr = any_gold_reward(rec["prompt"], rec["chosen"]), any_gold_reward(rec["prompt"], rec["rejected"])
                if gc != gr:
                    total += 1
                    agree += gc > gr
        return round(agree / total, 4) if total else None

    return {"all": accuracy([sel / "easy.jsonl", sel / "hard.jsonl"]), "easy": accuracy([sel / "easy.jsonl"]),
            "hard": accuracy([sel / "hard.jsonl"])}


def stage_seconds(seed_dir: Path) -> dict[str, float]:
    """Seconds per stage of this seed, as last run (kept across resumed invocations)."""
    path = seed_dir / "stage_seconds.json"
    return read_json(path) if path.exists() else {}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- report


METRICS = ("gold", "reward", "reward_heldout", "gold_sampled", "reward_sampled", "reward_heldout_sampled")
METRIC_NAMES = {"gold": "gold (greedy)", "reward": "RM (greedy)", "reward_heldout": "held-out RM (greedy)",
                "gold_sampled": "gold (T=1)", "reward_sampled": "RM (T=1)", "reward_heldout_sampled": "held-out RM (T=1)"}
#: The scores a paper claim is checked on (the verdict is on the first one measured: gold where there is one).
CLAIM_METRICS = ("gold", "reward_heldout", "gold_sampled", "reward_heldout_sampled")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def measured(seeds: list[dict], metric: str) -> bool:
    """Whether every seed has `metric` for every method (gold: only on the embedded tasks; held-out RM: runs made
    since the held-out reward model exists)."""
    return all(s.get(metric) and all(v is not None for v in s[metric].values()) for s in seeds)


def verdict(diffs: list[float]) -> str:
    """"holds" = better on average and in every seed, "mostly" = in most seeds, else "fails"."""
    mean = statistics.fmean(diffs)
    wins = sum(d > 0 for d in diffs)
    return "holds" if mean > 0 and wins == len(diffs) else "mostly" if mean > 0 and 2 * wins > len(diffs) else "fails"


def aggregate(seeds: list[dict], labels: dict[str, str]) -> dict[str, Any]:
    """Mean and std over seeds per method, and the paper's claims checked pairwise per seed on gold and on the
    held-out reward model (the verdict: on greedy gold where it is known, else on the greedy held-out reward)."""
    metrics = [m for m in METRICS if measured(seeds, m)]
    rows = []
    for key, label in labels.items():
        row: dict[str, Any] = {"key": key, "label": label.strip(),
                               "length_mean": statistics.fmean(s["length"][key] for s in seeds)}
        for metric in metrics:
            values = [s[metric][key] for s in seeds]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
            row[f"{metric}_per_seed"] = values
        rows.append(row)
    claims = []
    checked = [m for m in CLAIM_METRICS if m in metrics]
    for text, a, b in CLAIMS:
        claim: dict[str, Any] = {"claim": text, "seeds": len(seeds)}
        for metric in checked:
            diffs = [s[metric][a] - s[metric][b] for s in seeds]
            m, sd = mean_std(diffs)
            claim[metric] = {"diff_mean": m, "diff_std": sd, "seeds_holding": sum(d > 0 for d in diffs),
                             "verdict": verdict(diffs)}
        claim["verdict_on"] = checked[0] if checked else None
        claim["verdict"] = claim[checked[0]]["verdict"] if checked else None
        claims.append(claim)
    agree = None
    if {"gold", "reward_heldout"} <= set(checked):
        agree = sum(c["gold"]["verdict"] == c["reward_heldout"]["verdict"] for c in claims)
    return {"rows": rows, "claims": claims, "metrics": metrics, "claim_metrics": checked,
            "heldout_agrees_with_gold": agree}


def markdown(report: dict[str, Any]) -> str:
    agg, seeds = report["aggregate"], report["seeds"]
    metrics = agg.get("metrics", [m for m in METRICS if measured(seeds, m)])
    n = len(seeds)
    best = [s["max_gold"] for s in seeds if s.get("max_gold") is not None]
    lines = [
        f"# MPO reproduction: {report.get('source', 'tiny')}"
        + (f" on `{report['task']}`" if report.get("task") else ""),
        "",
        f"`{report['command']}` — {n} seed(s) {report['seeds_list']}, {report['mode']} sizes, "
        f"{seeds[0]['num_eval_prompts']} held-out prompts per seed. RM: the learned reward model every method "
        "optimised; held-out RM: the reward model trained on the other half of its pairs, never optimised (what a "
        "user without a gold reward can check with)"
        + (f"; gold: the task's true reward (best possible ≈ {statistics.fmean(best):.2f})" if best else "")
        + ". Mean ± std over seeds.",
        "",
        "| method | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " | answer tokens |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for row in agg["rows"]:
        label = row["label"] if row["key"] != "mpo_a_stage1" else f"*{row['label']}*"
        cells = " | ".join(f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in metrics)
        lines.append(f"| {label} | {cells} | {row['length_mean']:.1f} |")
    checked = agg.get("claim_metrics", ["gold", "gold_sampled"])
    lines += ["", "Paper claims, paired per seed (difference mean ± std; seeds where it holds; verdict):", "",
              "| claim | " + " | ".join(METRIC_NAMES[m] for m in checked) + " |", "|---|" + "---|" * len(checked)]
    for c in agg["claims"]:
        cells = " | ".join(f"{c[m]['diff_mean']:+.3f} ± {c[m]['diff_std']:.3f}, {c[m]['seeds_holding']}/{c['seeds']}, "
                           f"{c[m].get('verdict', c.get('verdict'))}" for m in checked)
        lines.append(f"| {c['claim']} | {cells} |")
    if agg.get("heldout_agrees_with_gold") is not None:
        lines += ["", f"The held-out reward model's verdicts (greedy) agree with gold's on "
                      f"{agg['heldout_agrees_with_gold']} of {len(agg['claims'])} claims."]
    thetas = "; ".join(
        ", ".join(f"θ={spec}: {s['thetas'][spec]:.3g} (easy {100 * s['easy_fraction'][spec]:.0f}%)" for spec in s["thetas"])
        for s in seeds)
    lines += ["", f"Splits per seed: {thetas}."]
    agree = [s["rm_vs_gold"] for s in seeds if s.get("rm_vs_gold")]
    if agree:
        fmt = lambda key: f"{100 * statistics.fmean(a[key] for a in agree if a[key] is not None):.1f}%"  # noqa: E731
        lines.append(f"RM ordering of two SFT samples agrees with gold: {fmt('all')} of all pairs, {fmt('easy')} of "
                     f"easy, {fmt('hard')} of hard pairs (first θ).")
    lines += [
        f"Time: {sum(s['stage_seconds_total'] for s in seeds) / 60:.1f} min of stage runs over all seeds "
        f"({report['wall_seconds'] / 60:.1f} min wall in the last invocation; machine: {report['machine']}).",
        "",
        "Paper (HH-RLHF, Llama-2-7B, mean RM score): SFT 0.938, DPO-base 1.499, DPO 1.859, PPO 2.513, "
        "MPO (θ=2) 2.22, MPO (θ=1) 2.801; the sft-kl and reversed-order ablations both score below MPO.",
    ]
    return "\n".join(lines) + "\n"


def paired_differences(report: dict[str, Any], metric: str) -> list[tuple[str, list[float]]]:
    """(claim, per-seed difference A - B) for each paper claim: what the README's verdicts rest on."""
    return [(text, [s[metric][a] - s[metric][b] for s in report["seeds"]]) for text, a, b in CLAIMS]


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: the primary score per method (gold where it is known, else the held-out reward model; mean ± std over
    seeds, dots = seeds). Right: each paper claim as the paired per-seed difference A - B in it (dots = seeds, bar
    = mean ± std), with the held-out reward model's (or, without one, the T=1 samples') differences as crosses: a
    claim holds where the dots sit right of zero, whatever the seed-to-seed spread of the methods themselves."""
    from mpo_ext.plots import pyplot, save_figure

    plt = pyplot()
    seeds = report["seeds"]
    primary = "gold" if measured(seeds, "gold") else "reward_heldout"
    second = "reward_heldout" if primary == "gold" and measured(seeds, "reward_heldout") else f"{primary}_sampled"
    rows = report["aggregate"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [1, 1.15]})
    for i, r in enumerate(rows):
        color = "#8C8C8C" if r["key"] == "mpo_a_stage1" else "#4C72B0" if r["key"].startswith("mpo") else "#55A868"
        left.errorbar([r[f"{primary}_mean"]], [i], xerr=[r[f"{primary}_std"]], fmt="o", color=color, markersize=8,
                      capsize=4)
        left.scatter(r[f"{primary}_per_seed"], [i] * len(seeds), color="black", s=10, zorder=3)
    best = [s["max_gold"] for s in seeds if s.get("max_gold") is not None]
    if primary == "gold" and best:
        left.axvline(statistics.fmean(best), color="#C44E52", linestyle="--", linewidth=1,
                     label=f"best possible ({statistics.fmean(best):.2f})")
        left.legend(loc="lower left", fontsize=8)
    left.set_yticks(range(len(rows)))
    left.set_yticklabels([r["label"] for r in rows], fontsize=9)
    left.invert_yaxis()
    left.grid(axis="x", alpha=0.3)
    left.set_xlabel(f"{METRIC_NAMES[primary]} of each method")
    left.set_title(f"{METRIC_NAMES[primary]} per method\nmean ± std over {len(seeds)} seed(s), dots = seeds",
                   fontsize=10)
    claims = paired_differences(report, primary)
    crosses = dict(paired_differences(report, second))
    for i, (text, diffs) in enumerate(claims):
        mean, std = mean_std(diffs)
        held = sum(d > 0 for d in diffs)
        color = "#55A868" if mean > 0 and 2 * held > len(diffs) else "#C44E52"
        right.errorbar([mean], [i - 0.12], xerr=[std], fmt="o", color=color, markersize=8, capsize=4,
                       label=f"{METRIC_NAMES[primary]}: mean ± std" if i == 0 else None)
        right.scatter(diffs, [i - 0.12] * len(diffs), color="black", s=10, zorder=3,
                      label=f"{METRIC_NAMES[primary]}: one seed" if i == 0 else None)
        right.scatter(crosses[text], [i + 0.18] * len(diffs), color="#8172B2", s=14, marker="x", zorder=3,
                      label=f"{METRIC_NAMES[second]}: one seed" if i == 0 else None)
        right.annotate(f"{held}/{len(diffs)}", (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.axvline(0.0, color="black", linewidth=1)
    right.set_yticks(range(len(claims)))
    right.set_yticklabels([text for text, _ in claims], fontsize=9)
    right.invert_yaxis()
    right.grid(axis="x", alpha=0.3)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)  # below: no row hidden
    right.set_xlabel("paired difference A − B per seed (> 0: the claim holds in that seed)")
    right.set_title(f"Paper claims \"A > B\" on {METRIC_NAMES[primary]}, paired per seed (right margin: seeds "
                    "holding)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, fmt="png", tight=False)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="A shipped pipeline config (default: tiny).")
    source.add_argument("--config", default=None, help="A pipeline config file (YAML), as `mpo pipeline --config`.")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key for every method (repeatable), as `mpo pipeline --set`.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Run directories (default runs/reproduce, runs/reproduce-quick with --quick).")
    parser.add_argument("--results_dir", type=Path, default=None,
                        help="Where reproduce*.{json,md,png} go (default benchmarks/results; OUTPUT_DIR with --quick).")
    parser.add_argument("--quick", action="store_true",
                        help="One seed, small data and few steps (the embedded task only): a smoke run.")
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="The embedded task (configs with an assets: section; default: the config's). Results go "
                             "to reproduce_<task> files for tasks other than mpo-synthetic.")
    parser.add_argument("--seeds", default=None, help="Comma list of seeds (default 1,2,3,4,5; 1 with --quick).")
    parser.add_argument("--thetas", default=None,
                        help="Two reward-gap thresholds for MPO, numbers or gap percentiles like p50 (default 1,2 "
                             "as in the paper; p50,p75 with --quick, whose barely trained RM has a smaller scale).")
    parser.add_argument("--replot", type=Path, default=None,
                        help="Only redraw the PNG (beside it) from an existing reproduce JSON; nothing is run.")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for every stage (unless already set): the tiny model gains nothing "
                             "from more, and two threads on a busy 2-core machine run several times slower.")
    args = parser.parse_args(argv)
    args.source = args.config or args.preset or "tiny"
    args.sets = tuple(args.sets)
    args.seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3,4,5")).split(",") if s.strip()]
    thetas = tuple(t.strip() for t in (args.thetas or ("p50,p75" if args.quick else "1,2")).split(","))
    if len(thetas) != 2 or not args.seeds:
        raise UserError("--thetas needs exactly two values and --seeds at least one seed")
    for spec in thetas:
        if not spec.startswith("p"):
            try:
                float(spec)
            except ValueError:
                raise UserError(f"--thetas {spec}: give a number or a gap percentile such as p50") from None
    args.thetas = thetas
    mode = "quick" if args.quick else "full"
    name = Path(args.source).stem if args.config else args.source
    args.output_dir = (args.output_dir or REPO / ("runs/reproduce-quick" if args.quick else "runs/reproduce")).resolve()
    args.results_dir = (args.results_dir or (args.output_dir if args.quick else REPO / "benchmarks/results")).resolve()
    args.stem = ("reproduce" if mode == "full" else "reproduce_quick") + ("" if name == "tiny" else f"_{name}") + (
        "" if args.task in (None, SYNTHETIC_TASK_NAME) else "_" + args.task.removeprefix("mpo-"))
    return args


def embedded_task(args: argparse.Namespace) -> str | None:
    """The embedded task the runs are on (None: a config of real models and data)."""
    assets = make_config(args.source, args.output_dir, 0, False, args.sets, task=args.task).assets
    return assets.task if assets is not None else None


def check_settings(args: argparse.Namespace) -> None:
    """Refuse to mix runs of different settings in one directory (finished stages would be reused)."""
    path = args.output_dir / "reproduce_settings.json"
    current = json.loads(json.dumps(fingerprint(args.source, args.quick, args.thetas, args.task, args.sets)))
    if path.exists():
        if read_json(path) != current:
            raise UserError(f"--output_dir {args.output_dir}: holds a benchmark run with other settings "
                            f"(see {path}); use another --output_dir")
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, current)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        target = args.replot.with_suffix(".png")
        plot(read_json(args.replot), target)
        print(f"[reproduce] redrew {target} from {args.replot}", flush=True)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_settings(args)
    start = time.time()
    seeds = [SeedRun(args.output_dir / f"seed{s}", s, args).run() for s in args.seeds]
    labels = method_labels(args.thetas)
    report = {
        "command": " ".join(["python benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])]),
        "source": args.source,
        "task": embedded_task(args),
        "mode": "quick" if args.quick else "full",
        "seeds_list": args.seeds,
        "thetas": list(args.thetas),
        "labels": labels,
        "aggregate": aggregate(seeds, labels),
        "seeds": seeds,
        "paper_hh_rm_score": PAPER_HH,
        "settings": fingerprint(args.source, args.quick, args.thetas, args.task, args.sets),
        "wall_seconds": round(time.time() - start, 1),
        "machine": machine_line(),
        "output_dir": str(args.output_dir),
    }
    write_report(args.results_dir, args.stem, report, markdown(report), plot, "reproduce")


if __name__ == "__main__":
    run_main(main)
