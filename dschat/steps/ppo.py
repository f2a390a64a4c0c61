"""Step 3: PPO fine-tuning of the actor against the step-2 reward model (DeepSpeed-Chat compatible).

`parse_args(argv)` keeps every upstream flag (names, types, defaults; the pre-#698 batch flags as
deprecated aliases) and adds the PPO constants upstream hard-coded, sampling controls, an optional
separate reference model, resumable states and `--max_steps`. `build(args)` returns a `PPOLoop` whose
`train()` runs the generate -> score -> update cycle and whose `save_model()` writes `actor/`, `critic/`
and `actor_ema/`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections import defaultdict
from itertools import repeat
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dschat.rlhf import health
from dschat.steps import train_main
from dschat.utils import args as flags
from dschat.utils import startup
from dschat.utils.build import check_context_length, set_gradient_checkpointing
from dschat.utils.ds_utils import resolve_dtype
from dschat.utils.errors import UserError, run_main
from dschat.utils.model_card import card_files, push_to_hub
from dschat.utils.trainer import ResumableRun
from dschat.utils.utils import print_rank_0

# --------------------------------------------------------------------------------------------- flags


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
    group = parser.add_argument_group("batches and lengths")
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
    group = parser.add_argument_group("actor / critic optimisation")
    group.add_argument("--actor_learning_rate", type=float, default=9.65e-6, help="Actor peak learning rate.")
    group.add_argument("--critic_learning_rate", type=float, default=5e-6, help="Critic peak learning rate.")
    group.add_argument("--actor_weight_decay", type=float, default=0.0, help="Actor AdamW weight decay.")
    group.add_argument("--critic_weight_decay", type=float, default=0.0, help="Critic AdamW weight decay.")
    flags.add_optim_args(parser, learning_rate=0.0, num_warmup_steps=100, batch_flags=False)
    parser._option_string_actions["--max_steps"].help = "Stop after this many PPO steps (0: run all epochs)."


def _add_step3_deepspeed_args(parser) -> None:
    flags.add_deepspeed_args(parser, zero_flags=False)
    group = parser.add_argument_group("step-3 ZeRO, offload and Hybrid Engine")
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
    group = parser.add_argument_group("PPO (upstream's hard-coded constants as defaults)")
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
    sampling = parser.add_argument_group("rollout sampling (default: greedy, as upstream)")
    sampling.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    sampling.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --do_sample).")
    sampling.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass (with --do_sample).")
    sampling.add_argument("--top_k", type=int, default=0, help="0 disables top-k filtering.")


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


def parse_args(argv: list[str] | None = None):
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
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args) -> None:
    """Checks that need no model or data; raise UserError naming the flag."""
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
    if args.compute_fp32_loss is None:  # upstream's flag, on by default where the logits are half precision
        args.compute_fp32_loss = resolve_dtype(args.dtype) != "fp32"
    if args.kl_target is not None and (args.kl_target <= 0 or args.kl_horizon <= 0):
        raise UserError(f"--kl_target {args.kl_target} --kl_horizon {args.kl_horizon}: both must be positive")
    if args.do_sample and args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be positive when sampling")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p {args.top_p}: must be in (0, 1]")
    if not 0.0 <= args.ema_beta <= 1.0:
        raise UserError(f"--ema_beta {args.ema_beta}: must be in [0, 1]")
    health.check_health_args(args)
    if args.keep_best and not args.eval_steps:
        raise UserError("--keep_best needs periodic evaluations: add --eval_steps N")
    if bool(args.unsupervised_dataset_name) != bool(args.unsupervised_dataset_config_name):
        print_rank_0("warning: the unsupervised mix needs both --unsupervised_dataset_name and "
                     "--unsupervised_dataset_config_name; it stays off")


def check_actor_positions(args) -> None:
    """prompt + answer must fit the actor's position table (else generation indexes past it)."""
    check_context_length(args.actor_model_name_or_path, "--actor_model_name_or_path",
                         args.max_prompt_seq_len + args.max_answer_seq_len, "--max_prompt_seq_len + --max_answer_seq_len")


# --------------------------------------------------------------------------------------------- build


def prepare(args):
    """Everything before the engines: checks, seed, tokenizer, prompt (and unsupervised) datasets."""
    from dschat.rlhf.rlhf_engine import unsupervised_enabled
    from dschat.utils.build import build_tokenizer, end_of_text
    from dschat.utils.data.data_utils import create_prompt_dataset, get_unsupervised_data
    from dschat.utils.dist import get_local_rank
    from dschat.utils.utils import set_random_seed

    check_actor_positions(args)
    if args.seed is None:
        print_rank_0("warning: --seed is not set (upstream step-3 default); steps 1-2 used 1234, so the phase-3 "
                     "split may overlap their prompts and the run is not reproducible; pass --seed 1234")
    set_random_seed(args.seed)
    tokenizer = build_tokenizer(args, args.actor_model_name_or_path)
    prompts, held_out = create_prompt_dataset(
        get_local_rank(), args.data_path, args.data_split, args.data_output_path, 3, args.seed, tokenizer,
        args.max_prompt_seq_len, end_of_conversation_token=end_of_text(args, tokenizer),
        rebuild=args.rebuild_data_cache, column_map=flags.column_map(args),
    )
    if len(prompts) == 0:
        raise UserError(f"--data_path {' '.join(args.data_path)}: no prompts of at most --max_prompt_seq_len "
                        f"{args.max_prompt_seq_len} tokens")
    unsup = None
    if unsupervised_enabled(args):
        unsup = get_unsupervised_data(args, tokenizer)
        if hasattr(unsup, "keys") and "train" in unsup.keys():  # upstream returned the whole DatasetDict
            unsup = unsup["train"]
    return tokenizer, prompts, unsup, held_out


def count_total_iters(args, num_prompt_batches: int, num_unsup_batches: int | None) -> int:
    """Optimizer steps for the LR schedules (upstream's formula, capped by --max_steps)."""
    batches = min(num_prompt_batches, num_unsup_batches) if num_unsup_batches is not None else num_prompt_batches
    per_batch = (args.per_device_generation_batch_size / args.per_device_training_batch_size
                 * args.ppo_epochs / args.gradient_accumulation_steps)
    total = int(args.num_train_epochs * batches * per_batch)
    if args.max_steps:
        total = min(total, math.ceil(args.max_steps * args.generation_batches * per_batch))
    return max(1, total)


def _private_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a seed from the global RNG each time an iterator starts; with its own generator
    it leaves the global stream alone, so a resumed run samples the same rollouts as an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def build(args) -> PPOLoop:
    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised
    from dschat.rlhf.rlhf_engine import DeepSpeedRLHFEngine, unsupervised_enabled
    from dschat.utils.data.data_utils import DataCollatorRLHF
    from dschat.utils.output_dir import prepare_output_dir
    from dschat.utils.trainer import ResumableSampler, groups_by_length, sample_lengths

    prepare_output_dir(args.output_dir)
    tokenizer, prompts, unsup, held_out = prepare(args)
    seed = args.seed or 0
    prompt_loader = DataLoader(
        prompts, batch_size=args.per_device_generation_batch_size,
        sampler=ResumableSampler(len(prompts), shuffle=True, seed=seed, batch_size=args.per_device_generation_batch_size,
                                 lengths=sample_lengths(prompts) if groups_by_length(args) else None),
        collate_fn=DataCollatorRLHF(args.max_prompt_seq_len, args.inference_tp_size, tokenizer.pad_token_id,
                                    padding=args.padding),
        generator=_private_generator(seed),
    )
    unsup_loader = None
    if unsup is not None:
        from transformers import default_data_collator

        unsup_loader = DataLoader(unsup, batch_size=args.per_device_generation_batch_size,
                                  sampler=ResumableSampler(len(unsup), shuffle=True, seed=seed),
                                  collate_fn=default_data_collator, generator=_private_generator(seed))
    num_total_iters = count_total_iters(args, len(prompt_loader), len(unsup_loader) if unsup_loader else None)
    engine = DeepSpeedRLHFEngine(args.actor_model_name_or_path, args.critic_model_name_or_path, tokenizer, args,
                                 num_total_iters)
    trainer_cls = DeepSpeedPPOTrainerUnsupervised if unsupervised_enabled(args) else DeepSpeedPPOTrainer
    trainer = trainer_cls(engine, args)
    loop = PPOLoop(args, engine, trainer, prompt_loader, unsup_loader, tokenizer, num_total_iters)
    if args.eval_steps and args.eval_prompts:
        loop.held_out = held_out_prompt_batch(args, held_out, prompts, tokenizer)
    return loop


def held_out_prompt_batch(args, held_out, train_prompts, tokenizer) -> dict[str, torch.Tensor]:
    """The first --eval_prompts prompts of the phase-3 eval split (else of the training prompts), left-padded."""
    from dschat.utils.data.data_utils import DataCollatorRLHF

    dataset = held_out if held_out is not None and len(held_out) else train_prompts
    count = min(args.eval_prompts, len(dataset))
    source = "eval-split" if dataset is held_out else "training (the data has no eval split)"
    print_rank_0(f"Held-out evaluation every {args.eval_steps} steps on {count} {source} prompts")
    collate = DataCollatorRLHF(args.max_prompt_seq_len, 1, tokenizer.pad_token_id, padding="longest")
    return collate([dataset[i] for i in range(count)])


# --------------------------------------------------------------------------------------------- loop


def _resolved(path: str) -> str:
    """Absolute path for local files/directories (provenance survives a `cd`); hub ids unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


class PPOLoop(ResumableRun):
    """Epochs over the prompts; every `generation_batches` rollouts one PPO update ("step")."""

    name = "step3"

    def __init__(self, args, rlhf_engine, trainer, prompt_loader: DataLoader, unsup_loader: DataLoader | None,
                 tokenizer, num_total_iters: int):
        from dschat.utils.trainer import MetricLogger
        from dschat.utils.utils import ExponentialMovingAverage

        self.args = args
        self.rlhf_engine = rlhf_engine
        self.trainer = trainer
        self.prompt_loader = prompt_loader
        self.unsup_loader = unsup_loader
        self.tokenizer = tokenizer
        self.num_total_iters = num_total_iters
        self.device = rlhf_engine.actor.device
        self.logger = MetricLogger.from_args(args, "step3")
        self.reward_ema = ExponentialMovingAverage(0.9)
        self.global_step = 0          # PPO updates done
        self.epoch = 0
        self.step_in_epoch = 0        # prompt batches consumed in this epoch
        self.non_overflow_steps = 0
        self._stop_requested = False
        self._round: dict[str, torch.Tensor] = {}
        self.monitor = health.HealthMonitor("step3", health.thresholds_from_args(args))
        self.best = health.KeepBest(f"eval/{args.best_metric}")
        self.held_out: dict[str, torch.Tensor] | None = None

    # ---- state
    def _ema_partitioned(self) -> bool:
        from dschat.utils.utils import is_zero3

        ema = self.rlhf_engine.actor_ema
        return ema is not None and is_zero3(ema.module)

    def engines(self) -> dict:
        """Engines saved as DeepSpeed checkpoints. A ZeRO-3 EMA has no optimizer, and DeepSpeed cannot
        checkpoint an optimizer-less ZeRO-3 engine, so its partitions travel in the per-rank state."""
        engines = {"actor": self.rlhf_engine.actor, "critic": self.rlhf_engine.critic}
        if self.rlhf_engine.actor_ema is not None and not self._ema_partitioned():
            engines["actor_ema"] = self.rlhf_engine.actor_ema
        return engines

    def rank_state(self) -> dict:
        if not self._ema_partitioned():
            return {}
        params = self.rlhf_engine.actor_ema.module.parameters()
        return {"actor_ema_partitions": [getattr(p, "ds_tensor", p.data).detach().cpu().clone() for p in params]}

    def load_rank_state(self, state: dict) -> None:
        saved = state.get("actor_ema_partitions")
        if saved is None or not self._ema_partitioned():
            return
        params = list(self.rlhf_engine.actor_ema.module.parameters())
        if len(saved) != len(params):
            raise RuntimeError(f"EMA state has {len(saved)} tensors, the model {len(params)}")
        with torch.no_grad():
            for param, value in zip(params, saved):
                target = getattr(param, "ds_tensor", param.data)
                target.copy_(value.to(device=target.device, dtype=target.dtype).view_as(target))

    def extra_state(self) -> dict:
        trainer = self.trainer
        return {
            "kl_controller": trainer.kl_controller.state_dict(),
            "reward_normalizer": trainer.reward_stats.state_dict() if trainer.reward_stats else None,
            "reward_ema": self.reward_ema.ema,
            "non_overflow_steps": self.non_overflow_steps,
            "health_baseline": self.monitor.baseline,
            "keep_best": self.best.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        trainer = self.trainer
        if state.get("kl_controller"):
            trainer.kl_controller.load_state_dict(state["kl_controller"])
        if state.get("reward_normalizer") and trainer.reward_stats is not None:
            trainer.reward_stats.load_state_dict(state["reward_normalizer"])
        self.reward_ema.ema = state.get("reward_ema")
        self.non_overflow_steps = int(state.get("non_overflow_steps", self.global_step))
        self.monitor.baseline.update(state.get("health_baseline", {}))
        self.best.load_state_dict(state.get("keep_best", {}))

    # ---- loop
    def _done(self) -> bool:
        args = self.args
        if args.max_steps and self.global_step >= args.max_steps:
            return True
        return bool(args.enable_test_mode and args.test_stop_step and self.non_overflow_steps >= args.test_stop_step)

    def _batches_per_epoch(self) -> int:
        n = math.ceil(self.prompt_loader.sampler.num_samples / self.args.per_device_generation_batch_size)
        if self.unsup_loader is not None:
            n = min(n, math.ceil(self.unsup_loader.sampler.num_samples / self.args.per_device_generation_batch_size))
        return n

    def train(self) -> None:
        from dschat.utils.dist import barrier

        self._write_run_info(final=False)
        try:
            with self.sigterm_saves_state():
                self._maybe_resume()
                print_rank_0(f"***** Running training (total_iters={self.num_total_iters}) *****")
                if self.global_step == 0:
                    self._maybe_evaluate()
                self._run_epochs()
        finally:
            self.logger.close()
        barrier()

    def _run_epochs(self) -> None:
        from tqdm.auto import tqdm

        from dschat.utils.data.data_utils import MiniDataset
        from dschat.utils.dist import is_rank_0
        from dschat.utils.utils import to_device

        args = self.args
        exp_buffer = MiniDataset(args.generation_batches, args.per_device_training_batch_size)
        unsup_buffer = MiniDataset(args.generation_batches, args.per_device_training_batch_size)
        while self.epoch < args.num_train_epochs and not self._done():
            per_epoch = self._batches_per_epoch()
            start = self.step_in_epoch * args.per_device_generation_batch_size
            self.prompt_loader.sampler.set_epoch(self.epoch, start=start)
            unsup_iter = repeat(None)
            if self.unsup_loader is not None:
                self.unsup_loader.sampler.set_epoch(self.epoch, start=start)
                unsup_iter = iter(self.unsup_loader)
            print_rank_0(f"Beginning of Epoch {self.epoch + 1}/{args.num_train_epochs}, "
                         f"Total Generation Batches {per_epoch}")
            bar = tqdm(total=math.ceil(per_epoch / args.generation_batches),
                       initial=self.step_in_epoch // args.generation_batches, disable=not is_rank_0(),
                       desc=f"step3 epoch {self.epoch + 1}/{args.num_train_epochs}", dynamic_ncols=True)
            for batch_prompt, batch_unsup in zip(self.prompt_loader, unsup_iter):
                if self.step_in_epoch >= per_epoch:
                    break
                batch_prompt = to_device(batch_prompt, self.device)
                exp = self.trainer.generate_experience(batch_prompt["prompt"], batch_prompt["prompt_att_mask"],
                                                       self.epoch * per_epoch + self.step_in_epoch)
                self._accumulate_experience(exp)
                self.step_in_epoch += 1
                exp_batches = exp_buffer.add(exp)
                unsup_batches = None
                if batch_unsup is not None:
                    unsup_batches = unsup_buffer.add(to_device(batch_unsup, self.device))
                if exp_batches is None:
                    continue
                if unsup_batches is None:
                    unsup_batches = [None] * len(exp_batches)
                self._train_round(exp_batches, unsup_batches)
                bar.update(1)
                self._maybe_evaluate()
                self.after_step()
                if self._done():
                    break
            bar.close()
            if self._done() and self.step_in_epoch < per_epoch:
                break
            self.epoch += 1
            self.step_in_epoch = 0

    # ---- one PPO update
    def _accumulate_experience(self, exp: dict) -> None:
        """Per-sample statistics of one rollout batch, summed for the current round."""
        raw = exp["raw_rewards"].float()
        stats = {
            "count": torch.tensor(float(raw.numel())),
            "reward_sum": raw.sum(),
            "reward_sq": (raw * raw).sum(),
            "kl_sum": exp["kl"].float().sum(),
            "entropy_sum": exp["entropy"].float().sum(),
            "length_sum": exp["answer_length"].float().sum(),
            "gen_tokens": exp["generated_tokens"].float(),
        }
        for key, value in stats.items():
            self._round[key] = self._round.get(key, torch.zeros((), device=self.device)) + value.to(self.device)
        self._round["gen_time"] = self._round.get("gen_time", torch.zeros((), device=self.device)) + \
            exp["generate_time"].to(self.device)
        answers = dict(self.trainer.last_health)  # every rollout of the batch, also those dropped as too short
        rows = answers.pop("rows", 0.0)
        for key, value in {"health_rows": 1.0, **answers}.items():
            weighted = torch.tensor(value * rows if key != "health_rows" else rows, device=self.device)
            self._round[key] = self._round.get(key, torch.zeros((), device=self.device)) + weighted

    def _train_round(self, exp_batches: list, unsup_batches: list) -> None:
        from dschat.utils.trainer import reduce_mean_metrics
        from dschat.utils.utils import moving_average

        args = self.args
        engine = self.rlhf_engine
        start = time.time()
        if args.actor_gradient_checkpointing:
            set_gradient_checkpointing(engine.actor.module, True)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count = 0
        for _ in range(args.ppo_epochs):
            for exp, unsup in zip(exp_batches, unsup_batches):
                actor_loss, critic_loss = self.trainer.train_rlhf(exp)
                startup.report()  # first optimizer step (once)
                sums["loss/policy"] += actor_loss.detach().float()
                sums["loss/value"] += critic_loss.detach().float()
                for key, value in self.trainer.last_train_stats.items():
                    sums[key] += value.to(self.device)
                if unsup is not None:
                    sums["loss/unsupervised"] += self.trainer.train_unsupervised(unsup, args.unsup_coef).detach().float()
                if engine.actor_ema is not None:
                    moving_average(engine.actor.module, engine.actor_ema.module, beta=args.ema_beta,
                                   zero_stage=args.actor_zero_stage)
                count += 1
            random.shuffle(exp_batches)
            random.shuffle(unsup_batches)
        if args.actor_gradient_checkpointing:
            set_gradient_checkpointing(engine.actor.module, False)
        train_time = time.time() - start
        self.global_step += 1
        if not self.trainer.overflowed():
            self.non_overflow_steps += 1
        metrics = reduce_mean_metrics(dict(sums), count)
        metrics.update(self._round_metrics(train_time))
        self._round = {}
        self.trainer.kl_controller.update(metrics["objective/kl"], int(metrics.pop("_samples")))
        self._log(metrics)
        self._check_health(metrics)

    def _round_metrics(self, train_time: float) -> dict[str, float]:
        """Reward / KL / entropy / length over all samples of the round and all ranks."""
        from dschat.utils.dist import get_world_size

        health_keys = sorted(k for k in self._round if k.startswith("health/"))
        keys = ("count", "reward_sum", "reward_sq", "kl_sum", "entropy_sum", "length_sum", "gen_tokens",
                "health_rows", *health_keys)
        totals = torch.stack([self._round[k].float().reshape(()) for k in keys])
        times = torch.tensor([float(self._round["gen_time"]), train_time], device=self.device)
        if torch.distributed.is_initialized() and get_world_size() > 1:
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        count, r_sum, r_sq, kl_sum, ent_sum, len_sum, tokens, rows, *health_sums = totals.tolist()
        n = max(count, 1.0)
        mean = r_sum / n
        kl = kl_sum / n
        gen_time, train_time = times.tolist()
        kl_coef = self.trainer.kl_ctl
        return {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(r_sq / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)),
            "objective/kl": kl,
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": mean - kl_coef * kl,
            "objective/entropy": ent_sum / n,
            "health/entropy": ent_sum / max(len_sum, 1.0),
            **{key: value / max(rows, 1.0) for key, value in zip(health_keys, health_sums)},
            "answer_length": len_sum / n,
            "time/generation": gen_time,
            "time/training": train_time,
            "tokens_per_second/generation": tokens / max(gen_time, 1e-9),
            "lr/actor": self.rlhf_engine.actor.get_lr()[0],
            "lr/critic": self.rlhf_engine.critic.get_lr()[0],
            "_samples": count,
        }

    def _log(self, metrics: dict[str, float]) -> None:
        args = self.args
        metrics["reward/ema"] = self.reward_ema.update(metrics["reward/mean"])
        metrics["epoch"] = self.epoch + self.step_in_epoch / max(1, self._batches_per_epoch())
        self.logger.log(self.global_step, "train", metrics, echo=False)
        if self.global_step % max(1, args.log_interval) == 0 or self._done():
            unsup = metrics.get("loss/unsupervised", 0.0)
            print_rank_0(f"Epoch: {self.epoch} | Step: {self.global_step} | PPO Epoch: {args.ppo_epochs} | "
                         f"Actor Loss: {metrics['loss/policy']:.6f} | Critic Loss: {metrics['loss/value']:.6f} | "
                         f"Unsupervised Loss: {unsup:.6f}")
            print_rank_0(f"Average reward score: {metrics['reward/mean']:.6f} | "
                         f"EMA reward score: {metrics['reward/ema']:.6f}")
            print_rank_0(f"KL: {metrics['objective/kl']:.4f} (coef {metrics['objective/kl_coef']:.4g}) | "
                         f"answer length {metrics['answer_length']:.1f} | generation "
                         f"{metrics['time/generation']:.2f}s ({metrics['tokens_per_second/generation']:.1f} tok/s, "
                         f"{self.trainer.generator.path}) | training {metrics['time/training']:.2f}s")

    # ---- health and held-out evaluation
    def _check_health(self, metrics: dict[str, float]) -> None:
        """Warn on unhealthy signals; with --stop_on_collapse save a state and exit (COLLAPSE_EXIT_CODE)."""
        health.check_health(self.monitor, self.global_step, metrics, self.args.output_dir, self.args.stop_on_collapse,
                            self.save_state)

    def _maybe_evaluate(self) -> None:
        """Every --eval_steps steps (and before the first): greedy answers to the held-out prompts, scored."""
        from dschat.rlhf.generation import Generator
        from dschat.utils.utils import to_device

        args = self.args
        if self.held_out is None or self.global_step % args.eval_steps != 0:
            return
        trainer = self.trainer
        generator = Generator(trainer.actor_model, self.tokenizer, max_new_tokens=args.max_answer_seq_len,
                              zero_stage=args.actor_zero_stage, gather_params=False if args.unpin_actor_parameters else None)
        batch = to_device(self.held_out, self.device)
        gold = health.load_gold_reward(args.gold_reward) if args.gold_reward else None

        def reward(seq, width, prompts, answers):  # noqa: ARG001 - scored as the rollouts are
            mask = (seq != self.tokenizer.pad_token_id).long()
            return trainer.reward_model.rollout_scores(seq, mask, width, trainer.reward_ending_ids,
                                                       trainer.end_of_conversation_token_id)

        trainer.eval()
        metrics = health.evaluate_held_out(trainer.actor_model, generator, batch["prompt"], batch["prompt_att_mask"],
                                           self.tokenizer, reward, gold, args.per_device_generation_batch_size)
        trainer.train()
        self.logger.log(self.global_step, "eval", metrics)
        scores = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if self.best.consider(self.global_step, scores, healthy=not self.monitor.active) and args.keep_best:
            self._save_best_actor()

    def _best_dir(self) -> Path:
        return Path(self.args.output_dir) / "best_actor"

    def _save_best_actor(self) -> None:
        from dschat.utils.module.lora import lora_fused
        from dschat.utils.utils import save_causal_lm

        if not self.args.output_dir:
            return
        print_rank_0(f"--keep_best: new best held-out {self.best.metric} {self.best.best_score:.4f} at step "
                     f"{self.global_step}; saving the actor to {self._best_dir()}")
        with lora_fused(self.rlhf_engine.actor.module):
            save_causal_lm(self.rlhf_engine.actor.module, self.tokenizer, self._best_dir(),
                           extra_files=card_files(self.args, "step3 PPO actor (best evaluated step)",
                                                  self.args.actor_model_name_or_path, self.rlhf_engine.actor))

    # ---- outputs
    def _write_run_info(self, final: bool) -> None:
        from dschat.utils.dist import is_rank_0
        from dschat.utils.utils import atomic_write_json

        args = self.args
        if not (args.output_dir and is_rank_0()):
            return
        ppo_keys = ("init_kl_coef", "kl_target", "kl_horizon", "clip_reward_value", "cliprange", "cliprange_value",
                    "gamma", "lam", "normalize_reward", "whiten_advantages", "enable_ema", "ema_beta", "do_sample",
                    "temperature", "top_p", "top_k", "max_prompt_seq_len", "max_answer_seq_len",
                    "per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
                    "ppo_epochs", "actor_learning_rate", "critic_learning_rate", "actor_zero_stage",
                    "critic_zero_stage", "dtype")
        info = {
            "actor_model_name_or_path": _resolved(args.actor_model_name_or_path),
            "reference_model_name_or_path": _resolved(args.reference_model_name_or_path or args.actor_model_name_or_path),
            "critic_model_name_or_path": _resolved(args.critic_model_name_or_path),
            "reward_model_name_or_path": _resolved(args.critic_model_name_or_path),
            "data_path": [_resolved(p) for p in args.data_path],
            "data_split": args.data_split,
            "unsupervised_dataset_name": args.unsupervised_dataset_name,
            "seed": args.seed,
            "ppo": {k: getattr(args, k) for k in ppo_keys},
            "generation_path": self.trainer.generator.path,
            "hybrid_engine_requested": args.enable_hybrid_engine,
            "global_step": self.global_step,
            "final_kl_coef": self.trainer.kl_ctl,
            "health": self.monitor.summary()["status"],
            "kept_step": self.best.best_step if args.keep_best else self.global_step,
            "complete": final,
        }
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.output_dir) / "run_info.json", info)

    def save_model(self) -> None:
        """`actor/` and `actor_ema/` in Hugging Face layout, `critic/` in the reward-model layout."""
        from dschat.utils.build import fuse_lora
        from dschat.utils.utils import save_causal_lm, save_reward_model

        args = self.args
        if not args.output_dir:
            return
        engine = self.rlhf_engine
        out = Path(args.output_dir)
        print_rank_0(f"saving the final models to {out} ...")
        fuse_lora(engine.actor.module)
        if args.keep_best and self.best.best_step is not None:
            self._keep_best_actor(out / "actor")
        else:
            save_causal_lm(engine.actor.module, self.tokenizer, out / "actor",
                           extra_files=card_files(args, "step3 PPO actor", args.actor_model_name_or_path,
                                                  engine.actor))
        fuse_lora(engine.critic.module)
        save_reward_model(engine.critic.module, self.tokenizer, out / "critic",
                          extra_files=card_files(args, "step3 PPO critic", args.critic_model_name_or_path,
                                                       engine.critic))
        if engine.actor_ema is not None:
            fuse_lora(engine.actor_ema.module)
            save_causal_lm(engine.actor_ema.module, self.tokenizer, out / "actor_ema",
                           extra_files=card_files(args, "step3 PPO actor (EMA)", args.actor_model_name_or_path,
                                                      engine.actor_ema))
        health.write_health(args.output_dir, self.monitor)
        self._write_run_info(final=True)
        push_to_hub(args, out / "actor")

    def _keep_best_actor(self, dest: Path) -> None:
        """actor/ becomes the best evaluated step's actor; best.json beside it says which step and why."""
        from dschat.utils.dist import barrier, is_rank_0
        from dschat.utils.output_dir import publish_directory
        from dschat.utils.utils import atomic_write_json

        record = self.best.record(self.global_step, "best")
        if is_rank_0():
            publish_directory(self._best_dir(), dest, keep_existing=False)
            atomic_write_json(dest.parent / health.BEST_FILE, record)
        barrier()
        print_rank_0(f"--keep_best: {dest} is step {self.best.best_step}: {record['reason']}")


def main() -> None:
    """Step 3 entry point: `deepspeed --module dschat.steps.ppo ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
