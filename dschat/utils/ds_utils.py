"""DeepSpeed JSON configs for training and frozen (eval) engines, with upstream's signatures."""

from __future__ import annotations

from dschat.utils.errors import UserError

GLOBAL_BATCH_SIZE = 32
MICRO_BATCH_SIZE = 4

DTYPES = ("fp32", "fp16", "bf16")


def resolve_dtype(dtype: str | None) -> str:
    """Pick the training dtype: upstream's fp16 on GPU when unset, fp32 on CPU (fp16 does not exist there).

    An explicit fp16 request on CPU is refused here, with the fix, instead of deep inside DeepSpeed.
    """
    from dschat.utils.dist import on_cpu

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
    from dschat.utils.dist import on_cpu

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
