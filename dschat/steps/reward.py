"""Step 2: reward model (Bradley-Terry pairwise loss on the score at the end of each answer)."""

from __future__ import annotations

import torch

from dschat.rlhf import health
from dschat.steps import train_main
from dschat.steps.reward_args import RewardSettings, build_parser, parse_args  # noqa: F401 - the step's settings
from dschat.utils.build import (
    end_of_text,
    initialize_trained_engine,
    save_trained_model,
    stage_datasets,
    start_training_stage,
)
from dschat.utils.data.collators import DataCollatorReward
from dschat.utils.data.splits import part_indices
from dschat.utils.dist import get_all_reduce_mean
from dschat.utils.errors import UserError, run_main
from dschat.utils.losses import pairwise_accuracy
from dschat.utils.model.reward_model import REWARD_ENDING_FILE, reward_ending_record
from dschat.utils.printing import print_rank_0
from dschat.utils.saving import save_reward_model
from dschat.utils.trainer import Trainer


class RewardTrainer(Trainer):
    """Bradley-Terry training; each evaluation also feeds the reward-model health checks (`health.json`:
    a reward model that learned nothing is flagged before selection builds on it). The scores it judges are
    the model's own `chosen_mean_scores`/`rejected_mean_scores`, read by the one reward reader
    (`RewardModel.read_end_scores`)."""

    name = "step2_model"
    rows_per_sample = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = health.HealthMonitor("step2_model", self.settings.health_thresholds)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                          sequence_mask=batch["attention_mask"], use_cache=False)
        chosen, rejected = out["chosen_mean_scores"].detach(), out["rejected_mean_scores"].detach()
        return {
            "loss": out["loss"],
            "accuracy": pairwise_accuracy(chosen, rejected),
            "rewards/chosen": chosen.float().mean(),
            "rewards/rejected": rejected.float().mean(),
            "rewards/margins": (chosen - rejected).float().mean(),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        self.engine.eval()
        sums = torch.zeros(5, device=self.device)
        count = 0
        for i, batch in enumerate(self.eval_loader):
            if self.settings.eval_iters and i >= self.settings.eval_iters:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                              sequence_mask=batch["attention_mask"], use_cache=False)
            chosen, rejected = out["chosen_mean_scores"].float(), out["rejected_mean_scores"].float()
            sums += torch.stack([out["loss"].float(), pairwise_accuracy(chosen, rejected), chosen.mean(),
                                 rejected.mean(), health.identical_share(chosen, rejected)])
            count += 1
        loss, acc, chosen, rejected, identical = get_all_reduce_mean(sums / max(1, count)).tolist()
        print_rank_0(f"chosen_last_scores (higher is better) : {chosen}, rejected_last_scores (lower is better) : "
                     f"{rejected}, acc (higher is better) : {acc}")
        return {"loss": loss, "accuracy": acc, "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected, "identical_share": identical}

    def after_eval(self, metrics: dict[str, float]) -> None:
        """The reward-model health checks on the held-out numbers (every rank sees the same reduced ones);
        --stop_on_collapse stops with a saved state and exit status 3."""
        signals = {"health/reward_accuracy": metrics["accuracy"], "health/reward_margin": metrics["rewards/margins"],
                   "health/reward_identical_share": metrics["identical_share"]}
        health.check_health(self.monitor, self.global_step, signals, self.settings.output_dir,
                            self.settings.stop_on_collapse, self.save_state)

    def extra_state(self) -> dict:
        return {"health_baseline": self.monitor.baseline}

    def load_extra_state(self, state: dict) -> None:
        self.monitor.baseline.update(state.get("health_baseline", {}))

    def save_model(self) -> None:
        health.write_health(self.settings.output_dir, self.monitor)
        record = reward_ending_record(end_of_text(self.settings, self.tokenizer), self.tokenizer)
        save_trained_model(self.settings, self.engine, self.tokenizer, "the reward model", "step2 reward model",
                           save=save_reward_model, extra_files={REWARD_ENDING_FILE: record})


def data_part(train_data, settings: RewardSettings):
    """The --data_part K/N of the training pairs (`splits.part_indices`: seeded by --seed)."""
    part, parts = settings.part
    indices = part_indices(len(train_data), part, parts, settings.seed)
    if not indices:
        raise UserError(f"--data_part {settings.data_part}: part {part} of {len(train_data)} training pairs is empty; "
                        "use fewer parts or more data")
    print_rank_0(f"--data_part {settings.data_part}: training on {len(indices)} of {len(train_data)} pairs (part "
                 f"{part} of {parts}, positions permuted with seed {settings.seed})")
    return train_data.select(indices)


def build(settings) -> RewardTrainer:
    # model_utils imports transformers (seconds): deferred so --help and flag errors answer first
    from dschat.utils.model.model_utils import create_critic_model

    tokenizer, ds_config = start_training_stage(settings, tb_name="step2_model")
    train_data, eval_data = stage_datasets(settings, tokenizer, 2)
    if settings.part is not None:
        train_data = data_part(train_data, settings)
    model = create_critic_model(settings.model_name_or_path, tokenizer, ds_config, settings.num_padding_at_beginning,
                                dropout=settings.dropout, zero_stage=settings.zero_stage,
                                compute_fp32_loss=settings.compute_fp32_loss, loss_type=settings.reward_loss)
    engine = initialize_trained_engine(settings, model, ds_config, len(train_data), force_optimize=["v_head.weight"])
    collator = DataCollatorReward(pad_token_id=tokenizer.pad_token_id, max_seq_len=settings.max_seq_len,
                                  padding=settings.padding)
    return RewardTrainer(settings, engine, train_data, eval_data, collator, tokenizer)


def main() -> None:
    """Step 2 entry point: `deepspeed --module dschat.steps.reward ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
