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
    from dschat.utils.data.raw_datasets import join_prompt_response

    full = list(tokenizer(join_prompt_response(prompt, answer) + end_text)["input_ids"])
    eos_ending = end_text == (tokenizer.eos_token or "")
    if eos_ending and tokenizer.eos_token_id is not None and (not full or full[-1] != tokenizer.eos_token_id):
        full.append(tokenizer.eos_token_id)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
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
                  device: torch.device) -> list[float]:
    """One reward per (prompt ids, answer ids) in one forward: prompts left-padded to a common width, answers
    right-padded, read by `forward_value(..., prompt_length=width)` (the reward index rule of step 2 and PPO).
    `model` is a RewardModel or an engine around one."""
    width = max(len(h) for h, _ in layouts)
    answer_width = max(max(len(t) for _, t in layouts), 1)
    ids = torch.full((len(layouts), width + answer_width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (head, tail) in enumerate(layouts):
        ids[i, width - len(head):width] = torch.tensor(head, dtype=torch.long)
        ids[i, width:width + len(tail)] = torch.tensor(tail, dtype=torch.long)
        mask[i, width - len(head):width + len(tail)] = 1
    out = model.forward_value(ids.to(device), mask.to(device), prompt_length=width)
    config = getattr(getattr(model, "module", model), "config", None)
    require_finite_scores(out["chosen_end_scores"], getattr(config, "_name_or_path", "") or "(step 2)")
    return [float(s) for s in out["chosen_end_scores"].float().cpu()]


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
            layouts = [self.layout(p, a) for p, a in zip(prompts[start:start + self.batch_size],
                                                            answers[start:start + self.batch_size])]
            scores.extend(score_layouts(self.model, layouts, self.pad_id, self.device))
        return scores
