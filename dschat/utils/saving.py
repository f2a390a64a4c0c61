"""Saving a model: in Hugging Face layout (causal LMs) or upstream's reward-model layout, and the one
"save a stage's model" step every stage uses (fold LoRA in, write weights, tokenizer and model card).

Owns `save_stage_model` (SFT, RM, DPO and PPO's actor, critic, EMA and best-step copies all go through it)
and the two layouts: `save_causal_lm` (safetensors, config, generation config, full tokenizer) and
`save_reward_model` (`pytorch_model.bin` with `rwtransformer.*` + `v_head.weight`, so DeepSpeed-Chat loads
it). All are collective under ZeRO-3 (call on every rank); rank 0 writes through `staged_output`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dschat.utils.dist import barrier, is_rank_0
from dschat.utils.files import atomic_write_text
from dschat.utils.model_card import card_files
from dschat.utils.module.lora import lora_fused
from dschat.utils.output_dir import staged_output
from dschat.utils.zero import gather_full_state_dict


def save_stage_model(settings, engine: Any, tokenizer, output_dir: str | os.PathLike, card_title: str,
                     base_model: str | None, save: Callable[..., None] | None = None,
                     extra_files: dict[str, str] | None = None) -> None:
    """Write a stage's model: LoRA folded into the weights for the write (and unfolded after, so training can
    go on), weights and tokenizer in `save`'s layout (default `save_causal_lm`), and a README.md model card
    derived from `settings` beside them (`extra_files` too). Collective under ZeRO-3."""
    module = getattr(engine, "module", engine)
    files = {**(extra_files or {}), **card_files(settings, card_title, base_model, engine, model_dir=output_dir,
                                                 reward_layout=save is save_reward_model, tokenizer=tokenizer)}
    with lora_fused(module):
        (save or save_causal_lm)(module, tokenizer, output_dir, extra_files=files, file_format=settings.save_format)


def save_causal_lm(model: torch.nn.Module, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None,
                   file_format: str = "hf") -> None:
    """Save a causal LM in Hugging Face layout (safetensors, config, generation config, full tokenizer), or with
    `file_format="upstream"` (--save_format upstream) in DeepSpeed-Chat's: `pytorch_model.bin`, config and the
    tokenizer's vocabulary files only.

    Collective under ZeRO-3: call on every rank. Rank 0 writes through `staged_output` (staged inside
    `output_dir`, config.json moved in last).
    """
    module = getattr(model, "module", model)
    state = gather_full_state_dict(module)
    if is_rank_0():
        markers = ("pytorch_model.bin", "config.json") if file_format == "upstream" else ("config.json",)
        with staged_output(output_dir, markers=markers) as tmp:
            if file_format == "upstream":
                torch.save(state, tmp / "pytorch_model.bin")
                module.config.save_pretrained(tmp)
            else:
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _save_tokenizer(tokenizer, tmp, module, file_format)
            for name, content in (extra_files or {}).items():
                atomic_write_text(tmp / name, content)
            drop_stale_model_files(tmp, Path(output_dir), markers)
    barrier()


def save_reward_model(model: torch.nn.Module, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None,
                      file_format: str = "hf") -> None:
    """Save a reward/critic model in upstream's layout: `pytorch_model.bin` with `rwtransformer.*` +
    `v_head.weight`, plus the base config and the full tokenizer (`file_format="upstream"`: the tokenizer's
    vocabulary files only, as DeepSpeed-Chat writes them), so both projects load it."""
    module = getattr(model, "module", model)
    state = gather_full_state_dict(module)
    if is_rank_0():
        with staged_output(output_dir, markers=("pytorch_model.bin", "config.json")) as tmp:
            torch.save(state, tmp / "pytorch_model.bin")
            config = module.rwtransformer.config
            config.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp, module.rwtransformer, file_format)
            for name, content in (extra_files or {}).items():
                atomic_write_text(tmp / name, content)
            drop_stale_model_files(tmp, Path(output_dir), ("pytorch_model.bin", "config.json"))
    barrier()


# Files of a saved model that one --save_format writes and the other does not.
FORMAT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja")


def drop_stale_model_files(staging: Path, target: Path, markers: tuple[str, ...]) -> None:
    """Before a staged model moves in: remove from `target` the model files an earlier save in the other
    format left there and this one does not replace (a stale model.safetensors would be loaded before a new
    pytorch_model.bin). The markers go first, so a crash in between leaves a folder that reads incomplete."""
    staged = {entry.name for entry in staging.iterdir()}
    stale = [name for name in FORMAT_FILES if name not in staged and (target / name).exists()]
    if not stale:
        return
    for name in (*markers, *stale):
        (target / name).unlink(missing_ok=True)


def record_right_padding(directory: Path) -> None:
    """Write `"padding_side": "right"` into the saved `tokenizer_config.json`.

    `save_pretrained` writes the padding side only when the source config named one, and a tokenizer class
    may default to the left (Llama's does). DeepSpeed-Chat's loader forces right padding only when it adds
    its own `[PAD]`; a saved pad = eos tokenizer keeps the file's side, and upstream's reward reader (first
    pad after the text) then reads a left-padded row at the wrong position. Our own loader sets right
    padding anyway and generation left-pads prompts itself, so this changes nothing here.
    """
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("padding_side") != "right":
        config["padding_side"] = "right"
        atomic_write_text(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _save_tokenizer(tokenizer, directory: Path, model: torch.nn.Module, file_format: str = "hf") -> None:
    """The full tokenizer, plus the slow tokenizer's files (`tokenizer.model`, `vocab.json`/`merges.txt`)
    when it was loaded from them: upstream's savers call `save_vocabulary`, which needs them. `upstream`
    format: what DeepSpeed-Chat writes, the vocabulary files alone (no added tokens, no special-token
    settings: its loaders, and ours, then read a Llama folder with `LlamaTokenizer` from `tokenizer.model`)."""
    if file_format == "upstream":
        tokenizer.save_vocabulary(str(directory))
        return
    tokenizer.save_pretrained(directory)
    record_right_padding(directory)
    for attribute in ("vocab_file", "merges_file"):
        source = getattr(tokenizer, attribute, None) or tokenizer.init_kwargs.get(attribute)
        if isinstance(source, str) and os.path.isfile(source) and not (directory / Path(source).name).exists():
            shutil.copyfile(source, directory / Path(source).name)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (directory / "generation_config.json").exists():
        generation_config.save_pretrained(directory)
