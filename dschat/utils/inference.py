"""Eval-time model loading and reward scoring, shared by the upstream helpers (rw_eval.py, prompt_eval.py)
and the MPO evaluation (mpo_ext.evaluation): plain modules on one device, no DeepSpeed engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dschat.utils.errors import UserError


def require_finite_scores(scores: torch.Tensor | Sequence[float], reward_model: str) -> None:
    """Refuse a reward model whose scores hold NaN or inf (a damaged v_head, or an overflow in the
    scoring dtype): every decision taken from such scores is garbage, so stop at the first batch."""
    values = torch.as_tensor(scores, dtype=torch.float32)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise UserError(f"reward model {reward_model}: {bad} of {values.numel()} scores in a batch are NaN or "
                        "infinite (damaged weights, e.g. its v_head, or an overflow in this dtype); retrain or "
                        "re-export the step-2 model, or score in fp32")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: this rank's accelerator when a process group runs, else cuda if present, else cpu."""
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise UserError(f"--device {device}: {err}") from err
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default, bf16 on GPU (fp16 is refused on CPU, as everywhere in the project)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on CPU; use --dtype bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load_policy(path: str, device: torch.device, dtype: torch.dtype, add_special_tokens: str | None = None):
    """(model, tokenizer) of a causal LM checkpoint, in eval mode."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import create_hf_model
    from dschat.utils.utils import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(path, add_special_tokens=add_special_tokens)
    model = create_hf_model(AutoModelForCausalLM, path, tokenizer)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def reward_layout(tokenizer, prompt: str, answer: str, end_text: str, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + ending ids) of `prompt + answer + end_text` tokenised in one piece, as the
    step-2 data pipeline does, within `max_seq_len` (the prompt loses its start first). An eos ending
    (`end_text` == the eos token) is guaranteed to end the answer; another ending is appended as text.
    """
    return reward_layouts(tokenizer, [prompt], [answer], end_text, max_seq_len)[0]


def reward_layouts(tokenizer, prompts: Sequence[str], answers: Sequence[str], end_text: str,
                   max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """`reward_layout` of many pairs with one tokenizer call for the texts and one for the distinct
    prompts (a prompt with several answers is tokenised once)."""
    from dschat.utils.data.raw_datasets import join_prompt_response

    if not prompts:
        return []
    fulls = tokenizer([join_prompt_response(p, a) + end_text for p, a in zip(prompts, answers)])["input_ids"]
    distinct = list(dict.fromkeys(prompts))
    prompt_ids = dict(zip(distinct, tokenizer(distinct)["input_ids"]))
    eos_id = tokenizer.eos_token_id if end_text == (tokenizer.eos_token or "") else None
    return [_cut_layout(list(full), prompt_ids[p], eos_id, max_seq_len) for full, p in zip(fulls, prompts)]


def _cut_layout(full: list[int], prompt_ids: Sequence[int], eos_id: int | None,
                max_seq_len: int) -> tuple[list[int], list[int]]:
    """Split the jointly tokenised text where it stops matching the prompt alone, make an eos ending
    (`eos_id` given) end it, and fit it into `max_seq_len` (the prompt loses its start first)."""
    if eos_id is not None and (not full or full[-1] != eos_id):
        full.append(eos_id)
    cut = 0
    for a, b in zip(prompt_ids, full):  # joint tokenisation may merge across the boundary
        if a != b:
            break
        cut += 1
    cut = min(cut, len(full) - 1)
    head, tail = full[:cut], full[cut:]
    room = max_seq_len - len(tail)
    if room < 1:  # answer alone is too long: keep its start (the ending is lost, the score is read at the end)
        tail = tail[: max_seq_len - 1]
        room = 1
    if len(head) > room:
        head = head[len(head) - room:]
    return head, tail


@torch.no_grad()
def score_layouts(model, layouts: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                  device: torch.device, share_prompts: bool = False) -> list[float]:
    """One reward per (prompt ids, answer ids) in one forward: prompts left-padded to a common width, answers
    right-padded, read by `forward_value(..., prompt_length=width)` (the reward index rule of step 2 and PPO).
    `model` is a RewardModel or an engine around one. `share_prompts`: rows with the same prompt ids read
    that prompt once (`_score_shared_prompts`; same scores up to float rounding)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if share_prompts and len({tuple(h) for h, _ in layouts}) < len(layouts):
        scores = _score_shared_prompts(getattr(model, "module", model), layouts, pad_token_id, device)
    else:
        scores = _score_one_pass(model, layouts, pad_token_id, device)
    require_finite_scores(scores, getattr(config, "_name_or_path", "") or "(step 2)")
    return [float(s) for s in scores.float().cpu()]


def _score_one_pass(model, layouts: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                    device: torch.device) -> torch.Tensor:
    """Prompts left-padded, answers right-padded, one `forward_value` call: [N] rewards."""
    width = max(len(h) for h, _ in layouts)
    answer_width = max(max(len(t) for _, t in layouts), 1)
    rows = [[pad_token_id] * (width - len(h)) + list(h) + list(t) + [pad_token_id] * (answer_width - len(t))
            for h, t in layouts]
    real = [[0] * (width - len(h)) + [1] * (len(h) + len(t)) + [0] * (answer_width - len(t)) for h, t in layouts]
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.tensor(real, dtype=torch.long)
    return model.forward_value(ids.to(device), mask.to(device), prompt_length=width)["chosen_end_scores"]


def _left_right_padded(rows: Sequence[Sequence[int]], width: int, pad_token_id: int,
                       left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, width] ids and 0/1 mask of rows padded on the left or the right."""
    ids = [([pad_token_id] * (width - len(r)) + list(r)) if left else (list(r) + [pad_token_id] * (width - len(r)))
           for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r)))
            for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _score_shared_prompts(reward_model, layouts: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                          device: torch.device) -> torch.Tensor:
    """`score_layouts` with each distinct prompt run through the reward model once: the prompts' KV cache
    is selected per row (`batch_select_indices`) and only the answers are forwarded against it. The
    scored index follows the same rule (`end_index` on the whole prompt + answer row)."""
    from transformers import DynamicCache

    heads = list(dict.fromkeys(tuple(h) for h, _ in layouts))
    which = torch.tensor([heads.index(tuple(h)) for h, _ in layouts], dtype=torch.long)
    width = max(len(h) for h in heads)
    answer_width = max(max(len(t) for _, t in layouts), 1)
    head_ids, head_mask = _left_right_padded(heads, width, pad_token_id, left=True)
    tail_ids, tail_mask = _left_right_padded([t for _, t in layouts], answer_width, pad_token_id, left=False)
    head_ids, head_mask, tail_ids, tail_mask = (t.to(device) for t in (head_ids, head_mask, tail_ids, tail_mask))
    which = which.to(device)
    config = getattr(reward_model.rwtransformer, "config", None)
    cache = DynamicCache(config=config)
    head_values = reward_model.token_values(head_ids, head_mask, past_key_values=cache, use_cache=True)
    cache.batch_select_indices(which)
    row_head_mask = head_mask[which]
    full_mask = torch.cat([row_head_mask, tail_mask], dim=1)
    positions = row_head_mask.sum(dim=1, keepdim=True) + torch.arange(answer_width, device=device)
    tail_values = reward_model.token_values(tail_ids, full_mask, past_key_values=cache, position_ids=positions,
                                            use_cache=True)
    values = torch.cat([head_values[which], tail_values], dim=1)
    full_ids = torch.cat([head_ids[which], tail_ids], dim=1)
    index = reward_model.end_index(full_ids, width)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


class RewardScorer:
    """Scores (prompt, answer) texts with a trained step-2 reward model, the way it was trained.

    The text is `prompt + answer + ending` (`reward_layout`), where the ending is the one the reward model
    was trained with (`resolve_reward_ending`: recorded by our step 2, `<|endoftext|>` for an upstream
    checkpoint, or `end_text` when given), laid out like a PPO rollout (`score_layouts`). Tokenising with
    the reward model's own tokenizer lets policy and reward model use different vocabularies.
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 num_padding_at_beginning: int = 0, max_seq_len: int = 512, batch_size: int = 16,
                 add_special_tokens: str | None = None, end_text: str | None = None):
        from dschat.utils.model.model_utils import create_critic_model
        from dschat.utils.model.reward_model import ending_text, resolve_reward_ending
        from dschat.utils.utils import load_hf_tokenizer

        self.tokenizer = load_hf_tokenizer(path, add_special_tokens=add_special_tokens)
        self.model = create_critic_model(path, self.tokenizer, None, num_padding_at_beginning,
                                         rlhf_training=True)
        self.model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.pad_id = self.model.PAD_ID
        self.ending = resolve_reward_ending(path, end_text)
        self.end_text = ending_text(self.ending, self.tokenizer)

    def layout(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending in the reward model's ending) within max_seq_len."""
        return reward_layout(self.tokenizer, prompt, answer, self.end_text, self.max_seq_len)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            layouts = reward_layouts(self.tokenizer, prompts[start:start + self.batch_size],
                                     answers[start:start + self.batch_size], self.end_text, self.max_seq_len)
            scores.extend(score_layouts(self.model, layouts, self.pad_id, self.device))
        return scores
