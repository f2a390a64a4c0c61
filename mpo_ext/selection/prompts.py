"""The prompts of step 2.5: the phase slice of --data_path that step 3 would see, as text.

Owns `load_items` (prompt items, and the dataset's answers with --pair_source dataset), their token
lengths and `items_hash` (their identity, part of the shard fingerprint). Must not import models, the
shard protocol or the CLI.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from dschat.utils.data import data_utils
from dschat.utils.errors import UserError
from dschat.utils.printing import print_rank_0


def load_items(settings, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Prompt items of the chosen phase slice, in the order step 3 would see them, and what was left out.

    The data module's own phase slicing (`phase_rows`) and blending, on raw text (the output files need
    text, not token ids), rendered as the training stages render it (--chat_format). Prompts longer than
    --max_prompt_seq_len tokens leave no room for the answer's budget and are dropped and counted
    (`prompt_too_long`), as step 3 drops them; with --keep_truncated they stay and the sampler sees their last
    --max_prompt_seq_len tokens (the scorer cuts a prompt's start too). With --pair_source dataset, samples
    without both answers are skipped; answers cut when scored are counted (`answers_truncated`).
    """
    local_rank = data_utils.resolve_local_rank(settings.local_rank)
    need_pairs = settings.pair_source == "dataset"
    keep_truncated = settings.keep_truncated
    parts: list[list[dict]] = []
    stats = {"skipped": 0, "prompt_too_long": 0, "answers_truncated": 0}
    for name in settings.data_path:
        data_utils.check_data_path(name)
        raw = data_utils.get_raw_dataset(name, settings.data_output_path, settings.seed, local_rank, tokenizer=tokenizer,
                                         column_map=settings.column_map, chat_format=settings.chat_format)
        rows, _ = data_utils.phase_rows(raw, settings.data_split, settings.data_phase, settings.seed, settings.data_output_path,
                                        local_rank)
        items = []
        for sample in rows:
            prompt = raw.get_prompt(sample)
            chosen = raw.get_chosen(sample) if need_pairs else None
            rejected = raw.get_rejected(sample) if need_pairs else None
            if prompt is None or (need_pairs and (chosen is None or rejected is None)):
                stats["skipped"] += 1
                continue
            items.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        lengths = prompt_lengths(tokenizer, [it["prompt"] for it in items])
        stats["skipped"] += sum(1 for n in lengths if n == 0)
        stats["prompt_too_long"] += sum(1 for n in lengths if n > settings.max_prompt_seq_len)
        kept = [(it, min(n, settings.max_prompt_seq_len)) for it, n in zip(items, lengths)
                if n > 0 and (keep_truncated or n <= settings.max_prompt_seq_len)]
        if need_pairs:  # dataset answers longer than the room left after the prompt are cut when scored
            answer_lengths = prompt_lengths(tokenizer, [it[k] for it, _ in kept for k in ("chosen", "rejected")])
            room = settings.max_prompt_seq_len + settings.max_answer_seq_len
            stats["answers_truncated"] += sum(n + max(answer_lengths[2 * i:2 * i + 2]) > room
                                              for i, (_, n) in enumerate(kept))
        parts.append([it for it, _ in kept])
    merged = [it for part in parts for it in part]
    if len(parts) > 1:
        merged = [merged[i] for i in data_utils.get_shuffle_idx(settings.seed, len(merged)).tolist()]
    if settings.max_prompts:
        merged = merged[:settings.max_prompts]
    if not merged:
        raise UserError(f"--data_path {' '.join(settings.data_path)}: no usable prompts in phase {settings.data_phase} "
                        f"(skipped {stats['skipped']}, longer than --max_prompt_seq_len {settings.max_prompt_seq_len}: "
                        f"{stats['prompt_too_long']}); check --data_split/--data_phase and the prompt length limit "
                        "(or pass --keep_truncated)")
    for i, item in enumerate(merged):
        item["index"] = i
    if stats["prompt_too_long"]:
        action = ("kept, the sampler sees their last tokens (--keep_truncated)" if keep_truncated
                  else "dropped (--keep_truncated keeps them)")
        print_rank_0(f"data: {stats['prompt_too_long']} prompt(s) longer than --max_prompt_seq_len "
                     f"{settings.max_prompt_seq_len} tokens: {action}")
    if stats["answers_truncated"]:
        print_rank_0(f"warning: {stats['answers_truncated']} pair(s) have an answer longer than "
                     f"--max_prompt_seq_len + --max_answer_seq_len ({settings.max_prompt_seq_len} + "
                     f"{settings.max_answer_seq_len}) tokens with their prompt; it is cut when scored (raise "
                     "--max_answer_seq_len to score it whole)")
    return merged, stats


def prompt_lengths(tokenizer, prompts: list[str], batch_size: int = 1000) -> list[int]:
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(len(ids) for ids in tokenizer(prompts[start:start + batch_size])["input_ids"])
    return out


def items_hash(items: Sequence[dict]) -> str:
    """Identity of the selected prompts (and dataset answers) in order: part of the shard fingerprint."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item["prompt"], item.get("chosen"), item.get("rejected")]).encode())
        digest.update(b"\n")
    return digest.hexdigest()
