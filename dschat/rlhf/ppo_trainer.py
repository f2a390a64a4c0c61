"""PPO experience collection and updates: `PPOUpdater` (upstream's name `DeepSpeedPPOTrainer` stays).

It is not a `dschat.utils.trainer.Trainer` (the epoch/resume loop of SFT, RM and DPO): it owns one PPO
iteration over the engines of `DeepSpeedRLHFEngine` (rollouts in, losses out) and is driven by step 3's
`PPOLoop`, which owns epochs, states and logging.

Experience is a typed record (`dschat.rlhf.experience.Experience`, shapes documented there):
`sequence_rewards` is one reward-model score per rollout (upstream's key `rewards` still reads it), while
`compute_rewards` returns per-token rewards (the KL penalty on every answer token, the score on the last).
Masks are positions: the prompt's comes from the prompt collator, each answer's runs through its eos
(`generation.rollout_attention_mask`), so an eos or pad token inside a chat prompt is attended to.

The math lives in `ppo_math` (pure, unit-tested); this module wires it to the engines. Differences from
upstream, each deliberate:
- rollouts go through `generation.Generator` (Hybrid Engine only where it works, ZeRO-3 parameters
  gathered once per call, stop on eos), with upstream's greedy decoding unless --do_sample;
- model forwards get position ids computed from the attention mask, so left-padded prompts are
  positioned exactly as during generation (upstream relied on OPT doing this internally; --position_ids
  model restores upstream's), and a rollout's mask is positions, not `ids != pad` (--rollout_mask pad_token
  restores upstream's; both are part of --dschat_compat);
- the KL coefficient can be adaptive, the reward can be normalised by running statistics and the
  advantages whitened (all off by default), and every step reports TRL-style statistics.
"""

from __future__ import annotations

import inspect

import torch

from dschat.rlhf.experience import Experience
from dschat.rlhf.generation import (
    Generator,
    answer_lengths,
    answer_token_lists,
    decode_answers,
    decode_prompts,
    pad_token_mask,
)
from dschat.rlhf.health import generation_health
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
    token_log_probs,
    whiten,
    zero_after,
)
from dschat.steps.ppo_args import PPOSettings
from dschat.utils.dist import all_reduce
from dschat.utils.inference import RewardScorer
from dschat.utils.model.masks import position_ids_from_mask
from dschat.utils.model.reward_model import ending_text
from dschat.utils.printing import print_rank_0


def _accepts_position_ids(module: torch.nn.Module) -> bool:
    params = inspect.signature(module.forward).parameters
    return "position_ids" in params


class PPOUpdater:
    """One PPO iteration on the step-3 engines: `generate_experience(prompts, mask, step)` -> `Experience`
    (rollouts, log-probs, values, `sequence_rewards`); `train_rlhf(exp)` -> (actor loss, critic loss).
    Not a `Trainer`: `dschat.steps.ppo.PPOLoop` drives it."""

    def __init__(self, rlhf_engine, settings):
        settings = PPOSettings.adopt(settings)  # upstream's step-3 main passes its argparse Namespace
        self.rlhf_engine = rlhf_engine
        self.actor_model = rlhf_engine.actor
        self.critic_model = rlhf_engine.critic
        self.ref_model = rlhf_engine.ref
        self.reward_model = rlhf_engine.reward
        self.reward_ending_ids = rlhf_engine.reward_ending_ids
        # the one reward reader, around the reward engine: rollouts here and held-out evaluations alike
        self.reward_scorer = RewardScorer(self.reward_model, rlhf_engine.tokenizer,
                                          ending_text(rlhf_engine.reward_ending, rlhf_engine.tokenizer),
                                          ending=rlhf_engine.reward_ending)
        self.actor_ema = rlhf_engine.actor_ema
        self.tokenizer = rlhf_engine.tokenizer
        self.settings = settings
        self.max_answer_seq_len = settings.max_answer_seq_len
        self.pad_token_id = self.tokenizer.pad_token_id
        self.end_of_conversation_token_id = self.tokenizer.eos_token_id
        self.z3_enabled = settings.actor_zero_stage == 3
        self.compute_fp32_loss = settings.fp32_loss

        # PPO constants (upstream hard-coded them; flags here with the same defaults).
        if settings.kl_target:
            self.kl_controller = AdaptiveKLController(settings.init_kl_coef, settings.kl_target, settings.kl_horizon)
        else:
            self.kl_controller = FixedKLController(settings.init_kl_coef)
        self.clip_reward_value = settings.clip_reward_value
        self.cliprange = settings.cliprange
        self.cliprange_value = settings.cliprange_value
        self.gamma = settings.gamma
        self.lam = settings.lam
        self.reward_stats = RunningMeanStd() if settings.normalize_reward else None
        self.whiten_advantages = settings.whiten_advantages

        self.generator = Generator(
            self.actor_model, self.tokenizer, max_new_tokens=settings.max_answer_seq_len, sampling=settings.sampling,
            zero_stage=settings.actor_zero_stage, enable_hybrid_engine=settings.enable_hybrid_engine,
            gather_params=False if settings.unpin_actor_parameters else None,
        )
        # --position_ids model (upstream): forwards get no position ids, whatever the model does then
        self._actor_position_ids = settings.positions_from_mask and _accepts_position_ids(self.actor_model.module)
        self._ref_position_ids = settings.positions_from_mask and _accepts_position_ids(self.ref_model.module)
        self._last_kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_train_stats: dict[str, torch.Tensor] = {}
        self.last_health: dict[str, float] = {}  # answer checks of the last rollout batch, before any drop
        self.generate_time = 0.0  # seconds the last rollout batch took to generate (upstream's attribute)

    @property
    def kl_ctl(self) -> float:
        """Upstream attribute name: the current KL coefficient."""
        return self.kl_controller.value

    # ---- helpers
    def _lm_logits(self, engine, seq: torch.Tensor, attention_mask: torch.Tensor, with_positions: bool):
        kwargs = {"attention_mask": attention_mask, "use_cache": False}
        if with_positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        return engine(seq, **kwargs).logits

    def _print_answers(self, prompts: torch.Tensor, seq: torch.Tensor, step: int) -> None:
        settings = self.settings
        if not settings.print_answers or step % max(1, settings.print_answers_interval) != 0:
            return
        width = prompts.shape[1]
        for prompt, answer in zip(decode_prompts(self.tokenizer, prompts), decode_answers(self.tokenizer, seq, width)):
            print_rank_0(f"--- prompt --> step={step}\n{prompt}\n--- answer --> step={step}\n{answer}")

    def _generate_sequence(self, prompts: torch.Tensor, mask: torch.Tensor, step: int):
        """Generate, then drop rows whose answer has <= 1 token, its eos counted (upstream's rule);
        returns (prompts, prompt mask, sequences)."""
        seq = self.generator.generate(prompts, mask)
        self._print_answers(prompts, seq, step)
        width = prompts.shape[1]
        answers = answer_token_lists(seq, width, self.end_of_conversation_token_id)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        self.last_health = {**generation_health(answers, self.max_answer_seq_len, texts), "rows": float(len(answers))}
        keep = self.rollout_mask(seq, mask)[:, width:].sum(dim=1) > 1
        if not bool(keep.all()):
            print_rank_0(f"Dropping {int((~keep).sum())} too short generated answer(s) (<= 1 token)")
        if bool(keep.any()):
            kept = (prompts[keep], mask[keep], seq[keep])
            self._last_kept = kept
            return kept
        if self._last_kept is not None:
            print_rank_0("every answer of this batch was too short; reusing the previous batch's rollouts")
            return self._last_kept
        print_rank_0("every answer of the first batch was too short; training on them anyway")
        return prompts, mask, seq

    def rollout_mask(self, seq: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Which positions of the rollouts are real: the prompt collator's mask, then each answer through its
        eos; under --rollout_mask pad_token (--dschat_compat) upstream's `ids != pad`."""
        if self.settings.rollout_mask == "pad_token":
            return pad_token_mask(seq, self.pad_token_id)
        return self.generator.attention_mask(seq, prompt_mask)

    def _normalized_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.reward_stats is None:
            return scores
        s = scores.detach().float()
        moments = all_reduce(torch.stack([s.sum(), (s * s).sum(), torch.tensor(float(s.numel()), device=s.device)]))
        total, total_sq, count = moments.tolist()
        mean = total / max(count, 1.0)
        self.reward_stats.update_from_moments(mean, max(total_sq / max(count, 1.0) - mean * mean, 0.0), count)
        return self.reward_stats.normalize(scores.float()).to(scores.dtype)

    # ---- experience
    @torch.no_grad()
    def generate_experience(self, prompts: torch.Tensor, mask: torch.Tensor, step: int) -> Experience:
        """Rollouts for left-padded `prompts` [B, P] with the prompt collator's `mask`, scored and valued."""
        self.eval()
        prompts, prompt_mask, seq = self._generate_sequence(prompts, mask, step)
        stats = dict(self.generator.last_stats)
        self.generate_time = float(stats.get("generate_time", 0.0))
        self.train()
        attention_mask = self.rollout_mask(seq, prompt_mask)
        width = prompts.shape[1]

        logits = self._lm_logits(self.actor_model, seq, attention_mask, self._actor_position_ids)
        ref_logits = self._lm_logits(self.ref_model, seq, attention_mask, self._ref_position_ids)
        raw_scores = self.reward_scorer.score_rollouts(seq, attention_mask, width)
        values = self.critic_model.forward_value(seq, attention_mask, return_value_only=True)[:, :-1]

        logprobs = token_log_probs(logits, seq, self.compute_fp32_loss)
        ref_logprobs = token_log_probs(ref_logits, seq, self.compute_fp32_loss)
        answer_slots = attention_mask[:, width:]  # slots width-1 .. T-2 predict the answer tokens (eos included)
        entropy = (entropy_from_logits(logits[:, width - 1:-1, :]) * answer_slots).sum(dim=1)
        kl = ((logprobs[:, width - 1:].float() - ref_logprobs[:, width - 1:].float()) * answer_slots).sum(dim=1)
        return Experience(
            prompts=prompts,
            sequences=seq,
            attention_mask=attention_mask,
            token_log_probs=logprobs,
            ref_token_log_probs=ref_logprobs,
            values=values,
            sequence_rewards=self._normalized_scores(raw_scores),
            raw_sequence_rewards=raw_scores.detach().float(),
            kl=kl,
            entropy=entropy,
            answer_length=answer_lengths(seq, width, self.end_of_conversation_token_id).float(),
            generate_time=torch.tensor(float(stats.get("generate_time", 0.0))),
            generated_tokens=torch.tensor(float(stats.get("answer_tokens", 0))),
        )

    # ---- upstream-named building blocks
    def compute_rewards(self, prompts, log_probs, ref_log_probs, reward_score, action_mask):
        """Per-token rewards (batch x answer slots) from the per-sequence `reward_score` (upstream's name)."""
        start = prompts.shape[1] - 1
        return compute_kl_penalized_rewards(log_probs, ref_log_probs, reward_score, action_mask, start,
                                            self.kl_ctl, self.clip_reward_value)

    def get_advantages_and_returns(self, values, rewards, start):
        return compute_gae(values, rewards, start, self.gamma, self.lam)

    # ---- update
    def train_rlhf(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = exp.prompts
        log_probs = exp.token_log_probs
        ref_log_probs = exp.ref_token_log_probs
        sequence_rewards = exp.sequence_rewards
        values = exp.values
        attention_mask = exp.attention_mask
        seq = exp.sequences

        start = exp.prompt_width - 1
        action_mask = exp.action_mask
        with torch.no_grad():
            token_rewards = self.compute_rewards(prompts, log_probs, ref_log_probs, sequence_rewards, action_mask)
            old_values = zero_after(values, answer_end_slots(action_mask, start))
            advantages, returns = self.get_advantages_and_returns(old_values, token_rewards, start)
            if self.whiten_advantages:
                advantages = whiten(advantages, action_mask[:, start:])

        logits = self._lm_logits(self.actor_model, seq, attention_mask, self._actor_position_ids)
        new_logprobs = token_log_probs(logits, seq, self.compute_fp32_loss)
        mask = action_mask[:, start:]
        a_loss, clipfrac, approx_kl = actor_loss(new_logprobs[:, start:], log_probs[:, start:], advantages, mask,
                                                 self.cliprange)
        self.actor_model.backward(a_loss)
        if not self.settings.align_overflow:
            self.actor_model.step()

        new_values = self.critic_model.forward_value(seq, attention_mask, return_value_only=True, use_cache=False)[:, :-1]
        if self.compute_fp32_loss:
            new_values, old_values_c, returns_c = new_values.float(), old_values.float(), returns.float()
        else:
            old_values_c, returns_c = old_values, returns
        c_loss, v_clipfrac = critic_loss(new_values[:, start:], old_values_c[:, start:], returns_c, mask,
                                         self.cliprange_value)
        self.critic_model.backward(c_loss)
        if self.settings.align_overflow:
            self._align_overflow()
            self.actor_model.step()
        self.critic_model.step()

        self.last_train_stats = {
            "policy/clipfrac": clipfrac.detach().float(),
            "policy/approxkl": approx_kl.detach().float(),
            "val/clipfrac": v_clipfrac.detach().float(),
            "val/mean": (old_values[:, start:] * mask).sum().float() / mask.sum().clamp(min=1),
            "returns/mean": (returns * mask).sum().float() / mask.sum().clamp(min=1),
            "advantages/mean": (advantages * mask).sum().float() / mask.sum().clamp(min=1),
        }
        return a_loss, c_loss

    def _align_overflow(self) -> None:
        """fp16: if exactly one of actor/critic overflowed, make the other skip its step as well."""
        actor_opt, critic_opt = self.actor_model.optimizer, self.critic_model.optimizer
        check_a = getattr(actor_opt, "check_overflow", None)
        check_c = getattr(critic_opt, "check_overflow", None)
        if check_a is None or check_c is None:
            return
        actor_overflow, critic_overflow = check_a(external=True), check_c(external=True)
        if actor_overflow and not critic_overflow:
            critic_opt.skip_step = True
            print_rank_0("OVERFLOW: actor overflow, skipping both actor and critic steps")
        elif critic_overflow and not actor_overflow:
            actor_opt.skip_step = True
            print_rank_0("OVERFLOW: critic overflow, skipping both actor and critic steps")
        elif actor_overflow and critic_overflow:
            print_rank_0("OVERFLOW: actor and critic overflow, skipping both actor and critic steps")

    def get_overflow(self) -> tuple[bool, bool]:
        """(actor, critic): whether each one's last step was skipped for fp16 overflow (upstream's name)."""
        return (bool(getattr(self.actor_model.optimizer, "overflow", False)),
                bool(getattr(self.critic_model.optimizer, "overflow", False)))

    def overflowed(self) -> bool:
        """Whether the last actor or critic step was skipped for fp16 overflow (always False otherwise)."""
        return any(self.get_overflow())

    # ---- modes
    def train(self) -> None:
        self.actor_model.train()
        self.critic_model.train()

    def eval(self) -> None:
        self.actor_model.eval()
        self.critic_model.eval()
        self.reward_model.eval()
        self.ref_model.eval()

    def _validate_training_mode(self) -> None:
        assert self.actor_model.module.training
        assert self.critic_model.module.training


class PPOUpdaterUnsupervised(PPOUpdater):
    """Adds the pretraining (language-modelling) loss on unsupervised data, InstructGPT's PPO-ptx."""

    def train_unsupervised(self, inputs: dict, unsup_coef: float) -> torch.Tensor:
        self._validate_training_mode()
        outputs = self.actor_model(**inputs, use_cache=False)
        loss = outputs.loss
        self.actor_model.backward(unsup_coef * loss)
        self.actor_model.step()
        return loss


# Upstream's names (DeepSpeed-Chat step-3 scripts import them from here).
DeepSpeedPPOTrainer = PPOUpdater
DeepSpeedPPOTrainerUnsupervised = PPOUpdaterUnsupervised
