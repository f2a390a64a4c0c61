"""DeepSpeed-Chat's one-shot driver for steps 1-3 with the OPT scripts, kept for drop-in use.

For the MPO chain (select, DPO, PPO on hard prompts) use `mpo pipeline` or training/run_mpo_*.sh.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STEP_DIRS = {
    1: ROOT / "training/step1_supervised_finetuning",
    2: ROOT / "training/step2_reward_model_finetuning",
    3: ROOT / "training/step3_rlhf_finetuning",
}
ACTOR_SIZES = ("1.3b", "6.7b", "13b", "66b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run DeepSpeed-Chat steps 1-3 with the OPT training scripts.")
    parser.add_argument("--step", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--actor-model", type=lambda s: s.removeprefix("facebook/opt-"), default="1.3b",
                        choices=ACTOR_SIZES)
    parser.add_argument("--reward-model", type=lambda s: s.removeprefix("facebook/opt-"), default="350m",
                        choices=("350m",))
    parser.add_argument("--actor-zero-stage", type=str, default="", choices=("", "0", "1", "2", "3"))
    parser.add_argument("--reward-zero-stage", type=str, default="", choices=("", "0", "1", "2", "3"))
    parser.add_argument("--output-dir", type=lambda p: str(Path(p).resolve()), default=str(Path("output").resolve()))
    parser.add_argument("--deployment-type", default="single_gpu", choices=("single_gpu", "single_node", "multi_node"))
    return parser.parse_args(argv)


def script_for(step: int, args: argparse.Namespace) -> Path:
    size = args.reward_model if step == 2 else args.actor_model
    return STEP_DIRS[step] / "training_scripts" / "opt" / args.deployment_type / f"run_{size}.sh"


def output_dirs(args: argparse.Namespace) -> dict[int, str]:
    return {
        1: f"{args.output_dir}/actor-models/{args.actor_model}",
        2: f"{args.output_dir}/reward-models/{args.reward_model}",
        3: f"{args.output_dir}/step3-models/{args.actor_model}",
    }


def step_command(step: int, args: argparse.Namespace) -> list[str]:
    dirs = output_dirs(args)
    script = script_for(step, args)
    if step == 1:
        return ["bash", str(script), dirs[1], args.actor_zero_stage]
    if step == 2:
        return ["bash", str(script), dirs[2], args.reward_zero_stage]
    return ["bash", str(script), dirs[1], dirs[2], args.actor_zero_stage, args.reward_zero_stage, dirs[3]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.actor_zero_stage or args.reward_zero_stage:
        print("warning: a non-default ZeRO stage may need other batch sizes than the script's", file=sys.stderr)
    for step in sorted(args.step):
        script = script_for(step, args)
        if not script.exists():
            print(f"error: no script {script} for --deployment-type {args.deployment_type}", file=sys.stderr)
            return 2
        if step == 3:
            dirs = output_dirs(args)
            missing = [d for d in (dirs[1], dirs[2]) if not (Path(d) / "config.json").exists()]
            if missing:
                print(f"error: step 3 needs finished step-1/2 outputs; missing {', '.join(missing)}", file=sys.stderr)
                return 2
        print(f"---=== Running Step {step} ===---", flush=True)
        start = time.time()
        code = subprocess.call(step_command(step, args), cwd=STEP_DIRS[step])
        if code != 0:
            log = Path(output_dirs(args)[step]) / "training.log"
            print(f"error: step {step} failed (exit {code}); see {log}. Try smaller batch sizes, a higher ZeRO "
                  "stage, --gradient_checkpointing or LoRA.", file=sys.stderr)
            return code
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"---=== Finished Step {step} in {elapsed} ===---", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
