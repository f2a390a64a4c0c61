"""Reward / critic model: a base transformer (no LM head) plus a bias-free scalar value head.

Submodule names `rwtransformer` and `v_head` are the checkpoint's key prefixes (upstream step 3 loads our
step-2 output and we load theirs), so they must not change.

End convention (one for SFT, RM and PPO): a sequence is scored at the token just before its end
marker, the first pad at or after the prompt (or the `num_padding_at_beginning`-th pad when no prompt
width is known). Every training text ends with eos == pad, so that is the last answer token, the same
token at which the actor stops.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from dschat.utils.losses import (
    divergence_reward_loss,
    gather_at,
    pairwise_reward_loss,
    sequence_end_index,
)
from dschat.utils.model.masks import has_left_padding, position_ids_from_mask

LOSS_TYPES = ("end", "divergence")


class RewardModel(nn.Module):
    """Scalar reward / value model (upstream layout: `rwtransformer` + `v_head`, no bias)."""

    def __init__(
        self,
        base_model: nn.Module,
        tokenizer: Any,
        num_padding_at_beginning: int = 0,
        compute_fp32_loss: bool = False,
        loss_type: str = "end",
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set pad_token = eos_token first")
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        self.compute_fp32_loss = compute_fp32_loss
        self.loss_type = loss_type
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
        if position_ids is None and has_left_padding(attention_mask):
            position_ids = position_ids_from_mask(attention_mask)
        if position_ids is not None and self._accepts_position_ids:
            kwargs["position_ids"] = position_ids
        outputs = self.rwtransformer(**kwargs)
        hidden = outputs[0]
        return self.v_head(hidden).squeeze(-1)

    def end_index(self, input_ids: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor:
        """Index of the scored token per row [N].

        `prompt_length=None`: the token before the `num_padding_at_beginning`-th pad (training pairs,
        right-padded). Otherwise: the token before the first pad at or after `prompt_length`, which
        skips a left-padded prompt (PPO rollouts).
        """
        if prompt_length is None:
            return sequence_end_index(input_ids, self.PAD_ID, self.num_padding_at_beginning)
        return sequence_end_index(input_ids, self.PAD_ID, 0, start=prompt_length)

    def end_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_length: int | None = None,
    ) -> torch.Tensor:
        """One reward per sequence [N], read at its end (see `end_index`). For evaluation tools."""
        values = self.token_values(input_ids, attention_mask)
        return gather_at(values, self.end_index(input_ids, prompt_length))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        **unused: Any,
    ) -> dict[str, torch.Tensor]:
        """Pairwise loss on [2B, L] (rows 0..B-1 chosen, B..2B-1 rejected).

        Returns `loss`, `chosen_mean_scores`, `rejected_mean_scores` (upstream names; they are END
        scores, not means). Extra batch keys such as the collator's `prompt_lengths` are ignored, so
        `model(**batch)` works.
        """
        if input_ids.shape[0] % 2:
            raise ValueError(f"reward batch must hold 2B rows (chosen then rejected), got {input_ids.shape[0]}")
        values = self.token_values(
            input_ids, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache
        )
        half = input_ids.shape[0] // 2
        chosen_ids, rejected_ids = input_ids[:half], input_ids[half:]
        chosen_values, rejected_values = values[:half], values[half:]
        chosen_end = gather_at(chosen_values, self.end_index(chosen_ids))
        rejected_end = gather_at(rejected_values, self.end_index(rejected_ids))
        if self.compute_fp32_loss:
            chosen_values, rejected_values = chosen_values.float(), rejected_values.float()
        if self.loss_type == "end":
            if self.compute_fp32_loss:
                loss = pairwise_reward_loss(chosen_end.float(), rejected_end.float())
            else:
                loss = pairwise_reward_loss(chosen_end, rejected_end)
        else:
            loss = divergence_reward_loss(
                chosen_ids, rejected_ids, chosen_values, rejected_values,
                self.PAD_ID, self.num_padding_at_beginning,
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
        """Per-token values [B, L] (critic), or with `return_value_only=False` also
        `chosen_end_scores` [B]: the value before the first pad at or after `prompt_length` (reward).

        Pass `prompt_length` = the (padded) prompt width so left pads are not taken as the end.
        """
        values = self.token_values(
            input_ids, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache
        )
        if return_value_only:
            return values
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        end_scores = gather_at(values, self.end_index(input_ids, prompt_length))
        return {"values": values, "chosen_end_scores": end_scores}
