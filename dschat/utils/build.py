"""Building blocks every entry point assembles: tokenizer, LoRA, optimizer + scheduler + engine."""

from __future__ import annotations

import argparse

import torch

from dschat.utils import startup
from dschat.utils.dist import get_world_size
from dschat.utils.ds_utils import (
    get_train_ds_config,
    load_user_ds_config,
    merge_ds_config,
    resolve_dtype,
    set_batch_sizes,
)
from dschat.utils.utils import create_optimizer, get_optimizer_grouped_parameters, load_hf_tokenizer


def build_tokenizer(args, model_name_or_path: str | None = None):
    path = model_name_or_path or args.model_name_or_path
    extra = args.eot_token if getattr(args, "add_eot_token", False) else None
    return load_hf_tokenizer(path, fast_tokenizer=True, add_special_tokens=extra)


def model_context_length(model_name_or_path: str, flag: str) -> int | None:
    """The model's position limit read from its config (None when it declares none)."""
    from transformers import AutoConfig

    from dschat.utils.errors import UserError

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {model_name_or_path}: cannot load its config ({' '.join(str(err).split())[:200]})") from err
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        limit = getattr(config, name, None)
        if limit:
            return int(limit)
    return None


def check_context_length(model_name_or_path: str, flag: str, length: int, length_flags: str) -> None:
    """Refuse sequence lengths beyond the model's position table instead of crashing inside attention."""
    from dschat.utils.errors import UserError

    limit = model_context_length(model_name_or_path, flag)
    if limit and length > limit:
        raise UserError(f"{length_flags} = {length} exceeds the max_position_embeddings {limit} of "
                        f"{model_name_or_path}; lower it")


def end_of_text(args, tokenizer) -> str:
    """One ending for every stage: the tokenizer's eos unless the user asked for another string."""
    return args.end_of_conversation_token or tokenizer.eos_token


def train_ds_config(args, *, zero_stage: int, micro_batch_size: int, gradient_accumulation_steps: int,
                    tb_name: str, **extra) -> dict:
    args.dtype = resolve_dtype(args.dtype)
    config = get_train_ds_config(
        offload=args.offload, dtype=args.dtype, stage=zero_stage,
        enable_tensorboard=args.enable_tensorboard, tb_path=args.tensorboard_path, tb_name=tb_name, **extra,
    )
    config = set_batch_sizes(config, micro_batch_size, gradient_accumulation_steps, get_world_size())
    user_file = getattr(args, "deepspeed_config", None)
    return merge_ds_config(config, load_user_ds_config(user_file), user_file) if user_file else config


def apply_lora(model: torch.nn.Module, lora_dim: int, module_name: str | None, only_optimize: bool,
               force_optimize: list[str] | None = None, flag: str = "--lora_module_name") -> torch.nn.Module:
    """LoRA on the Linear layers named by `module_name` (None: this architecture's decoder blocks);
    a name matching nothing is a UserError naming `flag`."""
    if lora_dim <= 0:
        return model
    from dschat.utils.module.lora import (
        convert_linear_layer_to_lora,
        make_model_gradient_checkpointing_compatible,
        only_optimize_lora_parameters,
        resolve_lora_module_name,
    )

    model = convert_linear_layer_to_lora(model, resolve_lora_module_name(model, module_name, flag), lora_dim)
    if only_optimize:
        model = only_optimize_lora_parameters(model, force_optimize_params=force_optimize or [])
        model = make_model_gradient_checkpointing_compatible(model)
    return model


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> None:
    """transformers 5 renamed gradient to activation checkpointing; accept either spelling."""
    prefix = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{prefix}_{'enable' if enabled else 'disable'}")()


def fuse_lora(model: torch.nn.Module) -> None:
    """Fold LoRA weights into their base Linear layers before saving (no-op without LoRA)."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        from dschat.utils.module.lora import convert_lora_to_linear_layer

        convert_lora_to_linear_layer(model)


@startup.timed("deepspeed_init")
def initialize_engine(model: torch.nn.Module, ds_config: dict, *, learning_rate: float, weight_decay: float,
                      lora_learning_rate: float, lr_scheduler_type: str, num_warmup_steps: int,
                      num_training_steps: int, offload: bool, args=None):
    """Optimizer groups (upstream's three), a transformers LR schedule, and the DeepSpeed engine."""
    import deepspeed
    from transformers import get_scheduler

    groups = get_optimizer_grouped_parameters(model, weight_decay, lora_learning_rate)
    optimizer = create_optimizer(groups, lr=learning_rate, offload=offload)
    scheduler = get_scheduler(lr_scheduler_type, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                              num_training_steps=max(1, num_training_steps))
    if args is not None and getattr(args, "deepspeed_config", None):
        # Already merged into ds_config; DeepSpeed refuses a config given both ways.
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, args=args, dist_init_required=True)
    if get_world_size() == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # One rank: DeepSpeed would still flatten every gradient, all-reduce it over itself and copy it back.
        engine.enable_backward_allreduce = False
    return engine


@startup.timed("deepspeed_init")
def initialize_frozen_engine(model: torch.nn.Module, ds_config: dict):
    """A forward-only DeepSpeed engine (reference, reward, EMA models)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
