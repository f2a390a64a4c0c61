"""One definition of each flag group, shared by every entry point: frozen settings dataclasses.

Each group is a frozen dataclass of `dschat.utils.settings.Settings` whose fields are its flags (help,
aliases and choices in field metadata); a stage's settings type inherits the groups it offers (steps 1-2:
`dschat.steps.sft.SFTSettings`, `dschat.steps.reward.RewardSettings`; step 3: `dschat.steps.ppo_args`),
and its parser is generated from them. A group checks its own flags at construction (`_check`, UserError
naming the flag). Flag names, types and defaults follow DeepSpeed-Chat (per step where upstream differs),
so users' scripts run unchanged; the additions are documented in each flag's help.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dschat.rlhf.health import (
    REWARD_MAX_IDENTICAL_SHARE,
    REWARD_MIN_ACCURACY,
    HealthThresholds,
    load_gold_reward,
)
from dschat.utils.data.raw_datasets import CHAT_FORMATS, parse_column_map
from dschat.utils.ds_utils import load_user_ds_config, resolve_dtype
from dschat.utils.errors import UserError
from dschat.utils.fingerprint import check_weight_files
from dschat.utils.settings import (  # noqa: F401 - the settings machinery, re-exported for the flag modules
    OWN_DEFAULT,
    FlagParser,
    Settings,
    UpstreamDefault,
    check_positive,
    finite_float,
    flag,
    new_parser,
    same_flag,
)
from dschat.utils.tokenizer import TOKENIZER_RULES

REPORT_TO_CHOICES = ("tensorboard", "wandb", "none")
SCHEDULER_CHOICES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
)
OPTIM_CHOICES = ("auto", "adamw_torch", "adamw_torch_fused")


SEED_MAX = 2**32 - 1  # numpy's seed range (it refuses negatives and 2**32 up); torch and random accept it too


def check_path_exists(flag_name: str, path: str | None, kind: str = "path") -> None:
    """A path that looks local (./x, /x, ~/x or a/b whose parent exists) must exist; a model directory's
    safetensors files must be whole (a truncated copy is one line naming the file, before anything loads)."""
    if path is None:
        return
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parent.exists()
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"{flag_name} {path}: {kind} does not exist; check the path")
    if kind == "model directory":
        check_weight_files(path, flag_name)


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class DataSettings(Settings):
    """Where the training text comes from and how it is cached."""

    flag_group = "data"
    upstream_defaults = {
        "chat_format": UpstreamDefault("raw", "HH-RLHF dialogues and conversations go through the tokenizer's chat "
                                              "template when it has one (the text a chat model was trained on); "
                                              "upstream tokenises every dataset's text as written."),
    }

    data_path: list[str] = flag(
        ["Dahoas/rm-static"],
        "Dataset names (DeepSpeed-Chat's), `local/jsonfile`, local files/directories "
        "(.json/.jsonl/.jsonl.gz/.parquet/.csv or a save_to_disk folder) or other hub ids (datasets.load_dataset), "
        "in DeepSpeed-Chat's or TRL's standard layouts (plain or conversational prompt/chosen/rejected, "
        "prompt/completion, messages) or HH dialogues. Several are blended.", aliases=("--dataset_name",))
    data_keys: str | None = flag(
        None, "Column mapping for local files and hub datasets: comma-separated NAME=COLUMN, NAME one of prompt, "
              "chosen, rejected, completion, messages (e.g. prompt=question,chosen=good,rejected=bad).")
    prompt_key: str | None = flag(None, "The data's column holding the prompt (same as --data_keys prompt=COLUMN).")
    chosen_key: str | None = flag(None, "The data's column holding the chosen (same as --data_keys chosen=COLUMN).")
    rejected_key: str | None = flag(
        None, "The data's column holding the rejected (same as --data_keys rejected=COLUMN).")
    data_split: str | None = flag(
        None, "Comma proportions for phases 1,2,3 (default 2,4,4 for named datasets; a local file or directory "
              "goes wholly to the running phase unless this is given).")
    data_output_path: str | None = flag(
        None, "Where split indices and tokenised caches go (node-local or shared storage); a directory of your "
              "own, created 0700 (default: $XDG_CACHE_HOME/dschat/data_files, i.e. ~/.cache/dschat/data_files). "
              "One that another user owns or others can write is refused.", own_default=True)
    rebuild_data_cache: bool = flag(False, "Rebuild the tokenised cache even if a matching one exists.")
    end_of_conversation_token: str | None = flag(
        None, "Text appended to every training sample (default: the tokenizer's eos token, the same ending for "
              "SFT, RM and PPO).", own_default=True)
    chat_format: str = flag(
        "auto", "Which texts go through the tokenizer's chat template (when it has one): auto: conversational data "
                "and HH-RLHF dialogues (Anthropic/hh-rlhf, local {chosen, rejected} dialogue files), while "
                "DeepSpeed-Chat's named datasets (Dahoas/rm-static, ...) keep upstream's text; template: those "
                "too; raw: none (HH dialogues as written, conversations as HH turns). Local files of plain "
                "prompt/chosen/rejected strings (e.g. selection's easy/hard pairs) are used as written. Selection "
                "and evaluation render prompts the same way.", choices=CHAT_FORMATS)
    keep_truncated: bool = flag(
        False, "Keep what the length limits cut: rows whose answer --max_seq_len cuts away entirely, pairs where it "
               "does so to either side or leaves both sides identical (kept as upstream did), and prompts longer "
               "than --max_prompt_seq_len (step 3 and selection: cut to their last tokens). By default they are "
               "dropped; either way they are counted (console, metrics.jsonl, model card, selection manifest).")

    @property
    def column_map(self) -> dict[str, str]:
        """{standard column: the data's column} from --data_keys and --prompt_key/--chosen_key/--rejected_key."""
        return parse_column_map(self.data_keys, prompt=self.prompt_key, chosen=self.chosen_key,
                                rejected=self.rejected_key)

    def _check(self) -> None:
        self.column_map  # noqa: B018 - a malformed --data_keys fails here, before any model is loaded


@dataclass(frozen=True, kw_only=True)
class SFTOnlyDataSettings(Settings):
    flag_group = "data"

    sft_only_data_path: list[str] = flag([], "Datasets used only in SFT (split 10,0,0).")


@dataclass(frozen=True, kw_only=True)
class BatchPaddingSettings(Settings):
    """How training batches are padded and grouped (stages whose batches the collators pad)."""

    flag_group = "data"
    upstream_defaults = {
        "padding": UpstreamDefault("max_length", "A batch is padded to its longest row (a multiple of 8), not to "
                                                 "--max_seq_len: the same losses for less compute."),
        "group_by_length": UpstreamDefault(False, "Batches of similar lengths need even less padding."),
    }

    padding: str = flag("longest", "Pad each batch to its longest row (multiple of 8) or, as upstream, to the "
                                   "max length.", choices=("longest", "max_length"))
    group_by_length: bool = flag(
        True, "Batch training samples of similar length together (shuffled megabatches sorted by length), so that "
              "little of each padded batch is padding; on by default with --padding longest.",
        negative="--no_group_by_length", negative_help="Plain shuffled batches, as upstream.")

    @property
    def groups_by_length(self) -> bool:
        """Length grouping in effect: asked for, and batches padded to their longest row."""
        return self.group_by_length and self.padding == "longest"


@dataclass(frozen=True, kw_only=True)
class PadMaskSettings(Settings):
    flag_group = "data"
    upstream_defaults = {
        "pad_mask": UpstreamDefault("always", "Causal attention already keeps real tokens from seeing the pads after "
                                              "them, and without a mask attention takes its fast causal kernel; "
                                              "only values at pad positions change (which only --reward_loss "
                                              "divergence reads)."),
    }

    pad_mask: str = flag(
        "auto", "auto: right-padded training batches run without an attention mask (the causal mask already "
                "hides trailing pads from real tokens, and attention takes its causal fast path); always: pass "
                "the padding mask as upstream.", choices=("auto", "always"))


SAMPLE_ORDERS = ("epoch", "upstream")


@dataclass(frozen=True, kw_only=True)
class SampleOrderSettings(Settings):
    """Which training samples each step sees, in which order."""

    flag_group = "data"
    upstream_defaults = {
        "sample_order": UpstreamDefault("upstream", "Upstream's DistributedSampler is seeded 0 whatever --seed and is "
                                                    "never told the epoch, so every epoch replays one order; here "
                                                    "the order follows --seed, changes every epoch and resumes "
                                                    "mid-epoch."),
    }

    sample_order: str = flag(
        "epoch", "epoch: shuffled from --seed, a new order every epoch (resumable mid-epoch); upstream: DeepSpeed-Chat's "
                 "order (DistributedSampler seeded 0 whatever --seed, the same order every epoch, evaluation batches "
                 "shuffled too).", choices=SAMPLE_ORDERS)

    @property
    def upstream_order(self) -> bool:
        return self.sample_order == "upstream"


@dataclass(frozen=True, kw_only=True)
class SequenceLengthSettings(Settings):
    flag_group = "data"

    max_seq_len: int = flag(512, "Truncate sequences to this many tokens (TRL: --max_length).", aliases=("--max_length",))

    def _check(self) -> None:
        if self.max_seq_len < 2:
            raise UserError(f"--max_seq_len {self.max_seq_len}: too short to hold one prompt token and one answer "
                            "token (nothing to learn from); use at least 2, typically 512")


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True)
class ModelSettings(Settings):
    """The trained model of steps 1, 2 and 3b."""

    flag_group = "model"

    model_name_or_path: str = flag(help="Hugging Face hub id or local directory.")
    dropout: float | None = flag(None, "Override dropout in the model config.")
    gradient_checkpointing: bool = flag(False, "Enable HF gradient checkpointing.")
    compute_fp32_loss: bool = flag(False, "Compute the loss on fp32 logits.")

    def _check(self) -> None:
        check_path_exists("--model_name_or_path", self.model_name_or_path, "model directory")


@dataclass(frozen=True, kw_only=True)
class TokenizerSettings(Settings):
    flag_group = "model"
    upstream_defaults = {
        "tokenizer_rule": UpstreamDefault(
            "upstream", "Upstream judges a tokenizer by the model's name: with 'llama' in it, LlamaTokenizer and, "
                        "without a pad token, a new untrained [PAD] (one more embedding row; Llama-2 rollouts "
                        "then start from it); any other name gets AutoTokenizer and pad = eos, replacing its own "
                        "pad (OPT's too). Here the checkpoint's own tokenizer, its own pad or else its eos."),
    }

    add_eot_token: bool = flag(False, "Add --eot_token to the tokenizer as a special token.")
    eot_token: str = flag("<|endoftext|>", "The special token --add_eot_token adds.")
    tokenizer_rule: str = flag(
        "ours", "ours: the checkpoint's own tokenizer, its own pad token or else its eos (never a new token); "
                "upstream: DeepSpeed-Chat's rules by the model's name (config.json's _name_or_path, else the "
                "path): 'llama' in it gives LlamaTokenizer and a new [PAD] token when it has no pad, any other name "
                "AutoTokenizer with pad = eos, replacing its own pad.", choices=TOKENIZER_RULES)

    @property
    def added_special_token(self) -> str | None:
        """The special token to add to the tokenizer (None: none)."""
        return self.eot_token if self.add_eot_token else None


@dataclass(frozen=True, kw_only=True)
class RewardEndingSettings(Settings):
    """`--reward_end_text`: the ending a reward model scores answers with (selection and PPO)."""

    flag_group = "models"

    reward_end_text: str | None = flag(
        None, "Text appended to an answer before the reward model reads it: `eos` (the eos token) or a literal "
              "such as `<|endoftext|>` (default: the ending recorded with the reward model by step 2; "
              "`<|endoftext|>` for a DeepSpeed-Chat step-2 output without a record).", own_default=True)


@dataclass(frozen=True, kw_only=True)
class RewardIndexSettings(Settings):
    """Where a reward model reads a sequence's score (steps 2, 2.5 and 3 alike)."""

    flag_group = "models"

    num_padding_at_beginning: int = flag(
        1, "Positions at the start of every sequence never taken for its end (OPT: 1, Llama and our tiny model: "
           "0); the score is read at the token before the first pad after them, in step 2, PPO and selection.")

    def _check(self) -> None:
        if self.num_padding_at_beginning < 0:
            raise UserError(f"--num_padding_at_beginning {self.num_padding_at_beginning}: must be >= 0")


# --------------------------------------------------------------------------------------------- optimisation


@dataclass(frozen=True, kw_only=True)
class TrainBatchSettings(Settings):
    flag_group = "optimisation"

    per_device_train_batch_size: int = flag(16, "Training samples per rank and micro-step.")
    per_device_eval_batch_size: int = flag(16, "Evaluation samples per rank.")
    learning_rate: float = flag(1e-3, "Peak learning rate.")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    optim: str = flag("auto", "Optimizer implementation (TRL's / transformers' names): auto (DeepSpeed's FusedAdam on "
                              "GPU, DeepSpeedCPUAdam with --offload, torch's fused AdamW on the CPU accelerator), "
                              "adamw_torch (torch's plain AdamW everywhere) or adamw_torch_fused (torch's fused AdamW "
                              "kernel: one pass over each tensor, several times faster on CPU; same update up to "
                              "rounding).",
                      choices=OPTIM_CHOICES)

    def _check(self) -> None:
        check_positive(self, "per_device_train_batch_size", "per_device_eval_batch_size")


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings(Settings):
    flag_group = "optimisation"

    num_train_epochs: int = flag(1, "Passes over the training data.")
    gradient_accumulation_steps: int = flag(1, "Micro-steps per optimizer step.")
    lr_scheduler_type: str = flag("cosine", "Learning-rate schedule (transformers' get_scheduler).",
                                  choices=SCHEDULER_CHOICES)
    num_warmup_steps: int = flag(0, "Warm-up optimizer steps.", low=0)
    warmup_ratio: float = flag(0.0, "Warm-up as a fraction of the run's optimizer steps (TRL's name); when set it "
                                    "replaces --num_warmup_steps.", low=0.0, high=1.0)
    max_steps: int = flag(0, "Stop after this many optimizer steps (0: run all epochs).", low=0)

    def warmup_steps(self, total_steps: int) -> int:
        """The warm-up the schedule takes: --num_warmup_steps, or --warmup_ratio of `total_steps` rounded up."""
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio else self.num_warmup_steps

    def _check(self) -> None:
        check_positive(self, "gradient_accumulation_steps")
        if self.num_train_epochs < 0:
            raise UserError(f"--num_train_epochs {self.num_train_epochs}: must be >= 0")
        default_warmup = next(f.default for f in dataclasses.fields(self) if f.name == "num_warmup_steps")
        if self.warmup_ratio and self.num_warmup_steps != default_warmup:
            raise UserError(f"--warmup_ratio {self.warmup_ratio:g} --num_warmup_steps {self.num_warmup_steps}: two "
                            "ways to set one warm-up; give one of them")


# --------------------------------------------------------------------------------------------- DeepSpeed


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSettings(Settings):
    flag_group = "deepspeed"

    local_rank: int = flag(-1, "Set by the launcher.")
    offload: bool = flag(False, "ZeRO offload of parameters and optimizer to CPU.")
    dtype: str | None = flag(None, "Training precision (default: fp16 on GPU as upstream, fp32 on CPU).",
                             choices=("fp16", "bf16", "fp32"), own_default=True)

    @property
    def resolved_dtype(self) -> str:
        """The precision the engines run in (--dtype, or the device's default; fp16 on CPU is a UserError)."""
        return resolve_dtype(self.dtype)

    def derived(self) -> dict[str, Any]:
        return {**super().derived(), "dtype": self.resolved_dtype}


@dataclass(frozen=True, kw_only=True)
class ZeroSettings(Settings):
    flag_group = "deepspeed"

    zero_stage: int = flag(0, "ZeRO stage (0: plain data parallel; 3: parameters partitioned).",
                           choices=(0, 1, 2, 3))


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfigSettings(Settings):
    """DeepSpeed's own command-line flags (`deepspeed.add_config_arguments`), as fields."""

    flag_group = "DeepSpeed"
    flag_group_description = "DeepSpeed configurations"

    deepspeed: bool = flag(False, "Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    deepspeed_config: str | None = flag(
        None, "A DeepSpeed JSON config merged over the one built from the flags: its keys replace the built-in "
              "defaults and add sections; keys the flags set (batch sizes, ZeRO stage, offload, precision) must "
              "agree with them or be \"auto\".")
    deepscale: bool = flag(False, "Deprecated enable DeepSpeed (helper flag for user code, no impact on DeepSpeed "
                                  "backend)")
    deepscale_config: str | None = flag(None, "Deprecated DeepSpeed json configuration file.")

    @property
    def user_ds_config(self) -> dict | None:
        """The --deepspeed_config file's JSON object (None without one)."""
        return load_user_ds_config(self.deepspeed_config) if self.deepspeed_config else None

    def _check(self) -> None:
        self.user_ds_config  # noqa: B018 - unreadable or not JSON: one line now, not after loading models


# --------------------------------------------------------------------------------------------- LoRA


LORA_MODULE_HELP = ("Substring selecting the Linear layers to wrap (default: the decoder blocks of the "
                    "architecture: `decoder.layers.` for OPT as upstream, `layers.` for Llama/Mistral/Qwen, "
                    "`.h.` for Falcon/BLOOM); a name matching no layer is an error.")


@dataclass(frozen=True, kw_only=True)
class LoRASettings(Settings):
    flag_group = "lora"

    lora_dim: int = flag(0, "LoRA rank; > 0 enables LoRA (TRL: --lora_r).", aliases=("--lora_r",))
    lora_module_name: str | None = flag(None, LORA_MODULE_HELP, own_default=True)
    only_optimize_lora: bool = flag(False, "Train only the LoRA parameters.")
    lora_learning_rate: float = flag(5e-4, "Learning rate of the LoRA parameters.")

    def _check(self) -> None:
        if self.only_optimize_lora and self.lora_dim <= 0:
            raise UserError("--only_optimize_lora needs --lora_dim > 0")


# --------------------------------------------------------------------------------------------- logging


@dataclass(frozen=True, kw_only=True)
class LoggingSettings(Settings):
    flag_group = "logging and checkpoints"

    output_dir: str = flag(help="Where the model, its card, metrics.jsonl and the training states go (required).")
    seed: int | None = flag(1234, "Seed of the data split, shuffling and initialisation.", low=0, high=SEED_MAX)
    enable_tensorboard: bool = flag(False, "TensorBoard scalars (upstream's flag: --report_to tensorboard plus "
                                           "DeepSpeed's own monitor).")
    tensorboard_path: str = flag("tensorboard", "Directory for TensorBoard logs (TRL: --logging_dir); each run writes "
                                                "a subdirectory named by its stage and identity.",
                                 aliases=("--logging_dir",))
    report_to: list[str] = flag(
        ["none"], "Experiment trackers for the metrics (metrics.jsonl is always written): tensorboard (under "
                  "--tensorboard_path), wandb (pip install 'dschat-mpo[wandb]'; WANDB_PROJECT, WANDB_MODE=offline "
                  "etc. as wandb reads them), or none.", nargs="+", choices=REPORT_TO_CHOICES)
    log_interval: int = flag(10, "Optimizer steps between log lines (TRL: --logging_steps).", low=1,
                             aliases=("--logging_steps",))
    save_steps: int = flag(0, "Write a full resumable training state every N optimizer steps (and each epoch end).",
                           low=0)
    push_to_hub: bool = flag(False, "Upload the final model (with its README.md model card) to the Hugging Face "
                                    "hub (token from HF_TOKEN or huggingface-cli login).")
    hub_model_id: str | None = flag(None, "Hub repository for --push_to_hub (default: the --output_dir folder "
                                          "name).", own_default=True)
    hub_private_repo: bool = flag(False, "Create the hub repository as private.")
    save_total_limit: int = flag(2, "Keep only the newest K training states.")
    resume: bool = flag(False, "Continue from the newest complete training state in --output_dir (TRL: "
                               "--resume_from_checkpoint, here a switch).", aliases=("--resume_from_checkpoint",))

    @property
    def trackers(self) -> list[str]:
        return trackers(self)

    def _check(self) -> None:
        report_to = self.report_to or []
        if "none" in report_to and len(report_to) > 1:
            raise UserError(f"--report_to {' '.join(report_to)}: 'none' excludes the others; give one or the other")
        if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
            raise UserError("--report_to wandb: the wandb package is not installed; pip install 'dschat-mpo[wandb]' "
                            "(or wandb), or drop wandb from --report_to")


def trackers(settings: LoggingSettings) -> list[str]:
    """The trackers a run reports to: --report_to, plus tensorboard with upstream's --enable_tensorboard."""
    chosen = [t for t in settings.report_to or [] if t != "none"]
    if settings.enable_tensorboard and "tensorboard" not in chosen:
        chosen.append("tensorboard")
    return chosen


SAVE_FORMATS = ("hf", "upstream")


@dataclass(frozen=True, kw_only=True)
class SaveFormatSettings(Settings):
    flag_group = "logging and checkpoints"
    upstream_defaults = {
        "save_format": UpstreamDefault(
            "upstream", "Our folders load anywhere Hugging Face models do (safetensors, the full tokenizer with its "
                        "pad and special-token settings). Upstream keeps the vocabulary files only, and its next "
                        "step reads a tokenizer.model-only Llama without those settings (on transformers 5: no "
                        "beginning-of-sequence token in step 3's prompts)."),
    }

    save_format: str = flag(
        "hf", "Files of a saved model. hf: Hugging Face layout (model.safetensors, config, generation config, the full "
              "tokenizer; a reward model keeps upstream's pytorch_model.bin); upstream: DeepSpeed-Chat's files "
              "(pytorch_model.bin, config.json, the tokenizer's vocabulary files only).", choices=SAVE_FORMATS)


@dataclass(frozen=True, kw_only=True)
class PrintLossSettings(Settings):
    flag_group = "logging and checkpoints"

    print_loss: bool = flag(False, "Every rank prints its loss each step.")


# --------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class EvalIntervalSettings(Settings):
    """Evaluation of the loss on the eval split (steps 1, 2 and 3b)."""

    flag_group = "evaluation"

    eval_interval: int = flag(0, "Evaluate every N optimizer steps (0: only before training, after each epoch and at "
                                 "the last step); --eval_steps (TRL's name) is the same setting.", low=0,
                              aliases=("--eval_steps",))
    eval_iters: int = flag(100, "At most this many eval batches.", low=0)


# --------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(Settings):
    """The one decoding type: greedy, or sampling with temperature / top-p / top-k. It is the sampling flag
    group of PPO and `mpo eval`, the settings selection samples with (`SelectionSettings.sampling`), and what
    `dschat.rlhf.generation.Generator` takes. Greedy decoding reads none of the other values."""

    flag_group = "sampling"

    do_sample: bool = flag(False, "Sample instead of greedy decoding.")
    temperature: float = flag(1.0, "Sampling temperature. Used with --do_sample.", low=0.0, low_open=True,
                              when="do_sample")
    top_p: float = flag(1.0, "Nucleus sampling mass. Used with --do_sample.", low=0.0, low_open=True, high=1.0)
    top_k: int = flag(0, "Sample among the k most likely tokens; 0 disables top-k filtering. Used with --do_sample.",
                      low=0)

    @property
    def sampling(self) -> SamplingSettings:
        """The decoding settings alone (what a Generator takes), whatever settings type holds them."""
        return SamplingSettings(**{name: getattr(self, name) for name in SAMPLING_FIELDS})


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings))
GREEDY = SamplingSettings()


# --------------------------------------------------------------------------------------------- health


HEALTH_GROUP = "health guards (warn when training destroys the policy; 0 disables a check)"
REWARD_HEALTH_GROUP = "health guards (warn when the reward model learns nothing; 0 disables a check)"
HELD_OUT_GROUP = "held-out evaluation and keeping the best model"
_THRESHOLDS = HealthThresholds()


@dataclass(frozen=True, kw_only=True)
class HealthSettings(Settings):
    """When a stage that trains a policy (PPO, DPO) warns that training destroys it."""

    flag_group = HEALTH_GROUP

    health_min_entropy_ratio: float = flag(
        _THRESHOLDS.min_entropy_ratio, "Warn when the mean per-token entropy of the answers falls below this "
                                       "fraction of its first measured value (entropy collapse).")
    health_max_kl: float = flag(_THRESHOLDS.max_kl, "Warn when the KL to the reference exceeds this many nats per "
                                                   "answer (PPO).")
    health_max_degenerate_share: float = flag(
        _THRESHOLDS.max_degenerate_share, "Warn when more than this share of the answers are empty or repeat at "
                                          "least half of their bigrams.")
    health_max_logp_drop: float = flag(
        _THRESHOLDS.max_logp_drop, "DPO: warn when the held-out chosen and rejected log-probs per token have both "
                                   "fallen by more than this (nats) since the first eval (likelihood displacement).")
    health_max_reward_gap: float = flag(
        _THRESHOLDS.max_reward_gap, "With a held-out reward model (--heldout_reward_model_name_or_path): warn when the "
                                    "gap between the training and the held-out reward (each in standard deviations "
                                    "of its scores at the first evaluation) has widened by more than this from its "
                                    "narrowest point, at --health_reward_gap_patience evaluations in a row "
                                    "(over-optimisation of the training reward model).")
    health_reward_gap_patience: int = flag(
        _THRESHOLDS.reward_gap_patience, "Consecutive evaluations the reward gap must stay widened before it warns.",
        low=1)
    stop_on_collapse: bool = flag(False, "On a health warning, save a training state and stop with exit status 3 "
                                         "instead of only warning.")

    @property
    def health_thresholds(self) -> HealthThresholds:
        return HealthThresholds(min_entropy_ratio=self.health_min_entropy_ratio, max_kl=self.health_max_kl,
                                max_degenerate_share=self.health_max_degenerate_share,
                                max_logp_drop=self.health_max_logp_drop, max_reward_gap=self.health_max_reward_gap,
                                reward_gap_patience=self.health_reward_gap_patience)

    def _check(self) -> None:
        for name in HealthSettings.group_names(HEALTH_GROUP):
            value = getattr(self, name)
            if not isinstance(value, bool) and value < 0:  # nan/inf never parse (finite floats)
                raise UserError(f"--{name} {value}: must be a finite number >= 0 (0 disables the check)")


@dataclass(frozen=True, kw_only=True)
class RewardHealthSettings(Settings):
    """When step 2 flags a reward model that learned nothing (health.json, which `mpo pipeline` reads before
    selecting with it). The policy checks are off there: there is no policy."""

    flag_group = REWARD_HEALTH_GROUP

    health_rm_min_accuracy: float = flag(
        REWARD_MIN_ACCURACY, "From the second evaluation on (the first is before training), warn (reward_at_chance) "
                             "when the held-out accuracy is at or below this, or when accuracy and mean margin are "
                             "no better than before training.", low=0.0, high=1.0)
    health_rm_max_identical_share: float = flag(
        REWARD_MAX_IDENTICAL_SHARE, "Warn (reward_identical) when at least this share of held-out pairs get the "
                                    "same score for chosen and rejected (the reward is read where the two are the "
                                    "same).", low=0.0, high=1.0)
    stop_on_collapse: bool = same_flag(HealthSettings, "stop_on_collapse")

    @property
    def health_thresholds(self) -> HealthThresholds:
        return HealthThresholds(min_entropy_ratio=0.0, max_kl=0.0, max_degenerate_share=0.0, max_logp_drop=0.0,
                                rm_min_accuracy=self.health_rm_min_accuracy,
                                rm_max_identical_share=self.health_rm_max_identical_share)


@dataclass(frozen=True, kw_only=True)
class HeldOutSettings(Settings):
    """Greedy answers to held-out prompts at each evaluation, and keeping the best evaluated step."""

    flag_group = HELD_OUT_GROUP

    eval_prompts: int = flag(16, "Held-out prompts answered at each evaluation for the generation checks and the "
                                 "held-out score (0: none).")
    gold_reward: str | None = flag(None, "MODULE:FUNCTION(prompt, answer) -> float, a known true reward also "
                                         "reported at each evaluation (e.g. mpo_ext.synthetic:gold_reward on the "
                                         "embedded task). The module is imported and the function called: it runs "
                                         "that code, so name only code you trust (also the gold_reward key of a "
                                         "pipeline config).")
    keep_best: bool = flag(False, "Make the saved result the evaluated step with the best held-out score instead "
                                  "of the last step; best.json beside it records which step was kept and why.")
    heldout_reward_model_name_or_path: str | None = flag(
        None, "A second step-2 reward model trained on preference pairs the training reward model never saw (mpo "
              "pipeline's heldout_rm: the other half of its pairs). Every evaluation also scores the answers with it "
              "(eval/reward_heldout) and logs the gap between the two rewards, each standardised by its first "
              "evaluation (eval/reward_gap): the training reward rising away from the held-out one is "
              "over-optimisation (see --health_max_reward_gap).")
    best_metric: str = flag("reward", "Held-out score that decides the best step: the reward model's mean, the "
                                      "held-out reward model's mean (reward_heldout, needs "
                                      "--heldout_reward_model_name_or_path), or the gold reward's mean (needs "
                                      "--gold_reward).", choices=("reward", "reward_heldout", "gold"))

    def _check(self) -> None:
        if self.eval_prompts < 0:
            raise UserError(f"--eval_prompts {self.eval_prompts}: must be >= 0")
        if self.keep_best and not self.eval_prompts:
            raise UserError("--keep_best needs held-out evaluations: set --eval_prompts above 0")
        if self.best_metric == "gold" and not self.gold_reward:
            raise UserError("--best_metric gold needs --gold_reward MODULE:FUNCTION")
        if self.best_metric == "reward_heldout" and not self.heldout_reward_model_name_or_path:
            raise UserError("--best_metric reward_heldout needs --heldout_reward_model_name_or_path")
        check_path_exists("--heldout_reward_model_name_or_path", self.heldout_reward_model_name_or_path,
                          "model directory")
        if self.gold_reward:
            load_gold_reward(self.gold_reward)


@dataclass(frozen=True, kw_only=True)
class EvalStepsSettings(Settings):
    flag_group = HELD_OUT_GROUP

    eval_steps: int = flag(0, "Every N steps, answer held-out prompts greedily and score them with the reward "
                              "model (and --gold_reward); 0: never.")

    def _check(self) -> None:
        if self.eval_steps < 0:
            raise UserError(f"--eval_steps {self.eval_steps}: must be >= 0")


# --------------------------------------------------------------------------------------------- parity


@dataclass(frozen=True, kw_only=True)
class DSChatCompatSettings(Settings):
    """--dschat_compat: DeepSpeed-Chat's defaults for every flag whose default here changes the numbers."""

    flag_group = "DeepSpeed-Chat parity"

    dschat_compat: bool = flag(
        False, "Set every default that changes numbers as DeepSpeed-Chat has it (listed below the options), so that "
               "a run with the same seed, data and model reproduces upstream's losses step for step; flags given "
               "explicitly still win.")


# --------------------------------------------------------------------------------------------- a trained stage


@dataclass(frozen=True, kw_only=True)
class TrainStageSettings(DataSettings, BatchPaddingSettings, SampleOrderSettings, PadMaskSettings,
                         SequenceLengthSettings, ModelSettings, TokenizerSettings, TrainBatchSettings, ScheduleSettings,
                         DeepSpeedSettings, ZeroSettings, DeepSpeedConfigSettings, LoRASettings, LoggingSettings,
                         SaveFormatSettings, EvalIntervalSettings):
    """The groups every stage built by `dschat.utils.build` offers (steps 1, 2 and 3b)."""

    upstream_defaults = {
        "keep_truncated": UpstreamDefault(True, "A row whose answer --max_seq_len cuts away entirely teaches nothing "
                                                "(SFT: prompt only; RM: a tie or one empty side) and is dropped and "
                                                "counted; upstream trains on it."),
    }

