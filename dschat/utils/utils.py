"""Small shared helpers with DeepSpeed-Chat's names: printing, seeding, atomic file writes, tokenizer loading,
optimizer groups, EMA, and saving models in Hugging Face layout (ZeRO-3 aware).

Owns the one atomic writer (`atomic_write` and its text/json/jsonl forms) and the model savers every stage
uses. Imports torch, numpy and `dschat.utils.dist` / `errors` / `output_dir` only: never a step, a
trainer, the data pipeline or `mpo_ext`, so any module can import it. DeepSpeed and transformers are
imported where used: the light commands (`mpo`, the pipeline driver) import this module for its writers
and never need either. Upstream-only names no project code calls (`save_hf_format`,
`save_zero_three_model`) live in `dschat.utils.compat` and are still importable from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from dschat.utils.dist import barrier, get_accelerator, get_rank, is_rank_0, on_cpu
from dschat.utils.errors import UserError
from dschat.utils.output_dir import default_file_mode, staged_output

# --------------------------------------------------------------------------------------------- printing


def print_rank_0(msg: Any, rank: int | None = None) -> None:
    """Print once per job (upstream signature: the optional rank is the caller's global rank)."""
    if (rank if rank is not None else get_rank()) <= 0:
        print(msg, flush=True)


def to_device(batch: dict, device) -> dict:
    """Move every tensor of a batch dict to `device` (non-tensors are passed through)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- seeding


def set_random_seed(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def get_rng_state() -> dict:
    """Every generator's state as tensors and plain numbers only, so a saved state loads with
    `torch.load(weights_only=True)` (no pickled objects, no code run on load)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (in place, like upstream); identity in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor = tensor / dist.get_world_size()
    return tensor


# --------------------------------------------------------------------------------------------- atomic I/O


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """The one atomic writer: `write(fh)` fills a temp file created exclusively (mkstemp: a fresh, unguessable
    name, never opened through a symlink) next to `path`, which then replaces `path` in one rename, so readers
    see the old or the complete new content. Mode: `mode`, else what `open()` gives (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------- tokenizer


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


def load_hf_tokenizer(model_name_or_path: str, fast_tokenizer: bool = True, add_special_tokens=None):
    """Load the tokenizer saved beside a checkpoint, falling back to the model it came from.

    Upstream ignored the checkpoint's own tokenizer files and followed `_name_or_path`, which fails
    offline; here the checkpoint directory is tried first. Pad = eos when there is no pad token (never a
    new untrained `[PAD]`), right padding for training.
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
            if is_upstream_llama_tokenizer_dir(name):
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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if add_special_tokens:
        extra = [add_special_tokens] if isinstance(add_special_tokens, str) else list(add_special_tokens)
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


# --------------------------------------------------------------------------------------------- optimizer


_NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def get_optimizer_grouped_parameters(
    model: torch.nn.Module,
    weight_decay: float,
    lora_lr: float = 5e-4,
    no_decay_name_list: Iterable[str] = _NO_DECAY,
    lora_name_list: Iterable[str] = ("lora_right_weight", "lora_left_weight"),
) -> list[dict]:
    """Upstream's three parameter groups: decayed, LoRA (own LR), and no-decay; empty groups dropped."""
    no_decay, lora = tuple(no_decay_name_list), tuple(lora_name_list)
    decayed, lora_params, undecayed = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(n in name for n in no_decay):
            undecayed.append(param)
        elif any(n in name for n in lora):
            lora_params.append(param)
        else:
            decayed.append(param)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": lora_params, "weight_decay": weight_decay, "lr": lora_lr},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(param_groups: list[dict], lr: float, offload: bool = False, betas=(0.9, 0.95)):
    """FusedAdam on GPU, DeepSpeedCPUAdam with ZeRO offload, torch AdamW on the CPU accelerator."""
    if on_cpu():
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: see the module docstring

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas)
    from deepspeed.ops.adam import FusedAdam  # lazy: see the module docstring

    return FusedAdam(param_groups, lr=lr, betas=betas)


# --------------------------------------------------------------------------------------------- EMA


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def moving_average(model: torch.nn.Module, model_ema: torch.nn.Module, beta: float = 0.992, device=None,
                   zero_stage: int = 0) -> None:
    """ema <- beta * ema + (1 - beta) * model, also under ZeRO-3.

    Upstream gathered ZeRO-3 parameters without a modifier rank, so the update was discarded and the
    saved EMA equalled the starting weights. When both models are partitioned alike each rank updates
    its own partition (no gathering at all); otherwise the actor's parameter is gathered first.
    """
    import deepspeed  # lazy: see the module docstring

    with torch.no_grad():
        for param, param_ema in zip(model.parameters(), model_ema.parameters()):
            if _is_partitioned(param_ema):
                if not _is_partitioned(param):
                    raise RuntimeError("a ZeRO-3 EMA model needs a ZeRO-3 actor (same partitioning)")
                src, dst = param.ds_tensor, param_ema.ds_tensor
                dst.copy_(torch.lerp(src.to(device=dst.device, dtype=dst.dtype), dst, beta))
                continue
            ctx = deepspeed.zero.GatheredParameters([param]) if _is_partitioned(param) else contextlib.nullcontext()
            with ctx:
                dst = param_ema.data
                dst.copy_(torch.lerp(param.data.to(device=dst.device, dtype=dst.dtype), dst, beta))


class ExponentialMovingAverage:
    """Scalar EMA used for logging a smoothed reward (upstream's helper, alpha = weight of the past)."""

    def __init__(self, alpha: float = 0.9):
        self.alpha = alpha
        self.ema: float | None = None

    def update(self, num: float) -> float:
        self.ema = num if self.ema is None else self.alpha * self.ema + (1.0 - self.alpha) * num
        return self.ema

    def get(self) -> float:
        return self.ema if self.ema is not None else 0.0


# --------------------------------------------------------------------------------------------- saving


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 ({} elsewhere); gathers ZeRO-3 partitions one parameter at a time.

    Must be called on every rank when the model is ZeRO-3 partitioned (it is a collective then).
    LoRA tensors are dropped: callers fuse LoRA first.
    """
    import deepspeed  # lazy: see the module docstring

    model = getattr(model, "module", model)
    keep = set(model.state_dict().keys())
    rank0 = is_rank_0()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if _is_partitioned(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank0:
                    state[name] = param.data.detach().cpu().clone()
        elif rank0:
            state[name] = param.detach().cpu().clone()
    if rank0:
        for name, buf in model.named_buffers():
            if name in keep:
                state[name] = buf.detach().cpu().clone()
    return {k: v for k, v in state.items() if "lora" not in k}


def is_zero3(model: torch.nn.Module) -> bool:
    model = getattr(model, "module", model)
    return any(_is_partitioned(p) for p in model.parameters())


def save_causal_lm(model: torch.nn.Module, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None) -> None:
    """Save a causal LM in Hugging Face layout (safetensors, config, generation config, full tokenizer).

    Collective under ZeRO-3: call on every rank. Rank 0 writes through `staged_output` (staged inside
    `output_dir`, config.json moved in last).
    """
    module = getattr(model, "module", model)
    state = gather_full_state_dict(module)
    if is_rank_0():
        with staged_output(output_dir, markers=("config.json",)) as tmp:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _save_tokenizer(tokenizer, tmp, module)
            for name, content in (extra_files or {}).items():
                atomic_write_text(tmp / name, content)
    barrier()


def save_reward_model(model: torch.nn.Module, tokenizer, output_dir: str | os.PathLike, extra_files: dict | None = None) -> None:
    """Save a reward/critic model in upstream's layout: `pytorch_model.bin` with `rwtransformer.*` +
    `v_head.weight`, plus the base config and the full tokenizer, so both projects load it."""
    module = getattr(model, "module", model)
    state = gather_full_state_dict(module)
    if is_rank_0():
        with staged_output(output_dir, markers=("pytorch_model.bin", "config.json")) as tmp:
            torch.save(state, tmp / "pytorch_model.bin")
            config = module.rwtransformer.config
            config.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp, module.rwtransformer)
            for name, content in (extra_files or {}).items():
                atomic_write_text(tmp / name, content)
    barrier()


def _save_tokenizer(tokenizer, directory: Path, model: torch.nn.Module) -> None:
    """The full tokenizer, plus the slow tokenizer's files (`tokenizer.model`, `vocab.json`/`merges.txt`)
    when it was loaded from them: upstream's savers call `save_vocabulary`, which needs them."""
    tokenizer.save_pretrained(directory)
    for attribute in ("vocab_file", "merges_file"):
        source = getattr(tokenizer, attribute, None) or tokenizer.init_kwargs.get(attribute)
        if isinstance(source, str) and os.path.isfile(source) and not (directory / Path(source).name).exists():
            shutil.copyfile(source, directory / Path(source).name)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (directory / "generation_config.json").exists():
        generation_config.save_pretrained(directory)


def __getattr__(name: str):
    """Upstream-only names (`save_hf_format`, `save_zero_three_model`) live in `dschat.utils.compat`."""
    from dschat.utils import compat  # the upstream-compatibility module imports this one

    if name in compat.UPSTREAM_UTILS_NAMES:
        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
