"""The typed settings of step 2.5, built once from the parsed flags.

Owns the frozen dataclasses every part of the stage reads (`SplitSettings`: how scored pairs become easy
and hard; `AnswerSamplingSettings`: what decides the sampled answers, i.e. the shared temperature/top-p/
top-k flags of `dschat.utils.args` plus lengths, N and batch; `ScoringSettings`: what else decides a
shard's records) and the choices of the enumerated flags. What a run records (the manifest, the shard
fingerprint) is derived from these, never from a list of flag names. Must not import models or files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from dschat.utils.errors import UserError
from mpo_ext.selection.gaps import DEFAULT_THRESHOLD

PAIR_SOURCES = ("samples", "dataset")
LABEL_POLICIES = ("reward_model", "human", "drop_disagreements")
PAIR_RULE = ("samples: the best and the worst of --num_samples answers per prompt by reward (first highest, "
             "last lowest), kept in sample order; dataset: the dataset's chosen and rejected answers")


class FlagSettings:
    """Base of settings dataclasses whose fields are flags of the same name."""

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def record(self) -> dict[str, Any]:
        """The settings as recorded in manifests and fingerprints (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class AnswerSamplingSettings(FlagSettings):
    """What decides the sampled answers: the flags of the parser's "sampling" group (a test keeps the two
    equal), recorded in the manifest and the shard fingerprint."""

    max_prompt_seq_len: int
    max_answer_seq_len: int
    num_samples: int
    temperature: float
    top_p: float
    top_k: int
    per_device_generation_batch_size: int


@dataclass(frozen=True)
class ScoringSettings(FlagSettings):
    """Besides the prompts, the models and the sampling, what decides a shard's scored records (a shard
    made under other values is refused or rebuilt)."""

    pair_source: str
    end_of_conversation_token: str
    reward_end_text: str | None
    seed: int
    shard_size: int
    dtype: str


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

    @classmethod
    def from_args(cls, args) -> SplitSettings:
        """Checked settings from --threshold/--easy_fraction/--label_policy/--gap_bucket_edges (UserError
        naming the flag otherwise); theta defaults to the paper's best when neither split flag is given."""
        threshold, easy_fraction = args.threshold, args.easy_fraction
        if threshold is not None and easy_fraction is not None:
            raise UserError("--threshold and --easy_fraction are exclusive: give one (a fixed theta or a target "
                            "easy share)")
        if easy_fraction is not None and not 0.0 < easy_fraction < 1.0:  # also refuses nan
            raise UserError(f"--easy_fraction {easy_fraction}: must be between 0 and 1 (exclusive)")
        if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
            raise UserError(f"--threshold {threshold}: gaps are absolute, so theta must be a finite number >= 0")
        if threshold is None and easy_fraction is None:
            threshold = DEFAULT_THRESHOLD
        try:
            edges = tuple(sorted(float(e) for e in args.gap_bucket_edges.split(",")))
        except ValueError as err:
            raise UserError(f"--gap_bucket_edges {args.gap_bucket_edges}: expected comma-separated numbers") from err
        return cls(threshold=threshold, easy_fraction=easy_fraction, label_policy=args.label_policy,
                   gap_edges=edges)
