"""Step 3's command line: every flag of `dschat.steps.ppo`, grouped, and its checks.

`parse_args(argv)` keeps every upstream flag (names, types, defaults; the pre-#698 batch flags as
deprecated aliases) and adds the PPO constants upstream hard-coded, sampling controls (the shared group
of `dschat.utils.args`), an optional separate reference model, resumable states and `--max_steps`.
`recorded_settings(args)` is what a run records of them. Imports no model code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dschat.rlhf import health
from dschat.utils import args as flags
from dschat.utils.ds_utils import resolve_dtype
from dschat.utils.errors import UserError
from dschat.utils.utils import print_rank_0

BATCH_GROUP = "batches and lengths"
OPTIM_GROUP = "actor / critic optimisation"
ENGINE_GROUP = "step-3 ZeRO, offload and Hybrid Engine"
PPO_GROUP = "PPO (upstream's hard-coded constants as defaults)"
SAMPLING_GROUP = "rollout sampling (default: greedy, as upstream)"
# What run_info.json records under "ppo" (with the resolved --dtype).
RECORDED_GROUPS = (BATCH_GROUP, OPTIM_GROUP, ENGINE_GROUP, PPO_GROUP, SAMPLING_GROUP)


class _DeprecatedAlias(argparse.Action):
    """An old flag name that still works, with a one-line notice naming its replacement."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def _add_step3_data_args(parser) -> None:
    # rollouts are left-padded, so they always keep their attention mask: no --pad_mask here
    flags.add_data_args(parser, max_seq_len=None, pad_mask=False)
    group = parser.add_argument_group("unsupervised (pretraining) mix")
    group.add_argument("--unsupervised_dataset_name", type=str, default=None,
                       help="Hugging Face dataset (or save_to_disk dir) for the pretraining loss (PPO-ptx).")
    group.add_argument("--unsupervised_dataset_config_name", type=str, default=None,
                       help="Its config name; both this and the name are needed to enable the mix.")
    group.add_argument("--unsup_coef", type=float, default=27.8, help="Weight of the pretraining loss.")
    group.add_argument("--preprocessing_num_workers", type=int, default=None,
                       help="Processes for tokenising the unsupervised dataset.")


def _add_step3_model_args(parser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--actor_model_name_or_path", type=str, required=True, help="Usually the step-1 output.")
    group.add_argument("--critic_model_name_or_path", type=str, required=True,
                       help="A step-2 output (ours or DeepSpeed-Chat's); also used as the reward model.")
    group.add_argument("--reference_model_name_or_path", type=str, default=None,
                       help="Model the KL penalty is measured against (default: the actor's initial weights; "
                            "MPO uses the DPO model)." + flags.OWN_DEFAULT)
    group.add_argument("--num_padding_at_beginning", type=int, default=1,
                       help="Passed to the critic/reward constructors (OPT: 1): the first N positions are never "
                            "taken for the end of a sequence.")
    flags.add_reward_ending_arg(group)
    group.add_argument("--actor_dropout", type=float, default=None,
                       help="Override dropout in the actor config (default: keep the model's)." + flags.OWN_DEFAULT)
    group.add_argument("--critic_dropout", type=float, default=None,
                       help="Override dropout in the critic config (default: keep the model's)." + flags.OWN_DEFAULT)
    group.add_argument("--actor_gradient_checkpointing", action="store_true",
                       help="Enable HF gradient checkpointing in the actor.")
    group.add_argument("--critic_gradient_checkpointing", action="store_true",
                       help="Enable HF gradient checkpointing in the critic.")
    group.add_argument("--compute_fp32_loss", action="store_true", default=None,
                       help="Upcast the logits to fp32 for the log-probs, ratios and per-token KL, and compute the "
                            "critic loss in fp32 (default: on for --dtype bf16/fp16; --no_compute_fp32_loss turns "
                            "it off)." + flags.OWN_DEFAULT)
    group.add_argument("--no_compute_fp32_loss", dest="compute_fp32_loss", action="store_false",
                       help=argparse.SUPPRESS)
    group.add_argument("--add_eot_token", action="store_true", help="Add --eot_token to the tokenizer.")
    group.add_argument("--eot_token", type=str, default="<|endoftext|>",
                       help="The special token --add_eot_token adds.")


def _add_step3_batch_args(parser) -> None:
    group = parser.add_argument_group(BATCH_GROUP)
    group.add_argument("--per_device_generation_batch_size", type=int, default=16,
                       help="Prompts per device per generation.")
    group.add_argument("--per_device_training_batch_size", type=int, default=16, help="PPO micro-batch per device.")
    group.add_argument("--generation_batches", type=int, default=1,
                       help="Generation batches collected before each PPO update.")
    group.add_argument("--ppo_epochs", type=int, default=1, help="Passes over the collected experience.")
    group.add_argument("--max_prompt_seq_len", type=int, default=256,
                       help="Longer prompts are dropped; shorter ones are left-padded.")
    group.add_argument("--max_answer_seq_len", type=int, default=256, help="Maximum new tokens per answer.")
    old = {"--per_device_train_batch_size": "per_device_generation_batch_size",
           "--per_device_mini_train_batch_size": "per_device_training_batch_size",
           "--generation_batch_numbers": "generation_batches"}
    for flag, dest in old.items():
        group.add_argument(flag, dest=dest, type=int, action=_DeprecatedAlias, replacement=f"--{dest}",
                           default=argparse.SUPPRESS, help=f"Deprecated alias of --{dest}.")


def _add_step3_optim_args(parser) -> None:
    group = parser.add_argument_group(OPTIM_GROUP)
    group.add_argument("--actor_learning_rate", type=float, default=9.65e-6, help="Actor peak learning rate.")
    group.add_argument("--critic_learning_rate", type=float, default=5e-6, help="Critic peak learning rate.")
    group.add_argument("--actor_weight_decay", type=float, default=0.0, help="Actor AdamW weight decay.")
    group.add_argument("--critic_weight_decay", type=float, default=0.0, help="Critic AdamW weight decay.")
    flags.add_optim_args(parser, learning_rate=0.0, num_warmup_steps=100, batch_flags=False,
                         max_steps_help="Stop after this many PPO steps (0: run all epochs).")


def _add_step3_deepspeed_args(parser) -> None:
    flags.add_deepspeed_args(parser, zero_flags=False)
    group = parser.add_argument_group(ENGINE_GROUP)
    group.add_argument("--actor_zero_stage", type=int, default=0, choices=(0, 1, 2, 3),
                       help="ZeRO stage of the actor (and reference) engines.")
    group.add_argument("--critic_zero_stage", type=int, default=0, choices=(0, 1, 2, 3),
                       help="ZeRO stage of the critic (and reward) engines.")
    group.add_argument("--offload_reference_model", action="store_true",
                       help="ZeRO-3 parameter offload for the reference (and EMA) model.")
    group.add_argument("--offload_reward_model", action="store_true",
                       help="ZeRO-3 parameter offload for the reward model.")
    group.add_argument("--enable_hybrid_engine", action="store_true",
                       help="DeepSpeed Hybrid Engine for generation where it works (GPU and a supported "
                            "architecture); otherwise one warning and Hugging Face generate.")
    group.add_argument("--unpin_actor_parameters", action="store_true",
                       help="Do not keep all ZeRO-3 actor parameters gathered during generation (HE: "
                            "pin_parameters=false; native path: gather layer by layer with synced_gpus).")
    group.add_argument("--release_inference_cache", action="store_true", help="HE: free the KV workspace after generate.")
    group.add_argument("--inference_tp_size", type=int, default=1,
                       help="HE tensor-parallel degree for generation (> 1 needs --actor_zero_stage 3).")
    group.add_argument("--tp_gather_partition_size", type=int, default=8,
                       help="HE: layers gathered per group when --inference_tp_size > 1.")
    group.add_argument("--enable_mixed_precision_lora", action="store_true",
                       help="Quantise frozen weights under ZeRO-3 (needs actor LoRA and actor ZeRO-3; GPU).")
    group.add_argument("--align_overflow", action="store_true",
                       help="fp16: when the actor or the critic overflows, skip both steps.")


def _add_step3_lora_args(parser) -> None:
    group = parser.add_argument_group("lora")
    for who in ("actor", "critic"):
        group.add_argument(f"--{who}_lora_dim", type=int, default=0, help=f"LoRA rank of the {who}; > 0 enables it.")
        group.add_argument(f"--{who}_lora_module_name", type=str, default=None, help=flags.LORA_MODULE_HELP)
        group.add_argument(f"--{who}_lora_learning_rate", type=float, default=5e-4,
                           help=f"Learning rate of the {who}'s LoRA parameters.")
    group.add_argument("--only_optimize_lora", action="store_true",
                       help="Train only LoRA parameters (actor and critic; the value head always trains).")


def _add_ppo_args(parser) -> None:
    group = parser.add_argument_group(PPO_GROUP)
    group.add_argument("--init_kl_coef", type=float, default=0.1,
                       help="KL penalty coefficient per token. Fixed for the whole run unless --kl_target is given "
                            "(then it is the adaptive controller's start value).")
    group.add_argument("--kl_target", type=float, default=None,
                       help="Enable the adaptive KL controller with this target KL per sequence (default: off, "
                            "the coefficient stays --init_kl_coef)." + flags.OWN_DEFAULT)
    group.add_argument("--kl_horizon", type=float, default=10000, help="Adaptive KL controller horizon (samples).")
    group.add_argument("--clip_reward_value", type=float, default=5.0, help="Reward-model scores are clipped to +-this.")
    group.add_argument("--cliprange", type=float, default=0.2, help="PPO ratio clip.")
    group.add_argument("--cliprange_value", type=float, default=0.2, help="Value clip around the old values.")
    group.add_argument("--gamma", type=float, default=1.0, help="Discount.")
    group.add_argument("--lam", type=float, default=0.95, help="GAE lambda.")
    group.add_argument("--normalize_reward", action="store_true",
                       help="Normalise reward-model scores by running mean/std before clipping.")
    group.add_argument("--whiten_advantages", action="store_true", help="Whiten advantages per mini-batch.")
    group.add_argument("--enable_ema", action="store_true", help="Keep an EMA of the actor, saved to actor_ema/.")
    group.add_argument("--ema_beta", type=float, default=0.992, help="EMA decay (weight of the past).")
    flags.add_sampling_args(parser.add_argument_group(SAMPLING_GROUP), with_do_sample=True)


def _add_step3_logging_args(parser) -> None:
    flags.add_logging_args(parser, tensorboard_path="step3_tensorboard", print_loss=False)
    parser.set_defaults(seed=None, log_interval=1)
    group = parser.add_argument_group("step-3 output")
    group.add_argument("--print_answers", action="store_true", help="Print decoded prompts and answers.")
    group.add_argument("--print_answers_interval", type=int, default=1, help="Every N generation steps.")
    group.add_argument("--enable_test_mode", action="store_true",
                       help="Stop after --test_stop_step PPO steps without fp16 overflow (CI).")
    group.add_argument("--test_stop_step", type=int, default=0,
                       help="PPO steps before --enable_test_mode stops (0: no limit).")


def _add_step3_health_args(parser) -> None:
    health.add_health_args(parser)
    health.add_keep_best_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = flags.new_parser("Step 3: PPO (RLHF) fine-tuning (DeepSpeed-Chat compatible flags).")
    _add_step3_data_args(parser)
    _add_step3_model_args(parser)
    _add_step3_batch_args(parser)
    _add_step3_optim_args(parser)
    _add_step3_deepspeed_args(parser)
    _add_step3_lora_args(parser)
    _add_ppo_args(parser)
    _add_step3_logging_args(parser)
    _add_step3_health_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked, with the defaults that depend on other flags filled in."""
    args = build_parser().parse_args(argv)
    vars(args).update(validate_args(args))
    return args


def recorded_settings(args) -> dict[str, Any]:
    """The settings `run_info.json` records: every flag of `RECORDED_GROUPS` (a flag added to one of them
    is recorded with no list to edit), and the precision the engines train in."""
    parser = build_parser()
    settings = {dest: getattr(args, dest) for title in RECORDED_GROUPS for dest in parser.group_dests(title)}
    settings["dtype"] = resolve_dtype(args.dtype)
    return settings


def validate_args(args) -> dict[str, Any]:
    """Checks that need no model or data (UserError naming the flag). Returns the values of the flags whose
    default depends on others, for `parse_args` to fill in; `args` itself is left as parsed."""
    flags.validate_common(args)
    flags.check_positive(args, "per_device_generation_batch_size", "per_device_training_batch_size",
                         "generation_batches", "ppo_epochs", "max_prompt_seq_len", "max_answer_seq_len",
                         "print_answers_interval", "inference_tp_size", "tp_gather_partition_size")
    for flag in ("actor_model_name_or_path", "critic_model_name_or_path", "reference_model_name_or_path"):
        flags.check_path_exists(f"--{flag}", getattr(args, flag), "model directory")
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        raise UserError(f"--inference_tp_size {args.inference_tp_size}: tensor-parallel generation needs "
                        "--actor_zero_stage 3; use --inference_tp_size 1 or ZeRO-3 for the actor")
    if (args.actor_zero_stage == 2 and args.critic_zero_stage == 2 and args.enable_hybrid_engine and args.offload
            and args.actor_lora_dim == 0):
        raise UserError("--actor_zero_stage 2 --critic_zero_stage 2 --enable_hybrid_engine --offload without "
                        "--actor_lora_dim is unsupported (training is unstable, as upstream); drop one of them "
                        "or enable actor LoRA")
    if args.enable_mixed_precision_lora and (args.actor_lora_dim <= 0 or args.actor_zero_stage != 3):
        raise UserError("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and --actor_zero_stage 3")
    if args.kl_target is not None and (args.kl_target <= 0 or args.kl_horizon <= 0):
        raise UserError(f"--kl_target {args.kl_target} --kl_horizon {args.kl_horizon}: both must be positive")
    flags.sampling_from_args(args)
    if not 0.0 <= args.ema_beta <= 1.0:
        raise UserError(f"--ema_beta {args.ema_beta}: must be in [0, 1]")
    health.check_health_args(args)
    if args.keep_best and not args.eval_steps:
        raise UserError("--keep_best needs periodic evaluations: add --eval_steps N")
    if bool(args.unsupervised_dataset_name) != bool(args.unsupervised_dataset_config_name):
        print_rank_0("warning: the unsupervised mix needs both --unsupervised_dataset_name and "
                     "--unsupervised_dataset_config_name; it stays off")
    # upstream's flag, on by default where the logits are half precision
    fp32_loss = args.compute_fp32_loss if args.compute_fp32_loss is not None else resolve_dtype(args.dtype) != "fp32"
    return {"compute_fp32_loss": fp32_loss}
