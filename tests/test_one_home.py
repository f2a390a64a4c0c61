"""One home per job (issue 24): collectives, JSON-lines reading, the helpers upstream imports from
`dschat.utils.utils`, frozen engines' DeepSpeed config, and saving a stage's model."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dschat.utils import dist as collectives
from dschat.utils import utils as upstream_utils
from dschat.utils.errors import UserError
from dschat.utils.files import parse_jsonl, read_jsonl

# --------------------------------------------------------------------------------------------- collectives


def _collectives_worker(rank: int, world: int, store_path: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        out = {
            "sum": collectives.all_reduce(torch.tensor([float(rank + 1)])).item(),
            "mean": collectives.all_reduce(torch.tensor([float(rank + 1)]), "mean").item(),
            "max": collectives.all_reduce(torch.tensor([float(rank)]), "max").item(),
            "min": collectives.all_reduce(torch.tensor([float(rank)]), "min").item(),
            "upstream_mean": collectives.get_all_reduce_mean(torch.tensor([float(rank + 1)])).item(),
            "gather": collectives.all_gather(torch.tensor([rank, 10 + rank])).tolist(),
            "objects": collectives.all_gather_objects({"rank": rank}),
            "broadcast": collectives.broadcast_object(f"from {rank}"),
            "any": collectives.any_rank_true(rank == 1),
            "none": collectives.any_rank_true(False),
        }
        with open(f"{results}.{rank}", "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()
    # As the entry points do after a multi-rank run (dist.finish_multi_rank_run): no C++ teardown, which
    # sometimes aborted a finished gloo rank.
    os._exit(0)


def test_collectives_on_two_gloo_ranks_and_in_one_process(tmp_path):
    """The one collectives helper: real gloo ranks agree; a single process gets the identity."""
    mp.spawn(_collectives_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        out = json.loads((tmp_path / f"out.{rank}").read_text())
        assert out["sum"] == 3.0 and out["mean"] == 1.5 and out["upstream_mean"] == 1.5
        assert out["max"] == 1.0 and out["min"] == 0.0
        assert out["gather"] == [0, 10, 1, 11] and out["objects"] == [{"rank": 0}, {"rank": 1}]
        assert out["broadcast"] == "from 0" and out["any"] is True and out["none"] is False
    # An earlier test in this process may have joined a one-rank group: both must give the identity.
    assert not dist.is_initialized() or dist.get_world_size() == 1
    single = torch.tensor([2.0])
    assert collectives.all_reduce(single, "mean") is single and single.item() == 2.0
    assert collectives.all_gather_objects("x") == ["x"] and collectives.broadcast_object(5) == 5
    assert collectives.any_rank_true(True) and not collectives.any_rank_true(False)


def test_no_hand_written_collectives_outside_dist():
    """Every collective of the project goes through `dschat.utils.dist`."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = ("distributed.all_reduce(", "distributed.all_gather", "distributed.broadcast", "dist.all_reduce(",
             "dist.all_gather", "dist.broadcast")
    offenders = [f"{path.relative_to(root)}: {call}" for base in ("dschat", "mpo_ext")
                 for path in sorted((root / base).rglob("*.py")) if path.name != "dist.py"
                 for call in calls if call in path.read_text(encoding="utf-8")]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------- JSON lines


def test_jsonl_reader_strict_and_torn(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')  # a run killed mid-write
    with pytest.raises(UserError, match=r"metrics.jsonl:4: invalid JSON line .*; fix it"):
        read_jsonl(path, hint="; fix it")
    skipped = []
    assert read_jsonl(path, skip_unreadable=True, on_skip=lambda n, line: skipped.append(n)) == [{"step": 1},
                                                                                                  {"step": 2}]
    assert skipped == [4]
    assert parse_jsonl('[1]\n"a"\n', "inline") == [[1], "a"]
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(UserError, match="latin1.jsonl: not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")


def test_a_line_nested_too_deep_is_an_unreadable_line():
    """json raises RecursionError, not JSONDecodeError, on a line nested 100k deep: the one reader takes it for
    an invalid line as well (strict: one UserError naming the line; a log: the line is skipped)."""
    text = '{"step": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(UserError, match=r"deep.jsonl:2: invalid JSON line \(nested too deep to read"):
        parse_jsonl(text, "deep.jsonl")
    assert parse_jsonl(text, "deep.jsonl", skip_unreadable=True) == [{"step": 1}]


def test_torn_selection_shard_is_one_line_not_a_traceback(tmp_path):
    """A shard left torn (a disk filled mid-copy) is refused naming the file, line and the fix."""
    from mpo_ext import selection

    shard = selection.shard_path(tmp_path, 0)
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps({"index": 0, "prompt": "p"}) + '\n{"index": 1, "pro')
    with pytest.raises(UserError, match=r"shard-00000.jsonl:2: invalid JSON line .*--rebuild_shards"):
        selection.read_shards(tmp_path, 1)


def test_readers_of_a_killed_runs_metrics_skip_its_torn_line(tmp_path):
    from dschat.utils.model_card import last_metrics
    from mpo_ext.curves import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "phase": "train", "loss": 1.0}\n{"step": 2, "pha')
    assert last_metrics(tmp_path) == {"train": {"step": 1, "phase": "train", "loss": 1.0}}
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "phase": "train", "loss": 1.0}]


# --------------------------------------------------------------------------------------------- utils split


def test_utils_reexports_each_name_from_its_home():
    """`dschat.utils.utils` keeps upstream's import path; each name is the object of its job's module."""
    from dschat.utils import device, ema, files, optim, printing, saving, seeding, tokenizer, zero

    homes = {"print_rank_0": printing, "to_device": device, "set_random_seed": seeding,
             "get_all_reduce_mean": collectives, "atomic_write": files, "atomic_write_jsonl": files,
             "load_hf_tokenizer": tokenizer, "get_optimizer_grouped_parameters": optim, "moving_average": ema,
             "ExponentialMovingAverage": ema, "gather_full_state_dict": zero, "save_causal_lm": saving}
    for name, home in homes.items():
        assert getattr(upstream_utils, name) is getattr(home, name), name
    for name in upstream_utils.__all__:
        assert getattr(upstream_utils, name) is not None
    assert upstream_utils.save_zero_three_model.__module__ == "dschat.utils.compat"


# --------------------------------------------------------------------------------------------- frozen engines


def test_frozen_engine_config_is_one_function():
    from dschat.utils.build import frozen_ds_config

    for zero_stage, expected in ((0, 0), (1, 0), (2, 0), (3, 3)):
        config = frozen_ds_config("bf16", offload=False, zero_stage=zero_stage, micro_batch_size=4)
        assert config["zero_optimization"]["stage"] == expected  # partitioned only beside a ZeRO-3 model
        assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4
        assert config["bf16"] == {"enabled": True} and "optimizer" not in config


# --------------------------------------------------------------------------------------------- saving


def test_save_stage_model_folds_lora_for_the_write_and_keeps_training_lora(tiny_llama_dir, tiny_tokenizer,
                                                                            tmp_path):
    from transformers import AutoModelForCausalLM

    from dschat.steps.sft import SFTSettings
    from dschat.utils.build import apply_lora
    from dschat.utils.module.lora import lora_layers
    from dschat.utils.saving import save_stage_model

    model = apply_lora(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), 4, None, only_optimize=False)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_left_weight.normal_()  # a trained adapter (LoRA's right factor starts random)
    ids = torch.tensor([tiny_tokenizer("Once upon a time").input_ids])
    with torch.no_grad():
        expected = model(ids).logits
    settings = SFTSettings(model_name_or_path=str(tiny_llama_dir), output_dir=str(tmp_path / "run"), lora_dim=4)
    save_stage_model(settings, model, tiny_tokenizer, tmp_path / "best", "step1 SFT (test)", "base-model")

    assert not any(layer.fused for layer in lora_layers(model))  # LoRA training can go on
    assert not any("lora" in key for key in load_file(str(tmp_path / "best" / "model.safetensors")))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "best")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
    card = (tmp_path / "best" / "README.md").read_text()
    assert "step1 SFT (test)" in card and "`base-model`" in card and "| lora_dim | 4 |" in card
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "best"))
