"""Step 2: reward model (Bradley-Terry pairwise loss on the score at the end of each answer)."""

from __future__ import annotations

import torch

from dschat.rlhf import health
from dschat.steps import train_main
from dschat.utils import args as flags
from dschat.utils.build import (
    end_of_text,
    initialize_trained_engine,
    save_trained_model,
    stage_datasets,
    start_training_stage,
)
from dschat.utils.data.collators import DataCollatorReward
from dschat.utils.errors import run_main
from dschat.utils.losses import pairwise_accuracy
from dschat.utils.model.reward_model import REWARD_ENDING_FILE, reward_ending_record
from dschat.utils.trainer import Trainer
from dschat.utils.utils import get_all_reduce_mean, print_rank_0, save_reward_model


def parse_args(argv: list[str] | None = None):
    parser = flags.new_parser("Step 2: reward model fine-tuning (DeepSpeed-Chat compatible flags).")
    flags.add_data_args(parser)
    flags.add_model_args(parser)
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="Positions at the start of every sequence never taken for its end (OPT: 1, Llama "
                             "and our tiny model: 0); the score is read at the token before the first pad after "
                             "them, as in PPO and selection.")
    parser.add_argument("--reward_loss", choices=("end", "divergence"), default="end",
                        help="'end': Bradley-Terry on the end scores; 'divergence': upstream's per-token loss "
                             "over the differing suffix.")
    flags.add_optim_args(parser, learning_rate=5e-5)
    flags.add_deepspeed_args(parser)
    flags.add_lora_args(parser)
    flags.add_logging_args(parser, tensorboard_path="step2_tensorboard", print_loss=False)
    flags.add_eval_args(parser, eval_interval=0, eval_iters=100)
    health.add_reward_health_args(parser)
    args = parser.parse_args(argv)
    flags.validate_common(args)
    health.check_reward_health_args(args)
    return args


class RewardTrainer(Trainer):
    """Bradley-Terry training; each evaluation also feeds the reward-model health checks (`health.json`:
    a reward model that learned nothing is flagged before selection builds on it)."""

    name = "step2_model"
    rows_per_sample = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = health.HealthMonitor("step2_model", health.reward_thresholds_from_args(self.args))

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                          use_cache=False)
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
            if self.args.eval_iters and i >= self.args.eval_iters:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                              use_cache=False)
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
        health.check_health(self.monitor, self.global_step, signals, self.args.output_dir,
                            self.args.stop_on_collapse, self.save_state)

    def extra_state(self) -> dict:
        return {"health_baseline": self.monitor.baseline}

    def load_extra_state(self, state: dict) -> None:
        self.monitor.baseline.update(state.get("health_baseline", {}))

    def save_model(self) -> None:
        health.write_health(self.args.output_dir, self.monitor)
        record = reward_ending_record(end_of_text(self.args, self.tokenizer), self.tokenizer)
        save_trained_model(self.args, self.engine, self.tokenizer, "the reward model", "step2 reward model",
                           save=save_reward_model, extra_files={REWARD_ENDING_FILE: record})


def build(args) -> RewardTrainer:
    # model_utils imports transformers (seconds): deferred so --help and flag errors answer first
    from dschat.utils.model.model_utils import create_critic_model

    tokenizer, ds_config = start_training_stage(args, tb_name="step2_model")
    train_data, eval_data = stage_datasets(args, tokenizer, 2)
    model = create_critic_model(args.model_name_or_path, tokenizer, ds_config, args.num_padding_at_beginning,
                                dropout=args.dropout, zero_stage=args.zero_stage,
                                compute_fp32_loss=args.compute_fp32_loss, loss_type=args.reward_loss)
    engine = initialize_trained_engine(args, model, ds_config, len(train_data), force_optimize=["v_head.weight"])
    collator = DataCollatorReward(pad_token_id=tokenizer.pad_token_id, max_seq_len=args.max_seq_len,
                                  padding=args.padding)
    return RewardTrainer(args, engine, train_data, eval_data, collator, tokenizer)


def main() -> None:
    """Step 2 entry point: `deepspeed --module dschat.steps.reward ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
