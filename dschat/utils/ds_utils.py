"""DeepSpeed JSON configs for training and frozen (eval) engines, with upstream's signatures."""

from __future__ import annotations

import json

from dschat.utils.errors import UserError

GLOBAL_BATCH_SIZE = 32
MICRO_BATCH_SIZE = 4

DTYPES = ("fp32", "fp16", "bf16")


def on_cpu() -> bool:
    """Whether the engines run on the CPU accelerator (asked where needed: the flag groups import this module,
    and parsing flags must not import torch)."""
    from dschat.utils.dist import on_cpu as accelerator_is_cpu

    return accelerator_is_cpu()


def resolve_dtype(dtype: str | None) -> str:
    """Pick the training dtype: upstream's fp16 on GPU when unset, fp32 on CPU (fp16 does not exist there).

    An explicit fp16 request on CPU is refused here, with the fix, instead of deep inside DeepSpeed.
    """
    if dtype is None:
        return "fp32" if on_cpu() else "fp16"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: unknown; choose one of {', '.join(DTYPES)}")
    if dtype == "fp16" and on_cpu():
        raise UserError("--dtype fp16: DeepSpeed has no fp16 training on CPU; use --dtype bf16 or --dtype fp32")
    return dtype


def _precision_sections(dtype: str) -> dict:
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def _offload_device(offload: bool) -> str:
    # On the CPU accelerator everything already lives in host memory: offloading is a no-op there.
    return "cpu" if offload and not on_cpu() else "none"


def get_train_ds_config(
    offload: bool,
    dtype: str = "fp32",
    stage: int = 2,
    enable_hybrid_engine: bool = False,
    inference_tp_size: int = 1,
    release_inference_cache: bool = False,
    pin_parameters: bool = True,
    tp_gather_partition_size: int = 8,
    max_out_tokens: int = 512,
    enable_tensorboard: bool = False,
    enable_mixed_precision_lora: bool = False,
    tb_path: str = "",
    tb_name: str = "",
) -> dict:
    """Config for a trained engine; callers overwrite the batch sizes as upstream's callers do."""
    device = _offload_device(offload)
    zero = {
        "stage": stage,
        "overlap_comm": True,
        "offload_param": {"device": device},
        "offload_optimizer": {"device": device},
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": False,
    }
    if enable_mixed_precision_lora:
        zero["zero_quantized_nontrainable_weights"] = True
    config = {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": zero,
        **_precision_sections(dtype),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": enable_hybrid_engine,
            "max_out_tokens": max_out_tokens,
            "inference_tp_size": inference_tp_size,
            "release_inference_cache": release_inference_cache,
            "pin_parameters": pin_parameters,
            "tp_gather_partition_size": tp_gather_partition_size,
        },
    }
    if enable_tensorboard:
        config["tensorboard"] = {
            "enabled": True,
            "output_path": f"{tb_path}/ds_tensorboard_logs/",
            "job_name": f"{tb_name}_tensorboard",
        }
    return config


def get_eval_ds_config(offload: bool, dtype: str = "fp32", stage: int = 0) -> dict:
    """Config for a frozen engine (reference, reward, EMA): no optimizer, optional parameter offload."""
    return {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": _offload_device(offload)},
            "memory_efficient_linear": False,
        },
        **_precision_sections(dtype),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def set_batch_sizes(config: dict, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> dict:
    """Fill the batch fields DeepSpeed checks: global = micro x world x accumulation."""
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * world_size * gradient_accumulation_steps
    return config


# --------------------------------------------------------------------------------------------- --deepspeed_config

# Keys of the built config that come from flags (batch sizes, ZeRO stage, offload, precision, hybrid engine).
# A user's --deepspeed_config may repeat them only with the same value (or "auto"): the flags decide, so the
# rest of the run (data loaders, model building, saved settings) agrees with the engine.
FLAG_CONTROLLED_KEYS = {
    "train_batch_size": "the batch-size flags (per-device batch x ranks x --gradient_accumulation_steps)",
    "train_micro_batch_size_per_gpu": "the per-device train batch-size flag",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "zero_optimization.stage": "the ZeRO-stage flag (--zero_stage, --actor_zero_stage or --critic_zero_stage)",
    "zero_optimization.offload_param.device": "--offload",
    "zero_optimization.offload_optimizer.device": "--offload",
    "fp16.enabled": "--dtype",
    "bf16.enabled": "--dtype",
    "torch_autocast.enabled": "--dtype (this project does not train under torch autocast)",
    "amp.enabled": "--dtype (apex AMP is not used)",
    "hybrid_engine.enabled": "--enable_hybrid_engine",
}
# Sections holding flag-controlled keys: the file must give each as a JSON object (or "auto"), as DeepSpeed
# expects; `"fp16": true` or `"zero_optimization": 2` would otherwise replace our section and fail inside it.
SECTIONS = ("zero_optimization", "zero_optimization.offload_param", "zero_optimization.offload_optimizer", "fp16",
            "bf16", "torch_autocast", "amp", "hybrid_engine")
# DeepSpeed reads "bfloat16" when "bf16" is absent (its old name).
SECTION_ALIASES = {"bfloat16": "bf16"}


def load_user_ds_config(path: str) -> dict:
    """The JSON object of a --deepspeed_config file, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except OSError as err:
        raise UserError(f"--deepspeed_config {path}: cannot read it ({err.strerror or err}); check the path") from err
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"--deepspeed_config {path}: not valid JSON ({err}); fix the file") from err
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed_config {path}: expected a JSON object with DeepSpeed's config keys")
    check_user_ds_config(config, path)  # a malformed section: one line at parse time, before any model loads
    return config


def _leaf(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _precision(config: dict) -> str:
    """The precision DeepSpeed will train in under `config` (its own reading order, aliases included)."""
    if _leaf(config, "fp16.enabled") is True:
        return "fp16"
    bf16 = config.get("bf16", config.get("bfloat16"))
    if isinstance(bf16, dict) and bf16.get("enabled") is True:
        return "bf16"
    if _leaf(config, "torch_autocast.enabled") is True or _leaf(config, "amp.enabled") is True:
        return "autocast"
    return "fp32"


def check_user_ds_config(user: dict, source: str) -> dict:
    """The user's config with DeepSpeed's old section names under their current ones, or one line when a
    section the flags control is not a JSON object."""
    user = dict(user)
    for old, new in SECTION_ALIASES.items():
        if old in user:
            if new in user and user[new] != user[old]:
                raise UserError(f"--deepspeed_config {source}: has both {new!r} and its old name {old!r} with "
                                f"different values; keep only {new!r}")
            user[new] = user.pop(old)
    for dotted in SECTIONS:
        value = _leaf(user, dotted)
        if value is not None and value != "auto" and not isinstance(value, dict):
            raise UserError(f"--deepspeed_config {source}: {dotted} must be a JSON object (e.g. {{\"enabled\": "
                            f"false}} or {{\"stage\": 2}}), not {json.dumps(value)}; fix the file")
    return user


def merge_ds_config(built: dict, user: dict, source: str) -> dict:
    """`user` merged over `built`: the file's keys replace our built-in defaults and add sections of its own
    (e.g. gradient_clipping, bucket sizes, the flops profiler); keys the flags control must agree with them
    (one line naming the key and the flag otherwise). "auto" values defer to the flags. The merged config
    must train in the precision the flags chose, whatever the file calls its sections."""
    user = check_user_ds_config(user, source)
    for dotted, flag in FLAG_CONTROLLED_KEYS.items():
        wanted = _leaf(user, dotted)
        if wanted is None or wanted == "auto":
            continue
        have = _leaf(built, dotted, False if dotted.endswith(".enabled") else None)
        if wanted != have:
            raise UserError(f"--deepspeed_config {source}: {dotted} = {wanted!r} conflicts with {flag}, which gives "
                            f"{have!r}; set it through the flag or drop the key from the file")

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            if value == "auto":
                continue
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged = merge(built, user)
    if _precision(merged) != _precision(built):
        raise UserError(f"--deepspeed_config {source}: makes DeepSpeed train in {_precision(merged)} while --dtype "
                        f"gives {_precision(built)}; set the precision with --dtype only")
    return merged
