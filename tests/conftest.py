"""Shared pytest fixtures: a tiny Llama, HH-format and TL;DR-format data, all built by the tests
themselves, and helpers to launch real DeepSpeed runs.

The default suite needs nothing outside the repository. Tests that read the real public data kept beside
the project (`$DSCHAT_SHARED_DIR`, default `../shared`) carry `@pytest.mark.shared_data`; the default run
deselects them (pyproject's addopts) and `pytest -m shared_data` runs them, failing when a file is absent.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModel, AutoTokenizer

from dschat.utils.model.reward_model import RewardModel
from dschat.utils.utils import save_reward_model
from mpo_ext import synthetic
from mpo_ext.bootstrap import build_default_assets, save_random_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}
SHARED_ROOT = Path(os.environ.get("DSCHAT_SHARED_DIR", REPO_ROOT.parent / "shared"))

# The shape of the small public Llama that DeepSpeed-Chat users test with (stories260K): 512 sentencepiece
# tokens, width 64, 5 layers, grouped-query attention (8 query / 4 key-value heads), tied embeddings.
# Random weights of standard deviation 0.2 rather than 0.02: at 0.02 the model's predictions are nearly
# uniform and greedy decoding repeats one token whatever the prompt; at 0.2 continuations depend on the
# context, as a trained model's do, so generation tests compare real token sequences.
TINY_LLAMA = {"hidden_size": 64, "num_layers": 5, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 172,
              "max_position_embeddings": 512, "initializer_range": 0.2}
TINY_VOCAB = 512
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
HH_EMPTY_CHOSEN = (7, 19, 31, 43)  # records whose final chosen answer is empty, as in the real release
HH_UNSHARED_PREFIX = 11  # a record whose rejected dialogue has another prompt than its chosen one


def pytest_sessionstart(session):
    session.config._shm_before = _shm_segments()


def pytest_sessionfinish(session, exitstatus):
    """Runs the suite SIGKILLs on purpose cannot unlink their DeepSpeed /dev/shm segments; do it here."""
    for path in _shm_segments() - getattr(session.config, "_shm_before", set()):
        path.unlink(missing_ok=True)


def _shm_segments() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if shm.is_dir() else set()


# --------------------------------------------------------------------------------------------- real data (opt-in)


@pytest.fixture(scope="session")
def shared_path():
    """`shared_path(rel)` -> the real file `$DSCHAT_SHARED_DIR/rel`; only for `@pytest.mark.shared_data` tests.

    A missing file fails the test (never a skip): whoever selected these tests asked for the real data.
    """

    def resolve(rel: str) -> Path:
        path = SHARED_ROOT / rel
        if not path.exists():
            pytest.fail(f"real-data fixture {path} is absent; set DSCHAT_SHARED_DIR to the folder that holds "
                        f"{rel}, or run without -m shared_data")
        return path

    return resolve


# --------------------------------------------------------------------------------------------- tiny Llama


_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Anna", "Sam"]
_THINGS = ["cat", "dog", "tree", "ball", "sun", "sky", "bird", "car", "house", "cake", "park", "fish", "boat", "hat"]
_VERBS = ["saw", "liked", "found", "ate", "wanted", "made", "lost", "took", "painted", "shared"]
_ADJECTIVES = ["big", "red", "little", "happy", "small", "blue", "old", "hot", "funny", "kind"]


def story_sentences(count: int, seed: int = 0) -> list[str]:
    """Short children's-story sentences (the register of the public tiny Llamas), deterministic in `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        name, verb = rng.choice(_NAMES), rng.choice(_VERBS)
        adj, thing, other = rng.choice(_ADJECTIVES), rng.choice(_THINGS), rng.choice(_THINGS)
        out.append(f"Once upon a time, there was a {adj} {thing}. {name} {verb} the {other} and smiled. "
                   f"It was day {i}.")
    return out


def tokenizer_corpus() -> list[str]:
    """What the test tokenizer is trained on: stories, HH dialogues and every text of the synthetic task."""
    dialogues = [r["chosen"] for r in hh_dialogue_records(60)]
    return story_sentences(300) + dialogues + list(synthetic.corpus_texts())


def build_sentencepiece_tokenizer(directory: Path, texts: list[str], vocab_size: int = TINY_VOCAB) -> Path:
    """Train a byte-fallback BPE sentencepiece model on `texts` and save it as a Llama tokenizer.

    Written like a converted Llama checkpoint: `tokenizer.model` with `tokenizer_config.json`
    (LlamaTokenizer, bos added, no eos) and `special_tokens_map.json`; transformers then adds
    `tokenizer.json`. Byte fallback makes every text encodable (no `<unk>`), as with the public Llamas.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", **SPECIAL_TOKENS, "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 512,
              "padding_side": "right"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")
    AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
    return directory


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random-weight Llama of the TINY_LLAMA shape with a sentencepiece tokenizer, in Hugging Face layout
    (config.json, generation_config.json, model.safetensors, tokenizer.model, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json)."""
    build_sentencepiece_tokenizer(directory, tokenizer_corpus())
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert len(tokenizer) == TINY_VOCAB, len(tokenizer)
    save_random_llama(directory, tokenizer, seed=seed, **TINY_LLAMA)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint directory (random weights, sentencepiece tokenizer) built for this session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tinystories_dir(tiny_llama_dir) -> Path:
    """The older name of `tiny_llama_dir` (the tests once used the public stories260K model itself)."""
    return tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    """The tiny Llama's tokenizer as the steps load it: pad = eos, right padding."""
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------------------------- HH and TL;DR data


def hh_dialogue_records(count: int = 60, seed: int = 0) -> list[dict]:
    """Anthropic HH-RLHF-format pairs `{"chosen", "rejected"}`, each a whole dialogue.

    Like the real release: one to three earlier turns, chosen and rejected share everything up to the last
    "\n\nAssistant:" except record HH_UNSHARED_PREFIX, and the records HH_EMPTY_CHOSEN end with an empty
    chosen answer. Lengths vary from record to record.
    """
    rng = random.Random(seed)
    records = []
    for i in range(count):
        turns = []
        for t in range(1 + i % 3):
            name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
            turns.append(f"\n\nHuman: What did {name} do with the {thing} on day {i}?"
                         f"\n\nAssistant: {name} {rng.choice(_VERBS)} the {thing}" + " and played" * (t + i % 4) + ".")
        question = f"\n\nHuman: Tell me more about the {rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)}, please.\n\nAssistant:"
        prompt = "".join(turns) + question
        chosen = " " + " ".join(story_sentences(1 + i % 4, seed=1000 + i))
        rejected = " I do not know" + ", really" * (i % 5) + "."
        if i in HH_EMPTY_CHOSEN:
            chosen = "" if i % 2 else " "
        other_prompt = prompt.replace("Tell me more", "Say something") if i == HH_UNSHARED_PREFIX else prompt
        records.append({"chosen": prompt + chosen, "rejected": other_prompt + rejected})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """JSON lines, gzip-compressed when the name ends in .gz (the layout of the HH-RLHF release)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def hh_file(tmp_path_factory) -> Path:
    """`harmless-base/test.jsonl.gz`-style file of `hh_dialogue_records(60)`."""
    return write_jsonl(tmp_path_factory.mktemp("hh") / "test.jsonl.gz", hh_dialogue_records(60))


def tldr_rows(count: int = 25) -> list[dict]:
    """Reddit TL;DR rows like the public query CSV: `query` (multi-line, ends with "TL;DR:"),
    `reference_responses` and `postprocessed_response`."""
    rows = []
    for i, sentence in enumerate(story_sentences(count, seed=5)):
        query = f"SUBREDDIT: r/stories\n\nTITLE: Day {i}\n\nPOST: {sentence}\nThanks for reading.\n\nTL;DR:"
        rows.append({"query": query, "reference_responses": f" a story about day {i}",
                     "postprocessed_response": f" day {i} was fine"})
    return rows


@pytest.fixture(scope="session")
def tldr_csv(tmp_path_factory) -> Path:
    """A TL;DR query CSV of `tldr_rows()` (cells with newlines, quoted by the csv module)."""
    path = tmp_path_factory.mktemp("tldr") / "posts.csv"
    rows = tldr_rows()
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_random_critic(model_dir: Path, tokenizer, out: Path, std: float = 0.5, seed: int = 0) -> Path:
    """A step-2 layout reward model on `model_dir` whose value head is N(0, std): a fixed reward for PPO to
    maximise (and its critic's starting point)."""
    torch.manual_seed(seed)
    critic = RewardModel(AutoModel.from_pretrained(str(model_dir)), tokenizer, 0)
    torch.nn.init.normal_(critic.v_head.weight, std=std)
    save_reward_model(critic, tokenizer, out)
    return out


def synthetic_easy_pairs(count: int = 80, seed: int = 3) -> list[dict]:
    """Records as step2.5_select writes easy.jsonl, on the synthetic task: the best answer against a sloppy
    one (learnable and unambiguous)."""
    rng = random.Random(seed)
    prompts = synthetic.all_prompts("train")
    records = []
    for i in range(count):
        prompt = rng.choice(prompts)
        records.append({"prompt": prompt, "chosen": synthetic.best_response(prompt),
                        "rejected": synthetic.sample_response(prompt, 0.0, rng), "chosen_reward": 2.0,
                        "rejected_reward": 0.0, "gap": 2.0, "prompt_index": i})
    return records


@pytest.fixture(scope="module")
def easy_pairs(tmp_path_factory) -> Path:
    """A folder holding an easy.jsonl as step2.5_select writes it (`synthetic_easy_pairs`), for DPO runs."""
    root = tmp_path_factory.mktemp("easy_pairs")
    write_jsonl(root / "easy.jsonl", synthetic_easy_pairs())
    return root


def one_line_error(result, *named: str) -> str:
    """A click result that failed as bad input: exit code 2, one line, no traceback, naming each of `named`."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for part in named:
        assert part in text, text
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child job: the repo importable, no rendezvous inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def run_command(cmd: list[str], cwd: Path | str | None = None, timeout: int = 900, env: dict | None = None):
    """Run a command, return the CompletedProcess; output is kept for assertion messages."""
    full_env = child_env(**(env or {}))
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def run_ds():
    """Launch `deepspeed --num_gpus N script args...` (CPU: N ranks over gloo) or plain python for N=0."""

    def launch(script: Path | str, args: list[str], num_ranks: int = 1, cwd=None, timeout: int = 900, env=None):
        if num_ranks <= 0:
            cmd = [sys.executable, str(script), *args]
        else:
            cmd = [
                "deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
                str(script), *args,
            ]
        return run_command(cmd, cwd=cwd, timeout=timeout, env=env)

    return launch


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The embedded default at a test size: synthetic preference data and a tiny Llama."""
    root = tmp_path_factory.mktemp("assets")
    return build_default_assets(root, seed=1234, num_train=600, num_test=60)
