"""The step 2.5 stage, in the order it runs: build the models, fill the missing shards, merge them and write
the outputs (easy.jsonl, hard.jsonl, figures and, last, manifest.json: its presence proves a whole run).

Owns the engines (frozen SFT sampler, frozen reward model), the distributed driver (shards dealt to ranks,
rank 0's errors broadcast so no rank waits forever) and the outputs. The math lives in `gaps`, the prompts
in `prompts`, the shard protocol in `shards`; flags are parsed in `cli` (this module must not import it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from dschat.rlhf.generation import Generator, hybrid_engine_unavailable_reason
from dschat.utils import startup
from dschat.utils.build import (
    frozen_causal_lm,
    frozen_ds_config,
    frozen_reward_model,
    initialize_frozen_engine,
)
from dschat.utils.checkpoint import maybe_inject_kill
from dschat.utils.dist import barrier, broadcast_object, get_rank, get_world_size, is_rank_0
from dschat.utils.ds_utils import get_train_ds_config, set_batch_sizes
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_json, atomic_write_jsonl
from dschat.utils.inference import RewardScorer
from dschat.utils.model.model_utils import create_hf_model
from dschat.utils.model.reward_model import ending_text, resolve_reward_ending
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.printing import print_rank_0
from dschat.utils.tokenizer import load_hf_tokenizer
from dschat.utils.trainer import MetricLogger
from mpo_ext import plots
from mpo_ext.selection.gaps import (
    accuracy_by_gap_bucket,
    balanced_threshold,
    gap_summary,
    human_agreement,
    orient_record,
    split_by_gap,
    split_warnings,
    threshold_for_fraction,
)
from mpo_ext.selection.prompts import items_hash, load_items
from mpo_ext.selection.settings import PAIR_RULE, SelectionSettings
from mpo_ext.selection.shards import (
    ShardWorker,
    assign_shards,
    discard_empty_shard_dir,
    prepare_shard_dir,
    read_shards,
    shard_fingerprint,
    shard_path,
    shard_ranges,
)

# --------------------------------------------------------------------------------------------- models


def build_actor(settings: SelectionSettings, tokenizer, ds_config: dict):
    """Frozen SFT engine for sampling; a Hybrid Engine only where DeepSpeed can run one."""
    if not settings.enable_hybrid_engine:
        return frozen_causal_lm(settings.sft_model_name_or_path, tokenizer, ds_config)
    model = create_hf_model(AutoModelForCausalLM, settings.sft_model_name_or_path, tokenizer, ds_config)
    if hybrid_engine_unavailable_reason(model) is None:
        import deepspeed  # only for the Hybrid Engine request: a plain run never needs it at import time

        config = get_train_ds_config(offload=False, dtype=settings.resolved_dtype, stage=settings.zero_stage,
                                     enable_hybrid_engine=True,
                                     max_out_tokens=settings.max_prompt_seq_len + settings.max_answer_seq_len)
        config = set_batch_sizes(config, settings.per_device_generation_batch_size, 1, get_world_size())
        model.requires_grad_(False)
        try:
            engine, *_ = deepspeed.initialize(model=model, config=config)
            return engine
        except Exception as err:  # noqa: BLE001 - the flag is a request; never fail the stage on it
            print_rank_0(f"warning: --enable_hybrid_engine: building the Hybrid Engine failed "
                         f"({type(err).__name__}: {err}); generating with Hugging Face generate")
    return initialize_frozen_engine(model, ds_config)


def build_reward(settings: SelectionSettings, tokenizer, ds_config: dict):
    return frozen_reward_model(settings.reward_model_name_or_path, tokenizer, ds_config,
                               settings.num_padding_at_beginning)


def reward_tokenizer(settings, fallback):
    """The reward model's own tokenizer; upstream step-2 outputs may lack one, then the SFT tokenizer."""
    try:
        return load_hf_tokenizer(settings.reward_model_name_or_path)
    except UserError:
        if fallback is None:
            raise
        print_rank_0(f"warning: no tokenizer in {settings.reward_model_name_or_path}; scoring with the SFT tokenizer")
        return fallback


# --------------------------------------------------------------------------------------------- shards


def run_shards(settings: SelectionSettings, worker: ShardWorker, shards: list[range], mine: list[int], all_assignments: list[list[int]],
               output_dir: Path) -> int:
    """Process this rank's shards; returns the number of prompts done. Under lockstep every rank runs as
    many batches as the busiest one."""
    my_batches = sum(len(worker.batches(shards[s])) for s in mine)
    busiest = max(sum(len(worker.batches(shards[s])) for s in assigned) for assigned in all_assignments)
    total_prompts = sum(len(shards[s]) for s in mine)
    bar = tqdm(total=total_prompts, unit="prompt", disable=not is_rank_0(), dynamic_ncols=True,
               desc=f"select (rank 0 of {get_world_size()})")
    done, start = 0, time.time()
    # Progress records in metrics.jsonl (all ranks' prompts, counted from rank 0's share): the pipeline's heartbeat.
    everything = sum(len(shard) for shard in shards)
    done_before = everything - sum(len(shards[s]) for assigned in all_assignments for s in assigned)
    progress = MetricLogger(str(output_dir), None, "select")
    progress.start(done_before, everything, unit="prompts")
    with bar:  # closed (its line ended) also when a batch fails, so an error starts on a line of its own
        for count, shard_id in enumerate(mine, start=1):
            records: list[dict] = []
            for batch in worker.batches(shards[shard_id]):
                records.extend(worker.run_batch(batch))
                startup.report(until="first_batch")  # no optimizer here: the first scored batch (once)
                bar.update(len(batch))
                done += len(batch)
                progress.progress(min(everything, done_before + done * get_world_size()))
                rate = done / max(time.time() - start, 1e-9)
                bar.set_postfix(all_ranks=f"{rate * get_world_size():.1f} prompts/s")
            records.sort(key=lambda r: r["index"])
            atomic_write_jsonl(shard_path(output_dir, shard_id), records)
            maybe_inject_kill("after_shard", count)  # crash tests: DSCHAT_KILL_AT=after_shard:N
        if worker.lockstep:
            for _ in range(busiest - my_batches):
                worker.dummy_batch()
    return done


# --------------------------------------------------------------------------------------------- outputs


def write_split_outputs(settings: SelectionSettings, raw_records: list[dict], output_dir: Path, extra_manifest: dict) -> dict:
    """Apply the label policy and theta to the scored pairs; write easy/hard, the figures and (last) the
    manifest. Rank 0 only."""
    split = settings.split

    manifest_path = output_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # the manifest marks a complete output: drop a stale one first
    records = [orient_record(r, split.label_policy) for r in raw_records]
    kept = [r for r in records if r is not None]
    gaps = np.asarray([r["gap"] for r in kept], dtype=float)
    theta = (threshold_for_fraction(gaps, split.easy_fraction) if split.easy_fraction is not None
             else float(split.threshold))
    easy_mask = split_by_gap(gaps, theta)
    easy = [r for r, e in zip(kept, easy_mask) if e]
    hard = [r for r, e in zip(kept, easy_mask) if not e]
    atomic_write_jsonl(output_dir / "easy.jsonl", easy)
    atomic_write_jsonl(output_dir / "hard.jsonl", hard)
    suggested = balanced_threshold(gaps)
    warnings = split_warnings(len(easy), len(hard), theta, suggested)
    identical = sum(1 for r in raw_records if len(set(r["responses"])) == 1)
    if identical:
        warnings.append(f"{identical} of {len(raw_records)} prompts have two identical answers (reward gap 0: "
                        "they go to the hard split and give DPO no signal)")
    for message in warnings:
        print_rank_0(f"warning: {message}")
    plots.plot_reward_gap_histogram(gaps, theta, output_dir / "reward_gap_hist.png",
                                    title=f"Reward gaps ({settings.pair_source}, {len(kept)} pairs)")
    files = ["easy.jsonl", "hard.jsonl", "reward_gap_hist.png"]
    accuracy = None
    human_gaps, agrees = human_agreement(raw_records)
    if human_gaps.size:
        buckets = accuracy_by_gap_bucket(human_gaps, agrees, split.gap_edges)
        accuracy = {"overall_accuracy": float(agrees.mean()), "pairs": int(agrees.size), "buckets": buckets,
                    "note": "share of dataset pairs where the reward model scores the human-chosen answer "
                            "strictly higher, by |reward gap| bucket (paper Figure 2)"}
        atomic_write_json(output_dir / "accuracy_by_gap.json", accuracy)
        plots.plot_accuracy_by_gap(buckets, output_dir / "accuracy_by_gap.png")
        files += ["accuracy_by_gap.json", "accuracy_by_gap.png"]
    total = len(kept)
    manifest = {
        "stage": "step2.5_select",
        "method": "two-stage MPO (Gou & Nguyen 2024): reward-gap split, easy gap > theta, hard gap <= theta",
        "split_mode": "easy_fraction" if split.easy_fraction is not None else "threshold",
        "threshold": theta,
        "easy_fraction_requested": split.easy_fraction,
        "balanced_threshold": suggested,
        "counts": {"prompts": len(raw_records), "pairs": total, "dropped": len(records) - total,
                   "easy": len(easy), "hard": len(hard), "identical_answers": identical},
        "fractions": {"easy": len(easy) / total if total else 0.0, "hard": len(hard) / total if total else 0.0},
        "gap": gap_summary(gaps),
        "rm_accuracy_vs_human": accuracy["overall_accuracy"] if accuracy else None,
        "pair_source": settings.pair_source,
        "pair_rule": PAIR_RULE,
        "num_samples": settings.num_samples if settings.samples_answers else 2,
        "label_policy": split.label_policy,
        "models": {"sft": settings.sft_model_name_or_path if settings.samples_answers else None,
                   "reward": settings.reward_model_name_or_path},
        "seed": settings.seed,
        "sampling": settings.sampling_record(),
        "warnings": warnings,
        "files": files,
        **extra_manifest,
    }
    atomic_write_json(manifest_path, manifest)
    print_rank_0(f"split at theta={theta:.4g}: easy {len(easy)} ({manifest['fractions']['easy']:.1%}), "
                 f"hard {len(hard)} ({manifest['fractions']['hard']:.1%}), dropped {len(records) - total}; "
                 f"written to {output_dir}")
    return manifest


# --------------------------------------------------------------------------------------------- driver


def run(settings: SelectionSettings) -> dict | None:
    """The whole stage (call on every rank after init_distributed); returns the manifest on rank 0."""
    rank, world = get_rank(), get_world_size()
    output_dir = prepare_output_dir(settings.output_dir)
    sft_tokenizer = load_hf_tokenizer(settings.sft_model_name_or_path) if settings.samples_answers else None
    rm_tokenizer = reward_tokenizer(settings, sft_tokenizer)
    items, load_stats = load_items(settings, sft_tokenizer or rm_tokenizer)
    digest = items_hash(items)
    shards = shard_ranges(len(items), settings.shard_size)
    fingerprint = shard_fingerprint(settings, digest, len(items))
    error = None
    if is_rank_0():
        try:
            prepare_shard_dir(output_dir, fingerprint, settings.rebuild_shards)
        except UserError as err:
            error = str(err)
    pending = broadcast_object(
        (error, [s for s in range(len(shards)) if not shard_path(output_dir, s).is_file()] if is_rank_0() else None))
    error, pending = pending
    if error:
        raise UserError(error)
    done_before = len(shards) - len(pending)
    print_rank_0(f"{len(items)} prompts in {len(shards)} shards of {settings.shard_size}; {done_before} already done, "
                 f"{len(pending)} to do on {world} rank(s)")
    worker_stats: dict[str, Any] = {}
    if pending:
        ds_config = frozen_ds_config(settings.resolved_dtype, offload=settings.offload, zero_stage=settings.zero_stage,
                                     micro_batch_size=settings.per_device_eval_batch_size)
        generator = None
        if settings.samples_answers:
            actor = build_actor(settings, sft_tokenizer, ds_config)
            generator = Generator(actor, sft_tokenizer, max_new_tokens=settings.max_answer_seq_len,
                                  sampling=settings.sampling, zero_stage=settings.zero_stage,
                                  enable_hybrid_engine=settings.enable_hybrid_engine)
        reward = build_reward(settings, rm_tokenizer, ds_config)
        ending = resolve_reward_ending(settings.reward_model_name_or_path,
                                       settings.reward_end_text or settings.end_of_conversation_token)
        scorer = RewardScorer(reward, rm_tokenizer, ending_text(ending, rm_tokenizer), ending=ending,
                              max_seq_len=settings.max_prompt_seq_len + settings.max_answer_seq_len,
                              batch_size=settings.per_device_eval_batch_size, share_prompts=True)
        worker = ShardWorker(settings, items, sft_tokenizer or rm_tokenizer, scorer, generator,
                             lockstep=settings.zero_stage == 3 and world > 1,
                             max_prompt_tokens=settings.max_prompt_seq_len)
        assignments = [assign_shards(pending, r, world) for r in range(world)]
        start = time.time()
        try:
            done = run_shards(settings, worker, shards, assignments[rank], assignments, output_dir)
        except UserError:  # e.g. a reward model giving NaN at its first batch: leave nothing behind
            if is_rank_0() and not done_before:
                discard_empty_shard_dir(output_dir)
            raise
        elapsed = time.time() - start
        worker_stats = {"prompts_this_run": sum(len(shards[s]) for s in pending),
                        "seconds": round(elapsed, 2),
                        "prompts_per_second": round(done * world / max(elapsed, 1e-9), 3),
                        "generation_path": generator.path if generator is not None else None}
    barrier()
    manifest, error = None, None
    if is_rank_0():
        try:
            manifest = merge_shards_and_write_outputs(settings, output_dir, shards, digest, load_stats, done_before,
                                                      worker_stats)
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)  # the other ranks must not wait forever on a failed rank 0
    if error:
        raise UserError(error)
    return manifest


def merge_shards_and_write_outputs(settings: SelectionSettings, output_dir: Path, shards: list[range], digest: str, load_stats: dict,
                                   done_before: int, worker_stats: dict) -> dict:
    """Rank 0: read every shard back (all ranks' work) and write the outputs with what this run was."""
    raw_records = read_shards(output_dir, len(shards))
    extra = {
        "data": {"data_path": settings.data_path, "data_split": settings.data_split,
                 "data_phase": settings.data_phase, "max_prompts": settings.max_prompts,
                 "chat_format": settings.chat_format, "keep_truncated": settings.keep_truncated, "hash": digest,
                 **load_stats},
        "shards": {"size": settings.shard_size, "count": len(shards), "done_before_this_run": done_before},
        "world_size": get_world_size(),
        "dtype": settings.resolved_dtype,
        "run": worker_stats,
    }
    return write_split_outputs(settings, raw_records, output_dir, extra)
