"""Step definitions (arguments, trainer, build) behind the thin `main.py` entry points.

Each step module (`sft`, `reward`, `ppo`) owns its settings type (its flags), its `build(settings)` and its
`main`; `train_main` is the order every training step runs in. dschat only: nothing here imports `mpo_ext`.
"""

from dschat.utils.dist import init_distributed


def train_main(parse_args, build) -> None:
    """The entry point every training step shares: parse (the frozen settings) -> join the process group ->
    build -> train -> save.

    Run as `deepspeed --module dschat.steps.sft ...` (or reward, ppo; mpo_ext.dpo), or through the step
    folders' `main.py`, which call the same `main`."""
    settings = parse_args()
    init_distributed(settings.local_rank)
    run = build(settings)
    run.train()
    run.save_model()
