"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer."""

from __future__ import annotations

import math

import torch

from dschat.steps import train_main
from dschat.utils import args as flags
from dschat.utils.build import (
    apply_lora,
    build_tokenizer,
    check_context_length,
    end_of_text,
    fuse_lora,
    initialize_engine,
    set_gradient_checkpointing,
    train_ds_config,
)
from dschat.utils.data.data_utils import DataCollatorSFT, create_prompt_dataset
from dschat.utils.dist import get_local_rank
from dschat.utils.errors import run_main
from dschat.utils.model_card import card_files, push_to_hub
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.trainer import Trainer, count_updates
from dschat.utils.utils import get_all_reduce_mean, print_rank_0, save_causal_lm, set_random_seed


def parse_args(argv: list[str] | None = None):
    parser = flags.new_parser("Step 1: supervised fine-tuning (DeepSpeed-Chat compatible flags).")
    flags.add_data_args(parser, sft_only=True)
    flags.add_model_args(parser)
    flags.add_optim_args(parser, learning_rate=1e-3)
    flags.add_deepspeed_args(parser)
    flags.add_lora_args(parser)
    flags.add_logging_args(parser, tensorboard_path="step1_tensorboard")
    flags.add_eval_args(parser, eval_interval=0, eval_iters=0)
    args = parser.parse_args(argv)
    flags.validate_common(args)
    return args


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
            if self.args.eval_iters and i >= self.args.eval_iters:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(input_ids=batch["input_ids"], attention_mask=self.model_attention_mask(batch),
                              labels=batch["labels"], use_cache=False)
            total += out.loss.float()
            count += 1
        loss = get_all_reduce_mean(total / max(1, count)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def save_model(self) -> None:
        if not self.args.output_dir:
            return
        print_rank_0(f"saving the final model to {self.args.output_dir} ...")
        fuse_lora(self.engine.module)
        save_causal_lm(self.engine.module, self.tokenizer, self.args.output_dir,
                       extra_files=card_files(self.args, "step1 SFT", self.args.model_name_or_path, self.engine))
        push_to_hub(self.args, self.args.output_dir)


def build(args) -> SFTTrainer:
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import causal_lm_model_to_fp32_loss, create_hf_model

    prepare_output_dir(args.output_dir)
    set_random_seed(args.seed)
    check_context_length(args.model_name_or_path, "--model_name_or_path", args.max_seq_len, "--max_seq_len")
    tokenizer = build_tokenizer(args)
    ds_config = train_ds_config(args, zero_stage=args.zero_stage, micro_batch_size=args.per_device_train_batch_size,
                                gradient_accumulation_steps=args.gradient_accumulation_steps, tb_name="step1_model")
    train_data, eval_data = create_prompt_dataset(
        get_local_rank(), args.data_path, args.data_split, args.data_output_path, 1, args.seed, tokenizer,
        args.max_seq_len, end_of_conversation_token=end_of_text(args, tokenizer),
        sft_only_data_path=args.sft_only_data_path, rebuild=args.rebuild_data_cache, column_map=flags.column_map(args),
    )
    model = create_hf_model(AutoModelForCausalLM, args.model_name_or_path, tokenizer, ds_config, dropout=args.dropout)
    if args.compute_fp32_loss:
        causal_lm_model_to_fp32_loss(model)
    model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    if args.gradient_checkpointing:
        set_gradient_checkpointing(model)
    collator = DataCollatorSFT(tokenizer.pad_token_id, args.max_seq_len, padding=args.padding)
    steps = count_updates(len(train_data), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          args.num_train_epochs, args.max_steps)
    engine = initialize_engine(model, ds_config, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                               lora_learning_rate=args.lora_learning_rate, lr_scheduler_type=args.lr_scheduler_type,
                               num_warmup_steps=args.num_warmup_steps, num_training_steps=steps,
                               offload=args.offload, args=args)
    return SFTTrainer(args, engine, train_data, eval_data, collator, tokenizer)


def main() -> None:
    """Step 1 entry point: `deepspeed --module dschat.steps.sft ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
