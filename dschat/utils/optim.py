"""Optimizer parameter groups (upstream's three) and the optimizer for the accelerator.

DeepSpeed's optimizers are imported where used (they JIT-build kernels on first import).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dschat.utils.dist import on_cpu
from dschat.utils.errors import UserError

_NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def get_optimizer_grouped_parameters(
    model: torch.nn.Module,
    weight_decay: float,
    lora_lr: float = 5e-4,
    no_decay_name_list: Iterable[str] = _NO_DECAY,
    lora_name_list: Iterable[str] = ("lora_right_weight", "lora_left_weight"),
) -> list[dict]:
    """Upstream's three parameter groups: decayed, LoRA (own LR), and no-decay; empty groups dropped."""
    no_decay, lora = tuple(no_decay_name_list), tuple(lora_name_list)
    decayed, lora_params, undecayed = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(n in name for n in no_decay):
            undecayed.append(param)
        elif any(n in name for n in lora):
            lora_params.append(param)
        else:
            decayed.append(param)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": lora_params, "weight_decay": weight_decay, "lr": lora_lr},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(param_groups: list[dict], lr: float, offload: bool = False, betas=(0.9, 0.95),
                     optim: str = "auto"):
    """`optim` auto: FusedAdam on GPU, DeepSpeedCPUAdam with ZeRO offload, torch's fused AdamW on the CPU
    accelerator; adamw_torch / adamw_torch_fused: torch AdamW, plain or with its fused kernel (--optim).

    On CPU the fused kernel makes one pass over each tensor instead of a dozen elementwise ops: the optimizer
    step of a 135M model drops from 0.54-0.77 to 0.11-0.13 CPU-s (benchmarks/results/real_size*). It is the
    same update up to rounding, and TRL's default optimizer."""
    if optim != "auto":
        if offload:
            raise UserError(f"--optim {optim}: ZeRO offload (--offload) steps on the CPU with DeepSpeed's CPU Adam; "
                            "leave --optim auto with --offload")
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=optim == "adamw_torch_fused" or None)
    if on_cpu():
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=True)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: see the module docstring

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas)
    from deepspeed.ops.adam import FusedAdam  # lazy: see the module docstring

    return FusedAdam(param_groups, lr=lr, betas=betas)
