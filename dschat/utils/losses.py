"""Pure tensor functions shared by the training steps (no models, no state, no distributed calls).

Keeping them pure lets the tests check them against numbers computed by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under `logits`: [B, T, V] x [B, T] -> [B, T].

    Uses `logit[label] - logsumexp(logits)` so no [B, T, V] log-softmax tensor is materialised next to
    the logits. The caller aligns positions (usually `logits[:, :-1]` with `labels[:, 1:]`). The result
    has the logits' dtype; pass `logits.float()` for fp32 precision with half-precision models.
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1).long()).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss `mean(-log sigmoid(chosen - rejected))`, as a scalar.

    Written as `softplus(rejected - chosen)`, which equals `log(1 + exp(-(c - r)))` and stays finite for
    large margins of either sign (a plain `log(sigmoid(.))` underflows to -inf).
    """
    return F.softplus(rejected_scores - chosen_scores).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen score is STRICTLY greater than the rejected one (float scalar).

    Ties count as wrong (0): a reward model that scores everything the same must not look 50% accurate.
    """
    return (chosen_scores > rejected_scores).float().mean()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is non-zero (weighted by `mask`).

    Masked-out entries are replaced by 0 before the sum, so NaN/inf there cannot leak in; an all-zero
    mask gives 0 rather than NaN.
    """
    mask = mask.to(x.dtype)
    x = torch.where(mask != 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1e-8)


def first_pad_index(
    input_ids: torch.Tensor, pad_token_id: int, occurrence: int = 0, start: int = 0
) -> torch.Tensor:
    """Position of the `occurrence`-th (0-based) pad token at or after `start` in each row, else L.

    [N, L] -> [N] long. This is the end marker of the reward-model convention: `occurrence` is
    `num_padding_at_beginning` (pads that are really BOS tokens, e.g. OPT) and `start` is the prompt
    width when the prompt may be left-padded.
    """
    n, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    is_pad = (input_ids == pad_token_id) & (positions >= start).unsqueeze(0)
    hit = is_pad & (is_pad.long().cumsum(dim=1) == occurrence + 1)
    found = hit.any(dim=1)
    index = hit.long().argmax(dim=1)
    return torch.where(found, index, torch.full_like(index, length))


def sequence_end_index(
    input_ids: torch.Tensor, pad_token_id: int, num_padding_at_beginning: int = 0, start: int = 0
) -> torch.Tensor:
    """Index of the token a sequence is scored at: the one just before its end marker, or the last
    position when there is no marker. [N, L] -> [N] long.

    ONE rule for reward training, PPO and selection: the end marker is the first pad at or after
    `max(start, num_padding_at_beginning)`. The first `num_padding_at_beginning` positions are skipped
    whatever they hold, so a beginning token that is a pad (bos == pad) is not taken for the end, and one
    that is not (OPT: bos 2, pad 1) does not push the marker one pad further. OPT's
    `[2, 10, 11, 12, 13, 2, 1, 1, 1]` is read at 5 (its eos), the index upstream's step 3 reads; upstream's
    step-2 training, which counted pads, read at 6 (the first pad) with this layout.

    Clamped to `max(start - 1, 0)` from below so a row that is a pad right from the start (or an empty
    answer) still yields a valid index instead of wrapping round to -1.
    """
    marker = first_pad_index(input_ids, pad_token_id, start=max(start, num_padding_at_beginning))
    return (marker - 1).clamp(min=max(start - 1, 0))


def gather_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values[i, index[i]]` for every row: [N, L] x [N] -> [N]."""
    return values.gather(1, index.long().unsqueeze(1)).squeeze(1)


def divergence_reward_loss(
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    pad_token_id: int,
    num_padding_at_beginning: int = 0,
) -> torch.Tensor:
    """Upstream DeepSpeed-Chat's per-token pairwise loss, kept for comparison runs (scalar).

    For each pair: `div` = first position where the two rows differ, `end` = the later of the two end
    markers (`first_pad_index`); the pair's loss is the mean of `softplus(r_t - c_t)` over positions
    `div .. end-1` (trailing pads of the shorter answer included), and pairs are averaged. Identical
    rows use the last position only. Unlike upstream (which would average an empty range to NaN), an
    empty range is widened to the single position `end-1`. Known weakness: every token after the
    divergence is pushed apart, not only the final one the reward is read from.
    """
    _, length = chosen_ids.shape
    c_ind = first_pad_index(chosen_ids, pad_token_id, start=num_padding_at_beginning)
    r_ind = first_pad_index(rejected_ids, pad_token_id, start=num_padding_at_beginning)
    differs = chosen_ids != rejected_ids
    identical = ~differs.any(dim=1)
    full = torch.full_like(c_ind, length)
    end = torch.where(identical, full, torch.maximum(c_ind, r_ind)).clamp(min=1)
    div = torch.where(identical, full - 1, differs.long().argmax(dim=1))
    div = torch.minimum(div, end - 1)
    positions = torch.arange(length, device=chosen_ids.device).unsqueeze(0)
    window = (positions >= div.unsqueeze(1)) & (positions < end.unsqueeze(1))
    per_token = F.softplus(rejected_values - chosen_values)
    return masked_mean(per_token, window, dim=1).mean()
