"""Step definitions (arguments, trainer, build) behind the thin `main.py` entry points.

Each step module (`sft`, `reward`, `ppo`) owns its flags, its `build(args)` and its `main`; `train_main`
is the order every training step runs in. dschat only: nothing here imports `mpo_ext`.
"""

from dschat.utils.dist import init_distributed


def train_main(parse_args, build) -> None:
    """The entry point every training step shares: parse -> join the process group -> build -> train -> save.

    Run as `deepspeed --module dschat.steps.sft ...` (or reward, ppo; mpo_ext.dpo), or through the step
    folders' `main.py`, which call the same `main`."""
    args = parse_args()
    init_distributed(args.local_rank)
    run = build(args)
    run.train()
    run.save_model()
