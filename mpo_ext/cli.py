"""`mpo`: the command line of dschat-mpo (two-stage MPO, Gou & Nguyen 2024).

Not to be confused with TRL's `loss_type=[...]` "MPO", which is InternVL's loss mixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from dschat.utils.errors import UserError
from mpo_ext import eval_cli


class _InputError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turn UserError into one line and exit code 2, like the step entry points."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise _InputError(" ".join(str(err).split())) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dschat-mpo: DeepSpeed-Chat-compatible RLHF with two-stage Mixed Preference Optimization."""


@main.command("assets")
@click.option("--root", type=click.Path(path_type=Path), default=Path("runs/assets"), show_default=True,
              help="Where the synthetic data (ROOT/data) and the tiny model (ROOT/tiny-llama) go.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--num_train", type=int, default=2000, show_default=True)
@click.option("--num_test", type=int, default=200, show_default=True)
@click.option("--task", type=click.Choice(["mpo-synthetic", "mpo-sort"]), default="mpo-synthetic", show_default=True,
              help="mpo-synthetic: list items of a category; mpo-sort: sort the numbers of the prompt.")
def assets_command(root: Path, seed: int, num_train: int, num_test: int, task: str) -> None:
    """Build the embedded default: a synthetic preference task and a tiny Llama (idempotent)."""
    from mpo_ext.bootstrap import build_default_assets

    paths = build_default_assets(root, seed=seed, num_train=num_train, num_test=num_test, task=task)
    for key, value in paths.items():
        click.echo(f"{key}: {value}")


@main.command("pipeline")
@click.option("--preset", type=click.Choice(["tiny", "smoke", "llama2-7b"]), default="tiny", show_default=True,
              help="tiny: the embedded CPU default; smoke: the tiny chain shrunk to a quick check; "
                   "llama2-7b: the paper's settings on HH-RLHF, 8 GPUs.")
@click.option("--output_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default runs/mpo-tiny or ./output_mpo_llama2_7b).")
@click.option("--steps", default=",".join(("assets", "sft", "rm", "select", "dpo", "ppo", "eval")), show_default=True,
              help="Comma list of stages to run.")
@click.option("--num_ranks", type=int, default=None, help="Processes per node (default: 1 for tiny, 8 for llama2-7b).")
@click.option("--deployment_type", type=click.Choice(["single_gpu", "single_node", "multi_node"]), default=None,
              help="Shortcut for the launcher: single_gpu = 1 rank, single_node = all local GPUs, multi_node = hostfile.")
@click.option("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs.")
@click.option("--threshold", type=eval_cli.FiniteFloatRange(min=0.0), default=None,
              help="Reward-gap theta for the easy/hard split (default: the preset's; 1.0 for llama2-7b as in the paper).")
@click.option("--reference", type=click.Choice(["dpo", "sft"]), default="dpo", show_default=True,
              help="PPO's KL reference: dpo (MPO) or sft (the paper's sft-kl ablation).")
@click.option("--order", type=click.Choice(["mpo", "reverse"]), default="mpo", show_default=True,
              help="mpo: DPO on easy then PPO on hard; reverse: the paper's reversed-order ablation.")
@click.option("--dry_run", is_flag=True, default=False, help="Print every command without running (also DRY_RUN=1).")
@click.option("--force", is_flag=True, default=False, help="Re-run stages whose output is already complete.")
def pipeline_command(preset, output_dir, steps, num_ranks, deployment_type, hostfile, threshold, reference, order,
                     dry_run, force) -> None:
    """Run the whole MPO chain (like DeepSpeed-Chat's e2e_rlhf.py), skipping finished stages."""
    from mpo_ext.pipeline import (
        STAGE_ORDER,
        build_plan,
        llama2_7b_preset,
        print_final_report,
        run_plan,
        smoke_preset,
        tiny_preset,
    )

    dry_run = dry_run or os.environ.get("DRY_RUN", "") not in ("", "0")
    wanted = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = [s for s in wanted if s not in STAGE_ORDER]
    if unknown:
        raise UserError(f"--steps {steps}: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_ORDER)}")
    if deployment_type == "single_gpu":
        num_ranks = 1
    theta = {} if threshold is None else {"threshold": threshold}
    if preset in ("tiny", "smoke"):
        out = (output_dir or Path(f"runs/mpo-{preset}")).resolve()
        make = tiny_preset if preset == "tiny" else smoke_preset
        plan_preset = make(out, ranks=num_ranks or 1, **theta)
    else:
        out = (output_dir or Path("output_mpo_llama2_7b")).resolve()
        plan_preset = llama2_7b_preset(out, ranks=num_ranks or 8, hostfile=hostfile if deployment_type == "multi_node"
                                       or hostfile else None, **theta)
    plan = build_plan(plan_preset, out, reference=reference, order=order, stages=wanted)
    run_plan(plan, out, dry_run=dry_run, force=force)
    if not dry_run:
        print_final_report(out)


for _command in (eval_cli.eval_command, eval_cli.compare_command, eval_cli.plot_curves_command):
    main.add_command(_command)


if __name__ == "__main__":
    main()
