"""The typed settings of step 2.5: `SelectionSettings`, every flag of the stage as a frozen dataclass.

Its flag groups: the shared data, reward-model and DeepSpeed groups of `dschat.utils.args`, and the stage's
own "models", "selection", "sampling" (what decides the sampled answers: the shared temperature/top-p/top-k
flags plus lengths, N and batch) and "throughput and output" groups. Derived from it, never from a list
of flag names: `split` (`SplitSettings`: how scored pairs become easy and hard), `sampling` (the one
decoding type, always sampling), `sampling_record()` and `ScoringSettings` (what the manifest and the shard
fingerprint record). `check_split` is the one rule for theta and the easy fraction, shared with the pipeline
config. Must not import models or files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dschat.utils import args as flags
from dschat.utils.args import flag, same_flag
from dschat.utils.errors import UserError
from mpo_ext.selection.gaps import DEFAULT_GAP_EDGES, DEFAULT_THRESHOLD

PAIR_SOURCES = ("samples", "dataset")
LABEL_POLICIES = ("reward_model", "human", "drop_disagreements")
PAIR_RULE = ("samples: the best and the worst of --num_samples answers per prompt by reward (first highest, "
             "last lowest), kept in sample order; dataset: the dataset's chosen and rejected answers")
SAMPLING_GROUP = "sampling"


def check_split(threshold: float | None, easy_fraction: float | None, *, threshold_key: str = "--threshold",
                easy_fraction_key: str = "--easy_fraction", require_one: bool = False) -> None:
    """The one rule for how pairs are split (selection's flags and the pipeline's `mpo:` keys): theta is a
    finite number >= 0 (gaps are absolute), the easy fraction lies strictly between 0 and 1, and at most one
    of them is given (`require_one`: exactly one). UserError naming the key otherwise."""
    if threshold is not None and easy_fraction is not None:
        raise UserError(f"{threshold_key} and {easy_fraction_key} are exclusive: give one (a fixed theta or a "
                        "target easy share)")
    if require_one and threshold is None and easy_fraction is None:
        raise UserError(f"{threshold_key} / {easy_fraction_key}: set one (a fixed theta or a target easy share)")
    if easy_fraction is not None and not 0.0 < easy_fraction < 1.0:  # also refuses nan
        raise UserError(f"{easy_fraction_key} {easy_fraction}: must be between 0 and 1 (exclusive)")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise UserError(f"{threshold_key} {threshold}: gaps are absolute, so theta must be a finite number >= 0")


@dataclass(frozen=True)
class SplitSettings:
    """How scored pairs become easy and hard; applied after scoring, so re-splitting reuses the shards.

    `threshold` is theta (None when `easy_fraction` picks it from the gaps); `gap_edges` are the sorted
    lower edges of the accuracy-by-gap buckets.
    """

    threshold: float | None
    easy_fraction: float | None
    label_policy: str
    gap_edges: tuple[float, ...]


@dataclass(frozen=True)
class ScoringSettings:
    """Besides the prompts, the models and the sampling, what decides a shard's scored records (a shard
    made under other values is refused or rebuilt)."""

    pair_source: str
    end_of_conversation_token: str | None
    reward_end_text: str | None
    seed: int
    shard_size: int
    dtype: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class SelectionModelSettings(flags.RewardIndexSettings, flags.RewardEndingSettings):
    flag_group = "models"

    sft_model_name_or_path: str | None = flag(
        None, "The sampling model: the SFT (step 1) model that samples the answers (not needed with --pair_source "
              "dataset); --sampling_model_name_or_path is the same flag.", aliases=("--sampling_model_name_or_path",))
    reward_model_name_or_path: str = flag(help="A step-2 reward model output (ours or upstream DeepSpeed-Chat's).")

    def _check(self) -> None:
        flags.check_path_exists("--sft_model_name_or_path", self.sft_model_name_or_path, "model directory")
        flags.check_path_exists("--reward_model_name_or_path", self.reward_model_name_or_path, "model directory")


@dataclass(frozen=True, kw_only=True)
class SplitFlagSettings(flags.Settings):
    flag_group = "selection"

    threshold: float | None = flag(None, f"theta: pairs with |r(a) - r(b)| > theta are easy (default: "
                                         f"{DEFAULT_THRESHOLD}, the paper's best). Exclusive with --easy_fraction.",
                                   own_default=True)
    easy_fraction: float | None = flag(None, "Instead of a fixed theta, put this fraction of pairs (the largest gaps) "
                                             "in easy.")
    pair_source: str = flag("samples", "samples: two SFT samples per prompt (the paper's Algorithm 1); dataset: "
                                       "score the dataset's own chosen/rejected pairs.", choices=PAIR_SOURCES)
    label_policy: str = flag("reward_model", "reward_model: the higher-scored answer is chosen (the paper); human: "
                                             "keep the dataset label; drop_disagreements: drop pairs where RM and "
                                             "human disagree (dataset pairs).", choices=LABEL_POLICIES)
    data_phase: int = flag(3, "Which --data_split slice to read (3: the prompts step 3 would see).", choices=(1, 2, 3))
    max_prompts: int = flag(0, "Use only the first N prompts (0: all).")
    gap_bucket_edges: str = flag(",".join(f"{e:g}" for e in DEFAULT_GAP_EDGES),
                                 "Lower edges of the gap buckets of accuracy_by_gap (last bucket open).")

    @property
    def split(self) -> SplitSettings:
        """The checked split (theta defaults to the paper's best when neither split flag is given)."""
        check_split(self.threshold, self.easy_fraction)
        try:
            edges = tuple(sorted(float(e) for e in self.gap_bucket_edges.split(",")))
        except ValueError as err:
            raise UserError(f"--gap_bucket_edges {self.gap_bucket_edges}: expected comma-separated numbers") from err
        threshold = DEFAULT_THRESHOLD if self.threshold is None and self.easy_fraction is None else self.threshold
        return SplitSettings(threshold=threshold, easy_fraction=self.easy_fraction, label_policy=self.label_policy,
                             gap_edges=edges)

    def _check(self) -> None:
        self.split  # noqa: B018 - a bad split is one line at parse time
        if self.max_prompts < 0:
            raise UserError(f"--max_prompts {self.max_prompts}: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class AnswerSamplingSettings(flags.Settings):
    """What decides the sampled answers; the group is recorded whole in the manifest and shard fingerprint."""

    flag_group = SAMPLING_GROUP
    flag_group_description = "What decides the sampled answers (recorded with every shard)."

    max_prompt_seq_len: int = flag(256, "Prompts longer than this are dropped (TRL: --max_prompt_length).",
                                   aliases=("--max_prompt_length",))
    max_answer_seq_len: int = flag(256, "Maximum new tokens per answer (TRL: --max_new_tokens).",
                                   aliases=("--max_new_tokens",))
    num_samples: int = flag(2, "Answers sampled per prompt (2: the paper's); the pair is the best and the worst of "
                               "them by reward. The prompt's prefill is computed once for all of its samples.")
    temperature: float = same_flag(flags.SamplingSettings, "temperature", help="Sampling temperature.",
                                   when=None)  # always sampled
    top_p: float = same_flag(flags.SamplingSettings, "top_p", help="Nucleus sampling mass.")
    top_k: int = same_flag(flags.SamplingSettings, "top_k",
                           help="Sample among the k most likely tokens; 0 disables top-k filtering.")
    per_device_generation_batch_size: int = flag(16, "Prompts per generate call (each yields --num_samples answers).")

    @property
    def sampling(self) -> flags.SamplingSettings:
        """The one decoding type; selection always samples (two greedy answers would be identical)."""
        return flags.SamplingSettings(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                      top_k=self.top_k)

    def sampling_record(self) -> dict[str, Any]:
        """The "sampling" group as recorded in the manifest and the shard fingerprint."""
        return self.group_values(SAMPLING_GROUP)

    def _check(self) -> None:
        if self.num_samples < 2:
            raise UserError(f"--num_samples {self.num_samples}: a pair needs at least 2 samples per prompt")
        flags.check_positive(self, "per_device_generation_batch_size", "max_prompt_seq_len", "max_answer_seq_len")


@dataclass(frozen=True, kw_only=True)
class SelectionOutputSettings(flags.Settings):
    flag_group = "throughput and output"

    per_device_eval_batch_size: int = flag(16, "Sequences per reward-model call.")
    shard_size: int = flag(256, "Prompts per resumable shard (OUTPUT_DIR/shards/shard-NNNNN.jsonl).")
    rebuild_shards: bool = flag(False, "Discard shards of an earlier run with different settings instead of "
                                       "refusing.")
    enable_hybrid_engine: bool = flag(False, "Generate with the DeepSpeed Hybrid Engine where it works (GPU, "
                                             "supported model).")
    output_dir: str = flag(help="Where easy.jsonl, hard.jsonl, manifest.json, the plots and shards/ go (required).")
    seed: int = same_flag(flags.LoggingSettings, "seed", help="Seed of the data split and of the sampling.")

    def _check(self) -> None:
        flags.check_positive(self, "per_device_eval_batch_size", "shard_size")


@dataclass(frozen=True, kw_only=True)
class SelectionSettings(flags.DataSettings, SelectionModelSettings, SplitFlagSettings, AnswerSamplingSettings,
                        SelectionOutputSettings, flags.DeepSpeedSettings, flags.ZeroSettings,
                        flags.DeepSpeedConfigSettings):
    """Every setting of step 2.5 (generation pads itself: no padding or length-grouping flags)."""

    description = ("Step 2.5 of two-stage MPO (Gou & Nguyen 2024): score answer pairs with the reward model and "
                   "split them by reward gap into easy (-> DPO, step3b) and hard (-> PPO, step 3).")

    @property
    def scoring(self) -> ScoringSettings:
        return ScoringSettings(pair_source=self.pair_source, end_of_conversation_token=self.end_of_conversation_token,
                               reward_end_text=self.reward_end_text, seed=self.seed, shard_size=self.shard_size,
                               dtype=self.resolved_dtype)

    @property
    def user_ds_config(self) -> None:
        """Selection builds its DeepSpeed config from the flags: a --deepspeed_config file is refused."""
        if self.deepspeed_config:
            raise UserError("--deepspeed_config: the DeepSpeed config is built from the flags here; drop it")
        return None

    @property
    def samples_answers(self) -> bool:
        """Answers come from the sampling model (else: the dataset's own pairs)."""
        return self.pair_source == "samples"

    def _check(self) -> None:
        if self.samples_answers:
            if not self.sft_model_name_or_path:
                raise UserError("--sft_model_name_or_path (the sampling model) is required with --pair_source "
                                "samples (it samples the answers)")
            if self.label_policy != "reward_model":
                raise UserError(f"--label_policy {self.label_policy}: sampled pairs have no human label; use "
                                "--label_policy reward_model or --pair_source dataset")
