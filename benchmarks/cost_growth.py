"""How cost grows: throughput and peak memory of SFT, DPO, selection (step 2.5) and one PPO step against model
size, sequence length, number of selection prompts and ranks (1 vs 2).

    python benchmarks/cost_growth.py            # default grid, 26 points: 35 min on 2 cores at load ~11
    python benchmarks/cost_growth.py --quick    # smoke, 8 points (each stage moved along one axis): 7 min there
    python benchmarks/cost_growth.py --report benchmarks/results/cost_growth.json   # re-render only

Every point is one configuration of `benchmarks/run.py`'s machinery, run by its `run_config` in a fresh
process (`benchmarks/worker.py`; 2 ranks under the real `deepspeed` launcher, gloo, CPU), so each peak RSS is
the point's own. The stages are the real ones: `dschat.steps.sft` and `mpo_ext.dpo` (parse_args -> build ->
Trainer.train, ZeRO 0, fp32), `mpo_ext.selection` (parse_args -> run: sample N=2 answers per prompt, score
them, split) and `dschat.steps.ppo` (parse_args -> build -> PPOLoop.train). The models are random Llamas
built from a config (no hub) with the tinystories tokenizer; the data are HH-RLHF harmless-base records.

One axis moves at a time from a base point (the middle model, the middle length, the middle prompt count,
1 rank). Throughput is measured in steady state: after warm-up steps (training, PPO) or the first batch of each
rank (selection), over whole windows; per CPU-second (user + system time of all ranks, the steady figure on a
shared machine) and per wall second (the slowest rank). Units: SFT and DPO, non-pad tokens trained on (chosen
+ rejected rows for DPO); selection, prompts (each with N answers generated and scored); PPO, answer tokens
generated per step (then scored and trained on). Peak memory: `ru_maxrss` summed over the rank processes.
Outputs: `benchmarks/results/cost_growth.{json,md}` (`cost_growth_quick.*` with `--quick`) and one PNG per axis,
`cost_growth[_quick]_<axis>.png`, with a panel column per stage that the axis applies to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import HH_TEST, MODEL_CONFIGS, TINYSTORIES, machine_info, median, write_json  # noqa: E402
from run import run_config, summarise  # noqa: E402

STAGES = ("sft", "dpo", "select", "ppo")
STAGE_TITLES = {"sft": "SFT (step 1)", "dpo": "DPO (step 3b)", "select": "selection (step 2.5, N=2)",
                "ppo": "one PPO step (step 3)"}
# What a stage's throughput counts.
UNITS = {"sft": "non-pad tokens", "dpo": "non-pad tokens", "select": "prompts", "ppo": "answer tokens"}
AXES = ("model", "seq", "prompts", "ranks")
AXIS_TITLES = {"model": "model size", "seq": "sequence length", "prompts": "number of selection prompts",
               "ranks": "ranks (1 vs 2, deepspeed launcher, gloo)"}
# Which stages each axis applies to (the prompt count is selection's).
AXIS_STAGES = {"model": STAGES, "seq": STAGES, "prompts": ("select",), "ranks": STAGES}


def grid(quick: bool) -> dict[str, Any]:
    """Axis values and the base point. `seq` is the row length for SFT/DPO (--max_seq_len: HH rows are cut
    there, so rows are about that long) and the new tokens per answer for selection/PPO (prompts of at most
    `prompt_len` tokens; random models rarely stop early)."""
    if quick:
        return {"models": ("r1m", "rand"), "train_len": (32, 64), "answer_len": (8, 16), "prompts": (4, 8),
                "ranks": (1, 2), "base": {"model": "r1m", "seq": 0, "prompts": 8, "ranks": 1},
                # a smoke: every stage and every axis, but each stage moved along one axis only (8 points)
                "moved": {"sft": ("ranks",), "dpo": ("seq",), "select": ("prompts",), "ppo": ("model",)},
                "train_batch": 4, "train_samples": 8, "train_windows": 1, "train_warmup": 1,
                "gen_batch": 2, "ppo_windows": 1, "prompt_len": 128}
    return {"models": ("r1m", "rand", "r12m"), "train_len": (64, 128, 256), "answer_len": (16, 32, 64),
            "prompts": (8, 16, 32), "ranks": (1, 2), "base": {"model": "rand", "seq": 1, "prompts": 16, "ranks": 1},
            "train_batch": 4, "train_samples": 16, "train_windows": 2, "train_warmup": 2,
            "gen_batch": 4, "ppo_windows": 2, "prompt_len": 128}


def model_params(name: str) -> int:
    """Parameters of a random Llama of MODEL_CONFIGS (untied embeddings, grouped-query attention)."""
    c = MODEL_CONFIGS[name]
    h, ffn, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
    return 2 * vocab * h + layers * per_layer + h


def point_config(stage: str, model: str, seq: int, prompts: int, ranks: int, g: dict) -> dict[str, Any]:
    """One worker configuration (benchmarks/worker.py's keys) for a stage at a point of the grid."""
    common = {"model": model, "ranks": ranks, "stage": stage, "label": "ours"}
    if stage in ("sft", "dpo"):
        cfg = {"kind": "train", "task": stage, "impl": "ours", "batch_size": g["train_batch"], "padding": "longest",
               "ref": "resident", "max_seq_len": seq, "samples_per_window": g["train_samples"],
               "windows": g["train_windows"], "warmup_steps": g["train_warmup"]}
    elif stage == "select":
        cfg = {"kind": "select", "batch_size": g["gen_batch"], "prompts": prompts, "num_samples": 2,
               "max_new_tokens": seq, "max_prompt_seq_len": g["prompt_len"]}
    else:
        cfg = {"kind": "ppo", "batch_size": g["gen_batch"], "max_new_tokens": seq, "data": "prompts",
               "max_prompt_seq_len": g["prompt_len"], "windows": g["ppo_windows"], "warmup_steps": 1}
    cfg.update(common, seq=seq)
    suffix = f"/p{prompts}" if stage == "select" else ""
    cfg["name"] = f"growth/{stage}/{model}/len{seq}{suffix}/r{ranks}"
    return cfg


def plan(quick: bool) -> list[dict[str, Any]]:
    """Every configuration once, each tagged with the axes it is a point of (the base point is on all)."""
    g = grid(quick)
    base = g["base"]
    configs: dict[str, dict] = {}
    for stage in STAGES:
        lengths = g["train_len"] if stage in ("sft", "dpo") else g["answer_len"]
        values = {"model": g["models"], "seq": range(len(lengths)),
                  "prompts": g["prompts"] if stage == "select" else (base["prompts"],), "ranks": g["ranks"]}
        for axis in AXES:
            if stage not in AXIS_STAGES[axis]:
                continue
            moved = "moved" not in g or axis in g["moved"][stage]
            for value in values[axis] if moved else (base[axis],):
                point = {**base, axis: value}
                cfg = point_config(stage, point["model"], lengths[point["seq"]], point["prompts"], point["ranks"], g)
                configs.setdefault(cfg["name"], {**cfg, "axes": []})["axes"].append(axis)
    return list(configs.values())


# --------------------------------------------------------------------------------------------- results


def point_rows(runs: list[dict]) -> list[dict]:
    """One row per point: throughput per CPU-second and per wall second in the stage's unit, peak RSS."""
    rows = []
    for name, row in summarise(runs).items():
        cfg = row["config"]
        ok = [r for r in runs if r.get("config", {}).get("name") == name and "error" not in r]
        out = {"name": name, "stage": cfg["stage"], "axes": cfg["axes"], "model": cfg["model"],
               "params": model_params(cfg["model"]), "seq": cfg["seq"], "prompts": cfg.get("prompts"),
               "ranks": cfg["ranks"], "unit": UNITS[cfg["stage"]]}
        if not ok:
            out["error"] = row["errors"][0]["error"]
            out["log"] = row["errors"][0]["log"]
            rows.append(out)
            continue
        windows = [w for r in ok for w in r["windows"]]
        cpu, wall = median([w["cpu_seconds"] for w in windows]), median([w["seconds"] for w in windows])
        amount = windows[0]["samples" if cfg["stage"] == "select" else "useful_tokens"]
        out.update(per_cpu_second=amount / cpu, per_wall_second=amount / wall, window_cpu_seconds=cpu,
                   window_wall_seconds=wall, amount_per_window=amount, prompts_per_window=windows[0]["samples"],
                   tokens_per_window=windows[0]["useful_tokens"],
                   peak_rss_mb=median([sum(r["peak_rss_mb_ranks"]) for r in ok]),
                   peak_rss_mb_ranks=ok[0]["peak_rss_mb_ranks"], process_wall_seconds=row["wall_seconds"],
                   loadavg_1min=ok[0].get("loadavg_1min"))
        if cfg["stage"] == "select":  # the whole stage: model build, every batch, merging and writing outputs
            stage = ok[0]["stage"]
            out.update(stage_prompts_per_wall_second=stage["samples"] / stage["seconds"],
                       stage_prompts_per_cpu_second=stage["samples"] / stage["cpu_seconds"])
        if cfg["stage"] == "ppo":
            out["ppo_cpu_phases"] = row.get("cpu_phases")
        rows.append(out)
    return rows


def axis_x(row: dict, axis: str) -> float:
    return {"model": row["params"] / 1e6, "seq": row["seq"], "prompts": row["prompts"], "ranks": row["ranks"]}[axis]


def axis_label(axis: str, stage: str) -> str:
    if axis == "seq":
        return "row length cut (--max_seq_len)" if stage in ("sft", "dpo") else "new tokens per answer"
    return {"model": "parameters (M)", "prompts": "prompts", "ranks": "ranks"}[axis]


def _f(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict], info: dict, mode: str, seconds: float) -> str:
    loads = [x for r in rows for x in (r.get("loadavg_1min") or [])]
    lines = [f"# How cost grows ({mode})", "",
             f"`python benchmarks/cost_growth.py{' --quick' if mode == 'quick' else ''}`: {info['nproc']} cores "
             f"({info['cpu']}), {info['ram_gb']} GiB RAM, torch {info['versions'].get('torch')}, deepspeed "
             f"{info['versions'].get('deepspeed')}; 1 intra-op thread per rank; {len(rows)} points in "
             f"{seconds / 60:.1f} min. Load average (1 min): {info['loadavg_start'][0]:.1f} at the start, "
             f"{info.get('loadavg_end', [float('nan')])[0]:.1f} at the end, median {median(loads):.1f} over the "
             "points (other jobs shared the cores: compare the per-CPU-second columns).", ""]
    for axis in AXES:
        lines += [f"## {AXIS_TITLES[axis]}", "",
                  "| stage | model (params) | length | prompts | ranks | unit | per CPU-s | per wall-s | "
                  "peak RSS MiB (all ranks) | window CPU-s | load |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for row in sorted((r for r in rows if axis in r["axes"]), key=lambda r: (STAGES.index(r["stage"]),
                                                                                 axis_x(r, axis))):
            head = (f"| {row['stage']} | {row['model']} ({row['params'] / 1e6:.1f}M) | {row['seq']} | "
                    f"{_f(row['prompts'])} | {row['ranks']} | {row['unit']} |")
            if "error" in row:
                lines.append(f"{head} error: {row['error']} | | | | |")
                continue
            load = row.get("loadavg_1min") or [None]
            lines.append(f"{head} {_f(row['per_cpu_second'], '{:.1f}')} | {_f(row['per_wall_second'], '{:.1f}')} | "
                         f"{_f(row['peak_rss_mb'])} | {_f(row['window_cpu_seconds'], '{:.2f}')} | "
                         f"{_f(load[0], '{:.1f}')} |")
        if axis == "prompts":
            stage_rows = sorted((r for r in rows if axis in r["axes"] and "stage_prompts_per_wall_second" in r),
                                key=lambda r: r["prompts"])
            lines += ["", "Whole selection stage (model build, every batch, merge and write), prompts per wall "
                      "second: " + ", ".join(f"{r['prompts']} prompts {r['stage_prompts_per_wall_second']:.2f}"
                                             for r in stage_rows) + "."]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path, prefix: str) -> list[str]:
    """One figure per axis; a column per stage the axis applies to (throughput on top, peak RSS below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for axis in AXES:
        stages = [s for s in AXIS_STAGES[axis] if any(axis in r["axes"] and r["stage"] == s and "error" not in r
                                                      for r in rows)]
        if not stages:
            continue
        fig, axes = plt.subplots(2, len(stages), figsize=(max(4.2 * len(stages) + 0.6, 6.5), 7), squeeze=False)
        for col, stage in enumerate(stages):
            points = sorted((r for r in rows if axis in r["axes"] and r["stage"] == stage and "error" not in r),
                            key=lambda r: axis_x(r, axis))
            xs = [axis_x(r, axis) for r in points]
            top, bottom = axes[0][col], axes[1][col]
            top.plot(xs, [r["per_cpu_second"] for r in points], marker="o", label="per CPU-second")
            top.plot(xs, [r["per_wall_second"] for r in points], marker="s", linestyle="--", label="per wall second")
            if axis == "prompts":
                top.plot(xs, [r["stage_prompts_per_wall_second"] for r in points], marker="^", linestyle=":",
                         label="whole stage, per wall second")
            top.set_title(STAGE_TITLES[stage], fontsize=10)
            top.set_ylabel(f"{UNITS[stage]} per second")
            top.set_ylim(bottom=0)
            top.legend(fontsize=7)
            bottom.plot(xs, [r["peak_rss_mb"] for r in points], marker="o", color="C3")
            bottom.set_ylabel("peak RSS, all ranks (MiB)")
            bottom.set_ylim(bottom=0)
            for ax in (top, bottom):
                ax.set_xlabel(axis_label(axis, stage))
                ax.grid(alpha=0.3)
                if axis == "model":
                    ax.set_xscale("log")
                if axis in ("ranks", "prompts"):
                    ax.set_xticks(xs)
        fig.suptitle(f"How cost grows with {AXIS_TITLES[axis]}\n(one axis moved from the base point; "
                     "random Llamas, CPU, fp32)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        path = out_dir / f"{prefix}_{axis}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    return files


def render(report: dict, out_dir: Path) -> list[str]:
    prefix = "cost_growth_quick" if report["mode"] == "quick" else "cost_growth"
    rows = point_rows(report["runs"])
    report["rows"] = rows
    report["plots"] = plot(rows, out_dir, prefix)
    write_json(out_dir / f"{prefix}.json", report)
    text = markdown(rows, report["machine"], report["mode"], report["total_seconds"])
    (out_dir / f"{prefix}.md").write_text(text, encoding="utf-8")
    print(text)
    return [str(out_dir / f"{prefix}.json"), str(out_dir / f"{prefix}.md"), *report["plots"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke: smallest models, fewest steps, each stage moved along one axis (8 points).")
    parser.add_argument("--only", type=str, default=None,
                        help="Run the points whose name contains this; with an earlier results JSON of the same "
                             "mode in --out, they replace their namesakes there and the rest is kept.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dschat_mpo_bench",
                        help="Scratch (shared with benchmarks/run.py): data subsets, random models, logs.")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="Where the JSON, Markdown and PNGs go.")
    parser.add_argument("--timeout", type=int, default=600, help="Seconds per point before giving up on it.")
    parser.add_argument("--report", type=Path, default=None,
                        help="Only re-render the Markdown and plots from an existing cost_growth JSON.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        render(json.loads(args.report.read_text()), args.out)
        return 0
    for path in (HH_TEST, TINYSTORIES):
        if not path.exists():
            print(f"error: fixture {path} is missing; set DSCHAT_SHARED_DIR to the folder holding it "
                  "(benchmarks/README.md says where to get it)", file=sys.stderr)
            return 2
    mode = "quick" if args.quick else "full"
    started = time.time()
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gb']} GiB RAM; load {info['loadavg_start']}")
    configs = plan(args.quick)
    if args.only:
        configs = [c for c in configs if args.only in c["name"]]
    models = sorted({c["model"] for c in configs})
    prep = run_config({"kind": "prepare", "name": "prepare-growth", "models": models}, args.workdir, args.timeout)
    if "error" in prep:
        print(f"error: preparing assets failed ({prep['error']}); see {prep['log']}", file=sys.stderr)
        return 1
    runs = []
    for i, cfg in enumerate(configs):
        cfg.update(threads=1, hang_dump_s=max(30, args.timeout - 30))
        result = run_config(cfg, args.workdir, args.timeout)
        runs.append(result)
        state = result.get("error") or f"{result['wall_seconds']:.1f}s"
        print(f"[{i + 1}/{len(configs)}] {cfg['name']}: {state}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    report = {"mode": mode, "machine": info, "total_seconds": time.time() - started, "grid": grid(args.quick),
              "runs": runs}
    earlier = args.out / f"{'cost_growth_quick' if args.quick else 'cost_growth'}.json"
    if args.only and earlier.is_file():
        previous = json.loads(earlier.read_text())
        rerun = {c["name"] for c in configs}
        kept = [r for r in previous["runs"] if r["config"]["name"] not in rerun]
        report.update(runs=kept + runs, total_seconds=previous["total_seconds"] + report["total_seconds"],
                      reruns=previous.get("reruns", []) + [{"only": args.only, "machine": info}],
                      machine=previous["machine"])
    files = render(report, args.out)
    print("wrote " + ", ".join(files))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
