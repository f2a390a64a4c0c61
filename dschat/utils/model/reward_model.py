"""Reward / critic model: a base transformer (no LM head) plus a bias-free scalar value head.

Submodule names `rwtransformer` and `v_head` are the checkpoint's key prefixes (upstream step 3 loads our
step-2 output and we load theirs), so they must not change.

End convention (one for SFT, RM and PPO): a sequence is scored at its last real token (the attention
mask says which positions are real), or at the token before it when that token is an eos ending whose id
is also the pad (`dschat.utils.losses.reward_index`, reached only through `RewardModel.end_index` /
`read_end_scores`). Every training text ends with eos; with pad == eos that reads the last answer token,
the token after which the actor stops; with pad != eos (OPT) it reads the eos itself.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dschat.utils.errors import UserError
from dschat.utils.losses import (
    divergence_reward_loss,
    gather_at,
    pairwise_reward_loss,
    reward_index,
)
from dschat.utils.model.masks import has_left_padding, position_ids_from_mask
from dschat.utils.tokenizer import UPSTREAM_REWARD_ENDING  # noqa: F401 - also read from here

LOSS_TYPES = ("end", "divergence")

# ---------------------------------------------------------------------------------------------
# The ending a reward model was trained with: the one home of this convention.
#
# Our step 2 appends the eos token to every answer (the ending the actor produces) and writes
# REWARD_ENDING_FILE beside the weights. DeepSpeed-Chat's step 2 appended the literal `<|endoftext|>`
# and wrote no record (and no full tokenizer: only its vocabulary files), so a step-2 folder with
# neither the record nor `tokenizer_config.json`/`tokenizer.json` is taken as upstream's. Selection, PPO,
# evaluation and rw_eval score `prompt + answer + ending` by the one rule (`RewardModel.end_index`): the
# last answer token for an eos ending (pad == eos), the last token of the literal otherwise. A flag
# (`--reward_end_text`, rw_eval's `--eot_token`) overrides.

REWARD_ENDING_FILE = "reward_ending.json"
EOS_ENDING = "eos"  # the tokenizer's eos token, whatever its text
FULL_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def reward_ending_record(end_text: str, tokenizer: Any) -> str:
    """The JSON our step 2 writes beside the weights (REWARD_ENDING_FILE)."""
    is_eos = end_text == tokenizer.eos_token
    return json.dumps({"end_text": EOS_ENDING if is_eos else end_text, "eos_token": tokenizer.eos_token,
                       "read_at": "last answer token" if is_eos else "last token of end_text"}, indent=1)


def resolve_reward_ending(model_dir: str, override: str | None = None) -> str:
    """`EOS_ENDING` or the literal text a reward model was trained with (see above); `override` wins."""
    if override:
        return override
    folder = Path(model_dir)
    record = folder / REWARD_ENDING_FILE
    if record.is_file():
        try:
            end_text = json.loads(record.read_text(encoding="utf-8"))["end_text"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            end_text = err
        if not isinstance(end_text, str) or not end_text:
            raise UserError(f"{record}: not a reward-ending record ({end_text!r}); expected JSON with a non-empty "
                            f"\"end_text\" (`eos` or the literal); fix or delete it, or pass --reward_end_text")
        return end_text
    if folder.is_dir() and not any((folder / name).exists() for name in FULL_TOKENIZER_FILES):
        return UPSTREAM_REWARD_ENDING
    return EOS_ENDING


def ending_text(ending: str, tokenizer: Any) -> str:
    """The text appended after an answer for `ending` (the eos token's text for `EOS_ENDING`)."""
    return (tokenizer.eos_token or "") if ending == EOS_ENDING else ending


def ending_token_ids(tokenizer: Any, ending: str) -> list[int] | None:
    """Token ids `ending` adds after an answer (None for the eos ending, which rollouts already end with).

    Taken as the difference between tokenising `"a" + text` and `"a"`, so a tokenizer that marks word
    starts (sentencepiece's `▁`) gives the ids that follow a word, as in the jointly tokenised training text.
    """
    if ending == EOS_ENDING or ending == tokenizer.eos_token:
        return None
    base = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a" + ending, add_special_tokens=False)["input_ids"]
    if full[:len(base)] == base and len(full) > len(base):
        return list(full[len(base):])
    return list(tokenizer(ending, add_special_tokens=False)["input_ids"])


def append_ending(seq: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, pad_token_id: int,
                  eos_token_id: int | None, ending_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts [B, T] (left-padded prompt of width P, answer, then padding; `attention_mask` says which
    positions are real) with each answer's final eos replaced by `ending_ids` -> (ids [B, T + E], mask).

    The answer is the real positions from P on; an eos at its last real position is its ending and is
    dropped (an answer cut by the length limit keeps every token). Nothing is read from the prompt's ids:
    its mask is copied as it is."""
    rows, length = seq.shape
    extra = len(ending_ids)
    out = torch.full((rows, length + extra), pad_token_id, dtype=seq.dtype, device=seq.device)
    mask = torch.zeros_like(out)
    ending = torch.tensor(ending_ids, dtype=seq.dtype, device=seq.device)
    answer = seq[:, prompt_width:]
    counts = (attention_mask[:, prompt_width:] != 0).long().sum(dim=1)
    out[:, :prompt_width] = seq[:, :prompt_width]
    mask[:, :prompt_width] = attention_mask[:, :prompt_width]
    for i in range(rows):
        n = int(counts[i])
        if n and eos_token_id is not None and int(answer[i, n - 1]) == eos_token_id:
            n -= 1
        out[i, prompt_width:prompt_width + n] = answer[i, :n]
        out[i, prompt_width + n:prompt_width + n + extra] = ending
        mask[i, prompt_width:prompt_width + n + extra] = 1
    return out, mask


class RewardModel(nn.Module):
    """Scalar reward / value model (upstream layout: `rwtransformer` + `v_head`, no bias)."""

    def __init__(
        self,
        base_model: nn.Module,
        tokenizer: Any,
        num_padding_at_beginning: int = 0,
        compute_fp32_loss: bool = False,
        loss_type: str = "end",
        positions_from_mask: bool = True,
    ) -> None:
        """`positions_from_mask`: left-padded rows are positioned from their mask (as generation positions
        them); False leaves the positions to the base model, as upstream did (--position_ids model)."""
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set pad_token = eos_token first")
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        self.compute_fp32_loss = compute_fp32_loss
        self.loss_type = loss_type
        self.positions_from_mask = positions_from_mask
        self.PAD_ID = tokenizer.pad_token_id
        if getattr(self.config, "word_embed_proj_dim", None) is not None:
            hidden = self.config.word_embed_proj_dim  # OPT projects the last hidden state down
        else:
            hidden = getattr(self.config, "hidden_size", None) or self.config.n_embd
            # Upstream writes this into the saved config.json; keep it for layout compatibility.
            self.config.n_embd = hidden
        self.v_head = nn.Linear(hidden, 1, bias=False)
        self.rwtransformer = base_model
        params = inspect.signature(base_model.forward).parameters
        # transformers >= 5 renamed `past_key_values` to `cache` (old name deprecated until 5.40).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._accepts_position_ids = "position_ids" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    # -- gradient checkpointing is a property of the base model ---------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Forwarded to the base model; uses transformers >= 5's `activation_checkpointing_enable`
        (the old name still works there but warns) and falls back to the old name."""
        base = self.rwtransformer
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        base = self.rwtransformer
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        """Let gradient checkpointing work when the embeddings are frozen (LoRA-only training)."""
        self.rwtransformer.enable_input_require_grads()

    # -- scoring ---------------------------------------------------------------------------------
    def token_values(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Per-token scalar values [N, L] from the base model's last hidden state."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        if past_key_values is not None:
            kwargs[self._cache_kwarg] = past_key_values
        if position_ids is None and self.positions_from_mask and has_left_padding(attention_mask):
            position_ids = position_ids_from_mask(attention_mask)
        if position_ids is not None and self._accepts_position_ids:
            kwargs["position_ids"] = position_ids
        outputs = self.rwtransformer(**kwargs)
        hidden = outputs[0]
        return self.v_head(hidden).squeeze(-1)

    def end_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  prompt_length: int | None = None) -> torch.Tensor:
        """Index of the scored token per row [N] (`dschat.utils.losses.reward_index`, the one rule): the last
        real token, or the one before it when that is an eos ending whose id is the pad. `attention_mask`
        (the collator's, or prompt mask + answer mask for rollouts) says which positions are real; None
        means every position is (Hugging Face's convention). `prompt_length`: the prompt's (padded) width,
        so nothing inside the prompt is taken for the end.
        """
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return reward_index(mask, input_ids, self.PAD_ID, start=prompt_length or 0,
                            num_padding_at_beginning=self.num_padding_at_beginning)

    def read_end_scores(self, values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        prompt_length: int | None = None) -> torch.Tensor:
        """THE reward reader: one score per row [N] from per-token values [N, L] at `end_index`. Training,
        PPO rollouts, selection, `mpo eval`, rw_eval and the held-out evaluations all read through it."""
        return gather_at(values, self.end_index(input_ids, attention_mask, prompt_length))

    def end_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_length: int | None = None,
    ) -> torch.Tensor:
        """One reward per sequence [N]: a forward, then `read_end_scores`."""
        values = self.token_values(input_ids, attention_mask)
        return self.read_end_scores(values, input_ids, attention_mask, prompt_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        sequence_mask: torch.Tensor | None = None,
        **unused: Any,
    ) -> dict[str, torch.Tensor]:
        """Pairwise loss on [2B, L] (rows 0..B-1 chosen, B..2B-1 rejected).

        Returns `loss`, `chosen_mean_scores`, `rejected_mean_scores` (upstream names; they are END
        scores, not means). `sequence_mask` says which positions hold real tokens (the collator's mask);
        it defaults to `attention_mask`, and a step that leaves the attention mask out for speed
        (`--pad_mask auto`) passes it here. Extra batch keys such as the collator's `prompt_lengths` are
        ignored, so `model(**batch)` works.
        """
        if input_ids.shape[0] % 2:
            raise ValueError(f"reward batch must hold 2B rows (chosen then rejected), got {input_ids.shape[0]}")
        values = self.token_values(
            input_ids, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache
        )
        half = input_ids.shape[0] // 2
        mask = sequence_mask if sequence_mask is not None else attention_mask
        if mask is None:
            mask = torch.ones_like(input_ids)
        end_scores = self.read_end_scores(values, input_ids, mask)
        chosen_end, rejected_end = end_scores[:half], end_scores[half:]
        chosen_values, rejected_values = values[:half], values[half:]
        if self.compute_fp32_loss:
            chosen_values, rejected_values = chosen_values.float(), rejected_values.float()
        if self.loss_type == "end":
            if self.compute_fp32_loss:
                loss = pairwise_reward_loss(chosen_end.float(), rejected_end.float())
            else:
                loss = pairwise_reward_loss(chosen_end, rejected_end)
        else:
            index = self.end_index(input_ids, mask)
            loss = divergence_reward_loss(
                input_ids[:half], input_ids[half:], chosen_values, rejected_values, index[:half], index[half:],
                mask[:half], mask[half:],
            )
        return {"loss": loss, "chosen_mean_scores": chosen_end, "rejected_mean_scores": rejected_end}

    def forward_value(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_value_only: bool = False,
        prompt_length: int = 0,
        use_cache: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-token values [B, L] (critic), or with `return_value_only=False` also the reward of each row
        [B] read by `read_end_scores`, under `end_scores` and upstream's key `chosen_end_scores` (the same
        tensor: any sequence's score, not only a chosen one's).

        Pass the attention mask (which positions are real) and `prompt_length` = the (padded) prompt width.
        """
        values = self.token_values(
            input_ids, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache
        )
        if return_value_only:
            return values
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        end_scores = self.read_end_scores(values, input_ids, attention_mask, prompt_length)
        return {"values": values, "end_scores": end_scores, "chosen_end_scores": end_scores}

    def rollout_scores(self, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                       ending_ids: list[int] | None = None, eos_token_id: int | None = None) -> torch.Tensor:
        """Reward of PPO rollouts [B] (`attention_mask`: the prompt's mask, then the answers' up to and
        including their eos): as they are for the eos ending (`ending_ids=None`), else with each answer's
        eos replaced by the trained ending (`append_ending`), read at its last token."""
        if ending_ids:
            seq, attention_mask = append_ending(seq, attention_mask, prompt_width, self.PAD_ID, eos_token_id,
                                                ending_ids)
        return self.end_scores(seq, attention_mask, prompt_length=prompt_width)
