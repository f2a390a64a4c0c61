"""PPO's experience record: one batch of rollouts and everything the update needs about them.

Shapes: B rollouts, prompts left-padded to width P, rows T = P + answer width long. Tensors on the
"slot" axis have T - 1 entries: slot t is about predicting token t + 1 (`dschat.rlhf.ppo_math`), so the
first slot whose target is an answer token is P - 1.

Upstream DeepSpeed-Chat passed a dict (`prompts`, `logprobs`, `ref_logprobs`, `value`, `rewards`,
`input_ids`, `attention_mask`); its step-3 mains read `out["rewards"]` and hand the batch to
`MiniDataset`. `Experience["rewards"]` etc. still answer under those keys, and slicing (`exp[a:b]`) and
`len(exp)` are what `MiniDataset` needs, so an upstream main keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# upstream's dict key -> field
UPSTREAM_KEYS = {
    "prompts": "prompts",
    "logprobs": "token_log_probs",
    "ref_logprobs": "ref_token_log_probs",
    "value": "values",
    "rewards": "sequence_rewards",
    "input_ids": "sequences",
    "attention_mask": "attention_mask",
}


@dataclass(frozen=True)
class Experience:
    """A batch of PPO rollouts (frozen; every field is a tensor, per rollout unless marked scalar)."""

    prompts: torch.Tensor               # [B, P] prompt ids, left-padded (P is the prompt width)
    sequences: torch.Tensor             # [B, T] prompt then generated answer, padding after each answer's eos
    attention_mask: torch.Tensor        # [B, T] 1 on real tokens: the prompt collator's mask, then each answer
                                        # through its eos (positions, never inferred from token ids)
    token_log_probs: torch.Tensor       # [B, T-1] actor log p(token t+1 | tokens <= t) when generated
    ref_token_log_probs: torch.Tensor   # [B, T-1] the same under the frozen reference
    values: torch.Tensor                # [B, T-1] critic value at token t
    sequence_rewards: torch.Tensor      # [B] reward-model score per rollout (normalised with --normalize_reward)
    raw_sequence_rewards: torch.Tensor  # [B] the score before normalisation (statistics)
    kl: torch.Tensor                    # [B] sum over answer tokens of actor - reference log-prob (statistics)
    entropy: torch.Tensor               # [B] sum over answer tokens of the actor's entropy (statistics)
    answer_length: torch.Tensor         # [B] answer tokens before the eos (statistics)
    generate_time: torch.Tensor         # scalar: seconds spent generating the batch (statistics)
    generated_tokens: torch.Tensor      # scalar: answer tokens generated (statistics)

    @property
    def prompt_width(self) -> int:
        return self.prompts.shape[1]

    @property
    def action_mask(self) -> torch.Tensor:
        """[B, T-1]: slot t counts when token t+1 is real (upstream: `attention_mask[:, 1:]`)."""
        return self.attention_mask[:, 1:]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, key):
        """`exp[a:b]`: rollouts a..b-1 (scalars kept); `exp["rewards"]`: a field by upstream key or name."""
        if isinstance(key, slice):
            return replace(self, **{f.name: _rows(getattr(self, f.name), key) for f in fields(self)})
        if isinstance(key, str):
            return getattr(self, UPSTREAM_KEYS.get(key, key))
        raise TypeError(f"Experience indices are slices or field names, not {type(key).__name__}")

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _rows(value: torch.Tensor, rows: slice) -> torch.Tensor:
    return value if value.dim() == 0 else value[rows]
