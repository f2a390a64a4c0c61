"""The one held-out evaluation of a policy under training (DPO's and PPO's `eval/*` metrics and keep-best).

Why one: "is the policy getting better?" must be answered the same way by every stage that trains a
policy, or the two stages' `eval/reward` curves (and the steps keep-best keeps) cannot be compared.
`HeldOutEvaluator` answers a fixed set of left-padded held-out prompts with a `Generator`, then reports the
generation signals (`dschat.rlhf.health.generation_health`), the policy's per-token entropy on its own
answers, the mean reward-model score (`eval/reward`) and the mean gold score (`eval/gold`, when a gold
function is known); the stage hands the metrics to its `KeepBest` (`dschat.rlhf.health`).

With a second, held-out reward model (trained on pairs the first never saw) the same answers are scored by
both: `eval/reward_heldout`, and the two standardised by their own first evaluation and their gap
(`eval/reward_z`, `eval/reward_heldout_z`, `eval/reward_gap`; `dschat.rlhf.health.RewardGap`), the
over-optimisation signal the stage's `HealthMonitor` judges.

Masks are positions: the prompt mask comes from the prompt collator, each answer runs from the prompt width
to its first eos (included), so an eos or pad token inside a chat prompt is attended to like any other.
The reward is read by the one reader (`RewardScorer.score_rollouts` -> `RewardModel.read_end_scores`), the
very function PPO scores its rollouts with; a reward model with another vocabulary gets texts instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from dschat.rlhf.generation import Generator, answer_token_lists, decode_continuations, rollout_attention_mask
from dschat.rlhf.health import RewardGap, generation_health, mean_gold
from dschat.rlhf.ppo_math import entropy_from_logits
from dschat.utils.inference import RewardScorer
from dschat.utils.model.masks import position_ids_from_mask


def prompt_texts(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
    """Each prompt's real tokens as text with its special tokens kept (a chat template survives), less a
    leading BOS (the tokenizer that reads the text adds its own)."""
    bos = tokenizer.bos_token_id
    rows = []
    for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        rows.append(real[1:] if real and bos is not None and real[0] == bos else real)
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


def rollout_rewards(scorer: RewardScorer, policy_tokenizer, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_width: int, same_vocabulary: bool | None = None) -> torch.Tensor:
    """Reward of generated rows [B]: by id when the reward model reads the policy's ids (PPO's rollout
    scoring), else as prompt and answer texts in the reward model's own tokenisation."""
    if same_vocabulary is None:
        same_vocabulary = scorer.shares_vocabulary(policy_tokenizer)
    if same_vocabulary:
        return scorer.score_rollouts(sequences, attention_mask, prompt_width).float().cpu()
    prompt_mask = attention_mask[:, :prompt_width]
    prompts = prompt_texts(policy_tokenizer, sequences[:, :prompt_width], prompt_mask)
    real_prompts = [[t for t, m in zip(ids, mask) if m] for ids, mask in
                    zip(sequences[:, :prompt_width].tolist(), prompt_mask.tolist())]
    answers = answer_token_lists(sequences, prompt_width, policy_tokenizer.eos_token_id)
    texts = decode_continuations(policy_tokenizer, real_prompts, [[a] for a in answers])
    return torch.tensor(scorer.score(prompts, texts), dtype=torch.float32)


class HeldOutEvaluator:
    """Answers fixed held-out prompts ([N, P] left-padded ids + the collator's mask) and scores them.

    `scorer`: the reward model (None: no `eval/reward`); `heldout_scorer`: the held-out reward model (None: no
    `eval/reward_heldout` and no gap; it needs `scorer`); `gold`: `f(prompt, answer) -> float` (None: no
    `eval/gold`). `reward_gap` keeps the first evaluation's statistics (`state_dict` for a resumed run).
    """

    def __init__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokenizer, *,
                 scorer: RewardScorer | None = None, heldout_scorer: RewardScorer | None = None,
                 gold: Callable[[str, str], float] | None = None, batch_size: int = 16):
        if heldout_scorer is not None and scorer is None:
            raise ValueError("a held-out reward model is compared with the training one: pass scorer too")
        self.prompt_ids = prompt_ids
        self.prompt_mask = prompt_mask
        self.tokenizer = tokenizer
        self.scorers = {key: (scorer, scorer.shares_vocabulary(tokenizer))
                        for key, scorer in (("eval/reward", scorer), ("eval/reward_heldout", heldout_scorer))
                        if scorer is not None}
        self.gold = gold
        self.batch_size = max(1, batch_size)
        self.reward_gap = RewardGap() if heldout_scorer is not None else None

    def state_dict(self) -> dict:
        return {"reward_gap_baseline": dict(self.reward_gap.baseline)} if self.reward_gap is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.reward_gap is not None:
            self.reward_gap.baseline = dict(state.get("reward_gap_baseline") or {})

    @torch.no_grad()
    def evaluate(self, model, generator: Generator) -> dict[str, float]:
        """Greedy (the generator's settings) answers to every held-out prompt, then the metrics."""
        module = getattr(model, "module", model)  # modes on the module: an HE engine's eval() would swap kernels in
        with_positions = "position_ids" in inspect.signature(module.forward).parameters
        device = next(module.parameters()).device
        eos = generator.eos_token_id
        answers_ids: list[list[int]] = []
        rewards: dict[str, list[float]] = {key: [] for key in self.scorers}
        prompts_text: list[str] = []
        answers_text: list[str] = []
        entropy_sum, token_count = 0.0, 0.0
        was_training = module.training
        for start in range(0, self.prompt_ids.shape[0], self.batch_size):
            ids = self.prompt_ids[start:start + self.batch_size].to(device)
            mask = self.prompt_mask[start:start + self.batch_size].to(device)
            seq = generator.generate(ids, mask)
            module.eval()
            width = ids.shape[1]
            attention = rollout_attention_mask(seq, mask, eos)
            kwargs = {"position_ids": position_ids_from_mask(attention)} if with_positions else {}
            logits = model(seq, attention_mask=attention, use_cache=False, **kwargs).logits
            slots = attention[:, width:].float()
            entropy_sum += float((entropy_from_logits(logits[:, width - 1:-1]) * slots).sum())
            token_count += float(slots.sum())
            answers_ids += answer_token_lists(seq, width, eos)
            if self.gold is not None:
                prompts_text += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                answers_text += self.tokenizer.batch_decode(seq[:, width:], skip_special_tokens=True)
            for key, (scorer, same_vocabulary) in self.scorers.items():
                rewards[key] += rollout_rewards(scorer, self.tokenizer, seq, attention, width, same_vocabulary).tolist()
        module.train(was_training)
        texts = self.tokenizer.batch_decode(answers_ids, skip_special_tokens=True)
        metrics = generation_health(answers_ids, generator.max_new_tokens, texts)
        metrics["health/entropy"] = entropy_sum / max(token_count, 1.0)
        metrics["eval/answer_length"] = sum(len(a) for a in answers_ids) / max(1, len(answers_ids))
        for key, scores in rewards.items():
            if scores:
                metrics[key] = sum(scores) / len(scores)
        if self.reward_gap is not None and rewards["eval/reward"]:
            metrics.update(self.reward_gap.metrics(rewards["eval/reward"], rewards["eval/reward_heldout"]))
        if self.gold is not None:
            metrics["eval/gold"] = mean_gold(self.gold, prompts_text, answers_text)
        return metrics
