"""Start-up per stage with and without `launcher.warm_start`, and whether the stages' outputs are the same.

Runs the first stages of a pipeline preset (default `smoke`, 1 rank) twice, in the same output root: once
as fresh `python -m` interpreters, once forked from the warm-start server (`dschat/utils/warm_start.py`),
both launched exactly as `mpo pipeline` launches them (`mpo_ext.pipeline.start_stage`), with
`DSCHAT_LAUNCH_TIME` exported per stage. Each training stage prints a `[startup]` line at its first step
(`dschat/utils/startup.py`): the table shows the rank's CPU seconds to that step (its own process only:
a warm child's clock starts at its fork) and wall seconds from launch to that step, plus the server's
one-off preload CPU seconds. Then it compares every file each stage wrote (sha256; logs, throughput figures and
records of times excluded).

    python benchmarks/warm_start.py                    # smoke: assets, sft, rm, select (~10 min on 2 cores)
    python benchmarks/warm_start.py --stages sft
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dschat.utils.files import read_jsonl  # noqa: E402
from dschat.utils.startup import LAUNCH_ENV, PREFIX  # noqa: E402
from mpo_ext.pipeline import build_plan, load_config, start_stage  # noqa: E402

#: Files that record when, how fast or the inputs' mtimes, not what was computed: left out of the comparison.
VOLATILE = ("run_info.json", "stage.json", ".log", "events.out", "manifest.json", "shards/config.json")


def timing(key: str) -> bool:
    return "per_second" in key or key.startswith("time/")


def stable_bytes(path: Path) -> bytes:
    """A file's bytes without timings (metrics.jsonl and the model card carry them) or the inputs' mtimes
    (the fingerprint in DPO's reference_logps.pt)."""
    if path.name == "metrics.jsonl":
        records = read_jsonl(path)
        return json.dumps([{k: v for k, v in r.items() if not timing(k)} for r in records]).encode()
    if path.name == "README.md":
        return "".join(x for x in path.read_text(encoding="utf-8").splitlines(True) if not timing(x.strip("| "))).encode()
    if path.name == "reference_logps.pt":
        tables = torch.load(path, weights_only=False)
        return b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(tables.items()) if k != "fingerprint")
    return path.read_bytes()


def run_stages(preset: str, sets: list[str], stages: set[str], out: Path, warm: bool) -> list[dict]:
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for stage in build_plan(load_config(preset, sets), out):
        if stage.name not in stages | {"assets"}:
            continue
        os.environ[LAUNCH_ENV] = repr(time.time())
        start = time.time()
        proc = start_stage(stage.command, out, warm)
        lines = list(proc.stdout)
        code = proc.wait()
        row = {"stage": stage.name, "returncode": code, "stage_wall_s": round(time.time() - start, 2),
               "startup": next((json.loads(x.split(PREFIX, 1)[1]) for x in lines if PREFIX in x), None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if code != 0:
            sys.exit(f"stage {stage.name} failed ({code}):\n{''.join(lines[-20:])}")
    return rows


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(stable_bytes(p)).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "data_cache" not in p.parts and not any(v in str(p) for v in VOLATILE)}


def server_cpu() -> float | None:
    """CPU seconds of this process's forkserver child (the preload), if one runs."""
    for child in psutil.Process().children():
        if "forkserver" in " ".join(child.cmdline()):
            times = child.cpu_times()
            return round(times.user + times.system, 2)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", default="sft,rm,select", help="Stages to time (assets always run).")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep both runs here (default: a temporary dir).")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    with tempfile.TemporaryDirectory(prefix="warm_bench_") as tmp:
        tmp = args.workdir or tmp
        run = Path(tmp) / "run"  # both runs write the same paths (outputs record their inputs' paths)
        fresh = run_stages(args.preset, args.set, stages, run, warm=False)
        run.rename(Path(tmp) / "fresh")
        warm = run_stages(args.preset, args.set, stages, run, warm=True)
        preload = server_cpu()
        a, b = digests(Path(tmp) / "fresh"), digests(run)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"\nLoad average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; warm-start server preload: "
          f"{preload} CPU-s once per pipeline run.\n")
    print("| stage | rank CPU-s to first step, fresh -> warm | imports CPU-s | launch to first step, wall s "
          "| whole stage wall s |\n|---|---:|---:|---:|---:|")
    for f, w in zip(fresh, warm):
        if not f["startup"] or not w["startup"]:
            continue
        fs, ws = f["startup"], w["startup"]
        print(f"| {f['stage']} | {fs['cpu']['total']:.1f} -> {ws['cpu']['total']:.1f} | {fs['cpu']['imports']:.1f} -> "
              f"{ws['cpu']['imports']:.1f} | {fs['wall']['total']:.1f} -> {ws['wall']['total']:.1f} | "
              f"{f['stage_wall_s']:.0f} -> {w['stage_wall_s']:.0f} |")
    print(f"\nOutputs compared: {len(a)} files; " + (f"DIFFERENT: {differ}" if differ else "all identical"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
