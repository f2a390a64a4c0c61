"""The embedded synthetic task (gold reward, data, label noise) and the offline tiny Llama bootstrap."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from mpo_ext import synthetic as S
from mpo_ext.bootstrap import build_default_assets, build_tiny_model

P3 = S.format_prompt("Name three fruits.")
P2 = S.format_prompt("Quick question: Can you tell me two words that rhyme with cat?")


# --- gold reward --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (P3, " apple, banana, cherry.", 1.0 + 1.0 + 0.9 + 0.5),  # optimal
        (P3, " lemon, melon.", 0.6 + 0.6 + 0.5),  # correct but low-weight, one short
        (P3, " apple, banana, cherry, grape.", 1.0 + 1.0 + 0.9 - 0.5 + 0.5),  # one too many
        (P3, " apple, apple, rock.", 1.0 - 0.75 - 1.0 + 0.5),  # repeat + unknown word
        (P3, " apple, banana, cherry", 1.0 + 1.0 + 0.9 - 0.5),  # no period
        (P3, " Apple ,  BANANA.", 1.0 + 1.0 + 0.5),  # case / spacing do not matter
        (P3, " apple,, banana.", 1.0 - 0.5 + 1.0 + 0.5),  # empty item
        (P3, " apple. banana.", -1.0 - 0.5),  # one malformed item, improper end
        (P2, " hat, bat.", 1.0 + 1.0 + 0.5),
        (P2, " apple, hat.", -1.0 + 1.0 + 0.5),  # a fruit is wrong here
        (P3, "", -2.0),
        (P3, "   \n ", -2.0),
    ],
)
def test_gold_reward_hand_computed(prompt, response, expected):
    assert S.gold_reward(prompt, response) == pytest.approx(expected)


def test_gold_reward_ordering_and_robustness():
    ladder = [
        " apple, banana, cherry.",  # best
        " apple, banana, lemon.",  # lower-weight item
        " lemon, melon, peach.",  # all low-weight
        " lemon, melon, peach, plum.",  # overlong
        " lemon, melon, peach",  # no period
        " lemon, melon, duck.",  # wrong item
        " lemon, lemon, duck, duck",  # repeats, wrong, no end
    ]
    scores = [S.gold_reward(P3, r) for r in ladder]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    assert S.max_gold(P3) == scores[0] == S.gold_reward(P3, S.best_response(P3))
    garbage = [" <unk> <unk>", "\n\nHuman: hi\n\nAssistant: x", "!!!,,,;;;" * 40, " é ü 漢字, 🍎.", " " + ", ".join(["zz"] * 500)]
    for g in garbage:
        value = S.gold_reward(P3, g)
        assert isinstance(value, float) and S.MIN_GOLD <= value < 0, (g, value)
    assert S.gold_reward(P3, " " + ", ".join(["zz"] * 500)) == S.MIN_GOLD


def test_parse_prompt():
    multi = "\n\nHuman: Name five tools.\n\nAssistant: saw.\n\nHuman: Hi. List two colors.\n\nAssistant:"
    assert S.parse_prompt(multi) == S.TaskSpec("colors", 2)
    assert S.parse_prompt(P2) == S.TaskSpec("words that rhyme with cat", 2)
    with pytest.raises(ValueError, match="not a mpo-synthetic prompt"):
        S.gold_reward("\n\nHuman: What is the capital of France?\n\nAssistant:", " Paris.")


def test_quality_controls_expected_gold():
    rng = random.Random(0)
    prompts = S.all_prompts("train")
    means = []
    for q in (0.05, 0.5, 0.95):
        values = [S.gold_reward(p, S.sample_response(p, q, rng)) for p in rng.sample(prompts, 300)]
        means.append(statistics.mean(values))
    assert means[0] < means[1] - 0.5 < means[2] - 1.0, means


# --- dataset --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_dataset_files_deterministic_and_held_out(tmp_path):
    a = S.make_synthetic_dataset(tmp_path / "a", num_train=300, num_test=50, seed=7)
    S.make_synthetic_dataset(tmp_path / "b", num_train=300, num_test=50, seed=7)
    S.make_synthetic_dataset(tmp_path / "c", num_train=300, num_test=50, seed=8)
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp-")]

    train, test = _read_jsonl(tmp_path / "a" / "train.jsonl"), _read_jsonl(tmp_path / "a" / "test.jsonl")
    assert len(train) == 300 and len(test) == 50
    keys = {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "label_correct"}
    for rec in train + test:
        assert set(rec) == keys
        assert rec["prompt"].startswith("\n\nHuman: ") and rec["prompt"].endswith("\n\nAssistant:")
        assert rec["chosen"].startswith(" ") and rec["rejected"].startswith(" ")
        assert rec["chosen_gold"] == S.gold_reward(rec["prompt"], rec["chosen"])
        assert rec["label_correct"] == (rec["chosen_gold"] > rec["rejected_gold"])
        assert rec["chosen_gold"] != rec["rejected_gold"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {S.parse_prompt(r["prompt"]) for r in test} <= {S.parse_prompt(p) for p in S.all_prompts("train")}

    assert a["seed"] == 7 and a["num_train"] == 300 and a["num_test"] == 50
    assert a["max_achievable_gold"] == pytest.approx(1.0 + 1.0 + 0.9 + 0.9 + 0.8 + 0.5)
    assert 0 < a["train"]["label_noise_rate"] < 0.5
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == a


def test_label_noise_concentrated_at_small_gaps():
    records = S.generate_records(3000, "train", seed=1234, label_beta=1.0)
    by_gap = sorted(records, key=lambda r: abs(r["chosen_gold"] - r["rejected_gold"]))
    fifth = len(by_gap) // 5
    acc_small = statistics.mean(r["label_correct"] for r in by_gap[:fifth])
    acc_large = statistics.mean(r["label_correct"] for r in by_gap[-fifth:])
    assert acc_small < 0.7 and acc_large > 0.95 and acc_large - acc_small > 0.25, (acc_small, acc_large)
    gaps = [abs(r["chosen_gold"] - r["rejected_gold"]) for r in by_gap]
    assert gaps[0] <= 0.1 and gaps[-1] >= 4.0  # gaps range from tiny to large
    sharp = S.generate_records(1000, "train", seed=1234, label_beta=50.0)
    assert statistics.mean(r["label_correct"] for r in sharp) > 0.97


def test_sft_data_is_middling():
    records = S.generate_records(3000, "train", seed=1234)
    chosen = statistics.mean(r["chosen_gold"] for r in records)
    rejected = statistics.mean(r["rejected_gold"] for r in records)
    best = statistics.mean(S.max_gold(r["prompt"]) for r in records)
    assert 1.0 < chosen < 3.0 and rejected < chosen - 0.5 and chosen < best - 1.0, (chosen, rejected, best)


# --- tokenizer + tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return build_default_assets(tmp_path_factory.mktemp("assets"), num_train=200, num_test=40)


def test_tokenizer_round_trip_and_bos(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model_dir"])
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.pad_token is None  # the loader decides pad = eos
    records = _read_jsonl(Path(assets["data_dir"]) / "train.jsonl")
    texts = [P3 + " apple, banana, cherry.", "\n\nHuman: Hi.\n\nAssistant: apple?\n\nHuman: List two tools.", *S.all_prompts()]
    texts += [r["prompt"] + r[k] for r in records for k in ("chosen", "rejected")]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    ids = tok(P3 + " apple." + tok.eos_token)["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.convert_ids_to_tokens(tok(P3)["input_ids"])[:5] == ["<s>", "\n", "\n", "Human", ":"]
    # Unknown words become <unk>, which decoding with skip_special_tokens drops; gold still parses.
    decoded = tok.decode(tok(" apple, zebra.")["input_ids"], skip_special_tokens=True)
    assert decoded == " apple,." and S.gold_reward(P3, decoded) == pytest.approx(1.0 - 0.5 + 0.5)


def test_model_loads_and_generates(assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(assets["model_dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings and cfg.vocab_size % 8 == 0
    assert cfg.vocab_size >= len(tok) and (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
    gen = GenerationConfig.from_pretrained(model_dir)
    assert gen.eos_token_id == gen.pad_token_id == tok.eos_token_id
    batch = tok([P3], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert logits.shape == (1, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert isinstance(S.gold_reward(P3, text), float)


def test_build_deterministic_and_idempotent(tmp_path, assets):
    texts = list(S.corpus_texts())
    a = build_tiny_model(tmp_path / "a", texts, seed=3)
    b = build_tiny_model(tmp_path / "b", iter(texts), seed=3)
    c = build_tiny_model(tmp_path / "c", texts, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
            "generation_config.json", "model.safetensors"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]

    # Rebuilding over an existing dir replaces it; build_default_assets skips complete parts.
    build_tiny_model(tmp_path / "a", texts, seed=4)
    assert (a / "model.safetensors").read_bytes() == (c / "model.safetensors").read_bytes()
    root = Path(assets["model_dir"]).parent
    stamps = {p: p.stat().st_mtime_ns for d in ("data", "tiny-llama") for p in (root / d).iterdir()}
    assert build_default_assets(root, num_train=200, num_test=40) == assets
    assert stamps == {p: p.stat().st_mtime_ns for d in ("data", "tiny-llama") for p in (root / d).iterdir()}


# --------------------------------------------------------------------------------------------- second task


SORT_DESC = S.sort_prompt([12, 3, 7], descending=True)


@pytest.mark.parametrize("response, expected", [
    (" 12 7 3.", 3 * 1.0 + 0.3),                 # right order, proper end
    (" 3 7 12.", 0.25 + 1.0 + 0.25 + 0.3),       # ascending: only the middle one in place
    (" 12 3 7", 1.0 + 0.25 + 0.25),              # no period
    (" 12 7 7 3.", 1.0 + 1.0 - 0.75 + 0.25 + 0.3),  # a repeat; 3 lands past the target's length
    (" 12 7.", 2.0 - 0.5 + 0.3),                 # 3 missing
    (" 12 7 3 5.", 3.0 - 0.75 + 0.3),            # a foreign number
    ("", -2.0),
])
def test_sort_gold_reward_hand_computed(response, expected):
    assert S.sort_gold_reward(SORT_DESC, response) == pytest.approx(expected)


def test_sort_task_prompts_parse_split_and_label(tmp_path):
    for template in range(len(S.SORT_TEMPLATES)):
        for descending in (False, True):
            prompt = S.sort_prompt([5, 20, 1, 9], descending, template)
            spec = S.parse_sort_prompt(prompt)
            assert spec == S.SortSpec((5, 20, 1, 9), descending)
            assert S.sort_gold_reward(prompt, S.best_sort_response(prompt)) == pytest.approx(4.3)
            assert S.any_gold_reward(prompt, S.best_sort_response(prompt)) == pytest.approx(4.3)
    with pytest.raises(ValueError):
        S.parse_sort_prompt(S.format_prompt("Name two fruits."))
    rng = random.Random(0)
    train = {S.sample_sort_prompt(rng, "train") for _ in range(300)}
    test = {S.sample_sort_prompt(rng, "test") for _ in range(100)}
    assert not train & test
    # better writers score higher on average; labels mostly agree with gold
    prompts = [S.sample_sort_prompt(rng, "train") for _ in range(300)]
    low = statistics.fmean(S.sort_gold_reward(p, S.sample_sort_response(p, 0.1, rng)) for p in prompts)
    high = statistics.fmean(S.sort_gold_reward(p, S.sample_sort_response(p, 0.9, rng)) for p in prompts)
    assert high > low + 1.0
    manifest = S.make_synthetic_dataset(tmp_path, num_train=300, num_test=30, seed=1, task=S.SORT_TASK_NAME)
    assert manifest["task"] == S.SORT_TASK_NAME and 0.05 < manifest["train"]["label_noise_rate"] < 0.35
    from mpo_ext.evaluation import find_gold_reward

    assert find_gold_reward(str(tmp_path)) is S.sort_gold_reward  # `mpo eval` scores this task by its own gold
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert S.sort_gold_reward(first["prompt"], first["chosen"]) == first["chosen_gold"]
    # the default task's data does not change with the registry
    assert S.generate_records(5, "train", 1234) == S.generate_records(5, "train", 1234, task=S.SYNTHETIC_TASK_NAME)
