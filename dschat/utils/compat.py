"""Names that only scripts written for upstream DeepSpeed-Chat use; the project's own code never calls them.

Upstream's step mains, and the many projects built from them, begin with
`from dschat.utils.utils import ..., save_hf_format, ..., save_zero_three_model, load_hf_tokenizer`.
This project saves through `save_causal_lm` / `save_reward_model` instead, so these two live here, in one
place, and `dschat.utils.utils` hands them out under their upstream path (its module `__getattr__`): such
a script keeps importing and saving unchanged. `tests/test_compat.py` runs that import line.

Owns: upstream-only names. Imports the savers' homes (`files`, `saving`, `zero`); nothing in `dschat/` or
`mpo_ext/` imports this.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dschat.utils.files import atomic_write
from dschat.utils.saving import save_causal_lm, save_reward_model
from dschat.utils.zero import gather_full_state_dict

UPSTREAM_UTILS_NAMES = ("save_hf_format", "save_zero_three_model")


def save_hf_format(model: torch.nn.Module, tokenizer, args, sub_folder: str = "") -> None:
    """Save `model` under `args.output_dir/sub_folder` in Hugging Face layout (upstream's name).

    Unlike upstream this writes the full tokenizer, a generation config and safetensors (a reward model:
    upstream's `pytorch_model.bin` layout), and is ZeRO-3 aware (call it on every rank then).
    """
    output_dir = os.path.join(args.output_dir, sub_folder)
    module = getattr(model, "module", model)
    if hasattr(module, "rwtransformer"):
        save_reward_model(module, tokenizer, output_dir)
    else:
        save_causal_lm(module, tokenizer, output_dir)


def save_zero_three_model(model_ema, global_rank: int, save_dir: str, zero_stage: int = 0) -> None:
    """Write the full state dict as `save_dir/pytorch_model.bin` (upstream's name; gathers ZeRO-3 weights).

    Collective under ZeRO-3: call it on every rank; rank `global_rank == 0` writes, atomically.
    """
    module = getattr(model_ema, "module", model_ema)
    state = gather_full_state_dict(module)
    if global_rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        atomic_write(Path(save_dir) / "pytorch_model.bin", lambda fh: torch.save(state, fh))
