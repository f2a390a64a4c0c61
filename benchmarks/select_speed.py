"""Step 2.5 selection speed: our sampling + scoring path against a plain loop, prompts per second.

Ours (`mpo_ext.selection.ShardWorker.run_batch`): each prompt's prefill runs once and its KV cache is
expanded to the N samples (`dschat.rlhf.generation.shared_prefill_generate`), answers are decoded in
one batch, and the reward model scores every answer of the batch in length-sorted batches laid out
with one tokenizer call (`dschat.utils.inference.reward_layouts` / `score_layouts`).
Plain loop: HF `generate(num_return_sequences=N)` (the prompt is repeated N times before prefill),
per-row decoding, then one reward-model forward per answer.

Both see the same model, prompts, batches and seeds; with the same seed they draw the same samples
(the benchmark reports the share of identical answers). The model is a random Llama of a few M
parameters with a word-level tokenizer built by `mpo_ext.bootstrap` (speed only). CPU-seconds
(`time.process_time` of this process) are reported next to wall seconds because a loaded machine
inflates wall time.

    python benchmarks/select_speed.py                # N = 2 and 4, ~5 min on a loaded 2-core machine
    python benchmarks/select_speed.py --prompts 8 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info  # noqa: E402
from dschat.rlhf.generation import Generator  # noqa: E402
from dschat.utils.args import SamplingSettings  # noqa: E402
from dschat.utils.inference import RewardScorer, reward_layout  # noqa: E402
from dschat.utils.seeding import set_random_seed  # noqa: E402
from mpo_ext.selection import ShardWorker, derive_seed  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def build_models(workdir: Path, hidden: int, layers: int):
    """(tokenizer, actor, reward model) from one random tiny Llama built by mpo_ext.bootstrap."""
    from transformers import AutoModel, AutoModelForCausalLM

    from dschat.utils.model.reward_model import RewardModel
    from dschat.utils.tokenizer import load_hf_tokenizer
    from mpo_ext import synthetic
    from mpo_ext.bootstrap import build_tiny_model

    records = synthetic.generate_records(400, "train", seed=5)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in records]
    path = build_tiny_model(workdir / "model", texts, hidden_size=hidden, num_layers=layers, num_heads=4,
                            max_position_embeddings=512)
    tokenizer = load_hf_tokenizer(str(path))
    actor = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    reward = RewardModel(AutoModel.from_pretrained(str(path)), tokenizer).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(reward.v_head.weight, std=0.5)
    return tokenizer, actor, reward, records


def make_prompts(records, count: int, turns: int) -> list[dict]:
    """Multi-turn prompts (a few earlier exchanges then a question): prompts longer than answers, as in HH."""
    items = []
    for i in range(count):
        parts = [records[(i * turns + k) % len(records)] for k in range(turns)]
        history = "".join(p["prompt"] + p["chosen"] for p in parts[:-1])
        items.append({"prompt": history + parts[-1]["prompt"], "index": i})
    return items


def plain_loop(batches, items, tokenizer, actor, reward, args, n: int) -> list[list[str]]:
    """HF generate with num_return_sequences=N, per-row decoding, one reward forward per answer."""
    from dschat.utils.inference import score_layouts

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config_kwargs = dict(max_new_tokens=args.answer_len, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         pad_token_id=pad, eos_token_id=eos, num_return_sequences=n)
    answers_out = []
    for batch in batches:
        enc = tokenizer([items[i]["prompt"] for i in batch], return_tensors="pt", padding=True,
                        padding_side="left")
        set_random_seed(derive_seed(args.seed, min(batch)))
        with torch.no_grad():
            seqs = actor.generate(**enc, **config_kwargs)
        width = enc["input_ids"].shape[1]
        for j, i in enumerate(batch):
            answers = []
            for k in range(n):
                row = seqs[j * n + k, width:].tolist()
                row = row[:row.index(pad)] if pad in row else row
                head = tokenizer.decode(enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist(),
                                        skip_special_tokens=True)
                full = tokenizer.decode(enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist() + row,
                                        skip_special_tokens=True)
                answers.append(full[len(head):])
            for answer in answers:  # one reward-model forward per answer
                layout = reward_layout(tokenizer, items[i]["prompt"], answer, tokenizer.eos_token,
                                       args.prompt_len + args.answer_len)
                score_layouts(reward, [layout], pad, torch.device("cpu"))
            answers_out.append(answers)
    return answers_out


def ours(batches, items, tokenizer, actor, reward, args, n: int) -> list[list[str]]:
    worker_args = Namespace(seed=args.seed, per_device_generation_batch_size=args.batch,
                            per_device_eval_batch_size=args.batch * n, num_samples=n)
    generator = Generator(actor, tokenizer, max_new_tokens=args.answer_len,
                          sampling=SamplingSettings(do_sample=True, temperature=1.0, top_p=1.0, top_k=0))
    scorer = RewardScorer(reward, tokenizer, tokenizer.eos_token, max_seq_len=args.prompt_len + args.answer_len,
                          batch_size=worker_args.per_device_eval_batch_size, share_prompts=True)
    worker = ShardWorker(worker_args, items, tokenizer, scorer, generator)
    out = []
    for batch in batches:
        answers, meta = worker._sample(batch)  # run_batch in two halves, to keep every sample for comparison
        worker.score_samples(batch, answers, meta)
        out.extend(answers[j * n:(j + 1) * n] for j in range(len(batch)))
    return out


def timed(fn, *fn_args) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*fn_args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument("--samples", type=str, default="2,4", help="Values of N (comma-separated).")
    parser.add_argument("--answer_len", type=int, default=32, help="New tokens per answer.")
    parser.add_argument("--turns", type=int, default=4, help="Exchanges per prompt (sets the prompt length).")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=1, help="Timed repetitions per path (median reported).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mpo_ext.selection import length_sorted_batches

    with tempfile.TemporaryDirectory(prefix="select_speed_") as tmp:
        tokenizer, actor, reward, records = build_models(Path(tmp), args.hidden, args.layers)
    items = make_prompts(records, args.prompts, args.turns)
    lengths = [len(x) for x in tokenizer([it["prompt"] for it in items])["input_ids"]]
    args.prompt_len = max(lengths)
    batches = length_sorted_batches(list(range(len(items))), lengths, args.batch)
    params = sum(p.numel() for p in actor.parameters())
    rows = []
    for n in [int(x) for x in args.samples.split(",")]:
        ours(batches[:1], items, tokenizer, actor, reward, args, n)  # warm-up (allocator, first-call costs)
        results = {"plain": [], "ours": []}
        answers = {}
        for _ in range(args.reps):
            for name, fn in (("plain", plain_loop), ("ours", ours)):
                wall, cpu, out = timed(fn, batches, items, tokenizer, actor, reward, args, n)
                results[name].append((wall, cpu))
                answers[name] = out
        same = sum(a == b for pa, pb in zip(answers["plain"], answers["ours"]) for a, b in zip(pa, pb))
        row = {"num_samples": n}
        for name in ("plain", "ours"):
            wall = statistics.median(w for w, _ in results[name])
            cpu = statistics.median(c for _, c in results[name])
            row[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                         "prompts_per_wall_s": round(args.prompts / wall, 3),
                         "prompts_per_cpu_s": round(args.prompts / cpu, 3)}
        row["speedup_wall"] = round(row["plain"]["wall_s"] / row["ours"]["wall_s"], 2)
        row["speedup_cpu"] = round(row["plain"]["cpu_s"] / row["ours"]["cpu_s"], 2)
        row["identical_answers"] = f"{same}/{args.prompts * n}"
        rows.append(row)
        print(json.dumps(row))
    load = os.getloadavg()
    report = {
        "benchmark": "step 2.5 selection: ours vs plain loop (generate num_return_sequences + 1 RM forward/answer)",
        "machine": machine_info(), "load_average_1_5_15": [round(x, 2) for x in load],
        "note": "wall time is inflated when the machine is shared; CPU-seconds (process_time) are the "
                "steadier figure",
        "settings": {"prompts": args.prompts, "batch": args.batch, "answer_len": args.answer_len,
                     "prompt_tokens_max": args.prompt_len, "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
                     "actor_params": params, "hidden": args.hidden, "layers": args.layers, "reps": args.reps,
                     "threads": args.threads},
        "rows": rows,
    }
    lines = ["# Step 2.5 selection: prompts per second, ours vs a plain loop", "",
             f"Random Llama {params / 1e6:.1f}M params, {args.prompts} prompts (mean "
             f"{report['settings']['prompt_tokens_mean']} tokens), {args.answer_len} new tokens per answer, "
             f"batch {args.batch}, {args.threads} thread(s), median of {args.reps}. Load average during the run: "
             f"{load[0]:.1f} (wall figures inflated by other work; CPU-seconds are this process's user+sys).", "",
             "| N | plain prompts/s (wall) | ours prompts/s (wall) | speed-up (wall) | plain prompts/CPU-s | "
             "ours prompts/CPU-s | speed-up (CPU) | identical answers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_samples']} | {r['plain']['prompts_per_wall_s']} | {r['ours']['prompts_per_wall_s']} | "
                     f"{r['speedup_wall']}x | {r['plain']['prompts_per_cpu_s']} | {r['ours']['prompts_per_cpu_s']} | "
                     f"{r['speedup_cpu']}x | {r['identical_answers']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "select_speed.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "select_speed.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
