"""One definition of each flag group, shared by every entry point.

Flag names, types and defaults follow DeepSpeed-Chat (per step where upstream differs), so users'
scripts run unchanged; the additions are documented in each flag's help.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dschat.utils.data.raw_datasets import CHAT_FORMATS, parse_column_map
from dschat.utils.ds_utils import load_user_ds_config
from dschat.utils.errors import UserError

REPORT_TO_CHOICES = ("tensorboard", "wandb", "none")
SCHEDULER_CHOICES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
)


def finite_float(text: str) -> float:
    """A float flag's value; nan and inf are refused (a nan threshold or learning rate would run
    and silently produce garbage)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2 (argparse's own code), and reads
    every `type=float` flag as a finite float."""

    def __init__(self, *args, **kwargs):
        self._dests_by_group: dict[str, list[str]] = {}  # before argparse adds its own groups
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def add_argument_group(self, *args, **kwargs):
        """A group that remembers its flags (`group_dests`), so what a run records can be derived from it."""
        group = super().add_argument_group(*args, **kwargs)
        dests = self._dests_by_group.setdefault(group.title, [])
        add = group.add_argument

        def add_argument(*names, **options):
            action = add(*names, **options)
            if action.default is not argparse.SUPPRESS and action.dest not in dests:  # not aliases, not --help
                dests.append(action.dest)
            return action

        group.add_argument = add_argument
        return group

    def group_dests(self, title: str) -> tuple[str, ...]:
        """The destinations of the flags of the argument group `title`, in definition order."""
        if title not in self._dests_by_group:
            raise KeyError(f"no argument group {title!r}")
        return tuple(self._dests_by_group[title])

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


# Ends a help text that states its own default: ArgumentDefaultsHelpFormatter then appends no
# "(default: None)" (it skips helps that mention %(default); this one renders as nothing).
OWN_DEFAULT = "%(default).0s"


def new_parser(description: str) -> argparse.ArgumentParser:
    return _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_args(parser, *, sft_only: bool = False,
                  max_seq_len: int | None = 512, padding: bool = True, pad_mask: bool = True) -> None:
    """Data flags; `padding` (with length grouping) and `pad_mask` only where the entry point uses them."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", nargs="*", default=["Dahoas/rm-static"],
                       help="Dataset names (DeepSpeed-Chat's), `local/jsonfile`, local files/directories "
                            "(.json/.jsonl/.jsonl.gz/.parquet/.csv or a save_to_disk folder) or other hub ids "
                            "(datasets.load_dataset), in DeepSpeed-Chat's or TRL's standard layouts (plain or "
                            "conversational prompt/chosen/rejected, prompt/completion, messages) or HH dialogues. "
                            "Several are blended.")
    group.add_argument("--data_keys", type=str, default=None,
                       help="Column mapping for local files and hub datasets: comma-separated NAME=COLUMN, NAME "
                            "one of prompt, chosen, rejected, completion, messages (e.g. "
                            "prompt=question,chosen=good,rejected=bad).")
    for name in ("prompt", "chosen", "rejected"):
        group.add_argument(f"--{name}_key", type=str, default=None,
                           help=f"The data's column holding the {name} (same as --data_keys {name}=COLUMN).")
    group.add_argument("--data_split", type=str, default=None,
                       help="Comma proportions for phases 1,2,3 (default 2,4,4 for named datasets; a local "
                            "file or directory goes wholly to the running phase unless this is given).")
    if sft_only:
        group.add_argument("--sft_only_data_path", nargs="*", default=[],
                           help="Datasets used only in SFT (split 10,0,0).")
    group.add_argument("--data_output_path", type=str, default=None,
                       help="Where split indices and tokenised caches go (node-local or shared storage); a "
                            "directory of your own, created 0700 (default: $XDG_CACHE_HOME/dschat/data_files, "
                            "i.e. ~/.cache/dschat/data_files). One that another user owns or others can write "
                            "is refused." + OWN_DEFAULT)
    group.add_argument("--rebuild_data_cache", action="store_true",
                       help="Rebuild the tokenised cache even if a matching one exists.")
    if padding:
        group.add_argument("--padding", choices=("longest", "max_length"), default="longest",
                           help="Pad each batch to its longest row (multiple of 8) or, as upstream, to the max "
                                "length.")
        group.add_argument("--group_by_length", dest="group_by_length", action="store_true", default=True,
                           help="Batch training samples of similar length together (shuffled megabatches sorted "
                                "by length), so that little of each padded batch is padding; on by default with "
                                "--padding longest.")
        group.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                           default=argparse.SUPPRESS, help="Plain shuffled batches, as upstream.")
    if pad_mask:
        group.add_argument("--pad_mask", choices=("auto", "always"), default="auto",
                           help="auto: right-padded training batches run without an attention mask (the causal "
                                "mask already hides trailing pads from real tokens, and attention takes its causal "
                                "fast path); always: pass the padding mask as upstream.")
    if max_seq_len is not None:
        group.add_argument("--max_seq_len", type=int, default=max_seq_len,
                           help="Truncate sequences to this many tokens.")
    group.add_argument("--end_of_conversation_token", type=str, default=None,
                       help="Text appended to every training sample (default: the tokenizer's eos token, "
                            "the same ending for SFT, RM and PPO)." + OWN_DEFAULT)
    group.add_argument("--chat_format", choices=CHAT_FORMATS, default="auto",
                       help="Which texts go through the tokenizer's chat template (when it has one): auto: "
                            "conversational data and HH-RLHF dialogues (Anthropic/hh-rlhf, local {chosen, rejected} "
                            "dialogue files), while DeepSpeed-Chat's named datasets (Dahoas/rm-static, ...) keep "
                            "upstream's text; template: those too; raw: none (HH dialogues as written, "
                            "conversations as HH turns). Local files of plain prompt/chosen/rejected strings (e.g. "
                            "selection's easy/hard pairs) are used as written. Selection and evaluation render "
                            "prompts the same way.")
    group.add_argument("--keep_truncated", action="store_true",
                       help="Keep what the length limits cut: rows whose answer --max_seq_len cuts away entirely, "
                            "pairs where it does so to either side or leaves both sides identical (kept as "
                            "upstream did), and prompts longer than --max_prompt_seq_len (step 3 and selection: "
                            "cut to their last tokens). By default they are dropped; either way they are counted "
                            "(console, metrics.jsonl, model card, selection manifest).")


def add_model_args(parser, *, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", type=str, required=required,
                       help="Hugging Face hub id or local directory.")
    group.add_argument("--dropout", type=float, default=None, help="Override dropout in the model config.")
    group.add_argument("--gradient_checkpointing", action="store_true", help="Enable HF gradient checkpointing.")
    group.add_argument("--compute_fp32_loss", action="store_true", help="Compute the loss on fp32 logits.")
    group.add_argument("--add_eot_token", action="store_true",
                       help="Add --eot_token to the tokenizer as a special token.")
    group.add_argument("--eot_token", type=str, default="<|endoftext|>", help="The special token --add_eot_token adds.")


def add_reward_ending_arg(group) -> None:
    """`--reward_end_text`: the ending a reward model scores answers with (one definition for select and PPO)."""
    group.add_argument("--reward_end_text", type=str, default=None,
                       help="Text appended to an answer before the reward model reads it: `eos` (the eos token) "
                            "or a literal such as `<|endoftext|>` (default: the ending recorded with the reward "
                            "model by step 2; `<|endoftext|>` for a DeepSpeed-Chat step-2 output without a record)." + OWN_DEFAULT)


def add_optim_args(parser, *, learning_rate: float, num_warmup_steps: int = 0, weight_decay: float = 0.0,
                   batch_flags: bool = True,
                   max_steps_help: str = "Stop after this many optimizer steps (0: run all epochs).") -> None:
    group = parser.add_argument_group("optimisation")
    if batch_flags:
        group.add_argument("--per_device_train_batch_size", type=int, default=16,
                           help="Training samples per rank and micro-step.")
        group.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Evaluation samples per rank.")
        group.add_argument("--learning_rate", type=float, default=learning_rate, help="Peak learning rate.")
        group.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the training data.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-steps per optimizer step.")
    group.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULER_CHOICES,
                       help="Learning-rate schedule (transformers' get_scheduler).")
    group.add_argument("--num_warmup_steps", type=int, default=num_warmup_steps, help="Warm-up optimizer steps.")
    group.add_argument("--max_steps", type=int, default=0, help=max_steps_help)


def add_deepspeed_args(parser, *, zero_flags: bool = True) -> None:
    group = parser.add_argument_group("deepspeed")
    group.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    group.add_argument("--offload", action="store_true", help="ZeRO offload of parameters and optimizer to CPU.")
    group.add_argument("--dtype", type=str, default=None, choices=("fp16", "bf16", "fp32"),
                       help="Training precision (default: fp16 on GPU as upstream, fp32 on CPU)." + OWN_DEFAULT)
    if zero_flags:
        group.add_argument("--zero_stage", type=int, default=0, choices=(0, 1, 2, 3),
                           help="ZeRO stage (0: plain data parallel; 3: parameters partitioned).")
    import deepspeed

    deepspeed.add_config_arguments(parser)
    for action in parser._actions:
        if "--deepspeed_config" in action.option_strings:
            action.help = ("A DeepSpeed JSON config merged over the one built from the flags: its keys replace the "
                           "built-in defaults and add sections; keys the flags set (batch sizes, ZeRO stage, "
                           "offload, precision) must agree with them or be \"auto\".")


LORA_MODULE_HELP = ("Substring selecting the Linear layers to wrap (default: the decoder blocks of the "
                    "architecture: `decoder.layers.` for OPT as upstream, `layers.` for Llama/Mistral/Qwen, "
                    "`.h.` for Falcon/BLOOM); a name matching no layer is an error." + OWN_DEFAULT)


def add_lora_args(parser) -> None:
    group = parser.add_argument_group("lora")
    group.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; > 0 enables LoRA.")
    group.add_argument("--lora_module_name", type=str, default=None, help=LORA_MODULE_HELP)
    group.add_argument("--only_optimize_lora", action="store_true", help="Train only the LoRA parameters.")
    group.add_argument("--lora_learning_rate", type=float, default=5e-4, help="Learning rate of the LoRA parameters.")


def add_logging_args(parser, *, tensorboard_path: str, print_loss: bool = True) -> None:
    group = parser.add_argument_group("logging and checkpoints")
    group.add_argument("--output_dir", type=str, default=None, help="Where to save; nothing is saved if omitted.")
    group.add_argument("--seed", type=int, default=1234, help="Seed of the data split, shuffling and initialisation.")
    group.add_argument("--enable_tensorboard", action="store_true",
                       help="TensorBoard scalars (upstream's flag: --report_to tensorboard plus DeepSpeed's own "
                            "monitor).")
    group.add_argument("--tensorboard_path", type=str, default=tensorboard_path,
                       help="Directory for TensorBoard logs.")
    group.add_argument("--report_to", nargs="+", choices=REPORT_TO_CHOICES, default=["none"],
                       help="Experiment trackers for the metrics (metrics.jsonl is always written): tensorboard "
                            "(under --tensorboard_path), wandb (pip install 'dschat-mpo[wandb]'; WANDB_PROJECT, "
                            "WANDB_MODE=offline etc. as wandb reads them), or none.")
    if print_loss:
        group.add_argument("--print_loss", action="store_true", help="Every rank prints its loss each step.")
    group.add_argument("--log_interval", type=int, default=10, help="Optimizer steps between log lines.")
    group.add_argument("--save_steps", type=int, default=0,
                       help="Write a full resumable training state every N optimizer steps (and each epoch end).")
    group.add_argument("--push_to_hub", action="store_true",
                       help="Upload the final model (with its README.md model card) to the Hugging Face hub "
                            "(token from HF_TOKEN or huggingface-cli login).")
    group.add_argument("--hub_model_id", type=str, default=None,
                       help="Hub repository for --push_to_hub (default: the --output_dir folder name)." + OWN_DEFAULT)
    group.add_argument("--hub_private_repo", action="store_true", help="Create the hub repository as private.")
    group.add_argument("--save_total_limit", type=int, default=2, help="Keep only the newest K training states.")
    group.add_argument("--resume", action="store_true",
                       help="Continue from the newest complete training state in --output_dir.")


def add_eval_args(parser, *, eval_interval: int = 0, eval_iters: int = 100) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval_interval", type=int, default=eval_interval,
                       help="Evaluate every N optimizer steps (0: only before training and after each epoch).")
    group.add_argument("--eval_iters", type=int, default=eval_iters, help="At most this many eval batches.")


# --------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingFlag:
    """One decoding flag: name, type, default, help, and the values it accepts (above `low`, at most `high`)."""

    name: str
    type: type
    default: float
    help: str
    low: float
    low_open: bool = False
    high: float | None = None

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)  # nan fails every comparison

    def range_text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# The one definition of the decoding flags of PPO rollouts, selection samples and `mpo eval`: argparse
# (`add_sampling_args`) and click (`mpo_ext.eval_cli`) options are both generated from it.
SAMPLING_FLAGS = (
    SamplingFlag("temperature", float, 1.0, "Sampling temperature.", low=0.0, low_open=True),
    SamplingFlag("top_p", float, 1.0, "Nucleus sampling mass.", low=0.0, low_open=True, high=1.0),
    SamplingFlag("top_k", int, 0, "Sample among the k most likely tokens; 0 disables top-k filtering.", low=0),
)
DO_SAMPLE_HELP = "Sample instead of greedy decoding."
WITH_DO_SAMPLE = " Used with --do_sample."


@dataclass(frozen=True)
class SamplingSettings:
    """Validated decoding settings (`sampling_settings`); greedy decoding reads none of the others."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int


def add_sampling_args(container, *, with_do_sample: bool) -> None:
    """The sampling flags on a parser or argument group; `with_do_sample` adds the --do_sample switch
    (off: greedy, as upstream's step 3), without it the entry point always samples."""
    if with_do_sample:
        container.add_argument("--do_sample", action="store_true", help=DO_SAMPLE_HELP)
    for flag in SAMPLING_FLAGS:
        container.add_argument(f"--{flag.name}", type=flag.type, default=flag.default,
                               help=flag.help + (WITH_DO_SAMPLE if with_do_sample else ""))


def sampling_settings(*, do_sample: bool, temperature: float, top_p: float, top_k: int) -> SamplingSettings:
    """The settings, or a UserError naming the flag; the temperature is checked only when sampling."""
    settings = SamplingSettings(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
    for flag in SAMPLING_FLAGS:
        value = getattr(settings, flag.name)
        if (do_sample or flag.name != "temperature") and not flag.accepts(value):
            raise UserError(f"--{flag.name} {value}: must be {flag.range_text()}")
    return settings


def sampling_from_args(args, *, do_sample: bool | None = None) -> SamplingSettings:
    """`sampling_settings` of parsed flags; `do_sample` for an entry point without the switch."""
    return sampling_settings(do_sample=args.do_sample if do_sample is None else do_sample,
                             **{flag.name: getattr(args, flag.name) for flag in SAMPLING_FLAGS})


def trackers(args) -> list[str]:
    """The trackers a run reports to: --report_to, plus tensorboard with upstream's --enable_tensorboard."""
    chosen = [t for t in getattr(args, "report_to", None) or [] if t != "none"]
    if getattr(args, "enable_tensorboard", False) and "tensorboard" not in chosen:
        chosen.append("tensorboard")
    return chosen


def check_trackers(args) -> None:
    report_to = getattr(args, "report_to", None) or []
    if "none" in report_to and len(report_to) > 1:
        raise UserError(f"--report_to {' '.join(report_to)}: 'none' excludes the others; give one or the other")
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise UserError("--report_to wandb: the wandb package is not installed; pip install 'dschat-mpo[wandb]' "
                        "(or wandb), or drop wandb from --report_to")


def column_map(args) -> dict[str, str]:
    """{standard column: the data's column} from --data_keys and --prompt_key/--chosen_key/--rejected_key."""
    return parse_column_map(getattr(args, "data_keys", None), prompt=getattr(args, "prompt_key", None),
                            chosen=getattr(args, "chosen_key", None), rejected=getattr(args, "rejected_key", None))


def check_path_exists(flag: str, path: str | None, kind: str = "path") -> None:
    if path is None:
        return
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parent.exists()
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"{flag} {path}: {kind} does not exist; check the path")


def check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name} {value}: must be positive")


def validate_common(args) -> None:
    """Checks every training entry point shares; raises UserError naming the flag."""
    check_positive(args, "per_device_train_batch_size", "per_device_eval_batch_size",
                   "gradient_accumulation_steps")
    if getattr(args, "max_seq_len", None) is not None and args.max_seq_len < 2:
        raise UserError(f"--max_seq_len {args.max_seq_len}: too short to hold one prompt token and one answer "
                        "token (nothing to learn from); use at least 2, typically 512")
    column_map(args)  # a malformed --data_keys fails here, before any model is loaded
    check_trackers(args)
    if getattr(args, "num_train_epochs", 1) < 0:
        raise UserError(f"--num_train_epochs {args.num_train_epochs}: must be >= 0")
    if getattr(args, "deepspeed_config", None):
        load_user_ds_config(args.deepspeed_config)  # unreadable or not JSON: one line now, not after loading
    lora_dims = {name: value for name, value in vars(args).items() if name.endswith("lora_dim")}
    if getattr(args, "only_optimize_lora", False) and not any(v > 0 for v in lora_dims.values()):
        raise UserError(f"--only_optimize_lora needs {' or '.join('--' + n for n in sorted(lora_dims))} > 0")
    if getattr(args, "push_to_hub", False) and not getattr(args, "output_dir", None):
        raise UserError("--push_to_hub needs --output_dir (the model is saved there first, then uploaded)")
    if getattr(args, "resume", False) and not getattr(args, "output_dir", None):
        raise UserError("--resume needs --output_dir (the states live under OUTPUT_DIR/checkpoints)")
    model_path = getattr(args, "model_name_or_path", None)
    check_path_exists("--model_name_or_path", model_path, "model directory")
