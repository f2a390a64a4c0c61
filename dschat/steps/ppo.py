"""Step 3: PPO fine-tuning of the actor against the step-2 reward model (DeepSpeed-Chat compatible).

The settings (`PPOSettings`, its flags) live in `dschat.steps.ppo_args` (`parse_args` is re-exported here,
where upstream-style scripts import it). `build(settings)` returns a `PPOLoop` whose `train()` runs the generate -> score -> update cycle
and whose `save_model()` writes `actor/`, `critic/` and `actor_ema/`.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from itertools import repeat
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dschat.rlhf import health
from dschat.rlhf.experience import Experience
from dschat.rlhf.generation import Generator
from dschat.rlhf.held_out import HeldOutEvaluator
from dschat.rlhf.ppo_trainer import PPOUpdater, PPOUpdaterUnsupervised
from dschat.rlhf.rlhf_engine import DeepSpeedRLHFEngine
from dschat.steps import train_main
from dschat.steps.ppo_args import PPOSettings, parse_args, recorded_settings
from dschat.utils import startup
from dschat.utils.build import (
    build_tokenizer,
    check_context_length,
    end_of_text,
    set_gradient_checkpointing,
)
from dschat.utils.data.collators import DataCollatorRLHF, MiniDataset
from dschat.utils.data.prompt_datasets import create_prompt_dataset, data_record, get_unsupervised_data
from dschat.utils.device import to_device
from dschat.utils.dist import all_reduce, barrier, get_local_rank, is_rank_0
from dschat.utils.ema import ExponentialMovingAverage, moving_average
from dschat.utils.errors import UserError, run_main
from dschat.utils.files import atomic_write_json
from dschat.utils.model_card import push_to_hub
from dschat.utils.output_dir import prepare_output_dir, publish_directory
from dschat.utils.printing import print_rank_0
from dschat.utils.saving import save_reward_model, save_stage_model
from dschat.utils.seeding import set_random_seed
from dschat.utils.trainer import (
    MetricLogger,
    ResumableRun,
    log_data_record,
    make_loader,
    reduce_mean_metrics,
)
from dschat.utils.zero import is_zero3

__all__ = ["PPOLoop", "PPOSettings", "build", "main", "parse_args", "prepare"]


def check_actor_positions(settings) -> None:
    """prompt + answer must fit the actor's position table (else generation indexes past it)."""
    check_context_length(settings.actor_model_name_or_path, "--actor_model_name_or_path",
                         settings.max_prompt_seq_len + settings.max_answer_seq_len, "--max_prompt_seq_len + --max_answer_seq_len")


# --------------------------------------------------------------------------------------------- build


def prepare(settings):
    """Everything before the engines: checks, seed, tokenizer, prompt (and unsupervised) datasets."""
    check_actor_positions(settings)
    if settings.seed is None:
        print_rank_0("warning: --seed is not set (upstream step-3 default); steps 1-2 used 1234, so the phase-3 "
                     "split may overlap their prompts and the run is not reproducible; pass --seed 1234")
    set_random_seed(settings.seed)
    tokenizer = build_tokenizer(settings, settings.actor_model_name_or_path)
    prompts, held_out = create_prompt_dataset(
        get_local_rank(), settings.data_path, settings.data_split, settings.data_output_path, 3, settings.seed, tokenizer,
        settings.max_prompt_seq_len, end_of_conversation_token=end_of_text(settings, tokenizer),
        rebuild=settings.rebuild_data_cache, column_map=settings.column_map, chat_format=settings.chat_format,
        keep_truncated=settings.keep_truncated,
    )
    if len(prompts) == 0:
        raise UserError(f"--data_path {' '.join(settings.data_path)}: no prompts of at most --max_prompt_seq_len "
                        f"{settings.max_prompt_seq_len} tokens")
    unsup = None
    if settings.unsupervised_enabled:
        unsup = get_unsupervised_data(settings, tokenizer)
        if hasattr(unsup, "keys") and "train" in unsup.keys():  # upstream returned the whole DatasetDict
            unsup = unsup["train"]
    return tokenizer, prompts, unsup, held_out


def count_total_iters(settings, num_prompt_batches: int, num_unsup_batches: int | None) -> int:
    """Optimizer steps for the LR schedules (upstream's formula, capped by --max_steps)."""
    batches = min(num_prompt_batches, num_unsup_batches) if num_unsup_batches is not None else num_prompt_batches
    per_batch = (settings.per_device_generation_batch_size / settings.per_device_training_batch_size
                 * settings.ppo_epochs / settings.gradient_accumulation_steps)
    total = int(settings.num_train_epochs * batches * per_batch)
    if settings.max_steps:
        total = min(total, math.ceil(settings.max_steps * settings.generation_batches * per_batch))
    return max(1, total)


def build(settings) -> PPOLoop:
    prepare_output_dir(settings.output_dir)
    tokenizer, prompts, unsup, held_out = prepare(settings)
    seed = settings.seed or 0
    prompt_loader = make_loader(prompts, settings.per_device_generation_batch_size,
                                DataCollatorRLHF(settings.max_prompt_seq_len, pad_token_id=tokenizer.pad_token_id,
                                                 padding=settings.padding),
                                shuffle=True, seed=seed, group_lengths=settings.groups_by_length,
                                upstream_order=settings.upstream_order)
    unsup_loader = None
    if unsup is not None:
        # transformers takes seconds to import (it is not otherwise needed before the engines are built)
        from transformers import default_data_collator

        unsup_loader = make_loader(unsup, settings.per_device_generation_batch_size, default_data_collator,
                                   shuffle=True, seed=seed, upstream_order=settings.upstream_order)
    num_total_iters = count_total_iters(settings, len(prompt_loader), len(unsup_loader) if unsup_loader else None)
    engine = DeepSpeedRLHFEngine(settings.actor_model_name_or_path, settings.critic_model_name_or_path, tokenizer, settings,
                                 num_total_iters)
    updater = (PPOUpdaterUnsupervised if settings.unsupervised_enabled else PPOUpdater)(engine, settings)
    loop = PPOLoop(settings, engine, updater, prompt_loader, unsup_loader, tokenizer, num_total_iters)
    if settings.eval_steps and settings.eval_prompts:
        batch = held_out_prompt_batch(settings, held_out, prompts, tokenizer)
        gold = health.load_gold_reward(settings.gold_reward) if settings.gold_reward else None
        heldout = settings.heldout_reward_model_name_or_path
        loop.evaluator = HeldOutEvaluator(batch["prompt"], batch["prompt_att_mask"], tokenizer,
                                          scorer=updater.reward_scorer, gold=gold,
                                          heldout_scorer=engine.heldout_reward_scorer(heldout) if heldout else None,
                                          batch_size=settings.per_device_generation_batch_size)
    return loop


def held_out_prompt_batch(settings, held_out, train_prompts, tokenizer) -> dict[str, torch.Tensor]:
    """The first --eval_prompts prompts of the phase-3 eval split (else of the training prompts), left-padded."""
    dataset = held_out if held_out is not None and len(held_out) else train_prompts
    count = min(settings.eval_prompts, len(dataset))
    source = "eval-split" if dataset is held_out else "training (the data has no eval split)"
    print_rank_0(f"Held-out evaluation every {settings.eval_steps} steps on {count} {source} prompts")
    collate = DataCollatorRLHF(settings.max_prompt_seq_len, pad_token_id=tokenizer.pad_token_id, padding="longest")
    return collate([dataset[i] for i in range(count)])


# --------------------------------------------------------------------------------------------- loop


def _resolved(path: str) -> str:
    """Absolute path for local files/directories (provenance survives a `cd`); hub ids unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def kl_budget(settings, kl_coef: float) -> dict:
    """The KL budget a run was held to: the adaptive controller's target (nats per answer) and horizon, or a fixed
    coefficient (DeepSpeed-Chat's default: nothing bounds the KL itself), and the coefficient now."""
    if settings.kl_target is None:
        return {"controller": "fixed", "kl_coef": settings.init_kl_coef, "kl_target": None}
    return {"controller": "adaptive", "kl_target": settings.kl_target, "kl_horizon": settings.kl_horizon,
            "init_kl_coef": settings.init_kl_coef, "kl_coef": kl_coef}


class PPOLoop(ResumableRun):
    """Epochs over the prompts; every `generation_batches` rollouts one PPO update ("step")."""

    name = "step3"

    def __init__(self, settings, rlhf_engine, updater, prompt_loader: DataLoader, unsup_loader: DataLoader | None,
                 tokenizer, num_total_iters: int):
        self.settings = settings
        self.rlhf_engine = rlhf_engine
        self.updater = updater  # a PPOUpdater (upstream: DeepSpeedPPOTrainer): one PPO iteration, not a loop
        self.prompt_loader = prompt_loader
        self.unsup_loader = unsup_loader
        self.tokenizer = tokenizer
        self.num_total_iters = num_total_iters
        self.device = rlhf_engine.actor.device
        self.logger = MetricLogger.from_settings(settings, "step3")
        self.reward_ema = ExponentialMovingAverage(0.9)
        self.global_step = 0          # PPO updates done
        self.epoch = 0
        self.step_in_epoch = 0        # prompt batches consumed in this epoch
        self.non_overflow_steps = 0
        self._stop_requested = False
        self._round: dict[str, torch.Tensor] = {}
        self.monitor = health.HealthMonitor("step3", settings.health_thresholds)
        self.best = health.KeepBest(f"eval/{settings.best_metric}")
        self.evaluator: HeldOutEvaluator | None = None
        self.data_record = data_record(prompt_loader.dataset)  # what the prompt build dropped (logged at step 0)

    # ---- state
    def _ema_partitioned(self) -> bool:
        ema = self.rlhf_engine.actor_ema
        return ema is not None and is_zero3(ema.module)

    batch_size_flag = "per_device_generation_batch_size"

    def order_loader(self) -> DataLoader:
        return self.prompt_loader

    def engines(self) -> dict:
        """Engines saved as DeepSpeed checkpoints. A ZeRO-3 EMA has no optimizer, and DeepSpeed cannot
        checkpoint an optimizer-less ZeRO-3 engine, so its partitions travel in the per-rank state."""
        engines = {"actor": self.rlhf_engine.actor, "critic": self.rlhf_engine.critic}
        if self.rlhf_engine.actor_ema is not None and not self._ema_partitioned():
            engines["actor_ema"] = self.rlhf_engine.actor_ema
        return engines

    def rank_state(self) -> dict:
        if not self._ema_partitioned():
            return {}
        params = self.rlhf_engine.actor_ema.module.parameters()
        return {"actor_ema_partitions": [getattr(p, "ds_tensor", p.data).detach().cpu().clone() for p in params]}

    def load_rank_state(self, state: dict) -> None:
        saved = state.get("actor_ema_partitions")
        if saved is None or not self._ema_partitioned():
            return
        params = list(self.rlhf_engine.actor_ema.module.parameters())
        if len(saved) != len(params):
            raise RuntimeError(f"EMA state has {len(saved)} tensors, the model {len(params)}")
        with torch.no_grad():
            for param, value in zip(params, saved):
                target = getattr(param, "ds_tensor", param.data)
                target.copy_(value.to(device=target.device, dtype=target.dtype).view_as(target))

    def extra_state(self) -> dict:
        updater = self.updater
        return {
            "kl_controller": updater.kl_controller.state_dict(),
            "reward_normalizer": updater.reward_stats.state_dict() if updater.reward_stats else None,
            "reward_ema": self.reward_ema.ema,
            "non_overflow_steps": self.non_overflow_steps,
            "health": self.monitor.state_dict(),
            "keep_best": self.best.state_dict(),
            "held_out": self.evaluator.state_dict() if self.evaluator is not None else {},
        }

    def load_extra_state(self, state: dict) -> None:
        updater = self.updater
        if state.get("kl_controller"):
            updater.kl_controller.load_state_dict(state["kl_controller"])
        if state.get("reward_normalizer") and updater.reward_stats is not None:
            updater.reward_stats.load_state_dict(state["reward_normalizer"])
        self.reward_ema.ema = state.get("reward_ema")
        self.non_overflow_steps = int(state.get("non_overflow_steps", self.global_step))
        self.monitor.load_state_dict(state.get("health") or {"baseline": state.get("health_baseline", {})})
        self.best.load_state_dict(state.get("keep_best", {}))
        if self.evaluator is not None:
            self.evaluator.load_state_dict(state.get("held_out", {}))

    # ---- loop
    def _done(self) -> bool:
        settings = self.settings
        if settings.max_steps and self.global_step >= settings.max_steps:
            return True
        return bool(settings.enable_test_mode and settings.test_stop_step and self.non_overflow_steps >= settings.test_stop_step)

    def _total_steps(self) -> int:
        """PPO updates this run makes: one per --generation_batches prompt batches, capped by --max_steps."""
        total = self.settings.num_train_epochs * self._batches_per_epoch() // self.settings.generation_batches
        return min(total, self.settings.max_steps) if self.settings.max_steps else total

    def _batches_per_epoch(self) -> int:
        n = math.ceil(self.prompt_loader.sampler.num_samples / self.settings.per_device_generation_batch_size)
        if self.unsup_loader is not None:
            n = min(n, math.ceil(self.unsup_loader.sampler.num_samples / self.settings.per_device_generation_batch_size))
        return n

    def train(self) -> None:
        try:
            with self.sigterm_saves_state():
                self._maybe_resume()
                print_rank_0(f"***** Running training (total_iters={self.num_total_iters}) *****")
                per_epoch = self._batches_per_epoch() // self.settings.generation_batches
                self.logger.start(self.global_step, self._total_steps(), epochs=self.settings.num_train_epochs,
                                  steps_per_epoch=per_epoch)
                if self.global_step == 0:
                    log_data_record(self.logger, self.data_record, self.settings)
                    self._maybe_evaluate()
                self._run_epochs()
                self._maybe_evaluate(final=True)
        finally:
            self.logger.close()
        barrier()

    def _run_epochs(self) -> None:
        settings = self.settings
        exp_buffer = MiniDataset(settings.generation_batches, settings.per_device_training_batch_size)
        unsup_buffer = MiniDataset(settings.generation_batches, settings.per_device_training_batch_size)
        run_info_written = False  # written after the first update: a run refused at its first batch leaves none
        while self.epoch < settings.num_train_epochs and not self._done():
            per_epoch = self._batches_per_epoch()
            start = self.step_in_epoch * settings.per_device_generation_batch_size
            self.prompt_loader.sampler.set_epoch(self.epoch, start=start)
            unsup_iter = repeat(None)
            if self.unsup_loader is not None:
                self.unsup_loader.sampler.set_epoch(self.epoch, start=start)
                unsup_iter = iter(self.unsup_loader)
            print_rank_0(f"Beginning of Epoch {self.epoch + 1}/{settings.num_train_epochs}, "
                         f"Total Generation Batches {per_epoch}")
            bar = tqdm(total=math.ceil(per_epoch / settings.generation_batches),
                       initial=self.step_in_epoch // settings.generation_batches, disable=not is_rank_0(),
                       desc=f"step3 epoch {self.epoch + 1}/{settings.num_train_epochs}", dynamic_ncols=True)
            for batch_prompt, batch_unsup in zip(self.prompt_loader, unsup_iter):
                if self.step_in_epoch >= per_epoch:
                    break
                batch_prompt = to_device(batch_prompt, self.device)
                exp = self.updater.generate_experience(batch_prompt["prompt"], batch_prompt["prompt_att_mask"],
                                                       self.epoch * per_epoch + self.step_in_epoch)
                self._accumulate_experience(exp)
                self.step_in_epoch += 1
                exp_batches = exp_buffer.add(exp)
                unsup_batches = None
                if batch_unsup is not None:
                    unsup_batches = unsup_buffer.add(to_device(batch_unsup, self.device))
                if exp_batches is None:
                    continue
                if unsup_batches is None:
                    unsup_batches = [None] * len(exp_batches)
                self._train_round(exp_batches, unsup_batches)
                if not run_info_written:
                    self._write_run_info(final=False)
                    run_info_written = True
                bar.update(1)
                self._maybe_evaluate()
                self.after_step()
                if self._done():
                    break
            bar.close()
            if self._done() and self.step_in_epoch < per_epoch:
                break
            self.epoch += 1
            self.step_in_epoch = 0

    # ---- one PPO update
    def _accumulate_experience(self, exp: Experience) -> None:
        """Per-sample statistics of one rollout batch, summed for the current round."""
        raw = exp.raw_sequence_rewards.float()
        stats = {
            "count": torch.tensor(float(raw.numel())),
            "reward_sum": raw.sum(),
            "reward_sq": (raw * raw).sum(),
            "kl_sum": exp.kl.float().sum(),
            "entropy_sum": exp.entropy.float().sum(),
            "length_sum": exp.answer_length.float().sum(),
            "gen_tokens": exp.generated_tokens.float(),
        }
        for key, value in stats.items():
            self._round[key] = self._round.get(key, torch.zeros((), device=self.device)) + value.to(self.device)
        self._round["gen_time"] = self._round.get("gen_time", torch.zeros((), device=self.device)) + \
            exp.generate_time.to(self.device)
        answers = dict(self.updater.last_health)  # every rollout of the batch, also those dropped as too short
        rows = answers.pop("rows", 0.0)
        for key, value in {"health_rows": 1.0, **answers}.items():
            weighted = torch.tensor(value * rows if key != "health_rows" else rows, device=self.device)
            self._round[key] = self._round.get(key, torch.zeros((), device=self.device)) + weighted

    def _train_round(self, exp_batches: list, unsup_batches: list) -> None:
        settings = self.settings
        engine = self.rlhf_engine
        start = time.time()
        if settings.actor_gradient_checkpointing:
            set_gradient_checkpointing(engine.actor.module, True)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count = 0
        for _ in range(settings.ppo_epochs):
            for exp, unsup in zip(exp_batches, unsup_batches):
                actor_loss, critic_loss = self.updater.train_rlhf(exp)
                startup.report()  # first optimizer step (once)
                sums["loss/policy"] += actor_loss.detach().float()
                sums["loss/value"] += critic_loss.detach().float()
                for key, value in self.updater.last_train_stats.items():
                    sums[key] += value.to(self.device)
                if unsup is not None:
                    sums["loss/unsupervised"] += self.updater.train_unsupervised(unsup, settings.unsup_coef).detach().float()
                if engine.actor_ema is not None:
                    moving_average(engine.actor.module, engine.actor_ema.module, beta=settings.ema_beta,
                                   zero_stage=settings.actor_zero_stage)
                count += 1
            random.shuffle(exp_batches)
            random.shuffle(unsup_batches)
        if settings.actor_gradient_checkpointing:
            set_gradient_checkpointing(engine.actor.module, False)
        train_time = time.time() - start
        self.global_step += 1
        if not self.updater.overflowed():
            self.non_overflow_steps += 1
        metrics = reduce_mean_metrics(dict(sums), count)
        metrics.update(self._round_metrics(train_time))
        self._round = {}
        self.updater.kl_controller.update(metrics["objective/kl"], int(metrics.pop("_samples")))
        self._log(metrics)
        self._check_health(metrics)

    def _round_metrics(self, train_time: float) -> dict[str, float]:
        """Reward / KL / entropy / length over all samples of the round and all ranks."""
        health_keys = sorted(k for k in self._round if k.startswith("health/"))
        keys = ("count", "reward_sum", "reward_sq", "kl_sum", "entropy_sum", "length_sum", "gen_tokens",
                "health_rows", *health_keys)
        totals = torch.stack([self._round[k].float().reshape(()) for k in keys])
        times = torch.tensor([float(self._round["gen_time"]), train_time], device=self.device)
        all_reduce(totals)
        all_reduce(times, "max")
        count, r_sum, r_sq, kl_sum, ent_sum, len_sum, tokens, rows, *health_sums = totals.tolist()
        n = max(count, 1.0)
        mean = r_sum / n
        kl = kl_sum / n
        gen_time, train_time = times.tolist()
        kl_coef = self.updater.kl_ctl
        return {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(r_sq / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)),
            "objective/kl": kl,
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": mean - kl_coef * kl,
            "objective/entropy": ent_sum / n,
            "health/entropy": ent_sum / max(len_sum, 1.0),
            **{key: value / max(rows, 1.0) for key, value in zip(health_keys, health_sums)},
            "answer_length": len_sum / n,
            "time/generation": gen_time,
            "time/training": train_time,
            "tokens_per_second/generation": tokens / max(gen_time, 1e-9),
            "lr/actor": self.rlhf_engine.actor.get_lr()[0],
            "lr/critic": self.rlhf_engine.critic.get_lr()[0],
            "_samples": count,
        }

    def _log(self, metrics: dict[str, float]) -> None:
        settings = self.settings
        metrics["reward/ema"] = self.reward_ema.update(metrics["reward/mean"])
        metrics["epoch"] = self.epoch + self.step_in_epoch / max(1, self._batches_per_epoch())
        self.logger.log(self.global_step, "train", metrics, echo=False)
        if self.global_step % max(1, settings.log_interval) == 0 or self._done():
            unsup = metrics.get("loss/unsupervised", 0.0)
            print_rank_0(f"Epoch: {self.epoch} | Step: {self.global_step} | PPO Epoch: {settings.ppo_epochs} | "
                         f"Actor Loss: {metrics['loss/policy']:.6f} | Critic Loss: {metrics['loss/value']:.6f} | "
                         f"Unsupervised Loss: {unsup:.6f}")
            print_rank_0(f"Average reward score: {metrics['reward/mean']:.6f} | "
                         f"EMA reward score: {metrics['reward/ema']:.6f}")
            print_rank_0(f"KL: {metrics['objective/kl']:.4f} (coef {metrics['objective/kl_coef']:.4g}) | "
                         f"answer length {metrics['answer_length']:.1f} | generation "
                         f"{metrics['time/generation']:.2f}s ({metrics['tokens_per_second/generation']:.1f} tok/s, "
                         f"{self.updater.generator.path}) | training {metrics['time/training']:.2f}s")

    # ---- health and held-out evaluation
    def _check_health(self, metrics: dict[str, float]) -> None:
        """Warn on unhealthy signals; with --stop_on_collapse save a state and exit (COLLAPSE_EXIT_CODE)."""
        health.check_health(self.monitor, self.global_step, metrics, self.settings.output_dir, self.settings.stop_on_collapse,
                            self.save_state)

    def _maybe_evaluate(self, final: bool = False) -> None:
        """Every --eval_steps steps (and before the first): greedy answers to the held-out prompts, scored by the
        same reader as the rollouts (`HeldOutEvaluator`, shared with DPO). `final`: at the last step when the
        schedule did not just evaluate it (--max_steps between two evaluations), so the last eval, keep-best and
        the card describe the model that is saved."""
        settings = self.settings
        if self.evaluator is None:
            return
        if final:
            if self._evaluated_at == self.global_step:
                return
        elif self.global_step % settings.eval_steps != 0:
            return
        self._evaluated_at = self.global_step
        updater = self.updater
        generator = Generator(updater.actor_model, self.tokenizer, max_new_tokens=settings.max_answer_seq_len,
                              zero_stage=settings.actor_zero_stage,
                              gather_params=False if settings.unpin_actor_parameters else None)
        updater.eval()
        metrics = self.evaluator.evaluate(updater.actor_model, generator)
        updater.train()
        self.logger.log(self.global_step, "eval", metrics)
        if "eval/reward_gap" in metrics:  # the rollouts' guards run each step; the reward gap is judged here
            health.check_health(self.monitor, self.global_step, {k: metrics[k] for k in health.GAP_KEYS if k in metrics},
                                settings.output_dir, settings.stop_on_collapse, self.save_state)
        if self.best.consider(self.global_step, metrics, healthy=not self.monitor.active) and settings.keep_best:
            self._save_best_actor()

    def _best_dir(self) -> Path:
        return Path(self.settings.output_dir) / "best_actor"

    def _save_best_actor(self) -> None:
        if not self.settings.output_dir:
            return
        print_rank_0(f"--keep_best: new best held-out {self.best.metric} {self.best.best_score:.4f} at step "
                     f"{self.global_step}; saving the actor to {self._best_dir()}")
        save_stage_model(self.settings, self.rlhf_engine.actor, self.tokenizer, self._best_dir(),
                         "step3 PPO actor (best evaluated step)", self.settings.actor_model_name_or_path)

    # ---- outputs
    def _write_run_info(self, final: bool) -> None:
        settings = self.settings
        if not (settings.output_dir and is_rank_0()):
            return
        info = {
            "actor_model_name_or_path": _resolved(settings.actor_model_name_or_path),
            "reference_model_name_or_path": _resolved(settings.reference_model_name_or_path or settings.actor_model_name_or_path),
            "critic_model_name_or_path": _resolved(settings.critic_model_name_or_path),
            "reward_model_name_or_path": _resolved(settings.critic_model_name_or_path),
            "data_path": [_resolved(p) for p in settings.data_path],
            "data_split": settings.data_split,
            "unsupervised_dataset_name": settings.unsupervised_dataset_name,
            "seed": settings.seed,
            "ppo": recorded_settings(settings),
            "generation_path": self.updater.generator.path,
            "hybrid_engine_requested": settings.enable_hybrid_engine,
            "global_step": self.global_step,
            "final_kl_coef": self.updater.kl_ctl,
            "kl_budget": kl_budget(settings, self.updater.kl_ctl),
            "health": self.monitor.summary()["status"],
            "kept_step": self.best.best_step if settings.keep_best else self.global_step,
            "complete": final,
        }
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(settings.output_dir) / "run_info.json", info)

    def save_model(self) -> None:
        """`actor/` and `actor_ema/` in Hugging Face layout, `critic/` in the reward-model layout."""
        settings = self.settings
        if not settings.output_dir:
            return
        engine = self.rlhf_engine
        out = Path(settings.output_dir)
        print_rank_0(f"saving the final models to {out} ...")
        if settings.keep_best and self.best.best_step is not None:
            self._keep_best_actor(out / "actor")
        else:
            save_stage_model(settings, engine.actor, self.tokenizer, out / "actor", "step3 PPO actor",
                             settings.actor_model_name_or_path)
        save_stage_model(settings, engine.critic, self.tokenizer, out / "critic", "step3 PPO critic",
                         settings.critic_model_name_or_path, save=save_reward_model)
        if engine.actor_ema is not None:
            save_stage_model(settings, engine.actor_ema, self.tokenizer, out / "actor_ema", "step3 PPO actor (EMA)",
                             settings.actor_model_name_or_path)
        health.write_health(settings.output_dir, self.monitor)
        self._write_run_info(final=True)
        push_to_hub(settings, out / "actor")

    def _keep_best_actor(self, dest: Path) -> None:
        """actor/ becomes the best evaluated step's actor; best.json beside it says which step and why."""
        record = self.best.record(self.global_step, "best")
        if is_rank_0():
            publish_directory(self._best_dir(), dest, keep_existing=False)
            atomic_write_json(dest.parent / health.BEST_FILE, record)
        barrier()
        print_rank_0(f"--keep_best: {dest} is step {self.best.best_step}: {record['reason']}")


def main() -> None:
    """Step 3 entry point: `deepspeed --module dschat.steps.ppo ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
