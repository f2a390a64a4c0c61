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


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real (mask 1) token of each row, [N, L] -> [N] long; -1 for a row with none.

    Works for any layout the collators build (right-padded training rows, left-padded prompts followed by
    right-padded answers): padding is wherever the mask is 0, whatever token id sits there.
    """
    length = attention_mask.shape[1]
    real = attention_mask != 0
    from_end = real.flip(dims=[1]).long().argmax(dim=1)
    return torch.where(real.any(dim=1), length - 1 - from_end, torch.full_like(from_end, -1))


def reward_index(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    end_marker_id: int | None,
    start: int = 0,
    num_padding_at_beginning: int = 0,
) -> torch.Tensor:
    """Index of the token a sequence is scored at, [N, L] -> [N] long: THE reward-reading rule.

    Stated in positions (the mask says which positions hold real tokens; a pad id inside the text is
    content like any other token):
    - the score is read at the row's last real token;
    - except when that token is the end marker (`end_marker_id`: the pad id, i.e. an eos ending whose
      token is also the pad, as with pad = eos) and it lies at or after `max(start, num_padding_at_beginning)`:
      then it marks the end and the score is read at the token before it.
    `start` is the prompt width (an end marker inside the prompt is never the end); the first
    `num_padding_at_beginning` positions (OPT's beginning token) are never an end marker. A row whose
    answer was cut by the length limit (no ending) is read at its last real token. The result is
    clamped to >= 0 (a row with no real token reads position 0).

    On upstream layouts this is upstream's "token before the first pad": OPT (bos = eos = 2, pad = 1)
    `[2, 10, 11, 12, 13, 2, 1, 1, 1]` with mask `[1]*6 + [0]*3` reads 5 (its eos, not the pad); a pad = eos
    row `[1, 5, 6, 7, 2, 2]` with mask `[1]*5 + [0]` reads 3 (the last answer token).
    """
    last = last_real_index(attention_mask)
    token = input_ids.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
    floor = max(start, num_padding_at_beginning)
    is_marker = (token == end_marker_id) if end_marker_id is not None else torch.zeros_like(last, dtype=torch.bool)
    ended = is_marker & (last >= floor)
    return (last - ended.long()).clamp(min=0)


def gather_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values[i, index[i]]` for every row: [N, L] x [N] -> [N]."""
    return values.gather(1, index.long().unsqueeze(1)).squeeze(1)


def divergence_reward_loss(
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upstream DeepSpeed-Chat's per-token pairwise loss, kept for comparison runs (scalar).

    For each pair: `div` = first position where the two rows differ (in token or in being real),
    `end` = one past the later of the two scored positions (`chosen_index`, `rejected_index`: the
    `reward_index` of each row, so `end` is upstream's "first pad"); the pair's loss is the mean of
    `softplus(r_t - c_t)` over positions `div .. end-1` (trailing pads of the shorter answer included),
    and pairs are averaged. Identical rows use the last position only. Unlike upstream (which would
    average an empty range to NaN), an empty range is widened to the single position `end-1`. Known
    weakness: every token after the divergence is pushed apart, not only the final one the reward is
    read from.
    """
    _, length = chosen_ids.shape
    differs = chosen_ids != rejected_ids
    if chosen_mask is not None and rejected_mask is not None:
        differs = differs | ((chosen_mask != 0) != (rejected_mask != 0))
    identical = ~differs.any(dim=1)
    full = torch.full_like(chosen_index, length)
    end = torch.where(identical, full, torch.maximum(chosen_index, rejected_index) + 1).clamp(min=1, max=length)
    div = torch.where(identical, full - 1, differs.long().argmax(dim=1))
    div = torch.minimum(div, end - 1)
    positions = torch.arange(length, device=chosen_ids.device).unsqueeze(0)
    window = (positions >= div.unsqueeze(1)) & (positions < end.unsqueeze(1))
    per_token = F.softplus(rejected_values - chosen_values)
    return masked_mean(per_token, window, dim=1).mean()
