"""Step 3's settings: every flag of `dschat.steps.ppo`, grouped, and its checks (`PPOSettings`).

Keeps every upstream flag (names, types, defaults; the pre-#698 batch flags as deprecated aliases) and adds
the PPO constants upstream hard-coded, sampling controls (the shared `SamplingSettings` group), an optional
separate reference model, resumable states and `--max_steps`. `recorded_settings(settings)` is what a run
records of them. Imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dschat.utils import args as flags
from dschat.utils.args import flag, same_flag
from dschat.utils.errors import UserError

BATCH_GROUP = "batches and lengths"
OPTIM_GROUP = "actor / critic optimisation"
ENGINE_GROUP = "step-3 ZeRO, offload and Hybrid Engine"
PPO_GROUP = "PPO (upstream's hard-coded constants as defaults)"
SAMPLING_GROUP = flags.SamplingSettings.flag_group
# What run_info.json records under "ppo" (with the resolved --dtype).
RECORDED_GROUPS = (BATCH_GROUP, OPTIM_GROUP, ENGINE_GROUP, PPO_GROUP, SAMPLING_GROUP)


@dataclass(frozen=True, kw_only=True)
class UnsupervisedMixSettings(flags.Settings):
    flag_group = "unsupervised (pretraining) mix"

    unsupervised_dataset_name: str | None = flag(None, "Hugging Face dataset (or save_to_disk dir) for the "
                                                       "pretraining loss (PPO-ptx).")
    unsupervised_dataset_config_name: str | None = flag(None, "Its config name; both this and the name are needed "
                                                              "to enable the mix.")
    unsup_coef: float = flag(27.8, "Weight of the pretraining loss.")
    preprocessing_num_workers: int | None = flag(None, "Processes for tokenising the unsupervised dataset.")

    @property
    def unsupervised_enabled(self) -> bool:
        return bool(self.unsupervised_dataset_name and self.unsupervised_dataset_config_name)

    def _check(self) -> None:
        if bool(self.unsupervised_dataset_name) != bool(self.unsupervised_dataset_config_name):
            from dschat.utils.printing import print_rank_0  # torch: only when there is something to say

            print_rank_0("warning: the unsupervised mix needs both --unsupervised_dataset_name and "
                         "--unsupervised_dataset_config_name; it stays off")


POSITION_IDS = ("from_mask", "model")
ROLLOUT_MASKS = ("positions", "pad_token")


@dataclass(frozen=True, kw_only=True)
class ActorCriticModelSettings(flags.RewardIndexSettings, flags.RewardEndingSettings):
    flag_group = "models"
    upstream_defaults = {
        "compute_fp32_loss": flags.UpstreamDefault(
            False, "With bf16/fp16 logits the log-softmax over a 32K vocabulary is off by up to 0.1 nats per token, "
                   "which goes straight into the PPO ratios and the KL.", ours="on for bf16/fp16"),
        "reward_end_text": flags.UpstreamDefault(
            "eos", "A reward model trained with a literal ending (upstream's `<|endoftext|>`) scores each rollout "
                   "with that ending in place of its eos; upstream scores the rollout as generated.",
            ours="the ending recorded with the reward model"),
        "rollout_mask": flags.UpstreamDefault(
            "pad_token", "Upstream marks a rollout's real tokens as those that are not the pad token; where pad = "
                         "eos (OPT, and every tokenizer upstream does not treat as Llama) that also hides each "
                         "answer's eos, every eos inside the prompt and OPT's beginning token, so the reward, the "
                         "KL and the last action skip the eos. Padding is a position here."),
        "position_ids": flags.UpstreamDefault(
            "model", "Left-padded rollouts keep the positions generation gave them; upstream's forwards let the "
                     "model number the left padding too, which moves every token of a model with absolute "
                     "positions (GPT-2, GPT-J, ...); rotary Llama and OPT (positions from its mask) agree up to "
                     "rounding."),
    }

    actor_model_name_or_path: str = flag(help="Usually the step-1 output.")
    critic_model_name_or_path: str = flag(help="A step-2 output (ours or DeepSpeed-Chat's); also used as the reward "
                                               "model.")
    reference_model_name_or_path: str | None = flag(
        None, "Model the KL penalty is measured against (default: the actor's initial weights; MPO uses the DPO "
              "model).", own_default=True)
    actor_dropout: float | None = flag(None, "Override dropout in the actor config (default: keep the model's).",
                                       own_default=True)
    critic_dropout: float | None = flag(None, "Override dropout in the critic config (default: keep the model's).",
                                        own_default=True)
    actor_gradient_checkpointing: bool = flag(False, "Enable HF gradient checkpointing in the actor.")
    critic_gradient_checkpointing: bool = flag(False, "Enable HF gradient checkpointing in the critic.")
    compute_fp32_loss: bool | None = flag(
        None, "Upcast the logits to fp32 for the log-probs, ratios and per-token KL, and compute the critic loss "
              "in fp32 (default: on for --dtype bf16/fp16; --no_compute_fp32_loss turns it off).",
        negative="--no_compute_fp32_loss", own_default=True)
    position_ids: str = flag(
        "from_mask", "Positions of the left-padded rollouts in the actor, reference, critic and reward forwards: "
                     "from_mask counts only real tokens (as generation does); model: the model's own default "
                     "(upstream; models with absolute positions then count the padding).", choices=POSITION_IDS)

    rollout_mask: str = flag(
        "positions", "Which positions of a rollout are real: positions (the prompt collator's mask, then each answer "
                     "through its eos); pad_token: those whose token is not the pad (upstream's rule; with pad = "
                     "eos it hides every eos).", choices=ROLLOUT_MASKS)

    @property
    def positions_from_mask(self) -> bool:
        return self.position_ids == "from_mask"

    def _check(self) -> None:
        for name in ("actor_model_name_or_path", "critic_model_name_or_path", "reference_model_name_or_path"):
            flags.check_path_exists(f"--{name}", getattr(self, name), "model directory")


@dataclass(frozen=True, kw_only=True)
class RolloutBatchSettings(flags.Settings):
    flag_group = BATCH_GROUP

    per_device_generation_batch_size: int = flag(
        16, "Prompts per device per generation. Upstream named it --per_device_train_batch_size before #698; that name "
            "still works here with a warning, but it is the training batch in steps 1, 2 and 3b, so use this one.",
        deprecated=("--per_device_train_batch_size",))
    per_device_training_batch_size: int = flag(16, "PPO micro-batch per device.",
                                               deprecated=("--per_device_mini_train_batch_size",))
    generation_batches: int = flag(1, "Generation batches collected before each PPO update.",
                                   deprecated=("--generation_batch_numbers",))
    ppo_epochs: int = flag(1, "Passes over the collected experience (TRL: --num_ppo_epochs).",
                           aliases=("--num_ppo_epochs",))
    max_prompt_seq_len: int = flag(256, "Longer prompts are dropped; shorter ones are left-padded (TRL: "
                                        "--max_prompt_length).", aliases=("--max_prompt_length",))
    max_answer_seq_len: int = flag(256, "Maximum new tokens per answer (TRL: --response_length).",
                                   aliases=("--response_length",))

    def _check(self) -> None:
        flags.check_positive(self, *self.group_names(BATCH_GROUP))


@dataclass(frozen=True, kw_only=True)
class ActorCriticOptimSettings(flags.Settings):
    flag_group = OPTIM_GROUP

    actor_learning_rate: float = flag(9.65e-6, "Actor peak learning rate.")
    critic_learning_rate: float = flag(5e-6, "Critic peak learning rate.")
    actor_weight_decay: float = flag(0.0, "Actor AdamW weight decay.")
    critic_weight_decay: float = flag(0.0, "Critic AdamW weight decay.")


@dataclass(frozen=True, kw_only=True)
class Step3EngineSettings(flags.Settings):
    flag_group = ENGINE_GROUP

    actor_zero_stage: int = flag(0, "ZeRO stage of the actor (and reference) engines.", choices=(0, 1, 2, 3))
    critic_zero_stage: int = flag(0, "ZeRO stage of the critic (and reward) engines.", choices=(0, 1, 2, 3))
    offload_reference_model: bool = flag(False, "ZeRO-3 parameter offload for the reference (and EMA) model.")
    offload_reward_model: bool = flag(False, "ZeRO-3 parameter offload for the reward model.")
    enable_hybrid_engine: bool = flag(False, "DeepSpeed Hybrid Engine for generation where it works (GPU and a "
                                             "supported architecture); otherwise one warning and Hugging Face "
                                             "generate.")
    unpin_actor_parameters: bool = flag(False, "Do not keep all ZeRO-3 actor parameters gathered during generation "
                                               "(HE: pin_parameters=false; native path: gather layer by layer with "
                                               "synced_gpus).")
    release_inference_cache: bool = flag(False, "HE: free the KV workspace after generate.")
    inference_tp_size: int = flag(1, "HE tensor-parallel degree for generation (> 1 needs --actor_zero_stage 3).")
    tp_gather_partition_size: int = flag(8, "HE: layers gathered per group when --inference_tp_size > 1.")
    enable_mixed_precision_lora: bool = flag(False, "Quantise frozen weights under ZeRO-3 (needs actor LoRA and "
                                                    "actor ZeRO-3; GPU).")
    align_overflow: bool = flag(False, "fp16: when the actor or the critic overflows, skip both steps.")

    def _check(self) -> None:
        flags.check_positive(self, "inference_tp_size", "tp_gather_partition_size")
        if self.inference_tp_size > 1 and self.actor_zero_stage != 3:
            raise UserError(f"--inference_tp_size {self.inference_tp_size}: tensor-parallel generation needs "
                            "--actor_zero_stage 3; use --inference_tp_size 1 or ZeRO-3 for the actor")


@dataclass(frozen=True, kw_only=True)
class ActorCriticLoRASettings(flags.Settings):
    flag_group = "lora"

    actor_lora_dim: int = flag(0, "LoRA rank of the actor; > 0 enables it.")
    actor_lora_module_name: str | None = flag(None, flags.LORA_MODULE_HELP, own_default=True)
    actor_lora_learning_rate: float = flag(5e-4, "Learning rate of the actor's LoRA parameters.")
    critic_lora_dim: int = flag(0, "LoRA rank of the critic; > 0 enables it.")
    critic_lora_module_name: str | None = flag(None, flags.LORA_MODULE_HELP, own_default=True)
    critic_lora_learning_rate: float = flag(5e-4, "Learning rate of the critic's LoRA parameters.")
    only_optimize_lora: bool = flag(False, "Train only LoRA parameters (actor and critic; the value head always "
                                           "trains).")

    def _check(self) -> None:
        if self.only_optimize_lora and self.actor_lora_dim <= 0 and self.critic_lora_dim <= 0:
            raise UserError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")


@dataclass(frozen=True, kw_only=True)
class PPOConstantSettings(flags.Settings):
    flag_group = PPO_GROUP

    init_kl_coef: float = flag(0.1, "KL penalty coefficient per token (TRL: --kl_coef). Fixed for the whole run unless "
                                    "--kl_target is given (then it is the adaptive controller's start value).",
                               aliases=("--kl_coef",))
    kl_target: float | None = flag(None, "Enable the adaptive KL controller with this target KL per sequence "
                                         "(default: off, the coefficient stays --init_kl_coef).", own_default=True)
    kl_horizon: float = flag(10000, "Adaptive KL controller horizon (samples).")
    clip_reward_value: float = flag(5.0, "Reward-model scores are clipped to +-this.")
    cliprange: float = flag(0.2, "PPO ratio clip.")
    cliprange_value: float = flag(0.2, "Value clip around the old values.")
    gamma: float = flag(1.0, "Discount.")
    lam: float = flag(0.95, "GAE lambda.")
    normalize_reward: bool = flag(False, "Normalise reward-model scores by running mean/std before clipping.")
    whiten_advantages: bool = flag(False, "Whiten advantages per mini-batch.")
    enable_ema: bool = flag(False, "Keep an EMA of the actor, saved to actor_ema/.")
    ema_beta: float = flag(0.992, "EMA decay (weight of the past).")

    def _check(self) -> None:
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise UserError(f"--kl_target {self.kl_target} --kl_horizon {self.kl_horizon}: both must be positive")
        if not 0.0 <= self.ema_beta <= 1.0:
            raise UserError(f"--ema_beta {self.ema_beta}: must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class Step3OutputSettings(flags.Settings):
    flag_group = "step-3 output"

    print_answers: bool = flag(False, "Print decoded prompts and answers.")
    print_answers_interval: int = flag(1, "Every N generation steps.")
    enable_test_mode: bool = flag(False, "Stop after --test_stop_step PPO steps without fp16 overflow (CI).")
    test_stop_step: int = flag(0, "PPO steps before --enable_test_mode stops (0: no limit).")

    def _check(self) -> None:
        flags.check_positive(self, "print_answers_interval")


@dataclass(frozen=True, kw_only=True)
class PPOSettings(flags.DataSettings, flags.BatchPaddingSettings, flags.SampleOrderSettings, UnsupervisedMixSettings,
                  ActorCriticModelSettings, flags.TokenizerSettings, RolloutBatchSettings, ActorCriticOptimSettings,
                  flags.ScheduleSettings, flags.DeepSpeedSettings, flags.DeepSpeedConfigSettings, Step3EngineSettings,
                  ActorCriticLoRASettings, PPOConstantSettings, flags.SamplingSettings, flags.LoggingSettings,
                  flags.SaveFormatSettings, Step3OutputSettings, flags.HealthSettings, flags.HeldOutSettings, flags.EvalStepsSettings,
                  flags.DSChatCompatSettings):
    """Every setting of step 3 (rollouts are left-padded and always keep their mask: no --pad_mask; prompts
    and answers have their own lengths: no --max_seq_len)."""

    description = "Step 3: PPO (RLHF) fine-tuning (DeepSpeed-Chat compatible flags)."
    run_label: ClassVar[str] = "step3_ppo"  # names its tracker runs (the pipeline's directory name)

    num_warmup_steps: int = same_flag(flags.ScheduleSettings, "num_warmup_steps", default=100)
    max_steps: int = same_flag(flags.ScheduleSettings, "max_steps",
                               help="Stop after this many PPO steps (0: run all epochs).")
    seed: int | None = same_flag(flags.LoggingSettings, "seed", default=None)
    log_interval: int = same_flag(flags.LoggingSettings, "log_interval", default=1)
    tensorboard_path: str = same_flag(flags.LoggingSettings, "tensorboard_path", default="step3_tensorboard")

    @property
    def fp32_loss(self) -> bool:
        """--compute_fp32_loss as the run uses it: upstream's flag, on by default where the logits are half
        precision (bf16/fp16)."""
        return self.compute_fp32_loss if self.compute_fp32_loss is not None else self.resolved_dtype != "fp32"

    def derived(self) -> dict[str, Any]:
        return {**super().derived(), "compute_fp32_loss": self.fp32_loss}

    def _check(self) -> None:
        """Checks across groups (UserError naming the flag); a group's own flags are checked by the group."""
        if (self.actor_zero_stage == 2 and self.critic_zero_stage == 2 and self.enable_hybrid_engine and self.offload
                and self.actor_lora_dim == 0):
            raise UserError("--actor_zero_stage 2 --critic_zero_stage 2 --enable_hybrid_engine --offload without "
                            "--actor_lora_dim is unsupported (training is unstable, as upstream); drop one of them "
                            "or enable actor LoRA")
        if self.enable_mixed_precision_lora and (self.actor_lora_dim <= 0 or self.actor_zero_stage != 3):
            raise UserError("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and --actor_zero_stage 3")
        if self.keep_best and not self.eval_steps:
            raise UserError("--keep_best needs periodic evaluations: add --eval_steps N")


build_parser = PPOSettings.build_parser
parse_args = PPOSettings.parse_args


def recorded_settings(settings: PPOSettings) -> dict[str, Any]:
    """The settings `run_info.json` records: every flag of `RECORDED_GROUPS` (a flag added to one of them
    is recorded with no list to edit), and the precision the engines train in."""
    recorded = {name: value for title in RECORDED_GROUPS for name, value in settings.group_values(title).items()}
    recorded["dtype"] = settings.resolved_dtype
    return recorded
