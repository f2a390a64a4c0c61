"""Start-up cost per stage of the MPO chain: seconds from launch to the first optimizer step, split.

Runs the stages of a pipeline preset (default `smoke`, 1 rank) one after the other, exactly as
`mpo pipeline` would launch them, with `DSCHAT_LAUNCH_TIME` exported so each process can report the
launcher's share. Every training stage prints one `[startup] {json}` line at its first optimizer step
(`dschat/utils/startup.py`; step 2.5 at its first scored batch): wall and CPU seconds for imports
(interpreter start to `init_distributed`), dist_init, data, model_load, deepspeed_init, lazy_imports (imports
made later, mostly transformers' model classes, taken out of the part they happened in) and other. The
table adds each stage's whole wall time and the CPU seconds of all its processes (launcher and ranks,
from `getrusage(RUSAGE_CHILDREN)`): on a shared machine wall time is inflated, CPU time much less.

    python benchmarks/startup.py                       # smoke chain, ~5 min on 2 cores
    python benchmarks/startup.py --stages sft,rm --tag before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dschat.utils.startup import IMPORTS_ENV, LAUNCH_ENV, PREFIX  # noqa: E402
from mpo_ext.pipeline import build_plan, load_config  # noqa: E402

OUT = REPO / "benchmarks" / "results"
PARTS = ("launcher", "imports", "dist_init", "data", "model_load", "deepspeed_init", "initial_eval", "lazy_imports",
         "other", "total")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage, env: dict) -> dict:
    """Launch one stage; its [startup] record, whole wall seconds and children CPU seconds."""
    cpu, wall = children_cpu(), time.time()
    env = {**env, LAUNCH_ENV: repr(time.time())}
    proc = subprocess.run(stage.command, env=env, cwd=REPO, capture_output=True, text=True)
    result = {"stage": stage.name, "returncode": proc.returncode, "stage_wall_s": round(time.time() - wall, 2),
              "stage_cpu_s": round(children_cpu() - cpu, 2), "load_average": round(os.getloadavg()[0], 2),
              "startup": None}
    for line in proc.stdout.splitlines():
        if PREFIX in line:
            result["startup"] = json.loads(line.split(PREFIX, 1)[1])
            break
    if proc.returncode != 0:
        result["error_tail"] = (proc.stdout + proc.stderr)[-1500:]
    return result


def render(rows: list[dict], load: tuple[float, float, float], tag: str) -> str:
    lines = [f"# Start-up per stage ({tag}): seconds from launch to the first optimizer step", "",
             f"Load average at the end: {load[0]:.1f} on {os.cpu_count()} cores: wall seconds are inflated by other "
             "work; CPU seconds are the stage process's own (rank 0).", "",
             "| stage | " + " | ".join(f"{p} wall / cpu" for p in PARTS)
             + " | all imports CPU (share) | whole stage wall | whole stage CPU |",
             "|---|" + "---|" * (len(PARTS) + 3)]
    for row in rows:
        s = row["startup"] or {"wall": {}, "cpu": {}}
        cells = []
        for part in PARTS:
            w, c = s["wall"].get(part), s["cpu"].get(part)
            cells.append("-" if w is None else f"{w:.1f} / {c:.1f}" if c is not None else f"{w:.1f} / -")
        imports = s["cpu"].get("imports", 0.0) + s["cpu"].get("lazy_imports", 0.0)
        share = f"{imports:.1f} ({imports / s['cpu']['total']:.0%})" if s["cpu"].get("total") else "-"
        lines.append(f"| {row['stage']} | " + " | ".join(cells) + f" | {share} | {row['stage_wall_s']} | "
                     f"{row['stage_cpu_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", help="A pipeline preset or config file (mpo pipeline --config).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config overrides.")
    parser.add_argument("--stages", default="sft,rm,select,dpo,ppo", help="Stages to time (assets always run).")
    parser.add_argument("--workdir", type=Path, default=None, help="Output root (default: a temporary one).")
    parser.add_argument("--tag", default="current", help="Name of this measurement (e.g. before, after).")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    wanted = set(args.stages.split(","))
    with tempfile.TemporaryDirectory(prefix="startup_bench_") as tmp:
        work = args.workdir or Path(tmp)
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "TOKENIZERS_PARALLELISM": "false", IMPORTS_ENV: "1"}
        rows = []
        for stage in build_plan(load_config(args.preset, args.set), work):
            if stage.name == "eval":
                continue
            row = run_stage(stage, env)
            if stage.name in wanted:
                rows.append(row)
                print(json.dumps(row), flush=True)
            if row["returncode"] != 0:
                print(f"stage {stage.name} failed:\n{row.get('error_tail', '')}", file=sys.stderr)
                break
            if wanted <= {r["stage"] for r in rows}:
                break  # later stages are not timed: do not run them
    load = os.getloadavg()
    text = render(rows, load, args.tag)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "startup.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous[args.tag] = {"preset": args.preset, "load_average": [round(x, 2) for x in load], "rows": rows}
    path.write_text(json.dumps(previous, indent=2) + "\n", encoding="utf-8")
    (args.out / f"startup_{args.tag}.md").write_text(text, encoding="utf-8")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
