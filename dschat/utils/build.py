"""The one recipe that turns flags into a trained stage's tokenizer, data, model and DeepSpeed engine.

Steps 1 (SFT), 2 (reward model) and 3b (DPO) run it in this order: `start_training_stage` (output
directory, seed, length check, tokenizer, DeepSpeed config) -> `stage_datasets` -> the stage's own model
(`create_causal_lm` for SFT and DPO) -> `initialize_trained_engine` (LoRA, gradient checkpointing,
optimizer, LR schedule, `deepspeed.initialize`) -> `save_trained_model`. PPO's engines
(`dschat.rlhf.rlhf_engine`) use the same pieces. Must not import `mpo_ext`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dschat.utils import startup
from dschat.utils.args import TrainStageSettings
from dschat.utils.data.prompt_datasets import create_prompt_dataset
from dschat.utils.dist import get_local_rank, get_world_size
from dschat.utils.ds_utils import get_eval_ds_config, get_train_ds_config, merge_ds_config, set_batch_sizes
from dschat.utils.errors import UserError
from dschat.utils.model_card import push_to_hub
from dschat.utils.module.lora import (
    convert_linear_layer_to_lora,
    make_model_gradient_checkpointing_compatible,
    only_optimize_lora_parameters,
    resolve_lora_module_name,
)
from dschat.utils.optim import create_optimizer, get_optimizer_grouped_parameters
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.printing import print_rank_0
from dschat.utils.saving import save_causal_lm, save_stage_model
from dschat.utils.seeding import set_random_seed
from dschat.utils.tokenizer import load_hf_tokenizer
from dschat.utils.trainer import count_updates

# transformers, deepspeed and dschat.utils.model.model_utils (which imports transformers) are imported
# inside the functions that need them: they take seconds to load, and a stage's `--help` or a bad flag
# should answer before that.


def build_tokenizer(settings, model_name_or_path: str | None = None):
    """The tokenizer of `model_name_or_path` (default: --model_name_or_path), with --add_eot_token's token and
    the class and pad token of --tokenizer_rule."""
    path = model_name_or_path or settings.model_name_or_path
    return load_hf_tokenizer(path, fast_tokenizer=True, add_special_tokens=settings.added_special_token,
                             rule=settings.tokenizer_rule)


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


def end_of_text(settings, tokenizer) -> str:
    """One ending for every stage: the tokenizer's eos unless the user asked for another string."""
    return settings.end_of_conversation_token or tokenizer.eos_token


def train_ds_config(settings, *, zero_stage: int, micro_batch_size: int,
                    gradient_accumulation_steps: int, tb_name: str, **extra) -> dict:
    """The DeepSpeed config of a trained engine: precision, offload, ZeRO stage, batch sizes and TensorBoard
    from the settings, with the --deepspeed_config file merged over it."""
    config = get_train_ds_config(
        offload=settings.offload, dtype=settings.resolved_dtype, stage=zero_stage,
        enable_tensorboard=settings.enable_tensorboard, tb_path=settings.tensorboard_path, tb_name=tb_name, **extra,
    )
    config = set_batch_sizes(config, micro_batch_size, gradient_accumulation_steps, get_world_size())
    user = settings.user_ds_config
    return merge_ds_config(config, user, settings.deepspeed_config) if user else config


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


@startup.timed("deepspeed_init")
def initialize_engine(model: torch.nn.Module, ds_config: dict, *, learning_rate: float, weight_decay: float,
                      lora_learning_rate: float, lr_scheduler_type: str, num_warmup_steps: int,
                      num_training_steps: int, offload: bool, optim: str = "auto"):
    """Optimizer groups (upstream's three), a transformers LR schedule, and the DeepSpeed engine (its config
    already holds any --deepspeed_config file, so DeepSpeed is given no command-line arguments)."""
    import deepspeed
    from transformers import get_scheduler

    groups = get_optimizer_grouped_parameters(model, weight_decay, lora_learning_rate)
    optimizer = create_optimizer(groups, lr=learning_rate, offload=offload, optim=optim)
    scheduler = get_scheduler(lr_scheduler_type, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                              num_training_steps=max(1, num_training_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, dist_init_required=True)
    if get_world_size() == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # One rank: DeepSpeed would still flatten every gradient, all-reduce it over itself and copy it back.
        engine.enable_backward_allreduce = False
    return engine


# --------------------------------------------------------------------------------------------- frozen engines


def frozen_ds_config(dtype: str, *, offload: bool, zero_stage: int, micro_batch_size: int) -> dict:
    """The DeepSpeed config of a forward-only engine (a reference, reward, EMA or sampling model): partitioned
    (ZeRO-3) when the model it serves beside is (`zero_stage` 3), else a full replica on every rank (stages 1-2
    partition optimizer state only, which a frozen model has none of); batch sizes consistent with the world."""
    config = get_eval_ds_config(offload=offload, dtype=dtype, stage=3 if zero_stage == 3 else 0)
    return set_batch_sizes(config, micro_batch_size, 1, get_world_size())


@startup.timed("deepspeed_init")
def initialize_frozen_engine(model: torch.nn.Module, ds_config: dict):
    """A forward-only DeepSpeed engine (reference, reward, EMA, sampling models)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def frozen_causal_lm(path: str, tokenizer, ds_config: dict):
    """A frozen engine of the causal LM at `path` (a reference policy, a sampling model)."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import create_hf_model

    return initialize_frozen_engine(create_hf_model(AutoModelForCausalLM, path, tokenizer, ds_config), ds_config)


def frozen_reward_model(path: str, tokenizer, ds_config: dict, num_padding_at_beginning: int, *,
                        dropout: float | None = None, compute_fp32_loss: bool = False,
                        positions_from_mask: bool = True):
    """A frozen engine of the step-2 reward model at `path` (ours or DeepSpeed-Chat's layout)."""
    from dschat.utils.model.model_utils import create_critic_model

    zero_stage = ds_config["zero_optimization"]["stage"]
    model = create_critic_model(path, tokenizer, ds_config, num_padding_at_beginning, rlhf_training=True,
                                dropout=dropout, zero_stage=zero_stage, compute_fp32_loss=compute_fp32_loss,
                                positions_from_mask=positions_from_mask)
    return initialize_frozen_engine(model, ds_config)


# --------------------------------------------------------------------------------------------- a trained stage


def start_training_stage(settings: TrainStageSettings, tb_name: str):
    """Claim --output_dir, seed every generator, check --max_seq_len against the model, load the tokenizer
    and derive the DeepSpeed training config (TensorBoard job `tb_name`). Returns (tokenizer, ds_config)."""
    prepare_output_dir(settings.output_dir)
    set_random_seed(settings.seed)
    check_context_length(settings.model_name_or_path, "--model_name_or_path", settings.max_seq_len, "--max_seq_len")
    tokenizer = build_tokenizer(settings)
    ds_config = train_ds_config(settings, zero_stage=settings.zero_stage,
                                micro_batch_size=settings.per_device_train_batch_size,
                                gradient_accumulation_steps=settings.gradient_accumulation_steps, tb_name=tb_name)
    return tokenizer, ds_config


def stage_datasets(settings: TrainStageSettings, tokenizer, phase: int, **extra):
    """(train, eval) datasets of training phase `phase` (1: SFT rows, 2: chosen/rejected pairs) from the
    data flags; `extra` goes to `create_prompt_dataset` (e.g. `sft_only_data_path`)."""
    return create_prompt_dataset(
        get_local_rank(), settings.data_path, settings.data_split, settings.data_output_path, phase, settings.seed,
        tokenizer, settings.max_seq_len, end_of_conversation_token=end_of_text(settings, tokenizer),
        rebuild=settings.rebuild_data_cache, column_map=settings.column_map, chat_format=settings.chat_format,
        keep_truncated=settings.keep_truncated, **extra,
    )


def create_causal_lm(settings: TrainStageSettings, tokenizer, ds_config: dict) -> torch.nn.Module:
    """The trained causal LM of SFT and DPO: --model_name_or_path with --dropout, and fp32 logits for the
    loss under --compute_fp32_loss."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import causal_lm_model_to_fp32_loss, create_hf_model

    model = create_hf_model(AutoModelForCausalLM, settings.model_name_or_path, tokenizer, ds_config,
                            dropout=settings.dropout)
    if settings.compute_fp32_loss:
        causal_lm_model_to_fp32_loss(model)
    return model


def initialize_trained_engine(settings: TrainStageSettings, model: torch.nn.Module, ds_config: dict, train_samples: int,
                              force_optimize: list[str] | None = None):
    """LoRA (--lora_dim; `force_optimize` stays trainable beside it), gradient checkpointing, then the
    optimizer, an LR schedule as long as the run's optimizer updates, and the DeepSpeed engine."""
    model = apply_lora(model, settings.lora_dim, settings.lora_module_name, settings.only_optimize_lora,
                       force_optimize=force_optimize)
    if settings.gradient_checkpointing:
        set_gradient_checkpointing(model)
    updates = count_updates(train_samples, settings.per_device_train_batch_size,
                            settings.gradient_accumulation_steps, settings.num_train_epochs, settings.max_steps)
    return initialize_engine(model, ds_config, learning_rate=settings.learning_rate,
                             weight_decay=settings.weight_decay, lora_learning_rate=settings.lora_learning_rate,
                             lr_scheduler_type=settings.lr_scheduler_type, num_warmup_steps=settings.warmup_steps(updates),
                             num_training_steps=updates, offload=settings.offload, optim=settings.optim)


def save_trained_model(settings: TrainStageSettings, engine, tokenizer, what: str, card_title: str,
                       save: Callable[..., None] = save_causal_lm, extra_files: dict | None = None) -> None:
    """The final model of a stage into --output_dir (`save_stage_model`: LoRA folded, weights, tokenizer, card),
    then pushed if asked. `save` is the layout (`save_causal_lm` or `save_reward_model`); `what` names the
    model in the log."""
    if not settings.output_dir:
        return
    print_rank_0(f"saving {what} to {settings.output_dir} ...")
    save_stage_model(settings, engine, tokenizer, settings.output_dir, card_title, settings.model_name_or_path,
                     save=save, extra_files=extra_files)
    push_to_hub(settings, settings.output_dir)
