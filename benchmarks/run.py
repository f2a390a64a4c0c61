"""Benchmark our training/generation paths against TRL and a bare PyTorch loop, on one machine, in one run.

    python benchmarks/run.py            # fuller run (<= ~15 min on 2 cores)
    python benchmarks/run.py --quick    # ~2-3 min smoke: tiny model, one batch size

Each configuration runs in a fresh subprocess (`benchmarks/worker.py`) so its peak RSS is its own.
Inside a process, after one warm-up optimizer step, several windows (passes over the same fixed
samples) are timed; figures are medians over windows (and over `--reps` repetitions of the whole
matrix). Configurations that are compared with each other run back to back, so they see similar
machine load. Results: a printed table, `benchmarks/results/<mode>.json`, `<mode>_throughput_vs_batch.png`
and `<mode>_summary.png`. See benchmarks/README.md for what is measured and the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import HH_TEST, REPO, TINYSTORIES, machine_info, median, write_json  # noqa: E402

# Prototyped inside the benchmark process only (see worker._apply_proposed_fixes); proposed for dschat/mpo_ext.
FIXES = ("collect_after_build", "no_single_rank_allreduce", "drop_right_pad_mask")
TARGETS = {"vs_trl": 1.3, "vs_bare": 0.85, "precomputed_memory": 0.7, "generation": 0.9}
TASKS = ("sft", "rm", "dpo")


# --------------------------------------------------------------------------------------------- the matrix


def plan(quick: bool, with_trl: bool, with_zero3: bool) -> list[dict[str, Any]]:
    """Configurations in run order; comparable ones are adjacent (same load conditions)."""
    if quick:
        models = {"tiny": {"batch_sizes": [4], "samples": 8, "windows": 5}}
        gen_tokens, gen_bs, gen_windows = 32, 4, 3
    else:
        models = {"tiny": {"batch_sizes": [2, 8], "samples": 8, "windows": 6},
                  "rand": {"batch_sizes": [2, 8], "samples": 8, "windows": 4}}
        gen_tokens, gen_bs, gen_windows = 64, 8, 4
    configs: list[dict[str, Any]] = []
    for model, spec in models.items():
        for bs in spec["batch_sizes"]:
            for task in TASKS:
                base = {"kind": "train", "task": task, "model": model, "batch_size": bs, "padding": "longest",
                        "ref": "resident", "samples_per_window": spec["samples"], "windows": spec["windows"],
                        "warmup_steps": -(-spec["samples"] // bs)}  # one whole window of warm-up
                variants = [("ours", {"impl": "ours"})]
                if with_trl:
                    variants.append(("trl", {"impl": "trl"}))
                variants += [("bare", {"impl": "bare"}), ("ours-maxlen", {"impl": "ours", "padding": "max_length"})]
                if task == "dpo":
                    variants.append(("ours-precomp", {"impl": "ours", "ref": "precomputed"}))
                    if with_trl and bs == max(spec["batch_sizes"]) and not quick:
                        variants.append(("trl-precomp", {"impl": "trl", "ref": "precomputed"}))
                if bs == max(spec["batch_sizes"]) and not quick:  # prototypes of the fixes proposed in README
                    variants.append(("ours+fix", {"impl": "ours", "fixes": list(FIXES)}))
                    if task == "dpo":
                        variants.append(("ours-precomp+fix", {"impl": "ours", "ref": "precomputed",
                                                              "fixes": list(FIXES)}))
                for label, extra in variants:
                    configs.append({**base, **extra, "name": f"{task}/{model}/bs{bs}/{label}", "label": label})
    if not quick:  # memory: a ~50M model whose weights, not activations, dominate; small data file
        base = {"kind": "train", "task": "dpo", "impl": "ours", "model": "wide", "batch_size": 1, "data": "small",
                "padding": "longest", "samples_per_window": 2, "windows": 1, "warmup_steps": 1}
        for label, extra in (("ours", {"ref": "resident"}), ("ours-precomp", {"ref": "precomputed"}),
                             ("ours+fix", {"ref": "resident", "fixes": list(FIXES)}),
                             ("ours-precomp+fix", {"ref": "precomputed", "fixes": list(FIXES)}),
                             ("ours-lora", {"ref": "resident", "lora_dim": 8}),
                             ("ours-lora-precomp+fix", {"ref": "precomputed", "lora_dim": 8, "fixes": list(FIXES)}),
                             ("bare", {"impl": "bare"})):
            configs.append({**base, **extra, "name": f"dpo-mem/wide/bs1/{label}", "label": label})
    for model in models:
        for impl in ("ours", "bare"):
            configs.append({"kind": "gen", "impl": impl, "model": model, "batch_size": gen_bs,
                            "samples_per_window": gen_bs, "max_new_tokens": gen_tokens, "windows": gen_windows,
                            "warmup_steps": 1, "name": f"gen/{model}/bs{gen_bs}/{impl}", "label": impl})
    if with_zero3 and not quick:
        for impl in ("ours", "bare"):
            configs.append({"kind": "gen", "impl": impl, "model": "tiny", "batch_size": 4, "samples_per_window": 4,
                            "max_new_tokens": 32, "windows": 2, "warmup_steps": 1, "zero_stage": 3, "ranks": 2,
                            "name": f"gen-zero3x2/tiny/bs4/{impl}", "label": impl})
    configs.append({"kind": "ppo", "batch_size": 4, "max_new_tokens": gen_tokens, "windows": gen_windows,
                    "warmup_steps": 1, "name": "ppo/tiny/bs4/ours", "label": "ours", "model": "tiny"})
    return configs


# --------------------------------------------------------------------------------------------- running


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(cfg: dict, workdir: Path, timeout: int) -> dict:
    """One configuration in a fresh process; returns its JSON, or an `error` record (the run goes on)."""
    safe = cfg["name"].replace("/", "_")
    out = workdir / "results" / f"{safe}.{os.getpid()}.json"
    log = workdir / "logs" / f"{safe}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    payload = json.dumps({**cfg, "workdir": str(workdir)})
    worker = str(HERE / "worker.py")
    if cfg.get("ranks", 1) > 1:
        cmd = ["deepspeed", "--num_gpus", str(cfg["ranks"]), "--master_port", str(free_port()), worker, payload,
               str(out)]
    else:
        cmd = [sys.executable, worker, payload, str(out)]
    threads = str(cfg.get("threads", 1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), timeout=timeout,
                                  check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.time() - start
    if code == 0 and out.exists():
        result = json.loads(out.read_text())
        result["wall_seconds"] = wall
        return result
    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
    return {"config": cfg, "error": f"exit {code}", "log": str(log), "log_tail": tail, "wall_seconds": wall}


# --------------------------------------------------------------------------------------------- aggregation


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per configuration: medians over every timed window of every repetition."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_name[run["config"]["name"]].append(run)
    rows = {}
    for name, group in by_name.items():
        ok = [r for r in group if "error" not in r]
        cfg = group[0]["config"]
        row: dict[str, Any] = {"config": cfg, "runs": len(group), "errors": [r for r in group if "error" in r]}
        if ok:
            windows = [w for r in ok for w in r["windows"]]
            seconds = [w["seconds"] for w in windows]
            useful, samples = windows[0]["useful_tokens"], windows[0]["samples"]
            med = median(seconds)
            cpu = median([w["cpu_seconds"] for w in windows])
            row.update(
                median_window_cpu_seconds=cpu, cpu_tokens_per_second=useful / cpu if cpu else None,
                windows=len(windows), window_seconds=seconds, median_window_seconds=med,
                useful_tokens_per_window=useful, padded_tokens_per_window=windows[0]["padded_tokens"],
                tokens_per_second=useful / med if med else None,
                best_tokens_per_second=useful / min(seconds) if seconds else None,
                samples_per_second=samples / med if med else None,
                peak_rss_mb=median([r["peak_rss_mb"] for r in ok]),
                baseline_rss_mb=median([r.get("baseline_rss_mb", 0.0) for r in ok]),
                wall_seconds=median([r["wall_seconds"] for r in ok]),
                build_seconds=median([r.get("build_seconds", 0.0) for r in ok]),
                first_loss=ok[0].get("first_loss"), live_causal_lm_models=ok[0].get("live_causal_lm_models"),
                loadavg=[r.get("loadavg_1min") for r in ok],
            )
            row["peak_above_baseline_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
            if cfg["kind"] == "ppo":
                phases = [p for r in ok for p in r["phases"]]
                row["phases"] = {k: median([p.get(k, 0.0) for p in phases])
                                 for k in ("generation", "experience", "training")}
                row["answer_tokens"] = median([p["answer_tokens"] for p in phases])
        rows[name] = row
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# (numerator label, denominator label, metric, target key or None, comparison, what it shows)
RATIOS = (
    ("ours", "trl", "cpu_tokens_per_second", "vs_trl", ">=", "ours/TRL useful tok per CPU-s"),
    ("ours", "bare", "cpu_tokens_per_second", "vs_bare", ">=", "ours/bare useful tok per CPU-s"),
    ("ours", "trl", "tokens_per_second", None, ">=", "ours/TRL useful tok/s (wall)"),
    ("ours", "bare", "tokens_per_second", None, ">=", "ours/bare useful tok/s (wall)"),
    ("ours", "ours-maxlen", "cpu_tokens_per_second", None, ">=", "padding longest/max_length tok per CPU-s"),
    ("ours-precomp", "trl-precomp", "cpu_tokens_per_second", "vs_trl", ">=", "both precomputed: ours/TRL"),
    ("ours-precomp", "trl", "cpu_tokens_per_second", None, ">=", "ours precomputed / TRL resident"),
    ("ours+fix", "trl", "cpu_tokens_per_second", "vs_trl", ">=", "ours+fixes/TRL tok per CPU-s"),
    ("ours+fix", "bare", "cpu_tokens_per_second", "vs_bare", ">=", "ours+fixes/bare tok per CPU-s"),
    ("ours+fix", "ours", "cpu_tokens_per_second", None, ">=", "effect of the proposed fixes (speed)"),
    ("ours+fix", "ours", "peak_rss_mb", None, "<=", "effect of the proposed fixes (peak RSS)"),
    ("ours-precomp", "ours", "peak_rss_mb", "precomputed_memory", "<=", "precomputed/resident peak RSS"),
    ("ours-precomp", "ours", "peak_above_baseline_mb", None, "<=", "precomputed/resident peak above imports"),
    ("ours-precomp+fix", "ours", "peak_rss_mb", "precomputed_memory", "<=",
     "precomputed+fixes / resident (today) peak RSS"),
    ("ours-precomp+fix", "ours+fix", "peak_rss_mb", "precomputed_memory", "<=",
     "precomputed+fixes / resident+fixes peak RSS"),
    ("ours-precomp+fix", "ours+fix", "peak_above_baseline_mb", None, "<=",
     "precomputed+fixes / resident+fixes peak above imports"),
    ("ours-lora-precomp+fix", "ours-lora", "peak_rss_mb", "precomputed_memory", "<=",
     "LoRA: precomputed+fixes / resident peak RSS"),
    ("ours", "bare", "peak_rss_mb", None, "<=", "ours/bare peak RSS"),
    ("ours", "trl", "peak_rss_mb", None, "<=", "ours/TRL peak RSS"),
)


def compare(rows: dict[str, dict]) -> list[dict]:
    """The ratios the targets are about, for every group (task/model/batch) where both sides ran."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, row in rows.items():
        prefix, label = name.rsplit("/", 1)
        groups[prefix][label] = row
    out = []
    for prefix, members in groups.items():
        kind = next(iter(members.values()))["config"]["kind"]
        if kind == "gen":
            for key, unit, target in (("cpu_tokens_per_second", "per CPU-s", "generation"),
                                      ("tokens_per_second", "wall", None)):
                value = _ratio(members.get("ours", {}).get(key), members.get("bare", {}).get(key))
                if value is not None:
                    out.append({"what": f"{prefix}: ours/bare generated tok ({unit})", "value": value,
                                "target": TARGETS.get(target) if target else None, "cmp": ">="})
            continue
        for num, den, key, target, cmp, what in RATIOS:
            value = _ratio(members.get(num, {}).get(key), members.get(den, {}).get(key))
            if value is not None:
                out.append({"what": f"{prefix}: {what}", "value": value,
                            "target": TARGETS[target] if target else None, "cmp": cmp})
    for rec in out:
        v, t = rec["value"], rec["target"]
        rec["met"] = None if v is None or t is None else (v >= t if rec["cmp"] == ">=" else v <= t)
    return out


# --------------------------------------------------------------------------------------------- output


def _f(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_tables(rows: dict[str, dict], comparisons: list[dict]) -> None:
    header = (f"{'configuration':40} {'tok/s':>8} {'tok/cpu':>8} {'samp/s':>7} {'win s':>6} {'pad%':>5} "
              f"{'peakMB':>7} {'+base':>6} {'wall s':>6} {'loss0':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in rows.items():
        if row.get("errors") and "tokens_per_second" not in row:
            print(f"{name:40} ERROR {row['errors'][0]['error']} (log: {row['errors'][0]['log']})")
            continue
        pad = None
        if row.get("padded_tokens_per_window"):
            pad = 100 * (1 - row["useful_tokens_per_window"] / row["padded_tokens_per_window"])
        print(f"{name:40} {_f(row['tokens_per_second']):>8} {_f(row['cpu_tokens_per_second']):>8} "
              f"{_f(row['samples_per_second'], '{:.2f}'):>7} {_f(row['median_window_seconds'], '{:.2f}'):>6} "
              f"{_f(pad):>5} {_f(row['peak_rss_mb']):>7} {_f(row['peak_above_baseline_mb']):>6} "
              f"{_f(row['wall_seconds'], '{:.1f}'):>6} {_f(row['first_loss'], '{:.4f}'):>7}")
        if "phases" in row:
            ph = row["phases"]
            total = sum(ph.values())
            print(f"{'':40} PPO step: generation {ph['generation']:.2f}s, experience {ph['experience']:.2f}s, "
                  f"training {ph['training']:.2f}s (total {total:.2f}s, {row['answer_tokens']:.0f} answer tokens)")
    print("\ncomparison" + " " * 64 + "ratio   target  met")
    for rec in comparisons:
        met = {True: "yes", False: "NO", None: ""}[rec["met"]]
        target = f"{rec['cmp']}{rec['target']}" if rec["target"] is not None else ""
        print(f"{rec['what']:72} {_f(rec['value'], '{:.2f}'):>6} {target:>8}  {met}")


def plot(rows: dict[str, dict], out_dir: Path, mode: str) -> list[str]:
    """Throughput-vs-batch-size curves per task, and a summary of ratios, memory and generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"ours": "C0", "trl": "C1", "bare": "C2", "ours-maxlen": "C3", "ours-precomp": "C4"}
    for ax, task in zip(axes, TASKS):
        curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for row in rows.values():
            cfg = row["config"]
            if cfg["kind"] == "train" and cfg["task"] == task and row.get("tokens_per_second"):
                curves[(cfg["label"], cfg["model"])].append((cfg["batch_size"], row["tokens_per_second"]))
        for (label, model), points in sorted(curves.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=styles.get(label, "k"),
                    linestyle="-" if model == "tiny" else "--", label=f"{label} ({model})")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task.upper()}: useful tokens/s vs batch size")
        ax.set_xlabel("per-device batch size (pairs for RM/DPO)")
        ax.set_ylabel("non-pad tokens / s (median window)")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    fig.suptitle(f"dschat-mpo benchmark ({mode}); solid: tinystories-260k, dashed: random 3M Llama")
    fig.tight_layout()
    path = out_dir / f"{mode}_throughput_vs_batch.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    names = [n for n, r in rows.items() if r["config"]["kind"] == "train" and r.get("peak_rss_mb")]
    axes[0].barh(range(len(names)), [rows[n]["peak_rss_mb"] for n in names],
                 color=[styles.get(rows[n]["config"]["label"], "k") for n in names])
    axes[0].barh(range(len(names)), [rows[n]["baseline_rss_mb"] for n in names], color="lightgrey",
                 label="RSS after imports")
    axes[0].set_yticks(range(len(names)), names, fontsize=6)
    axes[0].set_xlabel("peak RSS (MiB), fresh process per configuration")
    axes[0].legend(fontsize=7)
    gen = [n for n, r in rows.items() if r["config"]["kind"] == "gen" and r.get("tokens_per_second")]
    axes[1].bar(range(len(gen)), [rows[n]["tokens_per_second"] for n in gen],
                color=[styles.get(rows[n]["config"]["label"], "k") for n in gen])
    axes[1].set_xticks(range(len(gen)), gen, rotation=30, ha="right", fontsize=7)
    axes[1].set_ylabel("generated tokens / s (greedy)")
    axes[1].set_title("generation: our Generator vs bare HF generate")
    fig.tight_layout()
    path = out_dir / f"{mode}_summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


# --------------------------------------------------------------------------------------------- main


def trl_usable() -> str | None:
    """None if TRL imports here, else why not (the comparison is then left out, not faked)."""
    proc = subprocess.run([sys.executable, "-c", "import trl; trl.SFTTrainer, trl.RewardTrainer, trl.DPOTrainer"],
                          capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~2-3 minute smoke (tiny model, one batch size).")
    parser.add_argument("--reps", type=int, default=1, help="Repeat the whole matrix (more windows per median).")
    parser.add_argument("--only", type=str, default=None, help="Run configurations whose name contains this.")
    parser.add_argument("--no-trl", action="store_true", help="Leave out the TRL comparison.")
    parser.add_argument("--no-zero3", action="store_true", help="Leave out the 2-rank ZeRO-3 generation runs.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dschat_mpo_bench",
                        help="Scratch: data subset, random model, token cache, logs.")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="Where the JSON and PNGs go.")
    parser.add_argument("--timeout", type=int, default=600, help="Seconds per configuration before giving up.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Intra-op threads per process. 1 by default: on a shared, oversubscribed machine "
                             "two spinning OpenMP threads made step times swing 20x, one thread stays steady.")
    args = parser.parse_args(argv)

    for path in (HH_TEST, TINYSTORIES):
        if not path.exists():
            print(f"error: fixture {path} is missing; the benchmark needs ../shared (see docs)", file=sys.stderr)
            return 2
    mode = "quick" if args.quick else "full"
    started = time.time()
    why_no_trl = None if args.no_trl else trl_usable()
    if why_no_trl:
        print(f"TRL comparison left out: {why_no_trl} (pip install 'dschat-mpo[bench]')")
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gb']} GiB RAM; load {info['loadavg_start']}")
    prep = run_config({"kind": "prepare", "name": "prepare"}, args.workdir, args.timeout)
    if "error" in prep:
        print(f"error: preparing assets failed ({prep['error']}); see {prep['log']}", file=sys.stderr)
        return 1
    configs = plan(args.quick, with_trl=not args.no_trl and why_no_trl is None, with_zero3=not args.no_zero3)
    if args.only:
        configs = [c for c in configs if args.only in c["name"]]
    for cfg in configs:
        cfg.setdefault("threads", args.threads)
    runs = []
    total = len(configs) * args.reps
    for rep in range(args.reps):
        for i, cfg in enumerate(configs):
            result = run_config(cfg, args.workdir, args.timeout)
            runs.append(result)
            state = result.get("error") or f"{result['wall_seconds']:.1f}s"
            print(f"[{rep * len(configs) + i + 1}/{total}] {cfg['name']}: {state}", flush=True)
    rows = summarise(runs)
    comparisons = compare(rows)
    print_tables(rows, comparisons)
    args.out.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, args.out, mode)
    info["loadavg_end"] = os.getloadavg()
    report = {"mode": mode, "machine": info, "total_seconds": time.time() - started, "reps": args.reps,
              "trl": None if why_no_trl else info["versions"].get("trl"), "rows": rows, "comparisons": comparisons,
              "targets": TARGETS, "plots": pngs, "runs": runs}
    write_json(args.out / f"{mode}.json", report)
    print(f"\nwrote {args.out / f'{mode}.json'} and {', '.join(pngs)} in {report['total_seconds']:.0f}s")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
