"""Helpers for gpu_smoke.sh: build the offline assets, then summarise what step 3 did.

`assets ROOT`: the synthetic preference task and a small (~25M parameter) Llama with the task's word-level
tokenizer, built offline (the device machine has no hub access). Wide enough (head dim 64) for
DeepSpeed's inference kernels, small enough that steps 1-3 fit in a few minutes on one GPU.
`report STEP3_DIR`: which generation path ran (Hybrid Engine or Hugging Face generate, and why),
generation throughput and the reward trend, from run_info.json, metrics.jsonl and training.log.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dschat.utils.files import read_jsonl  # noqa: E402
from mpo_ext.bootstrap import build_default_assets  # noqa: E402

SMALL_MODEL = {"hidden_size": 512, "num_layers": 8, "num_heads": 8}


def build_assets(root: str) -> None:
    size = {} if os.environ.get("SMOKE_TINY") else SMALL_MODEL  # SMOKE_TINY=1: the 64-wide CPU model
    paths = build_default_assets(root, num_train=2000, num_test=100, **size)
    for key, value in paths.items():
        print(f"{key}: {value}")


def report(step3_dir: str) -> int:
    out = Path(step3_dir)
    info = json.loads((out / "run_info.json").read_text())
    metrics = read_jsonl(out / "metrics.jsonl", skip_unreadable=True)
    log = (out / "training.log").read_text(errors="replace") if (out / "training.log").exists() else ""
    he_lines = [line.strip() for line in log.splitlines()
                if "--enable_hybrid_engine:" in line or "parity check passed" in line]
    print("=" * 78)
    print(f"generation path: {info['generation_path']} (hybrid engine requested: {info['hybrid_engine_requested']})")
    for line in he_lines[:3]:
        print(f"  {line}")
    if not metrics:
        print("no PPO step was logged")
        return 1
    tps = [m["tokens_per_second/generation"] for m in metrics]
    steady = tps[1:] or tps
    print(f"PPO steps: {len(metrics)} | generation tokens/s: first {tps[0]:.1f}, "
          f"median of the rest {statistics.median(steady):.1f}")
    print(f"time/generation (median) {statistics.median(m['time/generation'] for m in metrics):.2f}s | "
          f"time/training (median) {statistics.median(m['time/training'] for m in metrics):.2f}s")
    print(f"reward/mean: first {metrics[0]['reward/mean']:.3f} -> last {metrics[-1]['reward/mean']:.3f} | "
          f"objective/kl last {metrics[-1]['objective/kl']:.3f} | answer_length last {metrics[-1]['answer_length']:.1f}")
    for name in ("actor", "critic", "actor_ema"):
        print(f"{name}/: {'ok' if (out / name / 'config.json').exists() else 'MISSING'}")
    print("=" * 78)
    return 0 if (out / "actor" / "config.json").exists() and (out / "critic" / "config.json").exists() else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("assets", "report"):
        print("usage: python benchmarks/gpu_smoke.py {assets ROOT | report STEP3_DIR}", file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == "assets":
        build_assets(sys.argv[2])
    else:
        sys.exit(report(sys.argv[2]))
