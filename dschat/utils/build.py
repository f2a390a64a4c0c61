"""The one recipe that turns flags into a trained stage's tokenizer, data, model and DeepSpeed engine.

Steps 1 (SFT), 2 (reward model) and 3b (DPO) run it in this order: `start_training_stage` (output
directory, seed, length check, tokenizer, DeepSpeed config) -> `stage_datasets` -> the stage's own model
(`create_causal_lm` for SFT and DPO) -> `initialize_trained_engine` (LoRA, gradient checkpointing,
optimizer, LR schedule, `deepspeed.initialize`) -> `save_trained_model`. PPO's engines
(`dschat.rlhf.rlhf_engine`) use the same pieces. Must not import `mpo_ext`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from dschat.utils import args as flags
from dschat.utils import startup
from dschat.utils.data.prompt_datasets import create_prompt_dataset
from dschat.utils.dist import get_local_rank, get_world_size
from dschat.utils.ds_utils import (
    get_train_ds_config,
    load_user_ds_config,
    merge_ds_config,
    resolve_dtype,
    set_batch_sizes,
)
from dschat.utils.errors import UserError
from dschat.utils.model_card import card_files, push_to_hub
from dschat.utils.module.lora import (
    convert_linear_layer_to_lora,
    convert_lora_to_linear_layer,
    make_model_gradient_checkpointing_compatible,
    only_optimize_lora_parameters,
    resolve_lora_module_name,
)
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.trainer import count_updates
from dschat.utils.utils import (
    create_optimizer,
    get_optimizer_grouped_parameters,
    load_hf_tokenizer,
    print_rank_0,
    save_causal_lm,
    set_random_seed,
)

# transformers, deepspeed and dschat.utils.model.model_utils (which imports transformers) are imported
# inside the functions that need them: they take seconds to load, and a stage's `--help` or a bad flag
# should answer before that.


def build_tokenizer(args, model_name_or_path: str | None = None):
    path = model_name_or_path or args.model_name_or_path
    extra = args.eot_token if getattr(args, "add_eot_token", False) else None
    return load_hf_tokenizer(path, fast_tokenizer=True, add_special_tokens=extra)


def model_context_length(model_name_or_path: str, flag: str) -> int | None:
    """The model's position limit read from its config (None when it declares none)."""
    from transformers import AutoConfig

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


# --------------------------------------------------------------------------------------------- a trained stage


def start_training_stage(args, tb_name: str):
    """Claim --output_dir, seed every generator, check --max_seq_len against the model, load the tokenizer
    and derive the DeepSpeed training config (TensorBoard job `tb_name`). Returns (tokenizer, ds_config)."""
    prepare_output_dir(args.output_dir)
    set_random_seed(args.seed)
    check_context_length(args.model_name_or_path, "--model_name_or_path", args.max_seq_len, "--max_seq_len")
    tokenizer = build_tokenizer(args)
    ds_config = train_ds_config(args, zero_stage=args.zero_stage, micro_batch_size=args.per_device_train_batch_size,
                                gradient_accumulation_steps=args.gradient_accumulation_steps, tb_name=tb_name)
    return tokenizer, ds_config


def stage_datasets(args, tokenizer, phase: int, **extra):
    """(train, eval) datasets of training phase `phase` (1: SFT rows, 2: chosen/rejected pairs) from the
    data flags; `extra` goes to `create_prompt_dataset` (e.g. `sft_only_data_path`)."""
    return create_prompt_dataset(
        get_local_rank(), args.data_path, args.data_split, args.data_output_path, phase, args.seed, tokenizer,
        args.max_seq_len, end_of_conversation_token=end_of_text(args, tokenizer), rebuild=args.rebuild_data_cache,
        column_map=flags.column_map(args), chat_format=args.chat_format, keep_truncated=args.keep_truncated, **extra,
    )


def create_causal_lm(args, tokenizer, ds_config: dict) -> torch.nn.Module:
    """The trained causal LM of SFT and DPO: --model_name_or_path with --dropout, and fp32 logits for the
    loss under --compute_fp32_loss."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import causal_lm_model_to_fp32_loss, create_hf_model

    model = create_hf_model(AutoModelForCausalLM, args.model_name_or_path, tokenizer, ds_config, dropout=args.dropout)
    if args.compute_fp32_loss:
        causal_lm_model_to_fp32_loss(model)
    return model


def initialize_trained_engine(args, model: torch.nn.Module, ds_config: dict, train_samples: int,
                              force_optimize: list[str] | None = None):
    """LoRA (--lora_dim; `force_optimize` stays trainable beside it), gradient checkpointing, then the
    optimizer, an LR schedule as long as the run's optimizer updates, and the DeepSpeed engine."""
    model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora,
                       force_optimize=force_optimize)
    if args.gradient_checkpointing:
        set_gradient_checkpointing(model)
    updates = count_updates(train_samples, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                            args.num_train_epochs, args.max_steps)
    return initialize_engine(model, ds_config, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                             lora_learning_rate=args.lora_learning_rate, lr_scheduler_type=args.lr_scheduler_type,
                             num_warmup_steps=args.num_warmup_steps, num_training_steps=updates,
                             offload=args.offload, args=args)


def save_trained_model(args, engine, tokenizer, what: str, card_title: str,
                       save: Callable[..., None] = save_causal_lm, extra_files: dict | None = None) -> None:
    """Fold LoRA in, write the model, tokenizer and model card into --output_dir, push it if asked.
    `save` is the writer (`save_causal_lm` or `save_reward_model`); `what` names the model in the log."""
    if not args.output_dir:
        return
    print_rank_0(f"saving {what} to {args.output_dir} ...")
    fuse_lora(engine.module)
    save(engine.module, tokenizer, args.output_dir,
         extra_files={**(extra_files or {}), **card_files(args, card_title, args.model_name_or_path, engine)})
    push_to_hub(args, args.output_dir)
