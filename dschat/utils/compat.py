"""Names that only scripts written for upstream DeepSpeed-Chat use; the project's own code never calls them.

Upstream's step mains, and the many projects built from them, begin with
`from dschat.utils.utils import ..., save_hf_format, ..., save_zero_three_model, load_hf_tokenizer`.
This project saves through `save_causal_lm` / `save_reward_model` instead, so these two live here, in one
place, and `dschat.utils.utils` hands them out under their upstream path (its module `__getattr__`): such
a script keeps importing and saving unchanged. `tests/test_compat.py` runs that import line.

Upstream's mains also pair `create_prompt_dataset` with `transformers.default_data_collator` (step 1) and
a `DataCollatorReward()` that only concatenates (step 2), so they need the items at upstream's fixed width;
ours are stored unpadded and padded per batch. `create_prompt_dataset` here (what `data_utils` exports under
upstream's path) wraps our datasets in `UpstreamLayoutDataset`, which pads each item as upstream stored it.
The project's own code builds its datasets through `dschat.utils.data.prompt_datasets`.

Owns: upstream-only names. Imports the savers' homes (`files`, `saving`, `zero`) and the dataset builder;
nothing in `dschat/` or `mpo_ext/` imports this except the upstream import paths (`utils.py`, `data_utils.py`).
The list of what upstream's scripts import, and the test that imports it all: `tests/test_dropin_imports.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dschat.utils.data.collators import pad_rows
from dschat.utils.data.prompt_datasets import PromptDataset
from dschat.utils.data.prompt_datasets import create_prompt_dataset as create_unpadded_prompt_dataset
from dschat.utils.files import atomic_write
from dschat.utils.saving import save_causal_lm, save_reward_model
from dschat.utils.zero import gather_full_state_dict

UPSTREAM_UTILS_NAMES = ("save_hf_format", "save_zero_three_model")


def save_hf_format(model: torch.nn.Module, tokenizer, args, sub_folder: str = "") -> None:
    """Save `model` under `args.output_dir/sub_folder` in Hugging Face layout (upstream's name).

    Unlike upstream this writes the full tokenizer, a generation config and safetensors (a reward model:
    upstream's `pytorch_model.bin` layout), and is ZeRO-3 aware (call it on every rank then).
    """
    output_dir = os.path.join(args.output_dir, sub_folder)
    module = getattr(model, "module", model)
    if hasattr(module, "rwtransformer"):
        save_reward_model(module, tokenizer, output_dir)
    else:
        save_causal_lm(module, tokenizer, output_dir)


def save_zero_three_model(model_ema, global_rank: int, save_dir: str, zero_stage: int = 0) -> None:
    """Write the full state dict as `save_dir/pytorch_model.bin` (upstream's name; gathers ZeRO-3 weights).

    Collective under ZeRO-3: call it on every rank; rank `global_rank == 0` writes, atomically.
    """
    module = getattr(model_ema, "module", model_ema)
    state = gather_full_state_dict(module)
    if global_rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        atomic_write(Path(save_dir) / "pytorch_model.bin", lambda fh: torch.save(state, fh))


class UpstreamLayoutDataset(Dataset):
    """A phase dataset whose items are laid out as upstream stored them, padded to `max_seq_len`.

    Phase 1: `{"input_ids", "attention_mask", "labels"}`, each [max_seq_len], right-padded with the pad id,
    labels -100 on the padding (what `default_data_collator` stacks). Phase 2: `(chosen_ids, chosen_mask,
    rejected_ids, rejected_mask)`, each [1, max_seq_len] (upstream's collator concatenates them on dim 0).
    Phase 3: our item `(prompt_ids, prompt_mask, pad_id)` unchanged and not reversed, because the only
    consumer, `DataCollatorRLHF`, is imported from this package by upstream's step 3 and left-pads it.
    Every other attribute (`chosen_dataset`, `lengths()`, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: PromptDataset, max_seq_len: int):
        self.dataset = dataset
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _padded(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.dataset.pad_token_id
        return (pad_rows([ids], self.max_seq_len, pad)[0],
                pad_rows([torch.ones_like(ids)], self.max_seq_len, 0)[0])

    def __getitem__(self, idx: int):
        phase = self.dataset.train_phase
        if phase == 1:
            ids, mask = self._padded(self.dataset.chosen_dataset[idx])
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        if phase == 2:
            chosen, chosen_mask = self._padded(self.dataset.chosen_dataset[idx])
            rejected, rejected_mask = self._padded(self.dataset.reject_dataset[idx])
            return chosen[None], chosen_mask[None], rejected[None], rejected_mask[None]
        return self.dataset[idx]


def create_prompt_dataset(local_rank: int, data_path, data_split, output_path, train_phase: int, seed, tokenizer,
                          max_seq_len: int, end_of_conversation_token: str | None = None, sft_only_data_path=(),
                          reload: bool = False, **options) -> tuple[UpstreamLayoutDataset, UpstreamLayoutDataset]:
    """Upstream's `create_prompt_dataset` (same positional parameters): this package's datasets
    (`prompt_datasets.create_prompt_dataset`; `options` are its keyword-only extras) with upstream's item
    layout (`UpstreamLayoutDataset`) and upstream's rows: phases 1 and 2 keep the rows whose answer the length
    limit cuts away (`keep_truncated`, as upstream trains on them), phase 3 drops over-long prompts (as upstream
    filters them). The ending defaults to the tokenizer's eos, this package's one convention (upstream's default
    was the literal `<|endoftext|>`)."""
    options.setdefault("keep_truncated", train_phase != 3)
    train, evals = create_unpadded_prompt_dataset(
        local_rank, data_path, data_split, output_path, train_phase, seed, tokenizer, max_seq_len,
        end_of_conversation_token=end_of_conversation_token, sft_only_data_path=sft_only_data_path, reload=reload,
        **options)
    return UpstreamLayoutDataset(train, max_seq_len), UpstreamLayoutDataset(evals, max_seq_len)
