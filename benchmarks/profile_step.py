"""Where one training step of ours goes at 135M parameters: collation, forward, reference forward (DPO),
backward, optimizer, DeepSpeed's engine around them, and the evaluation before the first step.

    python benchmarks/profile_step.py --model_dir DIR                 # SFT, RM and DPO, one process each
    python benchmarks/profile_step.py --model_dir DIR --task dpo --steps 4

It builds our step exactly as `run.py --size 135m` does (`worker.our_argv`: the same flags, the same
SmolLM2-135M-shaped random model `s135m` and chat-template token ids in the work directory, which
`run.py --size 135m` or this script prepares), then, on one thread:
- times the evaluation before training (`Trainer._log_eval`, with the eval split our data layer made and
  the default --eval_iters / --per_device_eval_batch_size / --eval_prompts), with DPO's held-out
  generations split out;
- runs `--steps` training steps by hand, the same calls `Trainer._run_epochs` makes (next batch from the
  loader, `compute_loss`, `engine.backward`, `engine.step`), with process-CPU timers around each call and
  around the optimizer's own `step` inside `engine.step` (the rest of `engine.step` is DeepSpeed's:
  clipping, the LR schedule, zeroing gradients, its bookkeeping);
- records one further step under torch.profiler and groups its operators (matmuls, attention, the
  vocabulary-sized log-softmax / cross-entropy, the optimizer's per-tensor ops, the rest).
The first step is a warm-up and is not counted. Writes `OUT.md` and `OUT.json` (default
benchmarks/results/real_size_profile).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TASKS = ("sft", "rm", "dpo")
# torch.profiler operator names -> the group they are reported under (first match wins; the rest is "other")
OP_GROUPS = (
    ("matmul (linear layers, lm_head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention")),
    ("log-softmax / cross-entropy over the vocabulary", ("log_softmax", "nll_loss", "cross_entropy", "aten::gather",
                                                         "_softmax", "logsumexp")),
    ("optimizer and clipping per-tensor ops", ("aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt",
                                               "aten::_foreach", "aten::norm", "linalg_vector_norm", "_fused_adam")),
)


class Timers:
    """Process-CPU and wall seconds per named phase, summed over the counted steps."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.counting = False

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.counting:
                    self.cpu[name] += time.process_time() - c
                    self.wall[name] += time.perf_counter() - w
        return timed


def _group_ops(prof) -> dict[str, float]:
    """Self CPU seconds per operator group of one profiled step."""
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("phase/"):
            continue
        name = next((group for group, keys in OP_GROUPS if any(k in event.key for k in keys)), "other operators")
        groups[name] += event.self_cpu_time_total / 1e6
    return dict(groups)


def profile_task(task: str, workdir: Path, steps: int, model: str, extra: list[str]) -> dict:
    import torch
    from worker import _our_module, our_argv

    from dschat.utils.dist import init_distributed
    from dschat.utils.trainer import to_device

    torch.set_num_threads(1)
    cfg = {"task": task, "model": model, "batch_size": 2, "padding": "longest", "ref": "resident",
           "samples_per_window": 2 * (steps + 2), "windows": 1, "warmup_steps": 0}
    module = _our_module(task)
    args = module.parse_args(our_argv({**cfg, "workdir": str(workdir)}, workdir)
                             + ["--output_dir", str(workdir / f"profile_out_{os.getpid()}")] + extra)
    init_distributed(args.local_rank)
    c0, w0 = time.process_time(), time.perf_counter()
    trainer = module.build(args)
    build = {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}
    engine = trainer.engine
    result: dict = {"task": task, "model": model, "build": build, "extra_flags": extra}

    # ---- the evaluation before training, as Trainer.train() runs it at step 0 (defaults of the step)
    eval_loader = trainer.eval_loader
    result["eval_samples"] = len(eval_loader.dataset) if eval_loader is not None else 0
    result["eval_settings"] = {"eval_iters": args.eval_iters, "per_device_eval_batch_size": args.per_device_eval_batch_size,
                               "eval_prompts": getattr(args, "eval_prompts", None)}
    gen_cpu = [0.0]
    if hasattr(trainer, "_evaluate_generations"):
        inner = trainer._evaluate_generations

        def timed_generations():
            c = time.process_time()
            out = inner()
            gen_cpu[0] += time.process_time() - c
            return out

        trainer._evaluate_generations = timed_generations
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.evaluate()
    result["initial_eval"] = {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0,
                              "generation_cpu": gen_cpu[0]}

    # ---- training steps by hand: the calls Trainer._run_epochs makes, each timed
    timers = Timers()
    optimizer = engine.optimizer
    optimizer.step = timers.wrap("optimizer.step (AdamW)", optimizer.step)
    if task == "dpo":
        reference = trainer.reference
        reference.log_probs = timers.wrap("reference forward", reference.log_probs)
    compute_loss = timers.wrap("forward + loss", trainer.compute_loss)
    backward = timers.wrap("engine.backward", engine.backward)
    step = timers.wrap("engine.step", engine.step)
    batches = iter(trainer.train_loader)
    next_batch = timers.wrap("next batch (sampler, dataset, collation)", lambda: to_device(next(batches),
                                                                                          trainer.device))
    tokens = 0
    step_cpu = step_wall = 0.0
    for i in range(steps + 1):
        timers.counting = i > 0  # step 0 warms up
        c, w = time.process_time(), time.perf_counter()
        batch = next_batch()
        engine.train()
        metrics = compute_loss(batch)
        backward(metrics["loss"])
        step()
        if i > 0:
            step_cpu += time.process_time() - c
            step_wall += time.perf_counter() - w
            tokens += int(batch["attention_mask"].sum())
    timers.counting = False
    phases = dict(timers.cpu)
    phases["forward + loss"] -= phases.get("reference forward", 0.0)
    phases["engine.step"] -= phases["optimizer.step (AdamW)"]
    phases = {("DeepSpeed engine.step around the optimizer" if k == "engine.step" else k): v for k, v in phases.items()}
    phases["loop remainder"] = step_cpu - sum(phases.values())
    result.update(steps=steps, step_cpu=step_cpu / steps, step_wall=step_wall / steps, tokens_per_step=tokens / steps,
                  phases_cpu={k: v / steps for k, v in phases.items()})

    # ---- one more step under torch.profiler: operator groups
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        batch = next_batch()
        metrics = compute_loss(batch)
        backward(metrics["loss"])
        step()
    result["op_groups_cpu"] = _group_ops(prof)
    result["top_ops"] = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                         for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    return result


def markdown(results: list[dict], info: dict) -> str:
    lines = ["# One training step of ours at 135M parameters (SmolLM2-135M shape, random weights)", "",
             f"`python benchmarks/profile_step.py --model_dir DIR` on {info['nproc']} cores ({info['cpu']}), shared "
             f"with other jobs (load average at start {', '.join(f'{x:.1f}' for x in info['loadavg_start'])}); "
             "1 intra-op thread; fp32; batch 2 (pairs for RM/DPO); rows of at most 128 tokens; our default flags "
             "(ZeRO 0, torch AdamW on the CPU accelerator, length grouping, no pad mask on right-padded rows). "
             "CPU seconds of this process (`time.process_time`), mean over the counted steps after one warm-up.", ""]
    for r in results:
        total = r["step_cpu"]
        flags = f" with `{' '.join(r['extra_flags'])}`" if r.get("extra_flags") else ""
        lines += [f"## {r['task'].upper()}{flags}", "",
                  f"{r['steps']} steps counted: {total:.2f} CPU-s per step ({r['step_wall']:.2f} s wall), "
                  f"{r['tokens_per_step']:.0f} useful tokens per step ({r['tokens_per_step'] / total:.1f} per CPU-s).",
                  "", "| phase | CPU s per step | share |", "|---|---:|---:|"]
        for name, value in sorted(r["phases_cpu"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {value:.3f} | {100 * value / total:.1f}% |")
        ops_total = sum(r["op_groups_cpu"].values())
        lines += ["", "Operators of one further step under torch.profiler (self time per operator group; the profiler "
                  "clocks wall time per operator, stretched by the other jobs on the machine, so read the shares):", "",
                  "| operator group | profiler s | share |", "|---|---:|---:|"]
        for name, value in sorted(r["op_groups_cpu"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {value:.3f} | {100 * value / ops_total:.1f}% |")
        ev = r["initial_eval"]
        settings = r["eval_settings"]
        gen = f", of which greedy answers to held-out prompts {ev['generation_cpu']:.1f}" if ev["generation_cpu"] else ""
        lines += ["", f"Build (data from cache, model, DeepSpeed engine): {r['build']['cpu']:.1f} CPU-s. Evaluation "
                  f"before training (--eval_iters {settings['eval_iters']} (the step's default; 0: every batch), eval "
                  f"batch {settings['per_device_eval_batch_size']} (the benchmark's)"
                  + (f", --eval_prompts {settings['eval_prompts']}" if settings["eval_prompts"] is not None else "")
                  + f"; {r['eval_samples']} eval samples in this data): {ev['cpu']:.1f} CPU-s{gen}, "
                  f"= {ev['cpu'] / total:.1f} training steps.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True, help="A SmolLM2-135M-Instruct folder.")
    parser.add_argument("--task", choices=TASKS, default=None, help=argparse.SUPPRESS)  # one task, in this process
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks, one fresh process each.")
    parser.add_argument("--extra", default="", help="More flags for our step, e.g. \"--optim adamw_torch_fused\".")
    parser.add_argument("--model", default="s135m", choices=("s135m", "smollm2"))
    parser.add_argument("--steps", type=int, default=3, help="Counted steps after one warm-up.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dschat_mpo_bench")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real_size_profile")
    parser.add_argument("--json_out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task:
        result = profile_task(args.task, args.workdir, args.steps, args.model, args.extra.split())
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1))
        return 0

    from common import machine_info, prepare_real_size

    info = machine_info()
    prepare_real_size(args.workdir, args.model_dir)
    results = []
    for task in args.tasks.split(","):
        out = args.workdir / f"profile_{task}_{os.getpid()}.json"
        out.unlink(missing_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   MASTER_PORT=str(port), PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, "--model_dir", str(args.model_dir), "--task", task, "--model", args.model,
               "--steps", str(args.steps), "--workdir", str(args.workdir), "--json_out", str(out),
               f"--extra={args.extra}"]
        subprocess.run(cmd, env=env, check=True)
        results.append(json.loads(out.read_text()))
        print(f"{task}: {results[-1]['step_cpu']:.2f} CPU-s per step", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results, info))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
