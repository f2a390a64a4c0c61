"""DeepSpeed-Chat itself against this package: its imports, its unchanged mains on our code, and step-by-step
parity of `--dschat_compat` with upstream's own numbers.

Needs a DeepSpeed-Chat checkout (the `applications/DeepSpeed-Chat` folder of DeepSpeedExamples, or the
repository root holding it), fetched separately and never copied into this repository:

    python3 benchmarks/upstream_parity.py --upstream PATH imports   # the import table of tests/test_dropin_imports.py
    python3 benchmarks/upstream_parity.py --upstream PATH mains     # upstream's step-1/2/3 main.py on OUR package
    python3 benchmarks/upstream_parity.py --upstream PATH parity    # upstream (its own dschat) vs ours --dschat_compat

`mains` and `parity` run on CPU in fp32 with the tiny Llama `models/tinystories-260k` and the first HH-RLHF
harmless-base test pairs that fit (`data/hh-rlhf/harmless-base/test.jsonl.gz`), both from $DSCHAT_SHARED_DIR
(default `../shared`), as `local/jsonfile` data; every run of steps 1, 2 and 3 uses the same seed, data, model
and flags on both sides. The model folder is named `tiny-llama` because upstream decides its tokenizer rule by
the name ("llama": a new `[PAD]` token; anything else: pad = eos).

What is done to upstream's code, all in this script, at run time, in its own process (its files are copied to
--workdir, where `data/train.json` and `data/eval.json` are written for `local/jsonfile`; nothing else on disk
changes):
- `dschat` is pinned to the checkout's folder (`parity`) or to this repository (`mains`) before the main
  runs, and the module file actually imported is checked and recorded. Without the pin Python picks a regular
  package on `sys.path` (an installed dschat-mpo) over upstream's namespace folder whatever the order, and a
  namespace folder first on PYTHONPATH over an editable install (whose finder runs after the path finder);
  `parity` records what a plain `import dschat` gives with the checkout first on PYTHONPATH.
- `deepspeed.ops.adam.FusedAdam` (a CUDA kernel) becomes `torch.optim.AdamW(fused=True)` with the same
  arguments, the optimizer our steps use on CPU.
- Upstream accepts only `--dtype fp16|bf16`: its mains get `--dtype bf16` and its DeepSpeed configs lose the
  half-precision section (`get_train_ds_config` / `get_eval_ds_config` wrapped), so everything runs in fp32.
- The process is launched as the `deepspeed` launcher would for one rank (`--local_rank 0`, RANK, WORLD_SIZE,
  MASTER_ADDR/PORT), since upstream's mains need a process group.
- `parity` reads upstream's numbers without changing its arithmetic: each `backward` loss, each reward-model
  forward's chosen and rejected scores, and each PPO experience's rewards and KL are recorded from wrappers
  around those calls; evaluation lines are parsed from its log.

Outputs (parity): `benchmarks/results/upstream_parity.json` (every compared number, the versions, the runs'
flags, the shims, which `dschat` each side imported) and `upstream_parity.md` (the step-by-step tables).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import HH_TEST, TINYSTORIES  # noqa: E402 - the benchmarks' shared fixture paths

RESULTS = REPO / "benchmarks" / "results"
SEED = 1234
TRAIN_PAIRS, EVAL_PAIRS = 120, 30
# Short pairs (characters), so that prompt + answer fits --max_seq_len with the 512-token vocabulary, and short
# chosen answers, so that step 1 teaches the tiny model to end its answers (step 3 then sees eos endings).
MAX_PROMPT_CHARS, MAX_CHOSEN_CHARS, MAX_REJECTED_CHARS = 200, 60, 200
MAX_SEQ_LEN, MAX_PROMPT = 128, 64
TOLERANCE = 1e-4  # "float noise" on CPU fp32 after a few optimizer steps
# The two tokenizer layouts upstream produces, chosen by the model folder's name: "llama" in it gives a new
# [PAD] token (a pad of its own), anything else pad = eos (then upstream's step-3 masks hide every eos).
CONFIGS = {
    "llama": {"model": "tiny-llama", "max_answer": 48,
              "about": "a folder named tiny-llama: upstream's Llama rule, a new [PAD] token (vocabulary 513, 520 rows)"},
    "pad_eos": {"model": "tinystories", "max_answer": 48,
                "about": "a folder named tinystories: upstream's rule for every other model, pad = eos"},
}


# --------------------------------------------------------------------------------------------- the checkout


def chat_dir(path: str) -> Path:
    """The DeepSpeed-Chat folder of `path` (itself, or `applications/DeepSpeed-Chat` below it)."""
    root = Path(path).expanduser().resolve()
    for candidate in (root, root / "applications" / "DeepSpeed-Chat"):
        if (candidate / "dschat").is_dir() and (candidate / "training").is_dir():
            return candidate
    raise SystemExit(f"error: --upstream {path}: no DeepSpeed-Chat checkout there (a folder with dschat/ and "
                     "training/, or a DeepSpeedExamples clone); fetch one first")


def script_files(chat: Path) -> list[Path]:
    """Upstream's scripts: every Python file outside its `dschat` library."""
    return sorted(p for p in chat.rglob("*.py") if p.relative_to(chat).parts[0] != "dschat")


def upstream_imports(chat: Path) -> dict[tuple[str, str], list[tuple[int, tuple[str, ...]]]]:
    """{(module, name): sorted [(positional arguments, keyword names)] of every call} for every name the
    scripts import from dschat. A local alias chosen between imported classes (`x = A if c else B`) counts
    as a call of each."""
    facts: dict[tuple[str, str], set] = {}
    for path in script_files(chat):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported: dict[str, tuple[str, str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dschat"):
                for alias in node.names:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
                    facts.setdefault((node.module, alias.name), set())
        aliases: dict[str, list[tuple[str, str]]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value = node.value
                options = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
                names = [o.id for o in options if isinstance(o, ast.Name) and o.id in imported]
                if names and len(names) == len(options):
                    aliases[node.targets[0].id] = [imported[n] for n in names]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                targets = ([imported[node.func.id]] if node.func.id in imported else aliases.get(node.func.id, []))
                call = (len(node.args), tuple(sorted(k.arg for k in node.keywords if k.arg)))
                for target in targets:
                    facts[target].add(call)
    return {key: sorted(calls) for key, calls in sorted(facts.items())}


def print_imports(chat: Path) -> None:
    for key, calls in upstream_imports(chat).items():
        print(f"    {key!r}: {calls!r},")


# --------------------------------------------------------------------------------------------- the child process


def pin_dschat(source: Path) -> None:
    """Make `import dschat...` resolve under `source/dschat` whatever else is installed: a package module
    whose search path is that folder only (upstream's has no __init__.py; ours has one, run it)."""
    import importlib.machinery
    import importlib.util

    folder = source / "dschat"
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location("dschat", init, submodule_search_locations=[str(folder)])
    else:
        spec = importlib.machinery.ModuleSpec("dschat", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["dschat"] = module
    if init.is_file():
        spec.loader.exec_module(module)
    sys.path.insert(0, str(source))


def install_cpu_shims() -> None:
    """FusedAdam -> torch AdamW; DeepSpeed configs without a half-precision section (see the docstring)."""
    import deepspeed.ops.adam
    import torch

    def adamw(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **_):
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    deepspeed.ops.adam.FusedAdam = adamw
    import dschat.utils.ds_utils as ds_utils

    def fp32(build):
        def wrapped(*args, **kwargs):
            if len(args) > 1:
                args = (args[0], "bf16", *args[2:])
            else:
                kwargs["dtype"] = "bf16"
            config = build(*args, **kwargs)
            for key in ("fp16", "bf16", "bfloat16"):
                config.pop(key, None)
            return config
        return wrapped

    ds_utils.get_train_ds_config = fp32(ds_utils.get_train_ds_config)
    ds_utils.get_eval_ds_config = fp32(ds_utils.get_eval_ds_config)


def install_recorders(record_file: Path) -> None:
    """Append upstream's per-step numbers to `record_file` (JSON lines) without changing what it computes."""
    import deepspeed
    import torch

    def emit(**record):
        with open(record_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    backward = deepspeed.DeepSpeedEngine.backward

    def recorded_backward(engine, loss, *args, **kwargs):
        emit(kind="backward", module=type(engine.module).__name__, loss=float(loss.detach().float()))
        return backward(engine, loss, *args, **kwargs)

    deepspeed.DeepSpeedEngine.backward = recorded_backward

    from dschat.utils.model.reward_model import RewardModel

    forward = RewardModel.forward

    def recorded_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        emit(kind="reward_forward", training=self.training,
             chosen=float(out["chosen_mean_scores"].float().mean()),
             rejected=float(out["rejected_mean_scores"].float().mean()),
             accuracy=float((out["chosen_mean_scores"] > out["rejected_mean_scores"]).float().mean()))
        return out

    RewardModel.forward = recorded_forward

    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer

    generate_experience = DeepSpeedPPOTrainer.generate_experience

    def recorded_experience(self, prompts, mask, step):
        exp = generate_experience(self, prompts, mask, step)
        width = exp["prompts"].shape[1]
        answer = exp["attention_mask"][:, width:].float()
        kl = ((exp["logprobs"][:, width - 1:].float() - exp["ref_logprobs"][:, width - 1:].float()) * answer).sum(1)
        emit(kind="experience", reward=float(exp["rewards"].float().mean()), kl=float(kl.mean()),
             answer_tokens=float(answer.sum(1).mean()), rows=int(exp["input_ids"].shape[0]))
        return exp

    DeepSpeedPPOTrainer.generate_experience = recorded_experience
    del torch


def child(argv: list[str]) -> None:
    """`_child --dschat DIR [--record FILE] MAIN ARGS...`: run upstream's MAIN with `dschat` from DIR."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dschat", type=Path, required=True)
    parser.add_argument("--record", type=Path)
    parser.add_argument("main", type=Path)
    known, rest = parser.parse_known_args(argv)
    pin_dschat(known.dschat)
    import dschat.utils.utils

    print(f"[upstream_parity] dschat.utils.utils from {dschat.utils.utils.__file__}", flush=True)
    install_cpu_shims()
    if known.record:
        install_recorders(known.record)
    import runpy

    sys.argv = [str(known.main), *rest]
    os.chdir(known.main.parent)
    runpy.run_path(str(known.main), run_name="__main__")


# --------------------------------------------------------------------------------------------- set-up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0", **(extra or {}))
    return env


def hh_pairs(path: Path, count: int, skip: int = 0) -> list[dict[str, str]]:
    """The first `count` short HH pairs after `skip` short ones (see MAX_PROMPT_CHARS), as local/jsonfile
    records (prompt, chosen, rejected; the prompt ends with "Assistant:", the answers lose their leading space)."""
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            pair = json.loads(line)
            cut = pair["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt, chosen = pair["chosen"][:cut], pair["chosen"][cut:].strip()
            if not pair["rejected"].startswith(prompt):
                continue
            rejected = pair["rejected"][cut:].strip()
            if (chosen and rejected and len(prompt) <= MAX_PROMPT_CHARS and len(chosen) <= MAX_CHOSEN_CHARS
                    and len(rejected) <= MAX_REJECTED_CHARS):
                records.append({"prompt": prompt.strip(), "chosen": chosen, "rejected": rejected})
    return records[skip:skip + count]


def prepare(chat: Path, work: Path) -> dict[str, Path]:
    """The scratch copy of upstream, its data files, our data folder and a model folder per configuration."""
    for name in ("HH", "tinystories"):
        source = HH_TEST if name == "HH" else TINYSTORIES
        if not source.exists():
            raise SystemExit(f"error: {source}: missing; set DSCHAT_SHARED_DIR to the folder holding data/ and models/")
    if work.exists():
        shutil.rmtree(work)
    upstream = work / "DeepSpeed-Chat"
    for part in ("dschat", "training"):
        shutil.copytree(chat / part, upstream / part, ignore=shutil.ignore_patterns("*.png", "*.mp4", "*.gif"))
    records = hh_pairs(HH_TEST, TRAIN_PAIRS + EVAL_PAIRS)
    data = {"train.json": records[:TRAIN_PAIRS], "eval.json": records[TRAIN_PAIRS:]}
    for folder in (upstream / "data", work / "our_data"):
        folder.mkdir(parents=True)
        for name, rows in data.items():
            (folder / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    for config in CONFIGS.values():
        shutil.copytree(TINYSTORIES, work / "models" / config["model"])
    return {"upstream": upstream, "our_data": work / "our_data", "models": work / "models", "runs": work / "runs"}


# --------------------------------------------------------------------------------------------- the runs


def step_flags(step: int, config: str, paths: dict[str, Path], side: str) -> list[str]:
    """The same flags for both sides (upstream's names); outputs under runs/SIDE/stepN-CONFIG."""
    model = paths["models"] / CONFIGS[config]["model"]
    out, cache = paths["runs"] / side, paths["runs"] / f"{side}-cache"
    if step == 1:
        return ["--data_path", "local/jsonfile", "--data_split", "2,4,4", "--model_name_or_path", str(model),
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--max_seq_len", str(MAX_SEQ_LEN), "--learning_rate", "3e-3", "--weight_decay", "0.0",
                "--num_train_epochs", "10", "--seed", str(SEED), "--data_output_path", str(cache),
                "--output_dir", str(out / f"step1-{config}")]
    if step == 2:
        return ["--data_path", "local/jsonfile", "--data_split", "2,4,4", "--model_name_or_path", str(model),
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--max_seq_len", str(MAX_SEQ_LEN), "--learning_rate", "1e-3", "--weight_decay", "0.1",
                "--num_padding_at_beginning", "0", "--num_train_epochs", "1", "--seed", str(SEED),
                "--data_output_path", str(cache), "--output_dir", str(out / f"step2-{config}")]
    return ["--data_path", "local/jsonfile", "--data_split", "2,4,4",
            "--actor_model_name_or_path", str(out / f"step1-{config}"),
            "--critic_model_name_or_path", str(out / f"step2-{config}"),
            "--num_padding_at_beginning", "0", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "4", "--generation_batches", "1", "--ppo_epochs", "1",
            "--max_prompt_seq_len", str(MAX_PROMPT), "--max_answer_seq_len", str(CONFIGS[config]["max_answer"]),
            "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-4", "--num_warmup_steps", "2",
            "--actor_dropout", "0.0", "--num_train_epochs", "1", "--seed", str(SEED),
            "--data_output_path", str(cache), "--output_dir", str(out / f"step3-{config}")]


MAINS = {1: "step1_supervised_finetuning", 2: "step2_reward_model_finetuning", 3: "step3_rlhf_finetuning"}


def run(command: list[str], env: dict[str, str], log: Path, timeout: int) -> tuple[str, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... exited {proc.returncode}; log: {log}\n{text[-3000:]}")
    return text, time.time() - start


def run_upstream_main(step: int, config: str, paths: dict[str, Path], dschat_source: Path, side: str,
                      record: Path | None, timeout: int, extra_env: dict[str, str] | None = None) -> tuple[str, float]:
    """Upstream's unchanged main of `step`, with `dschat` from `dschat_source` (see `child`)."""
    main = paths["upstream"] / "training" / MAINS[step] / "main.py"
    command = [sys.executable, str(Path(__file__).resolve()), "_child", "--dschat", str(dschat_source)]
    if record:
        command += ["--record", str(record)]
    command += [str(main), "--local_rank", "0", "--dtype", "bf16", "--deepspeed", *step_flags(step, config, paths, side)]
    if step == 1:
        command.append("--print_loss")
    return run(command, one_rank_env(extra_env), paths["runs"] / f"{side}-step{step}-{config}.log", timeout)


def run_our_main(step: int, config: str, paths: dict[str, Path], timeout: int) -> tuple[str, float]:
    main = REPO / "training" / MAINS[step] / "main.py"
    command = [sys.executable, str(main), *step_flags(step, config, paths, "ours"), "--dschat_compat", "--dtype", "fp32",
               "--log_interval", "1"]
    env = one_rank_env({"PYTHONPATH": str(REPO), "DSCHAT_LOCAL_DATA_DIR": str(paths["our_data"])})
    return run(command, env, paths["runs"] / f"ours-step{step}-{config}.log", timeout)


# --------------------------------------------------------------------------------------------- numbers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


FLOAT = r"(-?[0-9.]+(?:e-?[0-9]+)?|nan|inf)"


def upstream_numbers(step: int, log: str, records: list[dict]) -> dict[str, list[float]]:
    """Upstream's per-step numbers from the recorders and its log lines."""
    if step == 1:
        evals = [float(x) for x in re.findall(rf"ppl: \S+, loss: {FLOAT}", log)]
        return {"train/loss": [r["loss"] for r in records if r["kind"] == "backward"], "eval/loss": evals}
    if step == 2:
        train = [r for r in records if r["kind"] == "reward_forward" and r["training"]]
        evals = re.findall(rf"chosen_last_scores \(higher is better\) : {FLOAT}, rejected_last_scores "
                           rf"\(lower is better\) : {FLOAT}, acc \(higher is better\) : {FLOAT}", log)
        return {"train/loss": [r["loss"] for r in records if r["kind"] == "backward"],
                "train/rewards_chosen": [r["chosen"] for r in train],
                "train/rewards_rejected": [r["rejected"] for r in train],
                "eval/rewards_chosen": [float(c) for c, _, _ in evals],
                "eval/rewards_rejected": [float(r) for _, r, _ in evals],
                "eval/accuracy": [float(a) for _, _, a in evals]}
    steps = re.findall(rf"Actor Loss: {FLOAT} \| Critic Loss: {FLOAT}", log)
    experiences = [r for r in records if r["kind"] == "experience"]
    return {"actor_loss": [float(a) for a, _ in steps], "critic_loss": [float(c) for _, c in steps],
            "reward": [r["reward"] for r in experiences], "kl": [r["kl"] for r in experiences]}


def our_numbers(step: int, out: Path) -> dict[str, list[float]]:
    """Ours from metrics.jsonl (train records every step: --log_interval 1)."""
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if r.get("phase") == "train"]
    evals = [r for r in records if r.get("phase") == "eval"]
    if step == 1:
        return {"train/loss": [r["loss"] for r in train], "eval/loss": [r["loss"] for r in evals]}
    if step == 2:
        return {"train/loss": [r["loss"] for r in train],
                "train/rewards_chosen": [r["rewards/chosen"] for r in train],
                "train/rewards_rejected": [r["rewards/rejected"] for r in train],
                "eval/rewards_chosen": [r["rewards/chosen"] for r in evals],
                "eval/rewards_rejected": [r["rewards/rejected"] for r in evals],
                "eval/accuracy": [r["accuracy"] for r in evals]}
    return {"actor_loss": [r["loss/policy"] for r in train], "critic_loss": [r["loss/value"] for r in train],
            "reward": [r["reward/mean"] for r in train], "kl": [r["objective/kl"] for r in train]}


def compare(theirs: dict[str, list[float]], ours: dict[str, list[float]]) -> dict[str, Any]:
    """Per series: both sequences, the largest absolute difference, and whether lengths agree."""
    out = {}
    for key in theirs:
        a, b = theirs[key], ours.get(key, [])
        diffs = [abs(x - y) for x, y in zip(a, b)]
        out[key] = {"upstream": a, "ours": b, "steps": len(a), "same_length": len(a) == len(b),
                    "max_abs_diff": max(diffs) if diffs else None}
    return out


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def plain_import(chat: Path) -> str:
    """Which `dschat.utils.utils` a plain import gives with the checkout first on PYTHONPATH (no pin)."""
    proc = subprocess.run([sys.executable, "-c", "import dschat.utils.utils as u; print(u.__file__)"],
                          env={**os.environ, "PYTHONPATH": str(chat)}, cwd="/", capture_output=True, text=True)
    return (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]) if proc.returncode == 0 or proc.stderr else ""


def imported_from(log: str) -> str:
    found = re.search(r"\[upstream_parity\] dschat\.utils\.utils from (\S+)", log)
    return found.group(1) if found else ""


def parity(chat: Path, work: Path, timeout: int, out_dir: Path, configs: list[str]) -> dict[str, Any]:
    paths = prepare(chat, work)
    result: dict[str, Any] = {
        "upstream_checkout": str(chat), "versions": versions(), "device": "cpu", "dtype": "fp32",
        "model": "tinystories-260k (Llama, 260K parameters, vocabulary 512)", "seed": SEED,
        "data": f"local/jsonfile: the first {TRAIN_PAIRS} + {EVAL_PAIRS} HH-RLHF harmless-base test pairs (train.json "
                f"+ eval.json) whose prompt has at most {MAX_PROMPT_CHARS} characters, chosen answer "
                f"{MAX_CHOSEN_CHARS}, rejected answer {MAX_REJECTED_CHARS}; --data_split 2,4,4",
        "plain_import_with_checkout_on_pythonpath": plain_import(chat),
        "shims": ["dschat pinned to the checkout's folder", "FusedAdam -> torch.optim.AdamW(fused=True) (same arguments)",
                  "--dtype bf16 with the bf16 section removed from upstream's DeepSpeed configs: fp32",
                  "one-rank launcher environment with --local_rank 0",
                  "recorders around DeepSpeedEngine.backward, RewardModel.forward and "
                  "DeepSpeedPPOTrainer.generate_experience (read-only)"],
        "configs": {},
    }
    for config in configs:
        about = CONFIGS[config]
        steps = result["configs"].setdefault(config, {"about": about["about"], "steps": {}})["steps"]
        for step in (1, 2, 3):
            record = paths["runs"] / f"upstream-step{step}-{config}.records.jsonl"
            log, up_seconds = run_upstream_main(step, config, paths, paths["upstream"], "upstream", record, timeout)
            their_numbers = upstream_numbers(step, log, read_jsonl(record) if record.exists() else [])
            _, our_seconds = run_our_main(step, config, paths, timeout)
            steps[str(step)] = {
                "flags": [flag.replace(str(work), "WORK") for flag in step_flags(step, config, paths, "SIDE")],
                "upstream_imported": imported_from(log).replace(str(work), "WORK"),
                "seconds": {"upstream": up_seconds, "ours": our_seconds},
                "series": compare(their_numbers, our_numbers(step, paths["runs"] / "ours" / f"step{step}-{config}")),
            }
            print(f"{config} step {step}: " + ", ".join(f"{k} max diff {v['max_abs_diff']}"
                                                       for k, v in steps[str(step)]["series"].items()), flush=True)
    series = [s for config in result["configs"].values() for step in config["steps"].values()
              for s in step["series"].values()]
    worst = [s["max_abs_diff"] for s in series if s["max_abs_diff"] is not None]
    result["max_abs_diff"] = max(worst) if worst else None
    result["all_series_same_length"] = all(s["same_length"] for s in series)
    result["within_tolerance"] = bool(result["all_series_same_length"] and result["max_abs_diff"] is not None
                                      and result["max_abs_diff"] <= TOLERANCE)
    result["tolerance"] = TOLERANCE
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upstream_parity.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out_dir / "upstream_parity.md").write_text(markdown(result), encoding="utf-8")
    return result


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.6g}"


def markdown(result: dict[str, Any]) -> str:
    names = {"1": "step 1 (SFT)", "2": "step 2 (reward model)", "3": "step 3 (PPO)"}
    lines = ["# DeepSpeed-Chat vs dschat-mpo --dschat_compat, step by step", "",
             f"Generated by `python3 benchmarks/upstream_parity.py --upstream PATH parity` "
             f"({', '.join(f'{k} {v}' for k, v in result['versions'].items())}; CPU, fp32, seed {result['seed']}).", "",
             f"Model: {result['model']}. Data: {result['data']}.", "",
             f"Largest absolute difference over every compared number: **{_fmt(result['max_abs_diff'])}** "
             f"(tolerance {result['tolerance']}; every series has as many steps on both sides: "
             f"{result['all_series_same_length']}).", "",
             f"Upstream ran with its own `dschat` "
             f"({next(iter(result['configs'].values()))['steps']['1']['upstream_imported']}). A plain import with the checkout "
             f"first on PYTHONPATH gives: `{result['plain_import_with_checkout_on_pythonpath']}`.", "",
             "Shims applied to upstream at run time: " + "; ".join(result["shims"]) + ".", "",
             "Our metrics.jsonl keeps 6 decimals, so differences below 5e-7 are rounding.", ""]
    for config, data in result["configs"].items():
        lines += [f"## {config}: {data['about']}", ""]
        for step, run_data in data["steps"].items():
            lines += [f"### {names[step]}", "", f"Seconds: upstream {run_data['seconds']['upstream']:.0f}, ours "
                      f"{run_data['seconds']['ours']:.0f}. Flags (both sides): `{' '.join(run_data['flags'])}`", ""]
            for key, values in run_data["series"].items():
                lines += [f"**{key}** (max abs diff {_fmt(values['max_abs_diff'])})", "",
                          "| step | upstream | ours | difference |", "|---:|---:|---:|---:|"]
                for i, (a, b) in enumerate(zip(values["upstream"], values["ours"])):
                    lines.append(f"| {i} | {_fmt(a)} | {_fmt(b)} | {_fmt(abs(a - b))} |")
                if not values["same_length"]:
                    lines.append(f"| | {len(values['upstream'])} values | {len(values['ours'])} values | |")
                lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- mains on our code


def mains(chat: Path, work: Path, timeout: int) -> None:
    """Upstream's unchanged step-1/2/3 mains with `dschat` from this repository."""
    paths = prepare(chat, work)
    env = {"DSCHAT_LOCAL_DATA_DIR": str(paths["upstream"] / "data")}
    for step in (1, 2, 3):
        log, seconds = run_upstream_main(step, "llama", paths, REPO, "mains", None, timeout, env)
        source = imported_from(log)
        if not source.startswith(str(REPO)):
            raise SystemExit(f"error: step {step} imported dschat from {source}, not from {REPO}")
        print(f"upstream step {step} main on dschat-mpo: ok in {seconds:.0f} s (dschat from {source})", flush=True)


# --------------------------------------------------------------------------------------------- entry


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="DeepSpeed-Chat checkout (or DeepSpeedExamples clone)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dschat_upstream_parity")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="parity: the tokenizer layouts to run (default: all)")
    parser.add_argument("what", choices=("imports", "mains", "parity"))
    args = parser.parse_args()
    chat = chat_dir(args.upstream)
    if args.what == "imports":
        print_imports(chat)
    elif args.what == "mains":
        mains(chat, args.workdir, args.timeout)
    else:
        result = parity(chat, args.workdir, args.timeout, args.out, args.configs)
        print(f"largest difference {result['max_abs_diff']}; within {TOLERANCE}: {result['within_tolerance']}")


if __name__ == "__main__":
    main()
