"""Run ONE benchmark configuration in this (fresh) process and write its measurements as JSON.

`python benchmarks/worker.py '<config json>' OUT.json` (the deepspeed launcher may append
`--local_rank=N`). A fresh process per configuration is what makes the peak-RSS figures per
configuration: `ru_maxrss` is a process-lifetime high-water mark.

Configurations (keys of the JSON):
  kind=train: task sft|rm|dpo, impl ours|trl|bare, model tiny|rand|wide|xl|s135m|smollm2, batch_size, padding
              longest|max_length, ref resident|precomputed|copy (dpo; copy: a second model even for LoRA),
              data main|small, lora_dim (ours), flags (ours: extra step flags, e.g. --no_group_by_length),
              max_seq_len (ours, default 512), samples_per_window, windows, warmup_steps
              (after `warmup_steps` optimizer steps, `windows` passes over the same samples are timed)
  kind=gen:   impl ours|bare, model, batch_size, max_new_tokens, samples_per_window, windows, warmup_steps
              (whole passes here); zero_stage 3 + launched on 2 ranks: ours gathers once per call, bare
              re-gathers per token
  kind=ppo:   batch_size, max_new_tokens, windows, warmup_steps, model (default tiny; its critic is
              critic_<model>), data (default main), max_prompt_seq_len (default 192)
  kind=select: step 2.5 (`mpo_ext.selection.run`): model (SFT and critic_<model> as reward model), prompts,
              batch_size (prompts per generate call), num_samples, max_new_tokens, max_prompt_seq_len; the
              first batch of each rank is the warm-up, the rest is one timed window
  kind=prepare: build the work directory (data subset, random models, critic, token ids)
  kind=prepare_real: the real-size set (model_dir: a SmolLM2-135M-Instruct folder): its weights linked as
              model "smollm2", its shape with random weights as "s135m", token ids through our chat-template path
  any kind:   ranks (launched by run.py under the deepspeed launcher when > 1: each rank takes its
              share of a window; CPU seconds and tokens are summed over ranks, wall is the slowest rank's),
              workdir, threads, hang_dump_s (faulthandler stacks before a timeout), profile (ours: PATH for a
              torch.profiler table and a cProfile dump)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MAX_PROMPT_LEN,
    SEED,
    Clock,
    critic_dir,
    data_file,
    load_tokens,
    model_dir,
    now,
    our_data_args,
    padded_width,
    peak_rss_mb,
    rss_mb,
    token_set,
    write_json,
)

LEARNING_RATE = 1e-4
BETA = 0.1
ADAM_BETAS = (0.9, 0.95)  # ours (dschat.utils.utils.create_optimizer); TRL and bare are given the same
GRAD_CLIP = 1.0  # our DeepSpeed config's gradient_clipping; TRL's max_grad_norm default; bare clips too


# --------------------------------------------------------------------------------------------- window data


def window_items(cfg: dict, tokens: dict) -> list:
    """The samples of one window, in order (the same for every implementation)."""
    n = cfg["samples_per_window"]
    items = tokens["sft"] if cfg["task"] == "sft" else tokens["pairs" if cfg.get("data", "main") == "main"
                                                                     else "pairs_small"]
    if len(items) < n:
        raise SystemExit(f"only {len(items)} training items, need {n}; raise NUM_PAIRS in benchmarks/common.py")
    return items[:n]


def row_lengths(cfg: dict, items: list) -> list[list[int]]:
    """Per batch, the lengths of the rows the model sees (pairs: chosen rows then rejected rows)."""
    bs = cfg["batch_size"]
    batches = [items[i:i + bs] for i in range(0, len(items), bs)]
    if cfg["task"] == "sft":
        return [[len(x) for x in batch] for batch in batches]
    return [[len(c) for c, _, _ in batch] + [len(r) for _, r, _ in batch] for batch in batches]


def token_counts(cfg: dict, items: list, padding: str, multiple: int | None) -> tuple[int, int]:
    """(useful, padded) tokens of one window: non-pad tokens, and rows x batch width."""
    useful = padded = 0
    for lengths in row_lengths(cfg, items):
        useful += sum(lengths)
        padded += len(lengths) * padded_width(lengths, padding, token_set(cfg["model"]).max_seq_len, multiple)
    return useful, padded


def total_steps(cfg: dict) -> int:
    return cfg["warmup_steps"] + cfg["windows"] * steps_per_window(cfg)


def steps_per_window(cfg: dict) -> int:
    """Optimizer steps of one rank per window (each of `ranks` ranks takes its share of the samples)."""
    return -(-cfg["samples_per_window"] // (cfg["batch_size"] * cfg.get("ranks", 1)))


def reduce_windows(windows: list[dict]) -> list[dict]:
    """Windows of all ranks as one: tokens, samples and CPU seconds summed, wall the slowest rank's."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return windows
    for w in windows:
        wall = torch.tensor([w["seconds"]], dtype=torch.float64)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        sums = torch.tensor([w["cpu_seconds"], w["useful_tokens"], w["padded_tokens"], w["samples"]],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        w["seconds"], w["cpu_seconds"] = float(wall.item()), float(sums[0])
        w["useful_tokens"], w["padded_tokens"], w["samples"] = (int(x) for x in sums[1:].tolist())
    return windows


def finish_train(cfg: dict, items: list, clock: Clock, padding: str, multiple: int | None,
                 per_step: list[tuple[int, int]] | None = None) -> dict:
    useful, padded = token_counts(cfg, items, padding, multiple)
    windows = clock.windows(steps_per_window(cfg), cfg["warmup_steps"], useful, padded, cfg["samples_per_window"],
                            per_step)
    if len(clock) != total_steps(cfg):
        raise SystemExit(f"expected {total_steps(cfg)} optimizer steps, timed {len(clock)}")
    return {"windows": windows, "steps": len(clock), "train_seconds": clock.wall[-1] - clock.wall0,
            "step_seconds": clock.step_seconds()}


# --------------------------------------------------------------------------------------------- ours


def _our_module(task: str):
    if task == "sft":
        from dschat.steps import sft as module
    elif task == "rm":
        from dschat.steps import reward as module
    else:
        from mpo_ext import dpo as module
    return module


def our_argv(cfg: dict, workdir: Path) -> list[str]:
    """The flags our step module gets for a configuration (its defaults otherwise)."""
    bs = cfg["batch_size"]
    argv = our_data_args(workdir, cfg.get("data", "main"), cfg["model"]) + [
        "--model_name_or_path", str(model_dir(workdir, cfg["model"])),
        "--per_device_train_batch_size", str(bs), "--per_device_eval_batch_size", str(bs),
        "--padding", cfg["padding"], "--num_train_epochs", str(-(-total_steps(cfg) // steps_per_window(cfg))),
        "--max_steps", str(total_steps(cfg)),
        "--learning_rate", str(LEARNING_RATE), "--lr_scheduler_type", "constant", "--zero_stage", "0",
        "--dtype", "fp32", "--output_dir", str(workdir / f"ours_out_{os.getpid()}"),
    ]
    if cfg["task"] == "rm":
        argv += ["--num_padding_at_beginning", "0"]
    if cfg["task"] == "dpo":
        argv += ["--beta", str(BETA)]
        if cfg.get("ref") == "precomputed":
            argv += ["--precompute_ref_log_probs"]
    if cfg.get("ref") == "copy":  # a second model for the reference even where the base weights would do
        argv += ["--reference_model_name_or_path", str(_reference_copy(workdir, cfg["model"]))]
    if cfg.get("lora_dim"):
        argv += ["--lora_dim", str(cfg["lora_dim"]), "--lora_module_name", "layers.", "--only_optimize_lora"]
    if cfg.get("max_seq_len"):  # shorter rows: the memory runs where weights, not activations, dominate
        argv += ["--max_seq_len", str(cfg["max_seq_len"])]
    return argv + list(cfg.get("flags", ()))


def run_ours_train(cfg: dict, workdir: Path) -> dict:
    """Our step module end to end: parse_args -> build (DeepSpeed engine) -> the shared Trainer.train()."""
    import deepspeed  # noqa: F401 - counted in the baseline, not in the run
    import torch
    from torch.utils.data import DataLoader

    from dschat.utils.dist import init_distributed
    from dschat.utils.trainer import ResumableSampler, sample_lengths

    module = _our_module(cfg["task"])
    tokens = load_tokens(workdir, cfg["model"])
    items = window_items(cfg, tokens)
    baseline = rss_mb()
    bs = cfg["batch_size"]
    args = module.parse_args(our_argv(cfg, workdir))
    init_distributed(args.local_rank)
    t0 = now()
    trainer = module.build(args)
    build_seconds = now() - t0
    rss_after_build = rss_mb()
    alive_after_build = _count_live_causal_lms(torch, collect=False)

    # The samples the other implementations see: the first N items of our train set. With our default
    # length grouping they are regrouped every pass (an epoch of N samples); otherwise in the same order.
    loader = trainer.train_loader
    n = cfg["samples_per_window"]
    lengths = sample_lengths(loader.dataset)[:n] if args.groups_by_length else None
    world = torch.distributed.get_world_size()
    sampler = ResumableSampler(n, shuffle=lengths is not None, seed=0, rank=torch.distributed.get_rank(),
                               world_size=world, lengths=lengths, batch_size=bs)
    trainer.train_loader = DataLoader(loader.dataset, batch_size=bs, sampler=sampler, collate_fn=loader.collate_fn)
    trainer.eval_loader = None
    if not cfg.get("max_seq_len"):
        _check_same_items(cfg, loader.dataset, items)

    clock = Clock()
    engine_step = trainer.engine.step

    def timed_step(*a, **k):
        out = engine_step(*a, **k)
        clock.tick()
        return out

    trainer.engine.step = timed_step
    first_loss: list[float] = []
    compute_loss = trainer.compute_loss

    per_step: list[tuple[int, int]] = []  # gradient_accumulation_steps is 1: a micro-batch is a step

    def recorded_loss(batch):
        metrics = compute_loss(batch)
        if not first_loss:
            first_loss.append(float(metrics["loss"].detach()))
        mask = batch["attention_mask"]
        per_step.append((int(mask.sum()), mask.numel()))
        return metrics

    trainer.compute_loss = recorded_loss
    clock.start()
    with _maybe_profile(cfg):
        trainer.train()
    result = finish_train(cfg, items, clock, cfg["padding"], 8, per_step)
    for w in result["windows"]:
        w["samples"] = -(-n // world) if world > 1 else n  # this rank's share; summed over ranks below
    reduce_windows(result["windows"])
    alive = _count_live_causal_lms(torch)
    result.update(baseline_rss_mb=baseline, rss_after_build_mb=rss_after_build, build_seconds=build_seconds,
                  first_loss=first_loss[0] if first_loss else None, live_causal_lm_models=alive,
                  live_causal_lm_models_after_build=alive_after_build)
    return result


def _reference_copy(workdir: Path, model: str) -> Path:
    """Another directory (file symlinks) holding the policy's checkpoint: a distinct reference path."""
    source = model_dir(workdir, model)
    target = workdir / f"model_{model}_reference"
    if not target.is_dir():
        tmp = workdir / f".model_{model}_reference.{os.getpid()}"
        tmp.mkdir(parents=True)
        for item in source.iterdir():
            (tmp / item.name).symlink_to(item.resolve())
        tmp.rename(target)
    return target


def _maybe_profile(cfg: dict):
    """`"profile": "PATH"` in the config: torch.profiler op table (CPU time) and a cProfile dump beside it."""
    import contextlib

    if not cfg.get("profile"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def profiled():
        import cProfile
        import pstats

        import torch

        py = cProfile.Profile()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            py.enable()
            yield
            py.disable()
        path = Path(cfg["profile"])
        path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        with open(path.with_suffix(".pystats.txt"), "w") as fh:
            pstats.Stats(py, stream=fh).sort_stats("cumulative").print_stats(60)

    return profiled()


def _check_same_items(cfg: dict, dataset, items: list) -> None:
    """Our loader must hand out exactly the token ids the TRL and bare runners read from tokens.pt."""
    for i, expected in enumerate(items):
        got = dataset[i]
        if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], int):  # DPO's IndexedDataset
            got = got[1]
        if cfg["task"] == "sft":
            same = got["input_ids"].tolist() == expected
        else:
            same = got[0].tolist() == expected[0] and got[2].tolist() == expected[1]
        if not same:
            raise SystemExit(f"item {i}: our pipeline's token ids differ from tokens.pt; delete the work dir")


def _count_live_causal_lms(torch, collect: bool = True) -> int:
    """How many *ForCausalLM modules exist (a freed DPO reference must not be among them).

    `collect=False` also counts unreachable ones that only a later cyclic GC pass would free: memory
    that is still held while training starts.
    """
    import gc

    if collect:
        gc.collect()
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("ForCausalLM"))


# --------------------------------------------------------------------------------------------- TRL


def run_trl_train(cfg: dict, workdir: Path) -> dict:
    """TRL's SFTTrainer / RewardTrainer / DPOTrainer on the same token ids, fp32, no checkpointing."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    tokens = load_tokens(workdir, cfg["model"])
    items = window_items(cfg, tokens)
    baseline = rss_mb()
    path = str(model_dir(workdir, cfg["model"]))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    bs = cfg["batch_size"]
    common = dict(
        output_dir=str(workdir / f"trl_out_{os.getpid()}"), per_device_train_batch_size=bs, max_steps=total_steps(cfg),
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], weight_decay=0.0, max_grad_norm=GRAD_CLIP,
        # TRL's own default, and ours on CPU (auto): torch's fused AdamW; the `*-adamw` rows of --size 135m
        # run both sides with the plain kernel
        optim=cfg.get("trl_optim", "adamw_torch_fused"),
        # fp32 and no activation checkpointing, like ours (TRL defaults to bf16 on CPU and to checkpointing)
        bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10, use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=SEED,
        max_length=token_set(cfg["model"]).max_seq_len,
    )
    clock = Clock()
    first_loss: list[float] = []

    class Ticker(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002 - callback API
            clock.tick()

    def record_first_loss(cls):
        class Recorded(cls):
            def _prepare_dataset(self, dataset, *a, **k):  # already tokenised, by our pipeline
                return dataset if cls is trl.DPOTrainer else super()._prepare_dataset(dataset, *a, **k)

            def compute_loss(self, model, inputs, *a, **k):
                out = super().compute_loss(model, inputs, *a, **k)
                if not first_loss:
                    loss = out[0] if isinstance(out, tuple) else out
                    first_loss.append(float(loss.detach()))
                return out

        return Recorded

    if cfg["task"] == "sft":
        data = Dataset.from_dict({"input_ids": items})
        config = trl.SFTConfig(shuffle_dataset=False, packing=False, **common)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = record_first_loss(trl.SFTTrainer)(model=model, args=config, train_dataset=data,
                                                      processing_class=tokenizer, callbacks=[Ticker()])
        multiple = None
    elif cfg["task"] == "rm":
        data = Dataset.from_dict({"chosen_ids": [c for c, _, _ in items], "rejected_ids": [r for _, r, _ in items]})
        config = trl.RewardConfig(**common)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = record_first_loss(trl.RewardTrainer)(model=model, args=config, train_dataset=data,
                                                         processing_class=tokenizer, callbacks=[Ticker()])
        multiple = None
    else:
        data = Dataset.from_dict({"prompt_ids": [c[:p] for c, _, p in items], "chosen_ids": [c[p:] for c, _, p in items],
                                  "rejected_ids": [r[p:] for _, r, p in items]})
        config = trl.DPOConfig(beta=BETA, precompute_ref_log_probs=cfg.get("ref") == "precomputed", **common)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = record_first_loss(trl.DPOTrainer)(model=model, args=config, train_dataset=data,
                                                      processing_class=tokenizer, callbacks=[Ticker()])
        multiple = None
    rss_after_build = rss_mb()
    clock.start()
    trainer.train()
    result = finish_train(cfg, items, clock, "longest", multiple)
    result.update(baseline_rss_mb=baseline, rss_after_build_mb=rss_after_build,
                  first_loss=first_loss[0] if first_loss else None)
    return result


# --------------------------------------------------------------------------------------------- bare PyTorch


def _pad(rows: list[list[int]], value: int, width: int):
    import torch

    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def run_bare_train(cfg: dict, workdir: Path) -> dict:
    """The floor: the same maths in a plain loop (fused AdamW, clipping, longest-rounded-to-8 padding)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoModelForCausalLM

    tokens = load_tokens(workdir, cfg["model"])
    items = window_items(cfg, tokens)
    baseline = rss_mb()
    torch.manual_seed(SEED)
    path = str(model_dir(workdir, cfg["model"]))
    pad = tokens["pad_token_id"]
    task = cfg["task"]
    ref = None
    if task == "rm":
        base = AutoModel.from_pretrained(path, dtype=torch.float32)
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=False)
        model = torch.nn.ModuleDict({"base": base, "head": head})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if task == "dpo":
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW kernel: our default optimizer on CPU
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=ADAM_BETAS, weight_decay=0.0, fused=True)
    bs = cfg["batch_size"]
    batches = [items[b:b + bs] for b in range(0, len(items), bs)]

    def answer_logps(lm, ids, mask, labels):
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        return -nll.view(labels.shape).sum(dim=1)

    clock = Clock()
    first_loss: list[float] = []
    rss_after_build = rss_mb()
    clock.start()
    for step in range(total_steps(cfg)):
        batch = batches[step % len(batches)]
        if task == "sft":
            width = padded_width([len(x) for x in batch], "longest")
            ids = _pad(batch, pad, width)
            mask = _pad([[1] * len(x) for x in batch], 0, width)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        else:
            rows = [c for c, _, _ in batch] + [r for _, r, _ in batch]
            width = padded_width([len(x) for x in rows], "longest")
            ids = _pad(rows, pad, width)
            mask = _pad([[1] * len(x) for x in rows], 0, width)
            if task == "rm":
                values = model["head"](model["base"](input_ids=ids, attention_mask=mask,
                                                     use_cache=False).last_hidden_state).squeeze(-1)
                # our convention: score the token before the final eos (== pad)
                scores = values.gather(1, (mask.sum(dim=1, keepdim=True) - 2).clamp(min=0)).squeeze(1)
                chosen, rejected = scores.chunk(2)
                loss = F.softplus(rejected - chosen).mean()
            else:
                starts = torch.tensor([p for _, _, p in batch] * 2).unsqueeze(1)
                positions = torch.arange(width).unsqueeze(0)
                labels = ids.masked_fill((mask == 0) | (positions < starts), -100)[:, 1:]
                policy = answer_logps(model, ids, mask, labels)
                with torch.no_grad():
                    reference = answer_logps(ref, ids, mask, labels)
                pc, pr = policy.chunk(2)
                rc, rr = reference.chunk(2)
                loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not first_loss:
            first_loss.append(float(loss.detach()))
        clock.tick()
    result = finish_train(cfg, items, clock, "longest", 8)
    result.update(baseline_rss_mb=baseline, rss_after_build_mb=rss_after_build, first_loss=first_loss[0])
    return result


# --------------------------------------------------------------------------------------------- generation


def _prompt_batches(cfg: dict, tokens: dict) -> list:
    """Left-padded prompt batches through our RLHF collator (identical tensors for both paths)."""
    from dschat.utils.data.data_utils import DataCollatorRLHF

    n = cfg["samples_per_window"]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    prompts = tokens["prompts"]
    if len(prompts) < n * world:
        raise SystemExit(f"only {len(prompts)} prompts of <= {MAX_PROMPT_LEN} tokens, need {n * world}")
    mine = prompts[rank * n:(rank + 1) * n]
    import torch

    collate = DataCollatorRLHF(MAX_PROMPT_LEN, 1, tokens["pad_token_id"], padding="longest")
    bs = cfg["batch_size"]
    return [collate([(torch.tensor(p), torch.ones(len(p), dtype=torch.long), tokens["pad_token_id"])
                     for p in mine[i:i + bs]]) for i in range(0, n, bs)]


def run_gen(cfg: dict, workdir: Path) -> dict:
    """Our Generator (on a DeepSpeed engine, as in PPO) against a bare HF `generate` loop; greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import Generator, answer_lengths, pad_after_eos
    from dschat.utils.build import frozen_causal_lm, frozen_ds_config
    from dschat.utils.dist import init_distributed
    from dschat.utils.tokenizer import load_hf_tokenizer

    tokens = load_tokens(workdir)
    path = str(model_dir(workdir, cfg["model"]))
    zero_stage = cfg.get("zero_stage", 0)
    init_distributed()
    world = torch.distributed.get_world_size()
    baseline = rss_mb()
    tokenizer = load_hf_tokenizer(path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batches = _prompt_batches(cfg, tokens)
    new_tokens = cfg["max_new_tokens"]
    if cfg["impl"] == "bare" and not zero_stage:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def generate(ids, mask):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=pad, eos_token_id=eos)
    else:
        ds_config = frozen_ds_config("fp32", offload=False, zero_stage=zero_stage, micro_batch_size=cfg["batch_size"])
        engine = frozen_causal_lm(path, tokenizer, ds_config)
        if cfg["impl"] == "ours":
            generator = Generator(engine, tokenizer, max_new_tokens=new_tokens, zero_stage=zero_stage)

            def generate(ids, mask):
                return generator.generate(ids, mask)
        else:  # ZeRO-3 without our gather: plain HF generate on the partitioned module, ranks in lockstep

            def generate(ids, mask):
                with torch.no_grad():
                    return engine.module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                  do_sample=False, pad_token_id=pad, eos_token_id=eos,
                                                  synced_gpus=world > 1)
    clock = Clock()
    answer_tokens: list[int] = []
    rss_after_build = rss_mb()
    clock.start()
    for _ in range(cfg["warmup_steps"] + cfg["windows"]):
        count = 0
        for batch in batches:
            seq = generate(batch["prompt"], batch["prompt_att_mask"])
            width = batch["prompt"].shape[1]
            count += int(answer_lengths(pad_after_eos(seq, width, eos, pad), width, eos).sum())
        clock.tick()
        answer_tokens.append(count)
    windows = reduce_windows(clock.windows(1, cfg["warmup_steps"], answer_tokens[-1], 0, cfg["samples_per_window"]))
    return {"windows": windows, "baseline_rss_mb": baseline, "rss_after_build_mb": rss_after_build,
            "answer_tokens_per_window": answer_tokens, "world_size": world}


# --------------------------------------------------------------------------------------------- PPO


def run_ppo(cfg: dict, workdir: Path) -> dict:
    """Our step-3 loop (dschat.steps.ppo) with the phases of each PPO step timed separately."""
    from dschat.steps import ppo
    from dschat.utils.dist import init_distributed

    baseline = rss_mb()
    bs = cfg["batch_size"]
    model = cfg.get("model", "tiny")
    argv = [
        "--actor_model_name_or_path", str(model_dir(workdir, model)),
        "--critic_model_name_or_path", str(critic_dir(workdir, model)),
        "--data_path", str(data_file(workdir, cfg.get("data", token_set(model).data))),
        "--data_output_path", str(workdir / token_set(model).cache),
        "--per_device_generation_batch_size", str(bs), "--per_device_training_batch_size", str(bs),
        "--max_prompt_seq_len", str(cfg.get("max_prompt_seq_len", MAX_PROMPT_LEN)),
        "--max_answer_seq_len", str(cfg["max_new_tokens"]),
        "--num_padding_at_beginning", "0", "--actor_learning_rate", "1e-5", "--critic_learning_rate", "1e-5",
        "--num_warmup_steps", "0", "--seed", str(SEED), "--dtype", "fp32",
        "--max_steps", str(cfg["warmup_steps"] + cfg["windows"]), "--output_dir", str(workdir / f"ppo_out_{os.getpid()}"),
    ]
    args = ppo.parse_args(argv)
    init_distributed(args.local_rank)
    t0 = now()
    loop = ppo.build(args)
    build_seconds = now() - t0
    updater = loop.updater
    phases: list[dict[str, float]] = []
    generate_experience, train_rlhf = updater.generate_experience, updater.train_rlhf
    generate = updater.generator.generate
    gen_clock: dict[str, float] = {}

    def timed_generate(prompts, mask):
        t, c = now(), time.process_time()
        out = generate(prompts, mask)
        gen_clock.update(wall=now() - t, cpu=time.process_time() - c)
        return out

    def timed_experience(prompts, mask, step):
        t, c = now(), time.process_time()
        exp = generate_experience(prompts, mask, step)
        wall, cpu = now() - t, time.process_time() - c
        phases.append({"generation": gen_clock["wall"], "experience": wall - gen_clock["wall"],
                       "cpu_generation": gen_clock["cpu"], "cpu_experience": cpu - gen_clock["cpu"],
                       "answer_tokens": float(exp.generated_tokens), "rows": int(exp.sequences.shape[0]),
                       "width": int(exp.sequences.shape[1])})
        return exp

    def timed_train(exp):
        t, c = now(), time.process_time()
        out = train_rlhf(exp)
        phases[-1]["training"] = now() - t
        phases[-1]["cpu_training"] = time.process_time() - c
        return out

    updater.generator.generate = timed_generate
    updater.generate_experience, updater.train_rlhf = timed_experience, timed_train
    start = now()
    loop.train()
    wall = now() - start
    measured = phases[cfg["warmup_steps"]:]
    windows = [{"seconds": p["generation"] + p["experience"] + p.get("training", 0.0),
                "cpu_seconds": p["cpu_generation"] + p["cpu_experience"] + p.get("cpu_training", 0.0),
                "useful_tokens": int(p["answer_tokens"]), "padded_tokens": 0, "samples": p["rows"]}
               for p in measured]
    return {"phases": measured, "train_seconds": wall, "build_seconds": build_seconds, "baseline_rss_mb": baseline,
            "windows": reduce_windows(windows)}


# --------------------------------------------------------------------------------------------- selection


def run_select(cfg: dict, workdir: Path) -> dict:
    """Step 2.5 end to end (`mpo_ext.selection`: parse_args -> run), each generate+score batch timed.

    The first batch of every rank is the warm-up; the rest form one window (prompts and generated answer
    tokens). `stage_seconds` is the whole `run()`: model build, all batches, merging and writing outputs.
    """
    from dschat.utils.dist import init_distributed
    from mpo_ext import selection

    baseline = rss_mb()
    model = cfg["model"]
    # one directory for all ranks of this run (run.py's port is the same on every rank, unique per run)
    out_dir = workdir / f"select_{model}_{os.environ.get('MASTER_PORT', os.getpid())}"
    argv = [
        "--sft_model_name_or_path", str(model_dir(workdir, model)),
        "--reward_model_name_or_path", str(critic_dir(workdir, model)), "--num_padding_at_beginning", "0",
        "--data_path", str(data_file(workdir, cfg.get("data", "prompts"))),
        "--data_output_path", str(workdir / "data_cache"), "--max_prompts", str(cfg["prompts"]),
        "--max_prompt_seq_len", str(cfg.get("max_prompt_seq_len", MAX_PROMPT_LEN)),
        "--max_answer_seq_len", str(cfg["max_new_tokens"]), "--num_samples", str(cfg.get("num_samples", 2)),
        "--per_device_generation_batch_size", str(cfg["batch_size"]),
        "--per_device_eval_batch_size", str(cfg["batch_size"] * cfg.get("num_samples", 2)),
        # one shard per batch, so that every rank has work at every prompt count
        "--shard_size", str(cfg["batch_size"]), "--output_dir", str(out_dir), "--rebuild_shards",
        "--dtype", "fp32", "--seed", str(SEED),
    ]
    args = selection.parse_args(argv)
    init_distributed(args.local_rank)
    batches: list[dict] = []
    run_batch = selection.ShardWorker.run_batch

    def timed_batch(worker, batch):
        t, c = now(), time.process_time()
        records = run_batch(worker, batch)
        batches.append({"seconds": now() - t, "cpu_seconds": time.process_time() - c, "samples": len(batch),
                        "useful_tokens": sum(sum(r.get("answer_tokens", ())) for r in records)})
        return records

    selection.ShardWorker.run_batch = timed_batch
    t0, c0 = now(), time.process_time()
    selection.run(args)
    stage = {"seconds": now() - t0, "cpu_seconds": time.process_time() - c0}
    if int(os.environ.get("RANK", "0")) == 0:  # run() returns on every rank after rank 0 has written
        shutil.rmtree(out_dir, ignore_errors=True)
    measured = batches[1:]
    if not measured:
        raise SystemExit(f"{len(batches)} batch(es) on this rank: give at least 2 per rank (one is the warm-up)")
    window = {key: sum(b[key] for b in measured) for key in ("seconds", "cpu_seconds", "samples", "useful_tokens")}
    window["padded_tokens"] = 0
    stage_window = reduce_windows([{**stage, "useful_tokens": 0, "padded_tokens": 0,
                                    "samples": sum(b["samples"] for b in batches)}])[0]
    return {"windows": reduce_windows([window]), "batches": batches, "stage": stage_window,
            "baseline_rss_mb": baseline}


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    argv = [a for a in argv if not a.startswith("--local_rank")]
    cfg: dict[str, Any] = json.loads(argv[0])
    out = Path(argv[1])
    workdir = Path(cfg["workdir"])
    if cfg.get("hang_dump_s"):  # a stuck run leaves Python stacks in its log before it is killed
        import faulthandler

        faulthandler.dump_traceback_later(cfg["hang_dump_s"], exit=False)
    if "threads" in cfg:
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    wall_start = time.time()
    load_start = os.getloadavg()[0]
    if cfg["kind"] == "prepare":
        from common import prepare_assets

        write_json(out, prepare_assets(workdir, cfg.get("models")))
        return
    if cfg["kind"] == "prepare_real":
        from common import prepare_real_size

        write_json(out, prepare_real_size(workdir, Path(cfg["model_dir"])))
        return
    if cfg["kind"] == "train":
        runner = {"ours": run_ours_train, "trl": run_trl_train, "bare": run_bare_train}[cfg["impl"]]
        result = runner(cfg, workdir)
    elif cfg["kind"] == "gen":
        result = run_gen(cfg, workdir)
    elif cfg["kind"] == "ppo":
        result = run_ppo(cfg, workdir)
    elif cfg["kind"] == "select":
        result = run_select(cfg, workdir)
    else:
        raise SystemExit(f"unknown kind {cfg['kind']!r}")
    import torch

    result.update(config=cfg, peak_rss_mb=peak_rss_mb(), process_seconds=time.time() - wall_start,
                  torch_threads=torch.get_num_threads(), loadavg_1min=[load_start, os.getloadavg()[0]])
    result["peak_rss_mb_ranks"] = [result["peak_rss_mb"]]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, result["peak_rss_mb"])
        result["peak_rss_mb_ranks"] = every
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(out, result)


if __name__ == "__main__":
    main(sys.argv[1:])
