"""ZeRO-3 helpers: whether a parameter or model is partitioned, and the one gatherer of a full state dict.

DeepSpeed is imported where used: importing this module needs torch only.
"""

from __future__ import annotations

import torch

from dschat.utils.dist import is_rank_0


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed gives those a `ds_id`)."""
    return hasattr(param, "ds_id")


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 ({} elsewhere); gathers ZeRO-3 partitions one parameter at a time.

    Must be called on every rank when the model is ZeRO-3 partitioned (it is a collective then).
    LoRA tensors are dropped: callers fuse LoRA first.
    """
    import deepspeed  # lazy: see the module docstring

    model = getattr(model, "module", model)
    keep = set(model.state_dict().keys())
    rank0 = is_rank_0()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if is_partitioned(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank0:
                    state[name] = param.data.detach().cpu().clone()
        elif rank0:
            state[name] = param.detach().cpu().clone()
    if rank0:
        for name, buf in model.named_buffers():
            if name in keep:
                state[name] = buf.detach().cpu().clone()
    return {k: v for k, v in state.items() if "lora" not in k}


def is_zero3(model: torch.nn.Module) -> bool:
    model = getattr(model, "module", model)
    return any(is_partitioned(p) for p in model.parameters())
