"""The five DeepSpeed engines of step 3: actor, reference, optional actor EMA, critic and reward.

Creation order and ZeRO placement follow DeepSpeed-Chat: the reference (and EMA) model is ZeRO-3 when
the actor is, the reward model when the critic is; otherwise they are full replicas. Differences, each
for a reason:
- the Hybrid Engine section of the actor's config is switched on only where DeepSpeed has inference
  kernels for the model and a GPU is present (`generation.hybrid_engine_unavailable_reason`); elsewhere
  one warning, and generation falls back to Hugging Face `generate`;
- the EMA copy is kept in fp32 (a 0.8% update per step is below bf16/fp16 resolution) and partitioned
  exactly like the actor, so `moving_average` updates each rank's partition in place under ZeRO-3;
- the reference model may come from another checkpoint (`--reference_model_name_or_path`, e.g. the
  DPO model in MPO) instead of always the actor's initial weights;
- frozen engines (`dschat.utils.build.frozen_ds_config`, the one config of every forward-only engine) get
  batch sizes consistent with the world size (upstream's fixed 32/4 pair fails on world sizes that do not
  divide 8).
"""

from __future__ import annotations

import time

import torch

from dschat.rlhf.generation import hybrid_engine_unavailable_reason, warn_once
from dschat.steps.ppo_args import PPOSettings
from dschat.utils.build import (
    apply_lora,
    frozen_causal_lm,
    frozen_ds_config,
    frozen_reward_model,
    initialize_engine,
    initialize_frozen_engine,
    set_gradient_checkpointing,
    train_ds_config,
)
from dschat.utils.dist import on_cpu
from dschat.utils.inference import RewardScorer
from dschat.utils.model.reward_model import ending_text, ending_token_ids, resolve_reward_ending
from dschat.utils.printing import print_rank_0
from dschat.utils.tokenizer import load_hf_tokenizer


def log_init(model_name: str, start_time: float | None = None) -> float:
    """Upstream's `[start] Initializing X Model [start]` / `[end] ... (duration: Ns)` banners."""
    if start_time is None:
        print_rank_0(f"[start] Initializing {model_name} Model [start]")
        return time.time()
    duration = time.time() - start_time
    print_rank_0(f"[end] Initialized {model_name} Model [end] (duration: {duration:.2f}s)")
    return duration


def actor_gradient_accumulation_steps(settings) -> int:
    """The actor steps twice per mini-batch with unsupervised mixing (PPO + pretraining loss)."""
    return settings.gradient_accumulation_steps * (2 if settings.unsupervised_enabled else 1)


class DeepSpeedRLHFEngine:
    """Holds `actor`, `ref`, `actor_ema` (None unless --enable_ema), `critic`, `reward` engines.

    `args` is step 3's `PPOSettings`, or the argparse Namespace of DeepSpeed-Chat's own step-3 main (its
    keyword, `args=`), taken as settings through `PPOSettings.adopt`."""

    def __init__(self, actor_model_name_or_path: str, critic_model_name_or_path: str, tokenizer, args,
                 num_total_iters: int):
        settings = PPOSettings.adopt(args)
        self.settings = settings
        self.num_total_iters = num_total_iters
        self.tokenizer = tokenizer
        self.hybrid_engine_active = False
        self.hybrid_engine_reason: str | None = None
        reference_path = settings.reference_model_name_or_path or actor_model_name_or_path

        self.actor = self._init_actor(actor_model_name_or_path)
        self.ref = self._init_ref(reference_path)
        self.actor_ema = self._init_ema(actor_model_name_or_path) if settings.enable_ema else None
        self.critic = self._init_critic(critic_model_name_or_path)
        self.reward = self._init_reward(critic_model_name_or_path)
        # the ending the reward model was trained with; rollouts get it in place of their eos when it differs
        self.reward_ending = resolve_reward_ending(critic_model_name_or_path, settings.reward_end_text)
        self.reward_ending_ids = ending_token_ids(tokenizer, self.reward_ending)
        print_rank_0(f"reward model ending: {self.reward_ending!r}"
                     + (f" (appended to each answer as ids {self.reward_ending_ids})" if self.reward_ending_ids else ""))
        if settings.critic_gradient_checkpointing:
            set_gradient_checkpointing(self.critic.module)

    # ---- models
    def _causal_lm(self, path: str, ds_config: dict, dropout: float | None):
        # model_utils and transformers take seconds to import: only once the engines are built, so that
        # --help and flag errors stay instant (the same for the two imports below)
        from transformers import AutoModelForCausalLM

        from dschat.utils.model.model_utils import create_hf_model

        return create_hf_model(AutoModelForCausalLM, path, self.tokenizer, ds_config, dropout=dropout)

    def _init_actor(self, path: str):
        from dschat.utils.model.model_utils import causal_lm_model_to_fp32_loss

        settings = self.settings
        start = log_init("Actor")
        ds_config = train_ds_config(
            settings, zero_stage=settings.actor_zero_stage, micro_batch_size=settings.per_device_training_batch_size,
            gradient_accumulation_steps=actor_gradient_accumulation_steps(settings), tb_name="step3_actor",
            enable_hybrid_engine=False, inference_tp_size=settings.inference_tp_size,
            release_inference_cache=settings.release_inference_cache,
            pin_parameters=not settings.unpin_actor_parameters,
            tp_gather_partition_size=settings.tp_gather_partition_size,
            max_out_tokens=settings.max_prompt_seq_len + settings.max_answer_seq_len,
            enable_mixed_precision_lora=settings.enable_mixed_precision_lora,
        )
        if settings.enable_mixed_precision_lora and not on_cpu():
            ds_config["zero_optimization"]["zero_hpz_partition_size"] = torch.cuda.device_count()
        model = self._causal_lm(path, ds_config, settings.actor_dropout)
        if settings.fp32_loss:
            causal_lm_model_to_fp32_loss(model)
        model = apply_lora(model, settings.actor_lora_dim, settings.actor_lora_module_name, settings.only_optimize_lora,
                           flag="--actor_lora_module_name")
        if settings.enable_hybrid_engine:
            reason = hybrid_engine_unavailable_reason(model)
            if reason is None:
                ds_config["hybrid_engine"]["enabled"] = True
                self.hybrid_engine_active = True
            else:
                self.hybrid_engine_reason = reason
                warn_once(f"--enable_hybrid_engine: {reason}; generating with Hugging Face generate "
                          "(KV cache on) instead")
        engine = initialize_engine(
            model, ds_config, learning_rate=settings.actor_learning_rate, weight_decay=settings.actor_weight_decay,
            lora_learning_rate=settings.actor_lora_learning_rate, lr_scheduler_type=settings.lr_scheduler_type,
            num_warmup_steps=settings.warmup_steps(self.num_total_iters), num_training_steps=self.num_total_iters, offload=settings.offload,
        )
        log_init("Actor", start)
        return engine

    def _init_ref(self, path: str):
        settings = self.settings
        start = log_init("Ref")
        ds_config = frozen_ds_config(settings.resolved_dtype, offload=settings.offload_reference_model,
                                     zero_stage=settings.actor_zero_stage,
                                     micro_batch_size=settings.per_device_training_batch_size)
        engine = frozen_causal_lm(path, self.tokenizer, ds_config)
        log_init("Ref", start)
        return engine

    def _init_ema(self, path: str):
        """Same architecture (incl. LoRA layers) and partitioning as the actor, fp32 weights."""
        settings = self.settings
        start = log_init("EMA")
        ds_config = frozen_ds_config("fp32", offload=settings.offload_reference_model,
                                     zero_stage=settings.actor_zero_stage,
                                     micro_batch_size=settings.per_device_training_batch_size)
        # No persistent (always gathered) parameters: `moving_average` updates the partitions, which a
        # persistent parameter's full copy would not see.
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        model = self._causal_lm(path, ds_config, None)
        model = apply_lora(model, settings.actor_lora_dim, settings.actor_lora_module_name, False,
                           flag="--actor_lora_module_name")
        engine = initialize_frozen_engine(model, ds_config)
        log_init("EMA", start)
        return engine

    def _init_critic(self, path: str):
        settings = self.settings
        start = log_init("Critic")
        ds_config = train_ds_config(
            settings, zero_stage=settings.critic_zero_stage, micro_batch_size=settings.per_device_training_batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps, tb_name="step3_critic",
        )
        from dschat.utils.model.model_utils import create_critic_model

        model = create_critic_model(path, self.tokenizer, ds_config, settings.num_padding_at_beginning,
                                    rlhf_training=True, dropout=settings.critic_dropout,
                                    zero_stage=settings.critic_zero_stage, compute_fp32_loss=settings.fp32_loss,
                                    positions_from_mask=settings.positions_from_mask)
        # The value head always trains (upstream froze it with --only_optimize_lora, leaving a random
        # projection of the LoRA features as the value estimate).
        model = apply_lora(model, settings.critic_lora_dim, settings.critic_lora_module_name, settings.only_optimize_lora,
                           force_optimize=["v_head.weight"], flag="--critic_lora_module_name")
        engine = initialize_engine(
            model, ds_config, learning_rate=settings.critic_learning_rate, weight_decay=settings.critic_weight_decay,
            lora_learning_rate=settings.critic_lora_learning_rate, lr_scheduler_type=settings.lr_scheduler_type,
            num_warmup_steps=settings.warmup_steps(self.num_total_iters), num_training_steps=self.num_total_iters, offload=settings.offload,
        )
        log_init("Critic", start)
        return engine

    def _init_reward(self, path: str, tokenizer=None, name: str = "Reward"):
        settings = self.settings
        start = log_init(name)
        ds_config = frozen_ds_config(settings.resolved_dtype, offload=settings.offload_reward_model,
                                     zero_stage=settings.critic_zero_stage,
                                     micro_batch_size=settings.per_device_training_batch_size)
        engine = frozen_reward_model(path, tokenizer or self.tokenizer, ds_config, settings.num_padding_at_beginning,
                                     dropout=settings.critic_dropout, compute_fp32_loss=settings.fp32_loss,
                                     positions_from_mask=settings.positions_from_mask)
        log_init(name, start)
        return engine

    def heldout_reward_scorer(self, path: str) -> RewardScorer:
        """The held-out reward model (--heldout_reward_model_name_or_path) as a scorer for the evaluations: a
        frozen engine placed like the reward engine, in its own tokenizer and with its own ending."""
        tokenizer = load_hf_tokenizer(path)
        engine = self._init_reward(path, tokenizer, name="Held-out reward")
        ending = resolve_reward_ending(path, self.settings.reward_end_text)
        return RewardScorer(engine, tokenizer, ending_text(ending, tokenizer), ending=ending,
                            pad_token_id=engine.module.PAD_ID)
