"""Shared pieces of the benchmark: fixture paths, asset preparation, the sample windows and memory probes.

Every implementation (ours, TRL, bare PyTorch) must see exactly the same token ids in the same order,
so the token ids are produced ONCE by our own data pipeline (`create_prompt_dataset`, the path our steps
use) and stored in the work directory; the TRL and bare runners read them from there, and our runner
checks that its own pipeline hands it the same ids.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSCHAT_SHARED_DIR", REPO.parent / "shared"))
HH_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
TINYSTORIES = SHARED / "models" / "tinystories-260k"

SEED = 1234
MAX_SEQ_LEN = 512
# Enough HH pairs that the 9:1 train/eval split of our local-file loader leaves every window filled.
NUM_PAIRS = 80
# The DPO memory runs precompute reference log-probs for their whole data file: keep that file small.
NUM_PAIRS_SMALL = 6
MAX_PROMPT_LEN = 192  # generation / PPO: prompt + new tokens must fit tinystories' 512 positions

# "rand": a few-million-parameter Llama with the tinystories tokenizer (random weights; speed only).
RAND_CONFIG = {
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 512, "vocab_size": 512, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}
# "wide": ~50M parameters, so that model states (not attention activations) dominate memory; used for the
# precomputed-vs-resident reference memory comparison, where the reference's weights are what is saved.
WIDE_CONFIG = {**RAND_CONFIG, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
               "num_key_value_heads": 8}
# "xl": ~190M parameters (760 MiB in fp32), for the same comparison on short rows, closer to the regime of a
# 7B model, where a reference copy is gigabytes and the process's fixed ~400 MiB runtime is negligible.
XL_CONFIG = {**RAND_CONFIG, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
             "num_key_value_heads": 8}
# The model-size axis of benchmarks/cost_growth.py: ~0.9M, 3.2M ("rand") and ~12M parameters.
R1M_CONFIG = {**RAND_CONFIG, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
              "num_key_value_heads": 2}
R12M_CONFIG = {**RAND_CONFIG, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 7,
               "num_attention_heads": 6, "num_key_value_heads": 3}
MODEL_CONFIGS = {"rand": RAND_CONFIG, "wide": WIDE_CONFIG, "xl": XL_CONFIG, "r1m": R1M_CONFIG, "r12m": R12M_CONFIG}
# Models that get a step-2 style critic/reward model of their own (PPO, selection).
CRITIC_MODELS = ("tiny", "r1m", "rand", "r12m")
# "prompts": enough HH records that the step-3 / step-2.5 slice keeps a few dozen short prompts.
DATA_FILES = {"main": ("hh_pairs.jsonl", NUM_PAIRS), "small": ("hh_pairs_small.jsonl", NUM_PAIRS_SMALL),
              "prompts": ("hh_pairs_prompts.jsonl", 800), "real": ("hh_pairs_real.jsonl", 400)}

# Real size (`run.py --size 135m`): SmolLM2-135M-Instruct's tokenizer and chat template (from `--model_dir`),
# its shape with random weights ("s135m") and its own weights ("smollm2"). Rendered through the ChatML template
# many HH dialogues exceed REAL_MAX_SEQ_LEN and are dropped by our data layer, hence the larger file ("real").
REAL_SIZE_MODELS = ("s135m", "smollm2")
REAL_MAX_SEQ_LEN = 128


@dataclass(frozen=True)
class TokenSet:
    """What a model family trains on: the HH subset, the length limit, the data cache and the stored ids."""

    data: str  # key of DATA_FILES
    max_seq_len: int
    cache: str  # folder under the work directory (our data cache)
    tokens: str  # file under the work directory (the ids every implementation reads)


TOKEN_SETS = {"tinystories": TokenSet("main", MAX_SEQ_LEN, "data_cache", "tokens.pt"),
              "smollm2": TokenSet("real", REAL_MAX_SEQ_LEN, "data_cache_smollm2", "tokens_smollm2.pt")}


def token_set(model: str) -> TokenSet:
    """The token set a benchmark model trains on (every small model shares tinystories' tokenizer)."""
    return TOKEN_SETS["smollm2" if model in REAL_SIZE_MODELS else "tinystories"]


# --------------------------------------------------------------------------------------------- memory, time


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # /proc fallback (Linux)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """High-water RSS of this process since it started (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo reports it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """Cores, CPU and the load when a run ends, in one line for a report's footer."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, {cpu_model()}, load {load:.1f} at the end"


def write_report(results_dir: Path, stem: str, report: dict[str, Any], text: str, plot, tag: str) -> None:
    """A benchmark's results: STEM.json (the report), STEM.md (`text`, also printed) and STEM.png
    (`plot(report, path)`) in `results_dir`, each written atomically."""
    from dschat.utils.files import atomic_write_json, atomic_write_text

    atomic_write_json(results_dir / f"{stem}.json", report)
    atomic_write_text(results_dir / f"{stem}.md", text)
    plot(report, results_dir / f"{stem}.png")
    print("\n" + text)
    print(f"[{tag}] wrote {results_dir / stem}.{{json,md,png}}", flush=True)


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, CPU, RAM, library versions, load."""
    cpu = cpu_model()
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "deepspeed", "trl", "accelerate"):
        try:
            out = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__version__)"],
                                 capture_output=True, text=True, timeout=120, check=False)
            versions[name] = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": ram_gb, "python": platform.python_version(),
            "versions": versions, "loadavg_start": os.getloadavg()}


# --------------------------------------------------------------------------------------------- windows


@dataclass
class Window:
    """One measured pass over the same samples: wall and CPU seconds, useful and padded tokens it processed."""

    seconds: float
    cpu_seconds: float
    useful_tokens: int
    padded_tokens: int
    samples: int


class Clock:
    """Wall (perf_counter) and process CPU (process_time) stamps at the end of every optimizer step.

    CPU time is kept because the machine is shared: other users' load stretches wall time by a factor
    that changes from one process to the next, while the CPU seconds a 1-thread process spends on the
    same work stay within a few percent.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.start()

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def __len__(self) -> int:
        return len(self.wall)

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip([self.wall0] + self.wall[:-1], self.wall)]

    def windows(self, steps_per_window: int, warmup_steps: int, useful_per_window: int, padded_per_window: int,
                samples_per_window: int, per_step: list[tuple[int, int]] | None = None) -> list[dict]:
        """Per-window records after the warm-up steps.

        After the warm-up, every run of `steps_per_window` consecutive steps covers each batch of the
        window exactly once (a rotation of the fixed order), so all windows do the same work. A window
        runs from the end of the step before it to the end of its own last step: data loading,
        collation and loop bookkeeping between steps are all counted. `per_step` ((useful, padded)
        tokens of every step) replaces the per-window counts where batches are regrouped every epoch.
        """
        wall, cpu = [self.wall0] + self.wall, [self.cpu0] + self.cpu
        out = []
        for first in range(warmup_steps, len(self.wall) - steps_per_window + 1, steps_per_window):
            last = first + steps_per_window
            useful, padded = useful_per_window, padded_per_window
            if per_step is not None:
                useful = sum(u for u, _ in per_step[first:last])
                padded = sum(p for _, p in per_step[first:last])
            out.append(Window(wall[last] - wall[first], cpu[last] - cpu[first], useful, padded,
                              samples_per_window).__dict__)
        return out


def round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def padded_width(lengths: list[int], padding: str, max_len: int = MAX_SEQ_LEN, multiple: int | None = 8) -> int:
    """Batch width under a padding policy (ours: longest rounded to 8, or max_length; TRL: longest)."""
    if padding == "max_length":
        return max_len
    longest = max(lengths)
    return min(round_up(longest, multiple), max_len) if multiple else longest


# --------------------------------------------------------------------------------------------- assets


def write_hh_subset(path: Path, num_pairs: int = NUM_PAIRS) -> None:
    """The first `num_pairs` HH-RLHF harmless-base test records, unchanged (HH dialogue layout)."""
    rows = []
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(line if line.endswith("\n") else line + "\n")
            if len(rows) >= num_pairs:
                break
    path.write_text("".join(rows), encoding="utf-8")


def model_dir(workdir: Path, name: str) -> Path:
    return TINYSTORIES if name == "tiny" else workdir / f"model_{name}"


def critic_dir(workdir: Path, name: str) -> Path:
    """A step-2 style reward/critic model (random value head) on the base of model `name`."""
    return workdir / f"critic_{name}"


def data_file(workdir: Path, data: str = "main") -> Path:
    return workdir / DATA_FILES[data][0]


def our_data_args(workdir: Path, data: str = "main", model: str = "tiny") -> list[str]:
    """Data flags shared by every run through our pipeline (same cache, same split, same order)."""
    tset = token_set(model)
    if model in REAL_SIZE_MODELS:
        data = tset.data
    return ["--data_path", str(data_file(workdir, data)), "--data_output_path", str(workdir / tset.cache),
            "--max_seq_len", str(tset.max_seq_len), "--seed", str(SEED)]


def prepare_assets(workdir: Path, models: list[str] | None = None) -> dict[str, Any]:
    """Data subsets, the random Llamas (`models`, default all of MODEL_CONFIGS), step-2 style critics for PPO
    and selection, and the token ids every runner uses."""
    import torch
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dschat.utils.data.prompt_datasets import create_prompt_dataset
    from dschat.utils.model.reward_model import RewardModel
    from dschat.utils.saving import save_reward_model
    from dschat.utils.tokenizer import load_hf_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    for filename, count in DATA_FILES.values():
        if not (workdir / filename).exists():
            write_hh_subset(workdir / filename, count)
    tokenizer = load_hf_tokenizer(str(TINYSTORIES))

    wanted = MODEL_CONFIGS if models is None else {name: MODEL_CONFIGS[name] for name in models if name != "tiny"}
    for name, config in wanted.items():
        directory = model_dir(workdir, name)
        if not (directory / "config.json").exists():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(directory)
            AutoTokenizer.from_pretrained(str(TINYSTORIES)).save_pretrained(directory)
    for name in (n for n in CRITIC_MODELS if n == "tiny" or n in wanted):
        directory = critic_dir(workdir, name)
        if not (directory / "config.json").exists():
            torch.manual_seed(0)
            critic = RewardModel(AutoModel.from_pretrained(str(model_dir(workdir, name))), tokenizer, 0)
            torch.nn.init.normal_(critic.v_head.weight, std=0.5)
            save_reward_model(critic, tokenizer, directory)

    tokens_file = workdir / "tokens.pt"
    if not tokens_file.exists():
        common = dict(data_split=None, output_path=str(workdir / "data_cache"), seed=SEED, tokenizer=tokenizer,
                      max_seq_len=MAX_SEQ_LEN, end_of_conversation_token=tokenizer.eos_token)
        main_file, small_file = str(data_file(workdir, "main")), str(data_file(workdir, "small"))
        sft, _ = create_prompt_dataset(0, [main_file], train_phase=1, **common)
        pairs, _ = create_prompt_dataset(0, [main_file], train_phase=2, **common)
        small, _ = create_prompt_dataset(0, [small_file], train_phase=2, **common)
        prompts, _ = create_prompt_dataset(0, [main_file], train_phase=3, **{**common, "max_seq_len": MAX_PROMPT_LEN})

        tokens = {
            "sft": [sft[i]["input_ids"].tolist() for i in range(len(sft))],
            "pairs": _as_pairs(pairs),
            "pairs_small": _as_pairs(small),
            "prompts": [prompts[i][0].tolist() for i in range(len(prompts))],
            "pad_token_id": tokenizer.pad_token_id,
        }
        torch.save(tokens, tokens_file)
    tokens = torch.load(tokens_file)
    return {key: len(value) for key, value in tokens.items() if isinstance(value, list)}


def prepare_real_size(workdir: Path, source: Path) -> dict[str, Any]:
    """Assets of the real-size set: `model_smollm2` (links to the files of `source`, a SmolLM2-135M-Instruct
    folder), `model_s135m` (its config and tokenizer, random weights), `critic_s135m` (a step-2 style
    reward/critic model on it, for PPO) and the token ids, produced by our
    steps' own data path (`stage_datasets` under the flags our runs get: chat template, length limit, split)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dschat.steps import sft
    from dschat.utils.build import build_tokenizer, stage_datasets

    workdir.mkdir(parents=True, exist_ok=True)
    filename, count = DATA_FILES["real"]
    if not (workdir / filename).exists():
        write_hh_subset(workdir / filename, count)
    # A folder converted from GGUF by hand may still record its origin (`quantization_config`, which makes
    # transformers' Trainer refuse to fine-tune it); the weights are plain fp32: both models get the config
    # without it, as `mpo assets` writes it.
    config = json.loads((source / "config.json").read_text())
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    linked = model_dir(workdir, "smollm2")
    if not (linked / "config.json").exists():
        tmp = workdir / f".model_smollm2.{os.getpid()}"
        tmp.mkdir(parents=True)
        for item in source.iterdir():
            if item.name != "config.json":
                (tmp / item.name).symlink_to(item.resolve())
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(linked)
    random_dir = model_dir(workdir, "s135m")
    if not (random_dir / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(random_dir)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(random_dir)
    critic = critic_dir(workdir, "s135m")  # PPO's critic and reward model: the shape with a random value head
    if not (critic / "config.json").exists():
        from transformers import AutoModel

        from dschat.utils.model.reward_model import RewardModel
        from dschat.utils.saving import save_reward_model
        from dschat.utils.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(str(random_dir))
        torch.manual_seed(0)
        value_model = RewardModel(AutoModel.from_pretrained(str(random_dir)), tokenizer, 0)
        torch.nn.init.normal_(value_model.v_head.weight, std=0.5)
        save_reward_model(value_model, tokenizer, critic)
    tset = TOKEN_SETS["smollm2"]
    tokens_file = workdir / tset.tokens
    if not tokens_file.exists():
        argv = our_data_args(workdir, model="smollm2") + ["--model_name_or_path", str(linked),
                                                          "--output_dir", str(workdir / "unused_out")]
        settings = sft.parse_args(argv)
        tokenizer = build_tokenizer(settings)
        sft_rows, _ = stage_datasets(settings, tokenizer, 1)
        pairs, _ = stage_datasets(settings, tokenizer, 2)
        tokens = {"sft": [sft_rows[i]["input_ids"].tolist() for i in range(len(sft_rows))],
                  "pairs": _as_pairs(pairs), "pad_token_id": tokenizer.pad_token_id}
        torch.save(tokens, tokens_file)
    tokens = torch.load(tokens_file)
    return {key: len(value) for key, value in tokens.items() if isinstance(value, list)}


def _as_pairs(dataset) -> list:
    """(chosen ids, rejected ids, prompt length) of every pair of a phase-2 dataset."""
    return [(dataset[i][0].tolist(), dataset[i][2].tolist(), int(dataset[i][4])) for i in range(len(dataset))]


def load_tokens(workdir: Path, model: str = "tiny") -> dict[str, Any]:
    import torch

    return torch.load(workdir / token_set(model).tokens)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def now() -> float:
    return time.perf_counter()
