"""Exponential moving averages: of a model's weights (`moving_average`, ZeRO-3 aware) and of a logged
scalar (`ExponentialMovingAverage`), with upstream's names. DeepSpeed is imported where used."""

from __future__ import annotations

import contextlib

import torch

from dschat.utils.zero import is_partitioned


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
            if is_partitioned(param_ema):
                if not is_partitioned(param):
                    raise RuntimeError("a ZeRO-3 EMA model needs a ZeRO-3 actor (same partitioning)")
                src, dst = param.ds_tensor, param_ema.ds_tensor
                dst.copy_(torch.lerp(src.to(device=dst.device, dtype=dst.dtype), dst, beta))
                continue
            ctx = deepspeed.zero.GatheredParameters([param]) if is_partitioned(param) else contextlib.nullcontext()
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
