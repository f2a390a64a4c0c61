"""Step 2.5 of two-stage MPO (Gou & Nguyen 2024): split preference pairs by reward-model confidence.

For every prompt (by default the prompts PPO would see: phase 3 of the split) two answers are sampled
from the SFT model and scored by the reward model (the paper's Algorithm 1); alternatively the
dataset's own chosen/rejected pairs are scored. A pair whose reward gap exceeds theta is "easy" (the
RM is confident, so its label is reliable enough for offline DPO); the rest are "hard" (left to PPO,
whose on-line exploration can cope with an unsure RM). Gaps are absolute RM-score differences.

Work is cut into shards of `--shard_size` prompts. Shards are dealt to ranks round-robin, each is
written atomically when finished, and a restarted run only does the missing ones. The samples of a
prompt depend only on --seed, the prompt's index and the (deterministic) batch it falls into, never on
which rank ran it, so any number of ranks gives the same shards. Shards hold raw scored pairs; theta,
--easy_fraction and --label_policy are applied afterwards, so re-splitting reuses them.

The package, by job: `gaps` (pure math), `prompts` (which prompts), `settings` (the typed settings:
the flags), `shards` (units of work, their files, the worker), `stage` (models, driver, outputs), `cli`
(flags and `main`). This file only re-exports their public names; it must not hold logic.
"""

from mpo_ext.selection.cli import build_parser, main, parse_args
from mpo_ext.selection.gaps import (
    DEFAULT_GAP_EDGES,
    DEFAULT_THRESHOLD,
    accuracy_by_gap_bucket,
    balanced_threshold,
    best_worst_indices,
    gap_summary,
    human_agreement,
    orient_record,
    pair_from_samples,
    split_by_gap,
    split_warnings,
    threshold_for_fraction,
)
from mpo_ext.selection.prompts import items_hash, load_items, prompt_lengths
from mpo_ext.selection.settings import (
    LABEL_POLICIES,
    PAIR_RULE,
    PAIR_SOURCES,
    AnswerSamplingSettings,
    ScoringSettings,
    SelectionSettings,
    SplitSettings,
    check_split,
)
from mpo_ext.selection.shards import (
    ShardWorker,
    assign_shards,
    derive_seed,
    length_sorted_batches,
    prepare_shard_dir,
    read_shards,
    shard_fingerprint,
    shard_path,
    shard_ranges,
)
from mpo_ext.selection.stage import merge_shards_and_write_outputs, run, write_split_outputs

__all__ = [
    "DEFAULT_GAP_EDGES", "DEFAULT_THRESHOLD", "LABEL_POLICIES", "PAIR_RULE", "PAIR_SOURCES", "AnswerSamplingSettings",
    "ScoringSettings", "SelectionSettings", "ShardWorker", "SplitSettings", "accuracy_by_gap_bucket", "assign_shards",
    "balanced_threshold", "best_worst_indices", "derive_seed", "gap_summary", "human_agreement", "items_hash",
    "length_sorted_batches", "load_items", "main", "merge_shards_and_write_outputs", "orient_record",
    "pair_from_samples", "parse_args", "prepare_shard_dir", "prompt_lengths", "read_shards", "run",
    "shard_fingerprint", "shard_path", "shard_ranges", "split_by_gap", "split_warnings", "threshold_for_fraction",
    "build_parser", "check_split", "write_split_outputs",
]
