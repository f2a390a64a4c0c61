"""Throughput lines for scripts written against DeepSpeed-Chat (its `dschat.utils.perf` import path).

DeepSpeed-Chat's step-1/2 and step-3 mains print, after every step, how long it took and an estimate of
the training TFLOPs; they import `print_throughput` and `print_throughput_step3` from here, so those mains
keep running on this package. The project's own stages log speed in metrics.jsonl instead
(`samples_per_second`, `tokens_per_second`) and never call this module.

The FLOPs estimate is the one of Narayanan et al. (2021, "Efficient Large-Scale Language Model Training on
GPU Clusters", eq. 3): a forward pass of a decoder with l layers, width h and vocabulary V over B sequences
of s tokens costs about 24*B*s*l*h^2 * (1 + s/(6h) + V/(16*l*h)) floating-point operations; training
multiplies it by 3 (forward and backward) or 4 (activation checkpointing repeats the forward). With LoRA
of rank r the backward pass touches only the adapters, so the multiplier drops by about 1 - 2r/h.
"""

from __future__ import annotations

from typing import Any

import torch

from dschat.utils.dist import get_world_size


def get_hf_configs(hf_config: Any) -> tuple[int, int, int]:
    """(layers, hidden width, vocabulary size) of a Hugging Face config, whatever its attribute names."""
    layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", None)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    vocab = getattr(hf_config, "vocab_size", None)
    if not (layers and hidden and vocab):
        raise ValueError(f"{type(hf_config).__name__}: cannot tell the number of layers, the hidden size and the "
                         "vocabulary size of this model")
    return int(layers), int(hidden), int(vocab)


def calculate_flops(checkpoint_activations_factor: float, batch_size: int, seq_length: int, hf_config: Any) -> float:
    """Estimated floating-point operations of one pass over `batch_size` x `seq_length` tokens, times
    `checkpoint_activations_factor` (1: forward only, 3: training, 4: training with checkpointing)."""
    layers, hidden, vocab = get_hf_configs(hf_config)
    forward = 24.0 * batch_size * seq_length * layers * hidden ** 2
    return checkpoint_activations_factor * forward * (1.0 + seq_length / (6.0 * hidden) + vocab / (16.0 * layers * hidden))


def _module(model: Any) -> Any:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def _config(model: Any) -> Any:
    """The Hugging Face config (a DeepSpeed engine's own `config` is its DeepSpeed dict: look inside it)."""
    return _module(model).config


def _num_params(model: Any) -> int:
    """Parameters of the full model, also when ZeRO-3 holds only a partition of each on this rank."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in _module(model).parameters())


def _billions(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count else "NA"


def _training_factor(checkpointing: bool, lora_dim: int, hidden: int) -> float:
    factor = 4.0 if checkpointing else 3.0
    return factor - (1.0 - 2.0 * lora_dim / hidden) if lora_dim > 0 else factor


def _tflops(flops: float, seconds: float, devices: int) -> float:
    return flops / max(seconds, 1e-12) / devices / 1e12


def print_throughput(hf_model: Any, upstream_flags: Any, e2e_time: float, rank: int = 0) -> None:
    """Step 1/2: one line with the model size, the step's latency, TFLOPs per device and samples per second.
    `upstream_flags` (the caller's argparse Namespace, upstream's or ours; flags only some of upstream's parsers
    define are read with a default) needs `max_seq_len`, `per_device_train_batch_size` (and reads `gradient_checkpointing`, `lora_dim`
    when present). Only rank <= 0 prints."""
    if rank > 0:
        return
    config = _config(hf_model)
    _, hidden, _ = get_hf_configs(config)
    batch = int(upstream_flags.per_device_train_batch_size)
    seq = int(upstream_flags.max_seq_len)
    factor = _training_factor(getattr(upstream_flags, "gradient_checkpointing", False), getattr(upstream_flags, "lora_dim", 0), hidden)
    tflops = _tflops(calculate_flops(factor, batch, seq, config), e2e_time, get_world_size())
    print(f"Model Parameters: {_billions(_num_params(hf_model))}, Latency: {e2e_time:.2f}s, TFLOPs: {tflops:.2f}, "
          f"Samples/sec: {batch / max(e2e_time, 1e-12):.2f}, Time/seq {e2e_time / batch:.2f}s, Batch Size: {batch}, "
          f"Sequence Length: {seq}", flush=True)


def print_throughput_step3(actor_model: Any, critic_model: Any, upstream_flags: Any, e2e_time: float, gen_exp_time: float,
                           train_time: float, rank: int = 0) -> None:
    """Step 3: end-to-end, generation and training lines (latency, TFLOPs per device, generation bandwidth)
    and both models' sizes. `actor_model` and `critic_model` may be models or DeepSpeed engines; `upstream_flags` (the caller's Namespace) holds
    step 3's batch and length flags. Only rank <= 0 prints."""
    if rank > 0:
        return
    devices = get_world_size()
    actor_config, critic_config = _config(actor_model), _config(critic_model)
    _, actor_hidden, _ = get_hf_configs(actor_config)
    _, critic_hidden, _ = get_hf_configs(critic_config)
    seq = int(upstream_flags.max_prompt_seq_len) + int(upstream_flags.max_answer_seq_len)
    mixes_unsupervised = bool(getattr(upstream_flags, "unsupervised_dataset_name", None))
    batch = (int(upstream_flags.per_device_generation_batch_size) * int(upstream_flags.generation_batches) * int(upstream_flags.ppo_epochs)
             * devices * (2 if mixes_unsupervised else 1))
    actor_params, critic_params = _num_params(actor_model), _num_params(critic_model)

    train_flops = (
        calculate_flops(_training_factor(getattr(upstream_flags, "actor_gradient_checkpointing", False),
                                         getattr(upstream_flags, "actor_lora_dim", 0), actor_hidden), batch, seq, actor_config)
        + calculate_flops(_training_factor(getattr(upstream_flags, "critic_gradient_checkpointing", False),
                                           getattr(upstream_flags, "critic_lora_dim", 0), critic_hidden), batch, seq, critic_config))
    generation_batch = int(upstream_flags.per_device_generation_batch_size) * devices
    generation_flops = calculate_flops(1.0, generation_batch, seq, actor_config)
    per_token = gen_exp_time / max(int(upstream_flags.max_answer_seq_len), 1)
    bytes_per_param = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}.get(
        getattr(actor_config, "torch_dtype", None) or getattr(actor_config, "dtype", None), 0)
    bandwidth = actor_params * bytes_per_param / max(per_token, 1e-12) / 1e9 if bytes_per_param else float("nan")
    total_flops = train_flops + generation_flops * int(upstream_flags.generation_batches)

    print(f"End-to-End => Latency: {e2e_time:.2f}s, TFLOPs: {_tflops(total_flops, e2e_time, devices):.2f}, "
          f"Samples/sec: {batch / max(e2e_time, 1e-12):.2f}, Time/seq {e2e_time / batch:.2f}s, Batch Size: {batch}, "
          f"Total Seq. Length: {seq}", flush=True)
    print(f"Generation => Latency: {gen_exp_time:.2f}s, Per-token Latency {per_token * 1000:.2f} ms, "
          f"TFLOPs: {_tflops(generation_flops, gen_exp_time, devices):.2f}, BW: {bandwidth:.2f} GB/sec, "
          f"Answer Seq. Length: {upstream_flags.max_answer_seq_len}", flush=True)
    print(f"Training   => Latency: {train_time:.2f}s, TFLOPs: {_tflops(train_flops, train_time, devices):.2f}", flush=True)
    print(f"Actor Model Parameters => {_billions(actor_params)}, Critic Model Parameters => {_billions(critic_params)}",
          flush=True)
