"""Unit tests of the shared layer: flags, DeepSpeed configs, sampler, atomic writes, state discovery."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from dschat.steps import reward as reward_step
from dschat.steps import sft as sft_step
from dschat.utils.checkpoint import STATE_FILE, find_latest_state, list_complete_states
from dschat.utils.ds_utils import get_eval_ds_config, get_train_ds_config, resolve_dtype, set_batch_sizes
from dschat.utils.errors import UserError
from dschat.utils.output_dir import publish_directory, staged_output
from dschat.utils.trainer import (
    MetricLogger,
    ResumableSampler,
    check_data_order,
    count_updates,
)
from dschat.utils.utils import atomic_write_json


def test_step1_flag_defaults_match_upstream():
    args = sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "facebook/opt-125m"])
    assert args.data_path == ["Dahoas/rm-static"]
    assert args.data_output_path is None  # upstream: /tmp/data_files/ (world-writable); ours: a per-user cache
    assert args.per_device_train_batch_size == 16 and args.per_device_eval_batch_size == 16
    assert args.max_seq_len == 512 and args.learning_rate == 1e-3 and args.weight_decay == 0.0
    assert args.num_train_epochs == 1 and args.gradient_accumulation_steps == 1
    assert args.lr_scheduler_type == "cosine" and args.num_warmup_steps == 0 and args.seed == 1234
    # lora_module_name None: the architecture's decoder blocks, i.e. upstream's "decoder.layers." on OPT
    assert args.zero_stage == 0 and args.lora_dim == 0 and args.lora_module_name is None
    assert args.lora_learning_rate == 5e-4 and args.tensorboard_path == "step1_tensorboard"
    assert args.sft_only_data_path == [] and args.eot_token == "<|endoftext|>"


def test_step2_flag_defaults_match_upstream():
    args = reward_step.parse_args(["--output_dir", "out", "--model_name_or_path", "facebook/opt-350m", "--deepspeed"])
    assert args.learning_rate == 5e-5 and args.num_padding_at_beginning == 1
    assert args.eval_interval == 0 and args.eval_iters == 100
    assert args.tensorboard_path == "step2_tensorboard"


def test_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "x", "--zero_stage", "7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--zero_stage" in err[0]


def test_conflicting_and_missing_flags_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="--only_optimize_lora"):
        sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--only_optimize_lora"])
    with pytest.raises(UserError, match="--model_name_or_path"):
        sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", str(tmp_path / "missing")])
    # a training stage saves what it trains: --output_dir is required (upstream's scripts always pass it)
    with pytest.raises(SystemExit) as exit_info:
        sft_step.parse_args(["--model_name_or_path", "m", "--resume"])
    assert exit_info.value.code == 2


def test_dtype_resolution_on_cpu():
    assert resolve_dtype(None) == "fp32"
    assert resolve_dtype("bf16") == "bf16"
    with pytest.raises(UserError, match="--dtype fp16"):
        resolve_dtype("fp16")


def test_ds_configs_precision_and_batches():
    cfg = set_batch_sizes(get_train_ds_config(False, dtype="bf16", stage=3), 4, 2, world_size=3)
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"]["stage"] == 3
    assert "fp16" not in get_train_ds_config(False, dtype="fp32") and "bf16" not in get_eval_ds_config(False, "fp32")
    assert get_train_ds_config(False, dtype="fp16")["fp16"]["enabled"] is True


def test_count_updates_rounds_up_per_rank():
    # 10 samples on 3 ranks -> 4 per rank -> batches of 3 -> 2 micro-batches -> accumulation 2 -> 1 step
    assert count_updates(10, 3, 2, num_epochs=1, world_size=3) == 1
    assert count_updates(10, 3, 1, num_epochs=3, world_size=1) == 12
    assert count_updates(10, 3, 1, num_epochs=3, max_steps=5, world_size=1) == 5


def test_resumable_sampler_shards_and_skips():
    a = ResumableSampler(10, shuffle=False, seed=0, rank=0, world_size=3)
    b = ResumableSampler(10, shuffle=False, seed=0, rank=2, world_size=3)
    assert list(a) == [0, 3, 6, 9] and list(b) == [2, 5, 8, 1]  # padded by wrapping round, like DistributedSampler
    shuffled = ResumableSampler(10, shuffle=True, seed=7, rank=0, world_size=1)
    first = list(shuffled)
    shuffled.set_epoch(1)
    second = list(shuffled)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    shuffled.set_epoch(1, start=4)
    assert list(shuffled) == second[4:] and len(shuffled) == 6


def _batch_padding(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouping_covers_every_sample_with_little_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    for world_size in (1, 2):
        shards = [list(ResumableSampler(103, shuffle=True, seed=1, rank=r, world_size=world_size,
                                        lengths=lengths, batch_size=4)) for r in range(world_size)]
        assert sorted({i for shard in shards for i in shard}) == list(range(103))
        assert all(len(shard) == math.ceil(103 / world_size) for shard in shards)
        assert max(lengths[i] for i in shards[0][:4]) == 50  # the longest batch comes first
        plain = list(ResumableSampler(103, shuffle=True, seed=1, rank=0, world_size=world_size, batch_size=4))
        assert _batch_padding(shards[0], lengths, 4) * 5 < _batch_padding(plain, lengths, 4)
        if world_size == 2:  # both ranks' step-k batches come from one sorted global batch: similar widths
            widths = [[max(lengths[i] for i in shard[k:k + 4]) for k in range(0, 48, 4)] for shard in shards]
            assert all(abs(a - b) <= 2 for a, b in zip(*widths))


def test_length_grouping_is_seeded_per_epoch_and_resumable():
    lengths = [i % 13 for i in range(60)]
    sampler = ResumableSampler(60, shuffle=True, seed=3, rank=0, world_size=1, lengths=lengths, batch_size=4)
    first = list(sampler)
    again = list(ResumableSampler(60, shuffle=True, seed=3, rank=0, world_size=1, lengths=lengths, batch_size=4))
    sampler.set_epoch(1)
    second = list(sampler)
    assert first == again and first != second and sorted(second) == list(range(60))
    sampler.set_epoch(1, start=8)
    assert list(sampler) == second[8:]
    unshuffled = ResumableSampler(60, shuffle=False, seed=3, rank=0, world_size=1, lengths=lengths, batch_size=4)
    assert list(unshuffled) == list(range(60))  # evaluation order is never regrouped
    with pytest.raises(ValueError, match="lengths"):
        ResumableSampler(60, shuffle=True, seed=3, lengths=lengths[:-1])


def test_group_by_length_and_pad_mask_flags():
    args = sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m"])
    assert args.group_by_length and args.pad_mask == "auto" and args.groups_by_length
    args = sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--no_group_by_length", "--pad_mask", "always"])
    assert not args.group_by_length and args.pad_mask == "always" and not args.groups_by_length
    args = sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--padding", "max_length"])
    assert not args.groups_by_length  # every batch is max_seq_len wide anyway
    # PPO rollouts are left-padded and always keep their mask: the flag is not offered rather than ignored
    from dschat.steps import ppo as ppo_step

    ppo_flags = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", "out"]
    assert ppo_step.parse_args(ppo_flags).group_by_length
    with pytest.raises(SystemExit):
        ppo_step.parse_args(ppo_flags + ["--pad_mask", "always"])


def test_resume_refuses_another_data_order():
    saved = {"seed": 1, "per_device_train_batch_size": 8, "group_by_length": True, "world_size": 2,
             "gradient_accumulation_steps": 1}
    check_data_order(saved, dict(saved), "ckpt")  # same settings
    check_data_order(None, saved, "ckpt")  # a state from before the order was recorded
    # an older state that recorded other names is judged only on the names both record
    check_data_order({"per_device_train_batch_size": 8, "world_size": 2}, saved, "ckpt")
    with pytest.raises(UserError, match=r"--per_device_train_batch_size 8 \(now --per_device_train_batch_size 4\)"):
        check_data_order(saved, {**saved, "per_device_train_batch_size": 4}, "ckpt")
    with pytest.raises(UserError, match=r"2 rank\(s\) \(now 1 rank\(s\)\).*new --output_dir"):
        check_data_order(saved, {**saved, "world_size": 1}, "ckpt")
    with pytest.raises(UserError, match="--group_by_length"):
        check_data_order(saved, {**saved, "group_by_length": False}, "ckpt")
    with pytest.raises(UserError, match="--gradient_accumulation_steps 1 \\(now --gradient_accumulation_steps 2"):
        check_data_order(saved, {**saved, "gradient_accumulation_steps": 2}, "ckpt")


def test_recorded_data_order_is_read_from_the_sampler():
    """Every setting the sampler's order depends on is recorded: changing any one changes the order it
    draws and the record, so no hand-kept list of flags can miss one."""
    base = dict(dataset_len=40, shuffle=True, seed=3, rank=0, world_size=2, lengths=list(range(40)), batch_size=4)
    sampler = ResumableSampler(**base)
    for change in ({"seed": 4}, {"shuffle": False}, {"batch_size": 2}, {"lengths": None}, {"world_size": 1}):
        other = ResumableSampler(**{**base, **change})
        assert list(other) != list(sampler), change
        assert other.order_settings() != sampler.order_settings(), change


def test_staged_output_keeps_history_and_replaces_model(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training.log").write_text("log")
    (out / "model.safetensors").write_text("old")
    with staged_output(out) as tmp:
        assert tmp.parent == out  # staged on the target's own filesystem
        (tmp / "model.safetensors").write_text("new")
        assert (out / "model.safetensors").read_text() == "old"  # untouched until complete
    assert (out / "model.safetensors").read_text() == "new" and (out / "training.log").read_text() == "log"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "training.log"]


def test_staged_output_failure_leaves_old_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with staged_output(out) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("killed")
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_publish_directory_moves_a_kept_best_model_into_its_output(tmp_path):
    out = tmp_path / "run"
    best = out / "best_model"
    best.mkdir(parents=True)
    (out / "training.log").write_text("log")
    (out / "config.json").write_text("last")
    (best / "config.json").write_text("best")
    (best / "model.safetensors").write_text("best weights")
    inode = (best / "model.safetensors").stat().st_ino
    publish_directory(best, out)  # the DPO case: the source inside its target, the run's files kept
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training.log"]
    assert (out / "config.json").read_text() == "best" and (out / "training.log").read_text() == "log"
    assert (out / "model.safetensors").stat().st_ino == inode  # renamed, not copied

    actor, best_actor = tmp_path / "ppo" / "actor", tmp_path / "ppo" / "best_actor"
    actor.mkdir(parents=True)
    best_actor.mkdir()
    (actor / "pytorch_model.bin").write_text("last")
    (best_actor / "model.safetensors").write_text("best")
    publish_directory(best_actor, actor, keep_existing=False)  # the PPO case: the old actor's files go
    assert [p.name for p in actor.iterdir()] == ["model.safetensors"] and not best_actor.exists()


def test_only_complete_states_are_found(tmp_path, monkeypatch):
    from dschat.utils.checkpoint import sign_state

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # this test's own signing key
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        d = root / f"step-{step}"
        d.mkdir(parents=True)
        if complete:
            atomic_write_json(d / STATE_FILE, {"global_step": step})
            sign_state(d, {"stage": "t", "engines": []})
    (root / ".tmp-step-20").mkdir()
    assert [p.name for p in list_complete_states(tmp_path)] == ["step-5", "step-10"]
    assert find_latest_state(tmp_path).name == "step-10"
    assert find_latest_state(tmp_path / "nothing") is None


def test_metric_logger_truncates_after_resume_point(tmp_path):
    logger = MetricLogger(str(tmp_path), None, "t")
    for step in (1, 2, 3, 4):
        logger.log(step, "train", {"loss": 1.0 / step}, echo=False)
    logger.truncate_after(2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.5


def test_repo_scripts_are_executable():
    repo = Path(__file__).resolve().parents[1]
    scripts = list((repo / "training").rglob("*.sh"))
    assert scripts and all(os.access(s, os.X_OK) for s in scripts)


def test_optim_flag_builds_torchs_fused_adamw_on_a_real_engine(tiny_llama_dir):
    """On the CPU accelerator the default (auto) and --optim adamw_torch_fused step with torch's fused AdamW (one
    pass per tensor), the same update as --optim adamw_torch (the plain kernel) up to rounding; offload keeps
    DeepSpeed's CPU Adam."""
    import torch
    from transformers import AutoModelForCausalLM

    from dschat.utils.build import initialize_engine
    from dschat.utils.dist import init_distributed
    from dschat.utils.optim import create_optimizer

    assert sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m"]).optim == "auto"
    args = sft_step.parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--optim", "adamw_torch_fused"])
    assert args.optim == "adamw_torch_fused"
    with pytest.raises(UserError, match="--optim adamw_torch_fused: ZeRO offload"):
        create_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1, offload=True,
                         optim="adamw_torch_fused")
    init_distributed()
    ids = torch.tensor([[5, 9, 14, 3, 7, 2]])
    weights = {}
    for optim in ("auto", "adamw_torch_fused", "adamw_torch"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
        config = set_batch_sizes(get_train_ds_config(offload=False, dtype="fp32", stage=0), 1, 1, 1)
        engine = initialize_engine(model, config, learning_rate=1e-2, weight_decay=0.1, lora_learning_rate=1e-2,
                                   lr_scheduler_type="constant", num_warmup_steps=0, num_training_steps=2,
                                   offload=False, optim=optim)
        assert isinstance(engine.optimizer, torch.optim.AdamW)
        assert bool(engine.optimizer.defaults.get("fused")) == (optim != "adamw_torch")
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
            engine.step()
        weights[optim] = [p.detach().clone() for p in engine.module.parameters()]
    for auto, fused, plain in zip(weights["auto"], weights["adamw_torch_fused"], weights["adamw_torch"]):
        assert torch.equal(auto, fused)
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
