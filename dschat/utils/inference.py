"""Eval-time model loading and the one reward scorer.

Owns `RewardScorer` (texts -> rewards, laid out the way step 2 trained on them), the reward layouts and
`pad_with_mask` (ids + attention mask on top of the one padder, `collators.pad_rows`). Used by the
upstream helpers (rw_eval.py, prompt_eval.py), the MPO evaluation, DPO's held-out rewards and selection
(over an engine it built). Knows nothing of MPO: must not import `mpo_ext`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from dschat.utils.data.collators import pad_rows
from dschat.utils.data.raw_datasets import join_prompt_response
from dschat.utils.errors import UserError
from dschat.utils.model.model_utils import create_critic_model, create_hf_model
from dschat.utils.model.reward_model import ending_text, ending_token_ids, resolve_reward_ending
from dschat.utils.tokenizer import load_hf_tokenizer


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
    right-padded, each with its mask, read by `RewardModel.read_end_scores` (the one reward reader).
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
    head_ids, head_mask = pad_with_mask([h for h, _ in layouts], width, pad_token_id, left=True)
    tail_ids, tail_mask = pad_with_mask([t for _, t in layouts], answer_width, pad_token_id, left=False)
    ids = torch.cat([head_ids, tail_ids], dim=1)
    mask = torch.cat([head_mask, tail_mask], dim=1)
    return model.forward_value(ids.to(device), mask.to(device), prompt_length=width)["end_scores"]


def pad_with_mask(rows: Sequence[Sequence[int]], width: int, pad_token_id: int,
                  left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, width] ids (`pad_rows`, the one padder) and their 0/1 attention mask, padded on the left or the
    right. Rows must fit in `width`."""
    ids = pad_rows([torch.as_tensor(list(r), dtype=torch.long) for r in rows], width, pad_token_id, left=left)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long).unsqueeze(1)
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0)
    mask = positions >= width - lengths if left else positions < lengths
    return ids, mask.long()


def _score_shared_prompts(reward_model, layouts: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                          device: torch.device) -> torch.Tensor:
    """`score_layouts` with each distinct prompt run through the reward model once: the prompts' KV cache
    is selected per row (`batch_select_indices`) and only the answers are forwarded against it. Read by the
    same reader on the whole prompt + answer row and its mask."""
    heads = list(dict.fromkeys(tuple(h) for h, _ in layouts))
    which = torch.tensor([heads.index(tuple(h)) for h, _ in layouts], dtype=torch.long)
    width = max(len(h) for h in heads)
    answer_width = max(max(len(t) for _, t in layouts), 1)
    head_ids, head_mask = pad_with_mask(heads, width, pad_token_id, left=True)
    tail_ids, tail_mask = pad_with_mask([t for _, t in layouts], answer_width, pad_token_id, left=False)
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
    return reward_model.read_end_scores(values, full_ids, full_mask, width)


class RewardScorer:
    """Scores (prompt, answer) texts with a trained step-2 reward model, the way it was trained.

    The text is `prompt + answer + ending` (`reward_layout`), where the ending is the one the reward model
    was trained with (`resolve_reward_ending`: recorded by our step 2, `<|endoftext|>` for an upstream
    checkpoint, or `end_text` when given), laid out like a PPO rollout (`score_layouts`). Tokenising with
    the reward model's own tokenizer lets policy and reward model use different vocabularies.

    Build it from a checkpoint (`from_path`: eval, rw_eval, DPO) or around a model or DeepSpeed engine that
    is already built (selection, PPO). Texts are tokenised in one call and scored in batches of `batch_size`,
    each padded once. `share_prompts`: batches hold a prompt's answers side by side (longest prompts first)
    and read each prompt once (`score_layouts(..., share_prompts=True)`); otherwise batches follow the
    input order. `score_rollouts` scores generated ids (PPO's rollouts and the held-out evaluations).
    Every path ends in `RewardModel.read_end_scores`, the one reward reader.
    """

    def __init__(self, model, tokenizer, end_text: str, *, max_seq_len: int = 512, batch_size: int = 16,
                 device: torch.device | None = None, pad_token_id: int | None = None, share_prompts: bool = False,
                 ending: str | None = None):
        self.engine = model
        self.model = getattr(model, "module", model)
        self.tokenizer = tokenizer
        self.end_text = end_text
        self.ending = ending
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.device = device if device is not None else getattr(model, "device", torch.device("cpu"))
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad_token_id
        self.share_prompts = share_prompts
        self.ending_ids = ending_token_ids(tokenizer, ending or end_text)  # None: the eos ending

    @classmethod
    def from_path(cls, path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                  num_padding_at_beginning: int = 0, max_seq_len: int = 512, batch_size: int = 16,
                  add_special_tokens: str | None = None, end_text: str | None = None) -> RewardScorer:
        """A scorer over the step-2 checkpoint at `path`, on `device` in `dtype`, in eval mode."""
        tokenizer = load_hf_tokenizer(path, add_special_tokens=add_special_tokens)
        model = create_critic_model(path, tokenizer, None, num_padding_at_beginning, rlhf_training=True)
        model.to(device=device, dtype=dtype).eval()
        ending = resolve_reward_ending(path, end_text)
        return cls(model, tokenizer, ending_text(ending, tokenizer), max_seq_len=max_seq_len, batch_size=batch_size,
                   device=device, pad_token_id=model.PAD_ID, ending=ending)

    def layout(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending in the reward model's ending) within max_seq_len."""
        return reward_layout(self.tokenizer, prompt, answer, self.end_text, self.max_seq_len)

    def layouts(self, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """`layout` of many pairs (one tokenizer call)."""
        return reward_layouts(self.tokenizer, prompts, answers, self.end_text, self.max_seq_len)

    @torch.no_grad()
    def score_layouts(self, layouts: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """One reward per layout, one forward call. An empty list still runs a dummy forward (ZeRO-3
        ranks must issue the same calls)."""
        real = len(layouts)
        rows = list(layouts) or [([self.pad_id], [self.pad_id])]
        return score_layouts(self.model, rows, self.pad_id, self.device, share_prompts=self.share_prompts)[:real]

    def shares_vocabulary(self, tokenizer) -> bool:
        """Whether ids of `tokenizer` mean the same to this reward model (then rollouts are scored by id)."""
        own = self.tokenizer
        return tokenizer is own or (tokenizer.get_vocab() == own.get_vocab()
                                    and tokenizer.eos_token_id == own.eos_token_id)

    @torch.no_grad()
    def score_rollouts(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """Rewards [B] of generated rows [B, P + T] in this reward model's vocabulary. `attention_mask` is the
        prompt's mask followed by each answer's through its eos (`generation.rollout_attention_mask`). Each
        answer's eos is replaced by the reward model's ending (`RewardModel.rollout_scores`), then the row is
        read by the one reader. NaN/inf scores are refused (`require_finite_scores`)."""
        scores = self.model.rollout_scores(sequences.to(self.device), attention_mask.to(self.device), prompt_width,
                                           self.ending_ids, self.tokenizer.eos_token_id)
        config = getattr(self.model, "config", None)
        require_finite_scores(scores, getattr(config, "_name_or_path", "") or "(reward model)")
        return scores

    def score(self, prompts: Sequence[str], answers: Sequence[str], calls: int | None = None) -> list[float]:
        """Rewards in input order. `calls` pads the number of forward calls with dummy ones (ranks must
        issue the same number under ZeRO-3)."""
        layouts = self.layouts(prompts, answers)
        order = list(range(len(layouts)))
        if self.share_prompts:  # longest first, the answers of one prompt side by side
            order.sort(key=lambda i: (-len(layouts[i][0]), layouts[i][0], -len(layouts[i][1]), i))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches += [[] for _ in range(max(0, (calls or 0) - len(batches)))]
        scores = [0.0] * len(layouts)
        for batch in batches:
            for i, s in zip(batch, self.score_layouts([layouts[i] for i in batch])):
                scores[i] = s
        return scores
