"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dschat.steps import train_main
from dschat.utils import args as flags
from dschat.utils.build import (
    create_causal_lm,
    initialize_trained_engine,
    save_trained_model,
    stage_datasets,
    start_training_stage,
)
from dschat.utils.data.collators import DataCollatorSFT
from dschat.utils.dist import get_all_reduce_mean
from dschat.utils.errors import run_main
from dschat.utils.trainer import Trainer


@dataclass(frozen=True, kw_only=True)
class SFTSettings(flags.TrainStageSettings, flags.SFTOnlyDataSettings, flags.PrintLossSettings,
                  flags.DSChatCompatSettings):
    """Every setting of step 1 (its flags, DeepSpeed-Chat's names and defaults)."""

    description = "Step 1: supervised fine-tuning (DeepSpeed-Chat compatible flags)."

    learning_rate: float = flags.same_flag(flags.TrainBatchSettings, "learning_rate", default=1e-3)
    tensorboard_path: str = flags.same_flag(flags.LoggingSettings, "tensorboard_path", default="step1_tensorboard")
    eval_iters: int = flags.same_flag(flags.EvalIntervalSettings, "eval_iters", default=0)


build_parser = SFTSettings.build_parser
parse_args = SFTSettings.parse_args


class SFTTrainer(Trainer):
    name = "step1_model"

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                          labels=batch["labels"], use_cache=False)
        return {"loss": out.loss}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        self.engine.eval()
        total, count = torch.zeros((), device=self.device), 0
        for i, batch in enumerate(self.eval_loader):
            if self.settings.eval_iters and i >= self.settings.eval_iters:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                              labels=batch["labels"], use_cache=False)
            total += out.loss.float()
            count += 1
        loss = get_all_reduce_mean(total / max(1, count)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def save_model(self) -> None:
        save_trained_model(self.settings, self.engine, self.tokenizer, "the final model", "step1 SFT")


def build(settings) -> SFTTrainer:
    tokenizer, ds_config = start_training_stage(settings, tb_name="step1_model")
    train_data, eval_data = stage_datasets(settings, tokenizer, 1, sft_only_data_path=settings.sft_only_data_path)
    model = create_causal_lm(settings, tokenizer, ds_config)
    engine = initialize_trained_engine(settings, model, ds_config, len(train_data))
    collator = DataCollatorSFT(tokenizer.pad_token_id, settings.max_seq_len, padding=settings.padding)
    return SFTTrainer(settings, engine, train_data, eval_data, collator, tokenizer)


def main() -> None:
    """Step 1 entry point: `deepspeed --module dschat.steps.sft ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
