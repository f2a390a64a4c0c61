"""Pure PPO math for step 3 (no models, no engines, no collectives), each piece unit-tested by hand.

Index convention (as upstream): tensors on the "shifted" axis have T-1 slots for a sequence of T tokens;
slot t holds quantities about predicting token t+1. With prompts left-padded to width P, the first slot
whose target is an answer token is `start = P - 1`.
"""

from __future__ import annotations

import math

import torch

from dschat.utils.losses import gather_log_probs, masked_mean

__all__ = [
    "gather_log_probs", "masked_mean", "token_log_probs", "answer_end_slots", "zero_after", "compute_kl_penalized_rewards", "compute_gae",
    "actor_loss", "critic_loss", "whiten", "entropy_from_logits", "FixedKLController", "AdaptiveKLController",
    "RunningMeanStd",
]


def token_log_probs(logits: torch.Tensor, sequences: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """Per-token log-probability of each next token: logits [B, T, V] x sequences [B, T] -> [B, T-1]
    (shifted axis; per token, not summed over an answer as DPO's `sequence_log_prob_sums` are).

    `fp32=True` (`--compute_fp32_loss`) upcasts the logits before the log-softmax: in bf16 the
    logsumexp over a 32K vocabulary rounds by up to ~0.1 nats per token, which goes straight into the
    PPO ratios and the per-token KL. The result is fp32 then, else the logits' dtype.
    """
    shifted = logits[:, :-1, :]
    return gather_log_probs(shifted.float() if fp32 else shifted, sequences[:, 1:])


def answer_end_slots(action_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Slot that receives the reward-model score, per row ([B] long).

    n = number of unmasked answer slots (the answer's tokens through its eos); the score goes to slot
    `start + n`, upstream's index: the slot at the answer's last token (its eos), whose own target is
    padding; clipped to the last slot when the answer filled the budget.
    """
    n = action_mask[:, start:].sum(dim=1).long()
    return torch.clamp(start + n, max=action_mask.shape[1] - 1)


def zero_after(x: torch.Tensor, end_slots: torch.Tensor) -> torch.Tensor:
    """Copy of `x` [B, T-1] with every slot after each row's end slot set to 0."""
    slots = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    return x.masked_fill(slots > end_slots.unsqueeze(1), 0.0)


def compute_kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, reward_score: torch.Tensor,
                                 action_mask: torch.Tensor, start: int, kl_coef: float,
                                 clip_reward_value: float) -> torch.Tensor:
    """Per-slot rewards [B, T-1]: `-kl_coef * (logp - ref_logp)` everywhere, plus the clipped RM score
    at the end slot (`answer_end_slots`); slots after the end slot are 0 (upstream zeroes them before
    GAE, so nothing after the answer leaks into the advantages).
    """
    rewards = -kl_coef * (logprobs - ref_logprobs)
    end = answer_end_slots(action_mask, start)
    score = reward_score.to(rewards.dtype).clamp(-clip_reward_value, clip_reward_value)
    rewards = rewards.scatter_add(1, end.unsqueeze(1), score.unsqueeze(1))
    return zero_after(rewards, end)


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, start: int, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over slots `start .. T-2` -> (advantages, returns), both
    [B, T-1-start] and detached.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last slot = 0); A_t = delta_t + gamma*lam*A_{t+1};
    returns = A + V. Callers zero values/rewards after each answer's end slot first.
    """
    length = rewards.shape[1]
    next_adv = torch.zeros_like(rewards[:, 0])
    advantages = []
    for t in reversed(range(start, length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages.append(next_adv)
    adv = torch.stack(advantages[::-1], dim=1)
    returns = adv + values[:, start:]
    return adv.detach(), returns.detach()


def actor_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO policy loss -> (loss, clipfrac, approx_kl), all scalars.

    loss = sum(max(-A*ratio, -A*clip(ratio, 1-c, 1+c)) * m) / sum(m), ratio = exp((logp - old) * m).
    clipfrac: share of unmasked slots where the clipped term was the larger (active) one.
    approx_kl: 0.5 * masked mean of (logp - old)^2 (a cheap estimate of KL(old || new)).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.sum(torch.max(unclipped, clipped) * mask) / mask.sum().clamp(min=1e-8)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac, approx_kl


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> (loss, clipfrac).

    loss = 0.5 * sum(max((V - R)^2, (clip(V, V_old +- c) - R)^2) * m) / sum(m); clipfrac: share of
    unmasked slots where the clipped error was the larger one.
    """
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * torch.sum(torch.max(loss_unclipped, loss_clipped) * mask) / mask.sum().clamp(min=1e-8)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clipfrac


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance over the unmasked entries (mean 0 too unless shift_mean=False).

    Uses the unbiased (Bessel-corrected) variance; masked entries come out as 0.
    """
    mask = mask.to(x.dtype)
    count = mask.sum()
    mean = (x * mask).sum() / count.clamp(min=1.0)
    var = (((x - mean) * mask) ** 2).sum() / (count - 1.0).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position: [..., V] -> [...].

    H = logsumexp(z) - sum(softmax(z) * z), which avoids taking log of probabilities that underflow.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# --------------------------------------------------------------------------------------------- KL control


class FixedKLController:
    """Constant KL coefficient (upstream: 0.1)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:  # noqa: ARG002 - same API as adaptive
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steer the measured KL towards `target`.

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------- reward scaling


class RunningMeanStd:
    """Running mean/variance of reward scores (Chan et al. parallel update), for --normalize_reward.

    Callers feed batch moments already reduced over ranks, so every rank holds the same statistics.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0
        self.eps = eps

    def update_from_moments(self, batch_mean: float, batch_var: float, batch_count: float) -> None:
        if batch_count <= 0:
            return
        if self.count == 0:
            self.mean, self.var, self.count = float(batch_mean), float(batch_var), float(batch_count)
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta * delta * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
