"""Loading a tokenizer the way every stage needs it: from the checkpoint first, pad = eos, right padding.

Owns `load_hf_tokenizer` (upstream's name) and the detection of a Llama checkpoint saved DeepSpeed-Chat's
way (`tokenizer.model` only), which must be read with `LlamaTokenizer` to keep upstream's token ids.
transformers is imported where used: the light commands import this module's callers and never need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dschat.utils.errors import UserError

# DeepSpeed-Chat's literal end of a conversation: its step 2 appends it to every dialogue (and its step 3 never does).
UPSTREAM_REWARD_ENDING = "<|endoftext|>"

SLOW_TOKENIZER_FILES = ("tokenizer.model",)  # sentencepiece model: what upstream saves for Llama
FULL_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_upstream_llama_tokenizer_dir(path: str | os.PathLike) -> bool:
    """A Llama checkpoint saved the way DeepSpeed-Chat saves it: `tokenizer.model` and no full tokenizer.

    Upstream reads it with `LlamaTokenizer`, which does not add an extra `▁` before a leading space
    (`' Human: hi'`); a generic tokenizer built from the same file does, and shifts every upstream prompt.
    """
    folder = Path(path)
    if not folder.is_dir() or not all((folder / f).is_file() for f in SLOW_TOKENIZER_FILES + ("config.json",)):
        return False
    if any((folder / f).exists() for f in FULL_TOKENIZER_FILES):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "llama" or "llama" in str(config.get("_name_or_path", "")).lower()


UPSTREAM_PAD_TOKEN = "[PAD]"
TOKENIZER_RULES = ("ours", "upstream")


def upstream_model_name(model_name_or_path: str) -> str:
    """The name DeepSpeed-Chat's tokenizer loader judges a model by: its config.json's `_name_or_path` when
    the path is a directory that records one, else the path as given."""
    config_file = Path(model_name_or_path) / "config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text(encoding="utf-8")).get("_name_or_path") or model_name_or_path
        except (OSError, ValueError):
            return model_name_or_path
    return model_name_or_path


def uses_llama_rules(model_name_or_path: str, rule: str) -> bool | None:
    """Under DeepSpeed-Chat's rules (`rule == "upstream"`): whether the model's name (`upstream_model_name`)
    contains "llama", which picks its tokenizer class and pad rule; None under ours."""
    return "llama" in upstream_model_name(model_name_or_path) if rule == "upstream" else None


def set_pad_token(tokenizer, model_name_or_path: str, rule: str = "ours") -> None:
    """Give `tokenizer` its pad token. `ours`: its own pad, else its eos (never a new token whose embedding
    nobody trained). `upstream` (--tokenizer_rule upstream, part of --dschat_compat): a model whose name
    contains "llama" keeps its pad or gets a new `[PAD]` token (one embedding row more); any other gets pad =
    eos, replacing its own pad (OPT's `<pad>` too)."""
    if rule not in TOKENIZER_RULES:
        raise ValueError(f"tokenizer rule {rule!r}: not one of {', '.join(TOKENIZER_RULES)}")
    llama = uses_llama_rules(model_name_or_path, rule)
    if llama is False:
        tokenizer.pad_token = tokenizer.eos_token
    elif llama and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": UPSTREAM_PAD_TOKEN})
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_hf_tokenizer(model_name_or_path: str, fast_tokenizer: bool = True, add_special_tokens=None,
                      rule: str = "ours"):
    """Load the tokenizer saved beside a checkpoint, falling back to the model it came from.

    Upstream ignored the checkpoint's own tokenizer files and followed `_name_or_path`, which fails
    offline; here the checkpoint directory is tried first. The pad token by `set_pad_token` (ours: pad =
    eos when there is no pad token, never a new untrained `[PAD]`), right padding for training.
    `rule="upstream"` (--tokenizer_rule upstream) also takes DeepSpeed-Chat's class: `LlamaTokenizer` when
    the model's name contains "llama", else `AutoTokenizer` (which reads a `tokenizer.model`-only folder
    differently: ours reads any Llama folder saved that way with `LlamaTokenizer`).
    """
    from transformers import AutoTokenizer  # lazy: see the module docstring

    candidates = [model_name_or_path]
    config_file = Path(model_name_or_path) / "config.json"
    if Path(model_name_or_path).is_dir() and config_file.exists():
        origin = json.loads(config_file.read_text()).get("_name_or_path")
        if origin and origin != model_name_or_path:
            candidates.append(origin)
    elif not Path(model_name_or_path).exists() and ("/" in model_name_or_path and model_name_or_path.startswith((".", "/"))):
        raise UserError(f"model path {model_name_or_path} does not exist; pass an existing directory or a hub id")
    tokenizer, last_error = None, None
    for name in candidates:
        try:
            llama = uses_llama_rules(model_name_or_path, rule)
            if llama or (llama is None and is_upstream_llama_tokenizer_dir(name)):
                from transformers import LlamaTokenizer  # lazy: see the module docstring

                tokenizer = LlamaTokenizer.from_pretrained(name)
            else:
                tokenizer = AutoTokenizer.from_pretrained(name, use_fast=fast_tokenizer)
            break
        except (OSError, ValueError) as err:
            last_error = err
    if tokenizer is None:
        raise UserError(
            f"cannot load a tokenizer from {model_name_or_path} (tried {', '.join(candidates)}): "
            f"{str(last_error).splitlines()[0] if last_error else 'unknown error'}; save the tokenizer "
            "in the model directory or make its hub id reachable"
        )
    set_pad_token(tokenizer, model_name_or_path, rule)
    tokenizer.padding_side = "right"
    if add_special_tokens:
        extra = [add_special_tokens] if isinstance(add_special_tokens, str) else list(add_special_tokens)
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer
