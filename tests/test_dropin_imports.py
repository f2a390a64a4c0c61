"""Upstream DeepSpeed-Chat's own scripts import from this package once it is installed (issue 23).

Installing dschat-mpo puts a regular package `dschat` in site-packages, and it replaces the `dschat` folder
of a DeepSpeed-Chat checkout (a namespace package, no `__init__.py`), so upstream's `main.py` files,
`rw_eval.py` and `prompt_eval.py` run on this code. Everything they import must be here, and every call they
make must bind to our signatures. UPSTREAM_IMPORTS records it, read from upstream's files (DeepSpeedExamples
83757d9, `applications/DeepSpeed-Chat`: every file outside `dschat/`; `chat.py`, `inference/chatbot.py` and
`e2e_rlhf.py` import nothing of dschat) with the `ast` module: for each imported (module, name), the calls
those scripts make to it as (number of positional arguments, keyword names). No upstream checkout is needed
here. To regenerate after upstream changes, with a checkout of DeepSpeed-Chat at PATH:

    python3 benchmarks/upstream_parity.py --upstream PATH imports

which prints the dictionary below. `benchmarks/upstream_parity.py --upstream PATH mains` runs upstream's
unchanged step-1/2/3 mains against this package on a tiny model (opt-in, needs the checkout).
"""

from __future__ import annotations

import importlib
import inspect
import io
from argparse import Namespace
from contextlib import redirect_stdout

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SchedulerType, default_data_collator

UPSTREAM_IMPORTS: dict[tuple[str, str], list[tuple[int, tuple[str, ...]]]] = {
    ('dschat.rlhf.ppo_trainer', 'DeepSpeedPPOTrainer'): [(2, ())],
    ('dschat.rlhf.ppo_trainer', 'DeepSpeedPPOTrainerUnsupervised'): [(2, ())],
    ('dschat.rlhf.rlhf_engine', 'DeepSpeedRLHFEngine'): [(0, ('actor_model_name_or_path', 'args', 'critic_model_name_or_path', 'num_total_iters', 'tokenizer'))],
    ('dschat.utils.data.data_utils', 'DataCollatorRLHF'): [(2, ())],
    ('dschat.utils.data.data_utils', 'DataCollatorReward'): [(0, ())],
    ('dschat.utils.data.data_utils', 'MiniDataset'): [(2, ())],
    ('dschat.utils.data.data_utils', 'create_prompt_dataset'): [(8, ()), (8, ('end_of_conversation_token', 'sft_only_data_path'))],
    ('dschat.utils.data.data_utils', 'get_unsupervised_data'): [(2, ())],
    ('dschat.utils.ds_utils', 'get_eval_ds_config'): [(0, ('dtype', 'offload', 'stage')), (3, ())],
    ('dschat.utils.ds_utils', 'get_train_ds_config'): [(0, ('dtype', 'enable_tensorboard', 'offload', 'stage', 'tb_name', 'tb_path'))],
    ('dschat.utils.model.model_utils', 'causal_lm_model_to_fp32_loss'): [(1, ())],
    ('dschat.utils.model.model_utils', 'create_critic_model'): [(4, ('compute_fp32_loss', 'dropout', 'zero_stage')), (4, ('dropout',))],
    ('dschat.utils.model.model_utils', 'create_hf_model'): [(4, ()), (4, ('dropout',))],
    ('dschat.utils.module.lora', 'convert_linear_layer_to_lora'): [(3, ())],
    ('dschat.utils.module.lora', 'convert_lora_to_linear_layer'): [(1, ())],
    ('dschat.utils.module.lora', 'make_model_gradient_checkpointing_compatible'): [(1, ())],
    ('dschat.utils.module.lora', 'only_optimize_lora_parameters'): [(1, ()), (2, ())],
    ('dschat.utils.perf', 'print_throughput'): [(4, ())],
    ('dschat.utils.perf', 'print_throughput_step3'): [(7, ())],
    ('dschat.utils.utils', 'ExponentialMovingAverage'): [(0, ())],
    ('dschat.utils.utils', 'get_all_reduce_mean'): [(1, ())],
    ('dschat.utils.utils', 'get_optimizer_grouped_parameters'): [(3, ())],
    ('dschat.utils.utils', 'load_hf_tokenizer'): [(1, ('add_special_tokens', 'fast_tokenizer'))],
    ('dschat.utils.utils', 'moving_average'): [(2, ('zero_stage',))],
    ('dschat.utils.utils', 'print_rank_0'): [(1, ()), (2, ())],
    ('dschat.utils.utils', 'save_hf_format'): [(3, ()), (3, ('sub_folder',))],
    ('dschat.utils.utils', 'save_zero_three_model'): [(1, ('global_rank', 'save_dir', 'zero_stage')), (3, ('zero_stage',))],
    ('dschat.utils.utils', 'set_random_seed'): [(1, ())],
    ('dschat.utils.utils', 'to_device'): [(2, ())],
}

# What upstream's step-3 main calls on the trainer it builds (method: positional arguments), and reads.
UPSTREAM_TRAINER_METHODS = {"generate_experience": 3, "train_rlhf": 1, "train_unsupervised": 2, "get_overflow": 0}
UPSTREAM_TRAINER_ATTRIBUTES = ("generate_time",)


def _callable_signature(obj) -> inspect.Signature:
    return inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)


@pytest.mark.parametrize(("module", "name"), sorted(UPSTREAM_IMPORTS))
def test_every_name_upstream_imports_exists_and_takes_its_calls(module, name):
    obj = getattr(importlib.import_module(module), name)
    signature = _callable_signature(obj)
    skip_self = 1 if inspect.isclass(obj) else 0
    for positional, keywords in UPSTREAM_IMPORTS[(module, name)]:
        arguments = [object()] * (positional + skip_self)
        try:
            signature.bind(*arguments, **dict.fromkeys(keywords, object()))
        except TypeError as err:
            pytest.fail(f"{module}.{name}{signature}: upstream calls it with {positional} positional argument(s) "
                        f"and keywords {keywords}: {err}")


def test_trainer_offers_what_upstream_step3_calls():
    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised

    for cls in (DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised):
        for method, positional in UPSTREAM_TRAINER_METHODS.items():
            if method == "train_unsupervised" and cls is DeepSpeedPPOTrainer:
                continue
            inspect.signature(getattr(cls, method)).bind(*[object()] * (positional + 1))
    source = inspect.getsource(DeepSpeedPPOTrainer.__init__)
    assert all(f"self.{attribute}" in source for attribute in UPSTREAM_TRAINER_ATTRIBUTES)


# --------------------------------------------------------------------------------------------- behaviour


def test_upstream_path_datasets_have_upstream_item_layout(tiny_llama_dir, tiny_tokenizer, hh_file, tmp_path):
    """Step 1 collates `create_prompt_dataset`'s items with `default_data_collator`, step 2 with a
    `DataCollatorReward()` that only concatenates, step 3 with `DataCollatorRLHF(max_len, tp_size)`."""
    from dschat.utils.data.data_utils import DataCollatorReward, DataCollatorRLHF, create_prompt_dataset

    common = (-1, [str(hh_file)], "2,4,4", str(tmp_path / "cache"))
    sft, _ = create_prompt_dataset(*common, 1, 1234, tiny_tokenizer, 96, end_of_conversation_token=tiny_tokenizer.eos_token,
                                   sft_only_data_path=[])
    batch = default_data_collator([sft[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 96) and batch["labels"].shape == (3, 96)
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == -100).all() and torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert torch.equal(batch["input_ids"][0][real[0]], sft.chosen_dataset[0])  # the wrapped dataset's attributes

    pairs, _ = create_prompt_dataset(*common, 2, 1234, tiny_tokenizer, 96)
    batch = DataCollatorReward()([pairs[i] for i in range(2)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 96)
    assert torch.equal(batch["input_ids"][2][: len(pairs.reject_dataset[0])], pairs.reject_dataset[0])

    prompts, _ = create_prompt_dataset(*common, 3, 1234, tiny_tokenizer, 96)
    batch = DataCollatorRLHF(96, 1)([prompts[i] for i in range(2)])
    assert batch["prompt"].shape == (2, 96)
    assert torch.equal(batch["prompt"][0][-len(prompts.prompt_dataset[0]):], prompts.prompt_dataset[0])


def test_step3_classes_take_upstreams_argparse_namespace(tmp_path):
    """Upstream's step-3 main hands its own `args` (its flags plus `global_rank`, `end_of_conversation_token`,
    `gradient_accumulation_steps_actor`) to the engine and the trainer: they read it as settings."""
    from dschat.steps.ppo_args import PPOSettings

    base = PPOSettings.build_parser().parse_args(["--actor_model_name_or_path", str(tmp_path),
                                                  "--critic_model_name_or_path", str(tmp_path),
                                                  "--output_dir", str(tmp_path)])
    upstream_args = Namespace(**{**vars(base), "global_rank": 0, "end_of_conversation_token": "<|endoftext|>",
                                 "gradient_accumulation_steps_actor": 1})
    upstream_args.actor_learning_rate = 1e-4
    upstream_args.lr_scheduler_type = SchedulerType("linear")  # upstream's parser gives transformers' enum
    settings = PPOSettings.adopt(upstream_args)
    assert isinstance(settings, PPOSettings) and settings.actor_learning_rate == 1e-4
    assert settings.lr_scheduler_type == "linear"
    assert PPOSettings.adopt(settings) is settings


def test_perf_prints_upstreams_throughput_lines():
    from dschat.utils.perf import calculate_flops, print_throughput, print_throughput_step3

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    # Narayanan et al.'s estimate by hand: 24 * B * s * l * h^2 * (1 + s / 6h + V / 16lh), times 3 for training
    assert calculate_flops(3, 2, 8, config) == pytest.approx(3 * 24 * 2 * 8 * 2 * 256 * (1 + 8 / 96 + 64 / 512))
    args = Namespace(max_seq_len=8, per_device_train_batch_size=2, gradient_checkpointing=False, lora_dim=0,
                     max_prompt_seq_len=4, max_answer_seq_len=4, per_device_generation_batch_size=2,
                     generation_batches=1, ppo_epochs=1, unsupervised_dataset_name=None,
                     actor_gradient_checkpointing=False, critic_gradient_checkpointing=False, actor_lora_dim=0,
                     critic_lora_dim=0)
    out = io.StringIO()
    with redirect_stdout(out):
        print_throughput(model, args, 0.5, 0)
        print_throughput(model, args, 0.5, 1)  # only rank 0 prints
        print_throughput_step3(model, model, args, 1.0, 0.25, 0.75, 0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("Model Parameters: ") and "Samples/sec: 4.00" in lines[0]
    assert [line.split(" =>")[0] for line in lines[1:]] == ["End-to-End", "Generation", "Training  ", "Actor Model Parameters"]


def test_perf_reads_the_model_config_inside_a_deepspeed_engine():
    """Upstream's mains pass their DeepSpeed engine, whose own `config` is DeepSpeed's dict."""
    from dschat.utils.build import initialize_frozen_engine
    from dschat.utils.dist import init_distributed
    from dschat.utils.perf import print_throughput

    init_distributed()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    engine = initialize_frozen_engine(LlamaForCausalLM(config), {"train_batch_size": 2,
                                                                 "train_micro_batch_size_per_gpu": 2})
    args = Namespace(max_seq_len=8, per_device_train_batch_size=2, gradient_checkpointing=False, lora_dim=0)
    out = io.StringIO()
    with redirect_stdout(out):
        print_throughput(engine, args, 0.5, 0)
    assert out.getvalue().startswith("Model Parameters: ")
