"""Build causal LMs and reward/critic models the way DeepSpeed-Chat does, with strict, ZeRO-3-aware
loading of step-2 reward checkpoints (ours or upstream's).

Models are always materialised in fp32 (transformers >= 5 defaults to the checkpoint's dtype); the
DeepSpeed engine casts them to the configured fp16/bf16 and keeps fp32 master weights, as upstream.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from safetensors.torch import load_file as load_safetensors_file
from torch import nn
from transformers import AutoConfig, AutoModel

from dschat.utils import startup
from dschat.utils.errors import UserError
from dschat.utils.model.reward_model import RewardModel
from dschat.utils.module.lora import gathered

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout")
REWARD_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
REWARD_INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
MAX_NAMED_KEYS = 5


def configure_dropout(config: Any, dropout: float | None) -> Any:
    """Set every dropout attribute the config has (upstream's list) when `dropout` is given."""
    if dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, dropout)
    return config


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and (ds_config.get("zero_optimization") or {}).get("stage") == 3


@contextlib.contextmanager
def hf_deepspeed_scope(ds_config: dict | None) -> Iterator[None]:
    """Make transformers build ZeRO-3 partitioned models (zero.Init) exactly while this block runs.

    transformers only holds a weak reference to the HfDeepSpeedConfig, so the object is kept alive
    here for the whole build (and the resize). Outside ZeRO-3 the global is cleared for the block so a
    stale stage-3 config from an earlier build cannot partition, e.g., a stage-0 reference model.
    The previous global is restored afterwards.
    """
    # transformers.integrations.deepspeed imports deepspeed (seconds): only when a model is built
    from transformers.integrations import deepspeed as hf_ds

    previous = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    keep_alive = None
    if is_zero3(ds_config):
        keep_alive = hf_ds.HfDeepSpeedConfig(ds_config)  # registers the weak global reference
    else:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        del keep_alive
        hf_ds._hf_deepspeed_config_weak_ref = previous


def _param_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def check_tokenizer_matches(config: Any, tokenizer: Any, model_name_or_path: str) -> None:
    """Refuse a tokenizer whose base vocabulary is larger than the model's embedding table.

    Tokens the user adds on purpose (`--add_eot_token`) are added on top and handled by resizing; a larger
    *base* vocabulary means the tokenizer belongs to another model and would train on garbage ids.
    """
    model_vocab = getattr(config, "vocab_size", None)
    base_vocab = getattr(tokenizer, "vocab_size", None)
    if model_vocab and base_vocab and base_vocab > model_vocab:
        raise UserError(
            f"{model_name_or_path}: the tokenizer has {base_vocab} tokens but the model's vocabulary has "
            f"{model_vocab}; use the tokenizer saved with this model"
        )


@startup.timed("model_load")
def check_trainable_config(config: Any, model_name_or_path: str) -> None:
    """A folder whose config.json still carries a GGUF quantisation entry (a hand conversion that saved the
    loaded model's config) loads and trains, then refuses `save_pretrained` after the whole run: say so at once."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        raise UserError(f"{model_name_or_path}/config.json: has a GGUF quantization_config, so the trained model could "
                        "not be saved; convert the GGUF file to a plain folder (`mpo assets --model smollm2`, or load it "
                        "and save a model built from its config without that entry)")


def create_hf_model(
    model_class: Any,
    model_name_or_path: str,
    tokenizer: Any,
    ds_config: dict | None = None,
    rlhf_training: bool = False,
    dropout: float | None = None,
) -> nn.Module:
    """`model_class` (AutoModelForCausalLM, AutoModel, ...) from a directory or hub id, in fp32.

    `rlhf_training=True` builds from the config only (weights are loaded later). Sets
    `config.end_token_id`/`pad_token_id` from the tokenizer and rounds the embedding rows up to a
    multiple of 8 of `len(tokenizer)` (resized only when that differs from the current size).
    """
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_name_or_path}: cannot load a model config ({_one_line(err)})") from err
    check_trainable_config(config, model_name_or_path)
    configure_dropout(config, dropout)
    check_tokenizer_matches(config, tokenizer, model_name_or_path)
    with hf_deepspeed_scope(ds_config):
        if rlhf_training:
            model = model_class.from_config(config, dtype=torch.float32)
        else:
            try:
                model = model_class.from_pretrained(model_name_or_path, config=config, dtype=torch.float32)
            except OSError as err:
                raise UserError(f"{model_name_or_path}: cannot load model weights ({_one_line(err)})") from err
        model.config.end_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        # Only grow: an upstream Llama checkpoint trained with an extra [PAD] row (32008) keeps its rows.
        target_rows = 8 * math.ceil(len(tokenizer) / 8)
        if _param_shape(model.get_input_embeddings().weight)[0] < target_rows:
            model.resize_token_embeddings(target_rows)
    return model


# ---------------------------------------------------------------------------------------------
# Reward / critic checkpoints


def resolve_model_dir(model_name_or_path: str) -> str:
    """A local directory as is; anything else is fetched with `huggingface_hub.snapshot_download`."""
    if os.path.isdir(model_name_or_path):
        return model_name_or_path
    try:
        return snapshot_download(model_name_or_path)
    except Exception as err:  # offline, unknown repo, invalid id: all are the user's input
        raise UserError(
            f"{model_name_or_path}: not a local directory, and fetching it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {_one_line(err)}); pass a step-2 reward model output directory"
        ) from err


def find_reward_weights(model_dir: str) -> list[str]:
    """The weight file(s) of a checkpoint dir: `pytorch_model.bin`, else `model.safetensors`, else
    the shards named by an index file."""
    for name in REWARD_WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return [path]
    for name in REWARD_INDEX_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(model_dir, shard) for shard in shards]
    raise UserError(
        f"{model_dir}: no pytorch_model.bin or model.safetensors; pass a step-2 reward model output directory"
    )


def load_weight_files(paths: list[str]) -> dict[str, torch.Tensor]:
    """Read `.bin` (torch.load, weights only, on CPU) or `.safetensors` files into one state dict."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            if path.endswith(".safetensors"):
                part = load_safetensors_file(path, device="cpu")
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"{path}: cannot read the weights ({type(err).__name__}: {_one_line(err)})") from err
        if not isinstance(part, dict):
            raise UserError(f"{path}: expected a state dict (name -> tensor), found {type(part).__name__}")
        state.update(part)
    if state and all(key.startswith("module.") for key in state):  # a DeepSpeed engine's state dict
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f" (and {len(keys) - MAX_NAMED_KEYS} more)" if len(keys) > MAX_NAMED_KEYS else "")


def _expected_entries(model: nn.Module) -> tuple[dict[str, torch.Size], set[str]]:
    """(required name -> full shape, optional names). Parameters are required; tied-parameter
    aliases and persistent buffers are optional, because upstream's ZeRO-3 saver omits them."""
    required = {name: _param_shape(p) for name, p in model.named_parameters()}
    optional: set[str] = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in required:
            optional.add(name)
    for module_name, module in model.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf_name not in module._non_persistent_buffers_set:
                optional.add(f"{module_name}.{buf_name}" if module_name else buf_name)
    return required, optional


def check_reward_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise UserError naming offending keys unless `state` fits `model` exactly (shape-wise)."""
    required, optional = _expected_entries(model)
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in required and k not in optional]
    mismatched = [
        f"{k} (file {list(state[k].shape)} vs model {list(shape)})"
        for k, shape in required.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    if "v_head.weight" not in state:
        detail = f"; its keys look like: {_some(unexpected or list(state))}" if state else "; it is empty"
        raise UserError(
            f"{source}: no value head (v_head.weight) — is this a step-2 reward model output?{detail}"
        )
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_some(mismatched)}")
    if problems:
        raise UserError(
            f"{source}: does not match the reward model built from its config.json and the tokenizer "
            f"({'; '.join(problems)}); was it trained with the same base model and tokenizer?"
        )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def load_state_dict_zero3_aware(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`. For ZeRO-3 partitioned parameters every rank gathers each module's
    own params, rank 0 writes them and DeepSpeed re-partitions on exit (collective: call on all
    ranks)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.load_state_dict(state, strict=False)
        return
    rank = _rank()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and dot + name in state:
                    buf.copy_(state[dot + name])
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            with gathered([p for _, p in own], modifier_rank=0):
                if rank == 0:
                    for name, param in own:
                        if dot + name in state:
                            param.data.copy_(state[dot + name])


def match_zero3_dtype(model: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
    """Cast parameters created outside `zero.Init` (e.g. a reward model's `v_head`) to the ZeRO-3 dtype.

    `zero.Init` materialises the base model directly in bf16/fp16; a head added afterwards stays fp32,
    and DeepSpeed's ZeRO-3 then fails on mixed dtypes in one partition buffer. No-op otherwise.
    """
    if (ds_config.get("zero_optimization") or {}).get("stage") != 3:
        return model
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else \
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32
    with torch.no_grad():
        for param in model.parameters():
            if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


@startup.timed("model_load")
def create_critic_model(
    model_name_or_path: str,
    tokenizer: Any,
    ds_config: dict | None,
    num_padding_at_beginning: int = 0,
    rlhf_training: bool = False,
    dropout: float | None = None,
    zero_stage: int = 0,
    compute_fp32_loss: bool = False,
    loss_type: str = "end",
    positions_from_mask: bool = True,
) -> RewardModel:
    """RewardModel for step 2 (base weights from a causal LM / base model) or, with
    `rlhf_training=True`, for step 3 (all weights from a step-2 output: ours or upstream's).

    `zero_stage` is accepted for upstream signature compatibility; partitioning is detected from the
    parameters themselves. `positions_from_mask`: see `RewardModel`.
    """
    del zero_stage
    if not rlhf_training:
        base = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config, False, dropout)
        model = RewardModel(base, tokenizer, num_padding_at_beginning, compute_fp32_loss, loss_type,
                            positions_from_mask)
        return match_zero3_dtype(model, ds_config or {})
    model_dir = resolve_model_dir(model_name_or_path)
    files = find_reward_weights(model_dir)
    state = load_weight_files(files)  # read and checked on every rank, so all ranks fail alike
    base = create_hf_model(AutoModel, model_dir, tokenizer, ds_config, True, dropout)
    model = RewardModel(base, tokenizer, num_padding_at_beginning, compute_fp32_loss, loss_type, positions_from_mask)
    source = files[0] if len(files) == 1 else os.path.join(model_dir, "<shards>")
    check_reward_state_dict(model, state, source)
    load_state_dict_zero3_aware(model, state)
    return match_zero3_dtype(model, ds_config or {})


def reward_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Upstream-layout state dict (`rwtransformer.*`, `v_head.weight`) without LoRA keys, on CPU.

    Fuse LoRA first (`convert_lora_to_linear_layer`), or its update is lost. Accepts a DeepSpeed
    engine. ZeRO-3 partitioned parameters are gathered, so then every rank must call this.
    """
    module = getattr(model, "module", model)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in module.named_parameters(remove_duplicate=False):
            if "lora" in name:
                continue
            with gathered([param]):
                out[name] = param.detach().to("cpu", copy=True)
        for module_name, sub in module.named_modules():
            for buf_name, buf in sub.named_buffers(recurse=False):
                key = f"{module_name}.{buf_name}" if module_name else buf_name
                if buf is not None and buf_name not in sub._non_persistent_buffers_set and "lora" not in key:
                    out[key] = buf.detach().to("cpu", copy=True)
    return out


# ---------------------------------------------------------------------------------------------
# fp32 LM loss


def causal_lm_model_to_fp32_loss(model: nn.Module) -> nn.Module:
    """Make `model(..., labels=...)` compute the shifted cross-entropy on fp32 logits.

    With fp16/bf16 training the stock loss runs in half precision; this wraps the instance's
    `forward` (so a DeepSpeed engine calling the module picks it up) and leaves logits untouched.
    Labels use -100 for ignored positions; `num_items_in_batch` (transformers' gradient-accumulation
    normaliser) is honoured when passed.
    """
    if getattr(model, "_dschat_fp32_loss", False):
        return model
    original_forward = model.forward

    @functools.wraps(original_forward)
    def forward(*args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        num_items = kwargs.pop("num_items_in_batch", None)
        outputs = original_forward(*args, **kwargs)
        if labels is None:
            return outputs
        logits = outputs[0] if isinstance(outputs, tuple) else outputs.logits
        shift_logits = logits[..., :-1, :].float()
        shift_labels = labels[..., 1:].to(shift_logits.device)
        loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum" if num_items is not None else "mean",
        )
        if num_items is not None:
            loss = loss / num_items
        if isinstance(outputs, tuple):
            return (loss, *outputs)
        return type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k != "loss"})

    model.forward = forward
    model._dschat_fp32_loss = True
    return model
