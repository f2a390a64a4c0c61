"""Step definitions (arguments, trainer, build) behind the thin `main.py` entry points.

Each step has a light settings module (`sft_args`, `reward_args`, `ppo_args`; DPO's `mpo_ext.dpo_args`: its
flags, no torch) and a step module (`sft`, `reward`, `ppo`; `mpo_ext.dpo`) with its `build(settings)` and `main`;
`train_main` is the order every training step runs in, `run_step` what a step folder's main.py runs. dschat
only: nothing here imports `mpo_ext` (DPO's main.py names its modules itself). Importing this package imports
no torch.
"""

from __future__ import annotations

import importlib


def train_main(parse_args, build) -> None:
    """The entry point every training step shares: parse (the frozen settings) -> join the process group ->
    build -> train -> save.

    Run as `deepspeed --module dschat.steps.sft ...` (or reward, ppo; mpo_ext.dpo), or through the step
    folders' `main.py` (`run_step`)."""
    settings = parse_args()
    from dschat.utils.dist import init_distributed  # imports torch: after the flags are parsed

    init_distributed(settings.local_rank)
    run = build(settings)
    run.train()
    run.save_model()


def run_step(settings_module: str, step_module: str) -> None:
    """A step folder's main.py: parse the command line with the step's settings module alone (no torch, no
    models: --help and a bad flag answer at once), then import the step module and run it with those
    settings (`train_main`), bad input reported as one line (`run_main`)."""
    from dschat.utils.errors import run_main

    def main() -> None:
        settings = importlib.import_module(settings_module).parse_args()
        step = importlib.import_module(step_module)
        train_main(lambda: settings, step.build)

    run_main(main)
