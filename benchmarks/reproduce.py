"""Reproduce the MPO paper's comparison (Gou & Nguyen 2024, Table 3 and ablations) on the synthetic task.

    python benchmarks/reproduce.py                    # 5 seeds, tiny-preset sizes (~30 min on 2 cores)
    python benchmarks/reproduce.py --quick --output_dir /tmp/rq   # 1 seed, small sizes: a smoke run (minutes)

Why the synthetic task: its gold reward is known, so every method can be scored by the truth as well as by
the learned reward model (RM) that it optimised. Per seed (the data draw and every training seed change
together) one SFT model and one RM are trained and shared by all methods:

    SFT          the step-1 model
    DPO-base     DPO on the dataset's own human-labelled pairs (the RM's split; as many pairs as DPO gets)
    DPO          DPO on two SFT samples per prompt, ordered by the RM, all pairs (theta = 0)
    PPO          PPO on all prompts, initialised from and KL-anchored to SFT
    MPO (theta)  DPO on the easy pairs (gap > theta), then PPO on the hard prompts, init = reference = DPO
    MPO-sft-kl   as MPO (first theta) but the PPO reference is SFT
    MPO-reverse  PPO on the hard prompts from SFT first, then DPO on the easy pairs from the PPO actor

Everything runs through `mpo_ext.pipeline` (the `tiny` preset with per-seed and --quick overrides, the
same stages as `mpo pipeline --preset tiny`); all methods of a seed share one run directory, where each
method is a config variant: stages with the same identity (assets, SFT, RM, and for the ablations the MPO
selection/DPO) are reused, and an interrupted benchmark resumes where it stopped. Results: OUTPUT_DIR/seed*/eval/table.json per seed and
`reproduce.{json,md,png}` (benchmarks/results/ by default; OUTPUT_DIR for --quick).
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
# Quick mode: the tiny preset shrunk so that every method still runs end to end in a few minutes.
QUICK = ("assets.num_train=6000", "sft.num_train_epochs=10", "rm.num_train_epochs=1", "select.max_prompts=300",
         "dpo.num_train_epochs=2", "ppo.num_train_epochs=1", "eval.num_prompts=32")
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


def make_config(run_dir: Path, seed: int, quick: bool, *sets: str, task: str = SYNTHETIC_TASK_NAME) -> PipelineConfig:
    """The tiny preset for one seed (data draw and every training seed) on one embedded task, with the --quick
    sizes."""
    seeds = (f"assets.seed={seed}", f"common.seed={seed}", f"eval.seed={seed}", f"assets.task={task}")
    return load_config("tiny", [*seeds, *(QUICK if quick else ()), f"output_dir={run_dir}", *sets])


def fingerprint(quick: bool, thetas: tuple[str, str], task: str) -> dict[str, Any]:
    """What decides the results of a run directory (not seeds or threads)."""
    return {"quick": quick, "thetas": list(thetas), "task": task,
            "config": dump_config(make_config(Path("RUN"), 0, quick, task=task))}


# --------------------------------------------------------------------------------------------- runs


class SeedRun:
    """All methods of one seed in the run directory OUTPUT_DIR/seed<N>; each method is a config variant."""

    def __init__(self, root: Path, seed: int, quick: bool, thetas: tuple[str, str], task: str):
        self.root, self.seed, self.quick, self.theta_specs, self.task = root, seed, quick, thetas, task
        self.thetas: dict[str, float] = {}

    def _run(self, name: str, steps: tuple[str, ...], *sets: str, shards_from: Path | None = None) -> dict[str, Path]:
        """Run one method's stages (the others are reused); {stage: output directory}."""
        config = make_config(self.root, self.seed, self.quick, *sets, task=self.task)
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
        dpo = self._run("dpo (with assets, SFT, RM)", ("assets", "sft", "rm", "select", "dpo"), "mpo.threshold=0")
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
        config = make_config(self.root, self.seed, self.quick, task=self.task)
        model_flags = [flag for name, path in models.items() for flag in ("--model", f"{name}={path}")]
        eval_flags = [f"--{k}={v}" for k, v in config.section("eval").items()]
        # Greedy answers (as `mpo eval` and the paper's table) and samples at T=1 (the policy RLHF optimises).
        for eval_name, decoding in (("eval", []), ("eval_sampled", ["--do_sample", "--temperature", "1.0"])):
            eval_dir = self.root / eval_name
            if (eval_dir / "table.json").exists():
                continue
            print(f"[reproduce] seed {self.seed}: {eval_name}", flush=True)
            subprocess.run([sys.executable, "-m", "mpo_ext.cli", "eval", *model_flags, "--reward_model",
                            str(dpo["rm"]), "--data_path", str(dpo["assets"] / "data"), *eval_flags, *decoding,
                            "--data_output_path", str(self.root / "data_cache"), "--output_dir", str(eval_dir)],
                           check=True)
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
            "gold": {k: r.get("gold_mean") for k, r in rows.items()},
            "reward": {k: r["mean_reward"] for k, r in rows.items()},
            "length": {k: r["mean_length"] for k, r in rows.items()},
            "gold_sampled": {k: r.get("gold_mean") for k, r in sampled.items()},
            "reward_sampled": {k: r["mean_reward"] for k, r in sampled.items()},
            "num_eval_prompts": next(iter(rows.values()))["n"],
            "rm_vs_gold": rm_gold_agreement(self.selects["mpo_a"]),
            "rm_vs_human_dataset_pairs": selects["dpo_base"].get("rm_accuracy_vs_human"),
            "max_gold": read_json(self.base["assets"] / "data/manifest.json")["test"]["mean_max_gold"],
            "stage_seconds": stage_seconds(self.root),
            "stage_seconds_total": round(sum(stage_seconds(self.root).values()), 1),
            "wall_seconds": round(seconds, 1),
        }


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


METRICS = ("gold", "reward", "gold_sampled", "reward_sampled")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(seeds: list[dict], labels: dict[str, str]) -> dict[str, Any]:
    """Mean and std over seeds per method, and the paper's claims checked pairwise per seed (the verdict
    is on greedy gold: "holds" = better on average and in every seed, "mostly" = in most seeds)."""
    rows = []
    for key, label in labels.items():
        row: dict[str, Any] = {"key": key, "label": label.strip(),
                               "length_mean": statistics.fmean(s["length"][key] for s in seeds)}
        for metric in METRICS:
            values = [s[metric][key] for s in seeds]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
            row[f"{metric}_per_seed"] = values
        rows.append(row)
    claims = []
    for text, a, b in CLAIMS:
        claim: dict[str, Any] = {"claim": text, "seeds": len(seeds)}
        for metric in ("gold", "gold_sampled"):
            diffs = [s[metric][a] - s[metric][b] for s in seeds]
            m, sd = mean_std(diffs)
            wins = sum(d > 0 for d in diffs)
            claim[metric] = {"diff_mean": m, "diff_std": sd, "seeds_holding": wins}
        g = claim["gold"]
        claim["verdict"] = ("holds" if g["diff_mean"] > 0 and g["seeds_holding"] == len(seeds) else
                            "mostly" if g["diff_mean"] > 0 and 2 * g["seeds_holding"] > len(seeds) else "fails")
        claims.append(claim)
    return {"rows": rows, "claims": claims}


def markdown(report: dict[str, Any]) -> str:
    agg, seeds = report["aggregate"], report["seeds"]
    n = len(seeds)
    lines = [
        "# MPO reproduction on the synthetic task",
        "",
        f"`{report['command']}` — {n} seed(s) {report['seeds_list']}, {report['mode']} sizes, "
        f"{seeds[0]['num_eval_prompts']} held-out prompts per seed. Gold: the task's true reward "
        f"(best possible ≈ {statistics.fmean(s['max_gold'] for s in seeds):.2f}); RM: the learned reward model "
        "every method optimised. Mean ± std over seeds.",
        "",
        "| method | gold (greedy) | RM (greedy) | gold (T=1 samples) | RM (T=1 samples) | answer tokens | "
        "greedy gold per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in agg["rows"]:
        per_seed = ", ".join(f"{g:.2f}" for g in row["gold_per_seed"])
        label = row["label"] if row["key"] != "mpo_a_stage1" else f"*{row['label']}*"
        cells = " | ".join(f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS)
        lines.append(f"| {label} | {cells} | {row['length_mean']:.1f} | {per_seed} |")
    lines += ["", "Paper claims, checked on gold, paired per seed (difference mean ± std; seeds where it holds):", "",
              "| claim | greedy gold | seeds | sampled gold | seeds | verdict (greedy) |", "|---|---|---|---|---|---|"]
    for c in agg["claims"]:
        g, t = c["gold"], c["gold_sampled"]
        lines.append(f"| {c['claim']} | {g['diff_mean']:+.3f} ± {g['diff_std']:.3f} | {g['seeds_holding']}/{c['seeds']} | "
                     f"{t['diff_mean']:+.3f} ± {t['diff_std']:.3f} | {t['seeds_holding']}/{c['seeds']} | {c['verdict']} |")
    thetas = "; ".join(
        ", ".join(f"θ={spec}: {s['thetas'][spec]:.3g} (easy {100 * s['easy_fraction'][spec]:.0f}%)" for spec in s["thetas"])
        for s in seeds)
    agree = [s["rm_vs_gold"] for s in seeds]
    fmt = lambda key: f"{100 * statistics.fmean(a[key] for a in agree if a[key] is not None):.1f}%"  # noqa: E731
    lines += [
        "",
        f"Splits per seed: {thetas}.",
        f"RM ordering of two SFT samples agrees with gold: {fmt('all')} of all pairs, {fmt('easy')} of easy, "
        f"{fmt('hard')} of hard pairs (first θ).",
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
    """Left: gold reward per method (mean ± std over seeds, dots = seeds). Right: each paper claim as the
    paired per-seed difference A - B (dots = seeds, bar = mean ± std): a claim holds where the dots sit
    right of zero, whatever the seed-to-seed spread of the methods themselves."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["aggregate"]["rows"]
    n_seeds = len(report["seeds"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [1, 1.15]})
    for i, r in enumerate(rows):
        color = "#8C8C8C" if r["key"] == "mpo_a_stage1" else "#4C72B0" if r["key"].startswith("mpo") else "#55A868"
        left.errorbar([r["gold_mean"]], [i], xerr=[r["gold_std"]], fmt="o", color=color, markersize=8, capsize=4)
        left.scatter(r["gold_per_seed"], [i] * len(r["gold_per_seed"]), color="black", s=10, zorder=3)
    best = statistics.fmean(s["max_gold"] for s in report["seeds"])
    left.axvline(best, color="#C44E52", linestyle="--", linewidth=1, label=f"best possible ({best:.2f})")
    left.set_yticks(range(len(rows)))
    left.set_yticklabels([r["label"] for r in rows], fontsize=9)
    left.invert_yaxis()
    left.legend(loc="lower left", fontsize=8)
    left.grid(axis="x", alpha=0.3)
    left.set_xlabel("gold reward of greedy answers")
    left.set_title(f"Gold reward per method\nmean ± std over {n_seeds} seed(s), dots = seeds", fontsize=10)
    claims = paired_differences(report, "gold")
    sampled = dict(paired_differences(report, "gold_sampled"))
    for i, (text, diffs) in enumerate(claims):
        mean, std = mean_std(diffs)
        held = sum(d > 0 for d in diffs)
        color = "#55A868" if mean > 0 and 2 * held > len(diffs) else "#C44E52"
        right.errorbar([mean], [i - 0.12], xerr=[std], fmt="o", color=color, markersize=8, capsize=4,
                       label="greedy: mean ± std" if i == 0 else None)
        right.scatter(diffs, [i - 0.12] * len(diffs), color="black", s=10, zorder=3,
                      label="greedy: one seed" if i == 0 else None)
        right.scatter(sampled[text], [i + 0.18] * len(diffs), color="#8172B2", s=10, marker="x", zorder=3,
                      label="T=1 samples: one seed" if i == 0 else None)
        right.annotate(f"{held}/{len(diffs)}", (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.axvline(0.0, color="black", linewidth=1)
    right.set_yticks(range(len(claims)))
    right.set_yticklabels([text for text, _ in claims], fontsize=9)
    right.invert_yaxis()
    right.grid(axis="x", alpha=0.3)
    right.legend(loc="lower left", fontsize=8)
    right.set_xlabel("paired difference A − B in gold reward, per seed (> 0: the claim holds in that seed)")
    right.set_title("Paper claims \"A > B\", paired per seed (right margin: seeds holding, greedy)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Run directories (default runs/reproduce, runs/reproduce-quick with --quick).")
    parser.add_argument("--results_dir", type=Path, default=None,
                        help="Where reproduce.{json,md,png} go (default benchmarks/results; OUTPUT_DIR with --quick).")
    parser.add_argument("--quick", action="store_true", help="One seed, small data and few steps: a smoke run.")
    parser.add_argument("--task", choices=sorted(TASKS), default=SYNTHETIC_TASK_NAME,
                        help="The embedded synthetic task (its own gold reward); results go to reproduce_<task> "
                             "files for tasks other than the default.")
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
    args.output_dir = (args.output_dir or REPO / ("runs/reproduce-quick" if args.quick else "runs/reproduce")).resolve()
    args.results_dir = (args.results_dir or (args.output_dir if args.quick else REPO / "benchmarks/results")).resolve()
    args.stem = ("reproduce" if mode == "full" else "reproduce_quick") + (
        "" if args.task == SYNTHETIC_TASK_NAME else "_" + args.task.removeprefix("mpo-"))
    return args


def check_settings(output_dir: Path, quick: bool, thetas: tuple[str, str], task: str) -> None:
    """Refuse to mix runs of different settings in one directory (finished stages would be reused)."""
    path = output_dir / "reproduce_settings.json"
    current = json.loads(json.dumps(fingerprint(quick, thetas, task)))
    if path.exists():
        if read_json(path) != current:
            raise UserError(f"--output_dir {output_dir}: holds a benchmark run with other settings "
                            f"(see {path}); use another --output_dir")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
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
    check_settings(args.output_dir, args.quick, args.thetas, args.task)
    start = time.time()
    seeds = [SeedRun(args.output_dir / f"seed{s}", s, args.quick, args.thetas, args.task).run() for s in args.seeds]
    labels = method_labels(args.thetas)
    report = {
        "command": " ".join(["python benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "seeds_list": args.seeds,
        "thetas": list(args.thetas),
        "labels": labels,
        "aggregate": aggregate(seeds, labels),
        "seeds": seeds,
        "paper_hh_rm_score": PAPER_HH,
        "settings": fingerprint(args.quick, args.thetas, args.task),
        "wall_seconds": round(time.time() - start, 1),
        "machine": machine_line(),
        "output_dir": str(args.output_dir),
    }
    write_report(args.results_dir, args.stem, report, markdown(report), plot, "reproduce")


if __name__ == "__main__":
    run_main(main)
