"""Upstream's `dschat.utils.utils` import path: every helper name DeepSpeed-Chat's scripts import from it.

The helpers live by job in their own modules and are re-exported here (project code imports them from their
homes): printing (`printing`), moving batches (`device`), seeding and RNG state (`seeding`), collectives
(`dist`), atomic writes and JSON lines (`files`), tokenizer loading (`tokenizer`), optimizer groups (`optim`),
EMA (`ema`), ZeRO-3 gathering (`zero`) and model savers (`saving`). Upstream-only names no project code calls
(`save_hf_format`, `save_zero_three_model`) live in `dschat.utils.compat` and are still importable from here.
"""

from __future__ import annotations

from dschat.utils.device import to_device
from dschat.utils.dist import get_all_reduce_mean
from dschat.utils.ema import ExponentialMovingAverage, moving_average
from dschat.utils.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
)
from dschat.utils.optim import create_optimizer, get_optimizer_grouped_parameters
from dschat.utils.printing import print_rank_0
from dschat.utils.saving import save_causal_lm, save_reward_model
from dschat.utils.seeding import get_rng_state, set_random_seed, set_rng_state
from dschat.utils.tokenizer import (
    FULL_TOKENIZER_FILES,
    SLOW_TOKENIZER_FILES,
    is_upstream_llama_tokenizer_dir,
    load_hf_tokenizer,
)
from dschat.utils.zero import gather_full_state_dict, is_zero3

__all__ = [
    "FULL_TOKENIZER_FILES", "SLOW_TOKENIZER_FILES", "ExponentialMovingAverage", "atomic_write", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_jsonl", "atomic_write_text", "create_optimizer", "gather_full_state_dict",
    "get_all_reduce_mean", "get_optimizer_grouped_parameters", "get_rng_state", "is_upstream_llama_tokenizer_dir",
    "is_zero3", "load_hf_tokenizer", "moving_average", "print_rank_0", "save_causal_lm", "save_reward_model",
    "set_random_seed", "set_rng_state", "to_device",
]


def __getattr__(name: str):
    """Upstream-only names (`save_hf_format`, `save_zero_three_model`) live in `dschat.utils.compat`."""
    from dschat.utils import compat  # the upstream-compatibility module imports the savers' homes

    if name in compat.UPSTREAM_UTILS_NAMES:
        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
