"""DeepSpeed-Chat's `data_utils` import path: every name it had, re-exported from the modules that own them.

Upstream scripts and ours import `create_prompt_dataset`, `DataCollatorReward`, `DataCollatorRLHF`,
`MiniDataset`, `get_unsupervised_data`, ... from here, so this module stays; the code lives by job in
splits.py (which samples each phase reads), cache.py (the node-safe cache and its key),
prompt_datasets.py (tokenised per-phase datasets) and collators.py (per-batch padding, PPO mini-batches).
New code may import from those directly. Nothing is defined here.

Upstream's split arithmetic and names are kept; what differs on purpose: items are stored unpadded and
padded per batch by the collators; one end-of-text convention (the tokenizer's eos) for every phase; the
cache key covers file contents and the tokenizer; the cache is built by local rank 0 under a file lock
while other ranks poll for the files instead of sitting in an NCCL barrier; caches are safetensors files
(token ids and offsets, no pickle: loading one cannot run code) in a directory only the user can write,
by default under the user's cache directory.

One name is upstream's contract rather than ours: `create_prompt_dataset` here returns the items at upstream's
fixed width (`dschat.utils.compat.UpstreamLayoutDataset`), because upstream's mains collate them with
`default_data_collator`; the project's own code calls `prompt_datasets.create_prompt_dataset` (unpadded items).
"""

from __future__ import annotations

from dschat.utils.compat import UpstreamLayoutDataset, create_prompt_dataset
from dschat.utils.data.cache import (
    CACHE_FILE_MODE,
    CACHE_WAIT_TIMEOUT_ENV,
    DATA_CACHE_VERSION,
    DEFAULT_CACHE_WAIT_S,
    EDGE_HASH_BYTES,
    FULL_HASH_LIMIT,
    MARKER_SLACK_S,
    build_once,
    cache_wait_timeout,
    data_cache_dir,
    data_cache_files,
    data_cache_key,
    default_data_cache_dir,
    file_fingerprint,
    file_lock,
    path_fingerprint,
    resolve_local_rank,
    source_fingerprint,
    text_format,
    tokenizer_fingerprint,
    wait_for_files,
)
from dschat.utils.data.collators import (
    DataCollatorReward,
    DataCollatorRLHF,
    DataCollatorSFT,
    MiniDataset,
    batch_width,
    pad_rows,
    round_up,
)
from dschat.utils.data.prompt_datasets import (
    FILTER_REASONS,
    PromptDataset,
    answer_token_count,
    check_data_path,
    create_dataset,
    create_dataset_split,
    data_record,
    get_raw_dataset,
    get_unsupervised_data,
    load_cached_dataset,
    looks_like_path,
    report_filtered,
    unknown_dataset_error,
)
from dschat.utils.data.splits import (
    DEFAULT_DATA_SPLIT,
    TRAIN_EVAL_SPLIT,
    effective_data_split,
    get_raw_dataset_split_index,
    get_shuffle_idx,
    is_local_source,
    parse_data_split,
    phase_only_split,
    phase_rows,
    split_boundaries,
    split_index_file,
    split_parts,
    take_rows,
)

__all__ = [
    "CACHE_FILE_MODE", "CACHE_WAIT_TIMEOUT_ENV", "DATA_CACHE_VERSION", "DEFAULT_CACHE_WAIT_S", "DEFAULT_DATA_SPLIT",
    "EDGE_HASH_BYTES", "FILTER_REASONS", "FULL_HASH_LIMIT", "MARKER_SLACK_S", "TRAIN_EVAL_SPLIT",
    "DataCollatorRLHF", "DataCollatorReward", "DataCollatorSFT", "MiniDataset", "PromptDataset", "UpstreamLayoutDataset",
    "answer_token_count", "batch_width", "build_once", "cache_wait_timeout", "check_data_path", "create_dataset",
    "create_dataset_split", "create_prompt_dataset", "data_cache_dir", "data_cache_files", "data_cache_key",
    "data_record", "default_data_cache_dir",
    "effective_data_split", "file_fingerprint", "file_lock", "get_raw_dataset", "get_raw_dataset_split_index",
    "get_shuffle_idx", "get_unsupervised_data", "is_local_source", "load_cached_dataset", "looks_like_path",
    "pad_rows", "parse_data_split", "path_fingerprint", "phase_only_split", "phase_rows", "report_filtered",
    "resolve_local_rank",
    "round_up", "source_fingerprint", "split_boundaries", "split_index_file", "split_parts", "take_rows",
    "text_format", "tokenizer_fingerprint", "unknown_dataset_error", "wait_for_files",
]
