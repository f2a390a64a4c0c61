"""Hand-computed checks of the pure PPO math (dschat/rlhf/ppo_math.py)."""

from __future__ import annotations

import math

import pytest
import torch

from dschat.rlhf.generation import answer_lengths, answer_mask, first_tokens_agreement, pad_after_eos
from dschat.rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    actor_loss,
    answer_end_slots,
    compute_gae,
    compute_kl_penalized_rewards,
    critic_loss,
    entropy_from_logits,
    gather_log_probs,
    whiten,
    zero_after,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


def test_gather_log_probs():
    logits = T([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    close(gather_log_probs(logits, T([[1, 0]])), [[math.log(0.75), math.log(0.5)]])


def test_end_slots_and_kl_penalized_rewards():
    # 5 slots, prompt width 3 -> start 2; logprob - ref = 0.1 * (slot + 1); kl_coef 0.1
    diff = T([[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
    ref = torch.zeros(3, 5)
    mask = T([[0, 1, 1, 1, 0],      # two answer slots -> score at slot 4
              [1, 1, 1, 0, 0],      # one answer slot -> score at slot 3, slot 4 zeroed
              [1, 1, 1, 1, 1]])     # answer filled the budget -> score at the last slot
    close(answer_end_slots(mask, 2), [4, 3, 4])
    rewards = compute_kl_penalized_rewards(diff, ref, T([7.0, -1.0, 0.5]), mask, start=2, kl_coef=0.1,
                                           clip_reward_value=5.0)
    close(rewards, [[-0.01, -0.02, -0.03, -0.04, -0.05 + 5.0],
                    [-0.01, -0.02, -0.03, -0.04 - 1.0, 0.0],
                    [-0.01, -0.02, -0.03, -0.04, -0.05 + 0.5]])


def test_zero_after():
    close(zero_after(torch.ones(2, 4), T([1, 3])), [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_gae_gamma_one():
    values = T([[0.5, 1.0, 1.5]])
    rewards = T([[0.0, 1.0, 2.0]])
    adv, ret = compute_gae(values, rewards, start=0, gamma=1.0, lam=0.5)
    # delta = [0.5, 1.5, 0.5]; A2 = .5, A1 = 1.5 + .5*.5 = 1.75, A0 = .5 + .5*1.75 = 1.375
    close(adv, [[1.375, 1.75, 0.5]])
    close(ret, [[1.875, 2.75, 2.0]])
    adv, ret = compute_gae(values, rewards, start=1, gamma=1.0, lam=0.5)
    close(adv, [[1.75, 0.5]])
    close(ret, [[2.75, 2.0]])


def test_gae_discounted():
    adv, _ = compute_gae(T([[0.5, 1.0, 1.5]]), T([[0.0, 1.0, 2.0]]), start=0, gamma=0.9, lam=1.0)
    # delta = [0 + .9 - .5, 1 + 1.35 - 1, 2 - 1.5] = [.4, 1.35, .5]; A = [.4 + .9*1.8, 1.35 + .45, .5]
    close(adv, [[2.02, 1.8, 0.5]])


def test_actor_loss():
    old = torch.zeros(1, 4)
    new = T([[math.log(1.5), math.log(0.5), math.log(1.1), 3.0]])
    adv = T([[1.0, 1.0, -2.0, 5.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = actor_loss(new, old, adv, mask, cliprange=0.2)
    # slot 0: max(-1.5, -1.2) = -1.2 (clipped); slot 1: max(-0.5, -0.8) = -0.5; slot 2: 2.2 (equal)
    close(loss, (-1.2 - 0.5 + 2.2) / 3)
    close(clipfrac, 1 / 3)
    close(approx_kl, 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)


def test_actor_loss_gradient_flows_only_through_new_logprobs():
    new = torch.zeros(1, 2, requires_grad=True)
    loss, _, _ = actor_loss(new, torch.zeros(1, 2), T([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    close(new.grad, [[-0.5, 0.5]])


def test_critic_loss():
    values = T([[1.0, 2.0, 0.0]])
    old = T([[0.5, 2.1, 0.0]])
    returns = T([[2.0, 3.0, 1.0]])
    mask = T([[1.0, 1.0, 0.0]])
    loss, clipfrac = critic_loss(values, old, returns, mask, cliprange_value=0.2)
    # slot 0: clip -> 0.7, max(1, 1.69) = 1.69 (clipped); slot 1: (2 - 3)^2 = 1 either way
    close(loss, 0.5 * (1.69 + 1.0) / 2)
    close(clipfrac, 0.5)


def test_whiten():
    x = T([1.0, 2.0, 3.0, 100.0])
    mask = T([1, 1, 1, 0])
    close(whiten(x, mask), [-1.0, 0.0, 1.0, 0.0], tol=1e-4)
    close(whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], tol=1e-4)


def test_entropy_from_logits():
    logits = T([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]])
    close(entropy_from_logits(logits), [math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)])


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    close(adaptive.update(12.0, 256), 0.1 * (1 + 0.2 * 256 / 10000))        # error clipped at +0.2
    close(adaptive.update(3.0, 100), 0.1 * 1.00512 * (1 - 0.2 * 100 / 10000))  # error clipped at -0.2
    close(AdaptiveKLController(0.1, 6.0, 1000).update(6.6, 10), 0.1 * (1 + 0.1 * 10 / 1000))
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10)


def test_running_mean_std():
    stats = RunningMeanStd()
    stats.update_from_moments(2.0, 2.0 / 3.0, 3)   # [1, 2, 3]
    stats.update_from_moments(6.0, 1.0, 2)         # [5, 7]
    close(stats.mean, 3.6)
    close(stats.var, 4.64)
    close(stats.normalize(T([3.6 + math.sqrt(4.64)])), [1.0])
    other = RunningMeanStd()
    other.load_state_dict(stats.state_dict())
    assert other.state_dict() == stats.state_dict()


def test_answer_helpers():
    pad, eos = 0, 9
    seq = T([[5, 6, 7, 9, 4, 4],     # prompt 5 6, answer 7 eos then junk -> junk becomes pad
             [0, 6, 7, 8, 0, 0]])    # left-padded prompt, answer 7 8 then pad
    fixed = pad_after_eos(seq, 2, eos, pad)
    close(fixed, [[5, 6, 7, 9, 0, 0], [0, 6, 7, 8, 0, 0]])
    # positions: the answer runs from the prompt width through its first eos (included); pads are not looked at
    close(answer_mask(fixed, 2, eos).long(), [[1, 1, 0, 0], [1, 1, 1, 1]])
    close(answer_mask(fixed, 2, eos, include_end=False).long(), [[1, 0, 0, 0], [1, 1, 1, 1]])
    close(answer_lengths(fixed, 2, eos), [1, 4])
    assert first_tokens_agreement(fixed, seq, 2, pad, n_tokens=2) == 1.0
    assert first_tokens_agreement(fixed, seq, 2, pad, n_tokens=4) == 0.5
