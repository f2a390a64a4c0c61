"""The settings of `mpo eval` (and of `mpo compare --model`): `EvalSettings`, its options as fields.

`mpo eval` is a click command; its options are generated from these fields (`mpo_ext.eval_cli`), as the
training stages' argparse flags are from theirs, and the pipeline's `eval:` section is checked against the
same type (`EvalSettings.from_mapping`). What `table.json` records of the decoding is derived from the
"sampling" and "decoding" groups. Imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dschat.utils import args as flags
from dschat.utils.args import flag, same_flag
from dschat.utils.errors import UserError

DECODING_GROUP = "decoding"


@dataclass(frozen=True, kw_only=True)
class EvalInputSettings(flags.Settings):
    flag_group = "models and data"

    model: list[str] = flag(help="NAME=PATH of a causal LM to evaluate (repeat: --model sft=... --model mpo=...).")
    reward_model: str | None = flag(None, "Step-2 reward model output directory (scores every answer).")
    heldout_reward_model: str | None = flag(
        None, "A held-out step-2 reward model (trained on pairs --reward_model never saw; mpo pipeline's heldout_rm): "
              "every answer is scored by it too, in a held-out reward column.")
    data_path: list[str] = flag([], "Dataset name or local file/directory; its eval/test split gives the prompts (a "
                                    "local file without one: all its prompts). Repeat it to evaluate on several "
                                    "datasets together.")
    data_keys: str | None = flag(None, "Column mapping for local files and hub datasets, NAME=COLUMN comma-separated "
                                       "(e.g. prompt=question), as in the training stages.")
    chat_format: str = same_flag(flags.DataSettings, "chat_format",
                                 help="Which prompts go through the first model's chat template, as in the training "
                                      "stages (auto: conversational data and HH dialogues; template: DeepSpeed-Chat's "
                                      "named datasets too; raw: none).")
    num_prompts: int | None = flag(None, "Evaluate a seeded random subset of this many prompts (default: all).",
                                   low=1)
    data_output_path: str | None = flag(None, "Scratch directory of the data loaders (default: "
                                              "~/.cache/dschat/data_files).")

    @property
    def column_map(self) -> dict[str, str]:
        return flags.DataSettings(data_keys=self.data_keys).column_map

    def _check(self) -> None:
        self.column_map  # noqa: B018 - a malformed --data_keys fails here


@dataclass(frozen=True, kw_only=True)
class DecodingSettings(flags.Settings):
    flag_group = DECODING_GROUP

    max_new_tokens: int = flag(128, "Maximum new tokens per answer.", low=1)
    seed: int = flag(1234, "Fixes the prompt subset, the sampling and the bootstrap.", low=0, high=flags.SEED_MAX)
    batch_size: int = flag(16, "Prompts per generation/scoring batch (per rank).", low=1)
    max_prompt_seq_len: int = flag(256, "Longer prompts keep their last tokens (TRL: --max_prompt_length).", low=1,
                                   aliases=("--max_prompt_length",))


@dataclass(frozen=True, kw_only=True)
class EvalScoringSettings(flags.Settings):
    flag_group = "scoring and statistics"

    max_seq_len: int = flag(512, "Longest prompt+answer the reward model reads (TRL: --max_length).", low=2,
                            aliases=("--max_length",))
    num_padding_at_beginning: int = flag(0, "As in step 2 (OPT: 1, Llama: 0).", low=0)
    reward_end_text: str | None = same_flag(flags.RewardEndingSettings, "reward_end_text")
    device: str = flag("auto", "auto (this rank's GPU, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = flag("auto", "auto: bf16 on GPU, fp32 on CPU.", choices=("auto", "fp32", "bf16", "fp16"))
    gold: str = flag("auto", "Also score with the synthetic task's gold reward (auto: when the data's manifest.json "
                             "says it is the synthetic task).", choices=("auto", "synthetic", "none"))
    num_bootstrap: int = flag(1000, "Bootstrap resamples for the confidence intervals.", low=1)
    confidence: float = flag(0.95, "Level of the bootstrap intervals.", low=0.0, high=1.0, low_open=True,
                             high_open=True)


@dataclass(frozen=True, kw_only=True)
class EvalOutputSettings(flags.Settings):
    flag_group = "output"

    local_rank: int = flag(-1, "Set by the deepspeed launcher.", hidden=True)
    output_dir: str = flag(help="Writes generations/NAME.jsonl and table.json here.")


@dataclass(frozen=True, kw_only=True)
class EvalSettings(EvalInputSettings, DecodingSettings, flags.SamplingSettings, EvalScoringSettings,
                   EvalOutputSettings):
    """Every setting of `mpo eval`: the same prompts, decoding and seed for every model."""

    description = "Mean reward-model score (with bootstrap CI) of each model on the same held-out prompts."

    do_sample: bool = same_flag(flags.SamplingSettings, "do_sample", negative="--greedy",
                                help="Sample (with --temperature/--top_p/--top_k) or decode greedily.")

    def decoding_record(self) -> dict[str, Any]:
        """The decoding settings as `table.json` records them (the "sampling" and "decoding" groups)."""
        return {**self.group_values(DECODING_GROUP), **self.group_values(flags.SamplingSettings.flag_group)}

    def require_inputs(self) -> None:
        """What an evaluation run needs beyond the options' own checks."""
        if not self.model:
            raise UserError("--model: give at least one NAME=PATH")
        if not self.reward_model:
            raise UserError("--reward_model is required (a step-2 reward model output directory)")
        if not self.data_path:
            raise UserError("--data_path is required (the dataset whose held-out prompts are used)")
