"""Data pipeline: split arithmetic, adapters' texts, local files, per-phase tensors, collators, cache, errors."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HH_EMPTY_CHOSEN, HH_UNSHARED_PREFIX, hh_dialogue_records, tldr_rows, write_jsonl
from safetensors.torch import load_file

from dschat.utils.data import data_utils as du
from dschat.utils.data import raw_datasets as rd
from dschat.utils.data import splits
from dschat.utils.data.prompt_datasets import create_prompt_dataset
from dschat.utils.errors import UserError
from mpo_ext.selection import load_items, parse_args

HH_TEST = "data/hh-rlhf/harmless-base/test.jsonl.gz"


def pcr(i: int, **extra) -> dict:
    """A prompt/chosen/rejected record in the HH text convention."""
    return {
        "prompt": f"\n\nHuman: question number {i}?\n\nAssistant:",
        "chosen": f" a good answer {i}.",
        "rejected": f" bad {i}",
        **extra,
    }


def build(tok, data_path, phase, out, max_seq_len=64, data_split=None, **kw):
    return create_prompt_dataset(-1, data_path, data_split, str(out), phase, 1234, tok, max_seq_len, **kw)


@pytest.fixture(scope="module")
def real_hh_records(shared_path) -> list[dict]:
    with gzip.open(shared_path(HH_TEST), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# --------------------------------------------------------------------------------------------- split arithmetic


@pytest.mark.parametrize(
    ("split", "size", "bounds"),
    [
        ("2,4,4", 10, [0, 2, 6, 10]),
        ("2,4,4", 7, [0, 1, 4, 7]),  # 1.4 -> 1, 2.8 -> 3, 2.8 -> 3
        ("1,1,1", 7, [0, 3, 5, 7]),  # 2+2+2 = 6: the first split absorbs the missing row
        ("1,1,1", 5, [0, 1, 3, 5]),  # 2+2+2 = 6: the first split gives back the extra row
        ("1,1", 5, [0, 3, 5]),  # round(2.5) == 2 (half to even), first split absorbs
        ("10,0,0", 7, [0, 7, 7, 7]),
        ("9,1", 2312, [0, 2081, 2312]),
    ],
)
def test_split_boundaries(split, size, bounds):
    assert du.split_boundaries(split, size) == bounds


def test_split_index_files_and_permutation(tmp_path):
    perm = np.arange(10, dtype=np.uint32)
    np.random.RandomState(seed=7).shuffle(perm)
    assert du.get_shuffle_idx(7, 10).tolist() == perm.tolist()
    parts = [du.get_raw_dataset_split_index(0, str(tmp_path), "ds_clean", 7, "train", "2,4,4", k, 10) for k in range(3)]
    assert parts == [perm[:2].tolist(), perm[2:6].tolist(), perm[6:].tolist()]
    for k in range(3):
        saved = np.load(tmp_path / f"ds_clean_seed7_train_2,4,4_{k}.npy", allow_pickle=True)
        assert saved.tolist() == parts[k]


def test_phase_rows_of_a_local_file_without_eval_split(tmp_path):
    raw = rd.open_local_dataset(str(write_jsonl(tmp_path / "d.jsonl", [pcr(i) for i in range(20)])), "", 3, -1)
    order = du.get_shuffle_idx(3, 20).tolist()
    train, evals = du.phase_rows(raw, None, 3, 3, str(tmp_path / "out"), -1)  # PPO prompts: all of them train
    assert [r["prompt"] for r in train] == [pcr(i)["prompt"] for i in order] and evals == []
    train, evals = du.phase_rows(raw, None, 2, 3, str(tmp_path / "out"), -1)  # other phases: 9:1, then the phase
    head, tail = order[:18], order[18:]
    assert [r["prompt"] for r in train] == [pcr(head[j])["prompt"] for j in du.get_shuffle_idx(3, 18).tolist()]
    assert [r["prompt"] for r in evals] == [pcr(tail[j])["prompt"] for j in du.get_shuffle_idx(3, 2).tolist()]


def test_selection_reads_the_prompts_step3_trains_on(tmp_path, tiny_tokenizer, tiny_llama_dir, hh_file):
    """A local prompt file without an eval split: step 2.5 scores exactly step 3's prompts, in its order."""
    cache = tmp_path / "cache"
    step3, _ = create_prompt_dataset(-1, [str(hh_file)], None, str(cache), 3, 1234, tiny_tokenizer, 128)
    args = parse_args(["--data_path", str(hh_file), "--sft_model_name_or_path", str(tiny_llama_dir),
                       "--reward_model_name_or_path", str(tiny_llama_dir), "--max_prompt_seq_len", "128",
                       "--data_output_path", str(cache), "--output_dir", str(tmp_path / "select"),
                       "--seed", "1234"])
    items, _ = load_items(args, tiny_tokenizer)
    selected = [tiny_tokenizer(item["prompt"])["input_ids"] for item in items]
    assert len(step3) > 50 and selected == [step3[i][0].tolist() for i in range(len(step3))]


def test_data_parts_are_disjoint_seeded_and_cover_every_row():
    # size 5, seed 7: permutation perm, halves by split_boundaries("1,1", 5) = [0, 3, 5], each sorted
    perm = du.get_shuffle_idx(7, 5).tolist()
    assert splits.part_indices(5, 1, 2, 7) == sorted(perm[:3]) and splits.part_indices(5, 2, 2, 7) == sorted(perm[3:])
    for size, parts in ((31, 2), (10, 3), (1, 2)):
        pieces = [splits.part_indices(size, k, parts, 1234) for k in range(1, parts + 1)]
        assert sorted(i for piece in pieces for i in piece) == list(range(size))  # disjoint, cover every row
    assert splits.part_indices(31, 1, 2, 1) != splits.part_indices(31, 1, 2, 2)  # the seed decides
    assert splits.parse_data_part("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(UserError, match=f"--data_part {bad}: expected K/N"):
            splits.parse_data_part(bad)


def test_reward_model_trains_on_its_part_of_the_pairs(tmp_path, tiny_tokenizer, tiny_llama_dir, pair_file):
    """--data_part 1/2 and 2/2 of step 2 read disjoint halves of the phase's training pairs that together are
    all of them; the eval pairs stay whole."""
    from dschat.steps.reward import RewardSettings, data_part

    train, _ = build(tiny_tokenizer, [str(pair_file)], 2, tmp_path / "out", data_split="0,1,0")
    rows = {tuple(train[i][0].tolist()) for i in range(len(train))}
    halves = []
    for part in ("1/2", "2/2"):
        settings = RewardSettings.parse_args(["--model_name_or_path", str(tiny_llama_dir), "--data_path",
                                              str(pair_file), "--data_part", part, "--seed", "1234",
                                              "--output_dir", str(tmp_path / "rm")])
        half = data_part(train, settings)
        halves.append({tuple(half[i][0].tolist()) for i in range(len(half))})
    assert halves[0] and halves[1] and not halves[0] & halves[1] and halves[0] | halves[1] == rows
    assert abs(len(halves[0]) - len(halves[1])) <= 1


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "0,0,0", "1,-1,1"])
def test_bad_data_split(tmp_path, tiny_tokenizer, bad):
    f = write_jsonl(tmp_path / "d.jsonl", [pcr(i) for i in range(5)])
    with pytest.raises(UserError, match="--data_split"):
        build(tiny_tokenizer, [str(f)], 1, tmp_path / "out", data_split=bad)


# --------------------------------------------------------------------------------------------- adapters' texts


def adapter(name: str) -> rd.PromptRawDataset:
    cls = rd.find_adapter(name)
    assert cls is not None, name
    return cls.for_samples(name)


def texts(a: rd.PromptRawDataset, s: dict) -> tuple:
    return (a.get_prompt(s), a.get_chosen(s), a.get_rejected(s), a.get_prompt_and_chosen(s),
            a.get_prompt_and_rejected(s))


def test_dahoas_texts():
    s = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away", "response": "x"}
    for name in ("Dahoas/rm-static", "Dahoas/full-hh-rlhf"):
        assert texts(adapter(name), s) == (s["prompt"], " hello", " go away", s["prompt"] + " hello",
                                           s["prompt"] + " go away")
    assert adapter("Dahoas/rm-static").dataset_name_clean == "Dahoas_rm_static"
    a = adapter("Dahoas/synthetic-instruct-gptj-pairwise")
    s = {"prompt": "Tell me", "chosen": "Yes", "rejected": "No"}
    assert texts(a, s) == (" Human: Tell me Assistant:", " Yes", " No", " Human: Tell me Assistant: Yes",
                           " Human: Tell me Assistant: No")
    assert a.get_eval_data() is None  # train-only: 9:1 split happens in data_utils


def test_yitingxie_texts():
    s = {"prompt": "Human: q ", "chosen": "Assistant: good", "rejected": "Assistant: bad"}
    assert texts(adapter("yitingxie/rlhf-reward-datasets"), s) == (
        "Human: q Assistant:", " good", " bad", "Human: q Assistant: good", "Human: q Assistant: bad")


def test_webgpt_texts():
    a = adapter("openai/webgpt_comparisons")
    s = {"question": {"full_text": "Why?"}, "answer_0": "Because [1] it is (2).", "answer_1": "No idea",
         "score_0": -1.0, "score_1": 1.0}
    assert texts(a, s) == (" Human: Why? Assistant:", " No idea", " Because it is.",
                           " Human: Why? Assistant: No idea", " Human: Why? Assistant: Because it is.")
    tie = dict(s, score_0=0.0, score_1=0.0)
    assert a.get_chosen(tie) == " Because it is."


def test_shp_and_sft_only_texts():
    a = adapter("stanfordnlp/SHP")
    s = {"history": "H", "human_ref_A": "A", "human_ref_B": "B", "labels": 0}
    assert texts(a, s) == (" Human: H Assistant:", " B", " A", " Human: H Assistant: B", " Human: H Assistant: A")
    a = adapter("wangrui6/Zhihu-KOL")
    s = {"INSTRUCTION": "Q", "RESPONSE": "R"}
    assert texts(a, s) == (" Human: Q Assistant:", " R", None, " Human: Q Assistant: R", None)
    a = adapter("pvduy/sharegpt_alpaca_oa_vicuna_format")
    s = {"prompt": "USER: hi ASSISTANT:", "label": "yo"}
    assert texts(a, s) == ("Human: hi Assistant:", " yo", None, "Human: hi Assistant: yo", None)
    a = adapter("Cohere/miracl-ja-queries-22-12")
    s = {"query": "q", "positive_passages": [{"text": "p"}], "negative_passages": []}
    assert texts(a, s) == (" Human: q Assistant:", " p", None, " Human: q Assistant: p", None)
    a = adapter("mkqa-Japanese")
    s = {"queries": {"ja": "なに"}, "answers": {"ja": [{"text": "これ"}]}}
    assert a.get_prompt_and_chosen(s) == " Human: なに Assistant: これ" and a.dataset_name_clean == "mkqa"
    a = adapter("lmqg/qag_jaquad")
    assert a.get_prompt_and_chosen({"questions": ["q1", "q2"], "paragraph": "p"}) == " Human: q1 Assistant: p"
    a = adapter("Hello-SimpleAI/HC3-Chinese")
    assert a.get_chosen({"question": "q", "human_answers": ["h"]}) == " h"


def test_local_jsonfile_texts():
    a = adapter("local/jsonfile")
    s = {"prompt": "Human: I have a question. Assistant:", "chosen": "Good answer.", "rejected": "Bad answer."}
    assert texts(a, s) == (" Human: I have a question. Assistant:", " Good answer.", " Bad answer.",
                           " Human: I have a question. Assistant: Good answer.",
                           " Human: I have a question. Assistant: Bad answer.")
    assert a.dataset_name_clean == "jsonfile"


def test_tldr_texts():
    a = adapter("CarperAI/openai_summarize_comparisons")
    s = {"prompt": "SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:", "chosen": "TL;DR: short", "rejected": "TL;DR: long one"}
    assert texts(a, s) == (s["prompt"], " short", " long one", s["prompt"] + " short", s["prompt"] + " long one")
    a = adapter("openai/summarize_from_feedback")
    s = {"info": {"post": "My post.", "title": "T", "subreddit": "tifu"},
         "summaries": [{"text": " first"}, {"text": "second "}], "choice": 1}
    prompt = "SUBREDDIT: r/tifu\n\nTITLE: T\n\nPOST: My post.\n\nTL;DR:"
    assert texts(a, s) == (prompt, " second", " first", prompt + " second", prompt + " first")


def test_hh_dialogue_split():
    a = adapter("Anthropic/hh-rlhf/harmless-base")
    assert a.dataset_name_clean == "Anthropic_hh_rlhf_harmless_base"
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant: No, sorry!",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant: Sure, lots."}
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant:"
    assert texts(a, rec) == (prompt, " No, sorry!", " Sure, lots.", rec["chosen"], rec["rejected"])
    other = dict(rec, rejected=rec["rejected"].replace("a pen prank", "a joke"))  # no shared prompt
    assert a.get_rejected(other) is None and a.get_chosen(other) == " No, sorry!"
    records = hh_dialogue_records(60)
    empty = [i for i, r in enumerate(records) if a.get_chosen(r) is None and a.get_prompt(r) is not None
             and rd.split_hh_dialogue(r["chosen"])[1].strip() == ""]
    assert empty == list(HH_EMPTY_CHOSEN)
    assert all(a.get_prompt_and_chosen(records[i]) is None for i in empty)
    assert a.get_rejected(records[HH_UNSHARED_PREFIX]) is None


@pytest.mark.shared_data
def test_hh_dialogue_split_on_real_record(real_hh_records):
    a = adapter("Anthropic/hh-rlhf/harmless-base")
    rec = real_hh_records[0]
    prompt = a.get_prompt(rec)
    assert prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert a.get_chosen(rec) == " No, sorry!  All of these involve a pen, the point is that you can get funny " \
        "results by doing pranks with pens."
    assert a.get_rejected(rec).startswith(" There are lots of funny things you can do with pens")
    assert a.get_prompt_and_chosen(rec) == rec["chosen"] and a.get_prompt_and_rejected(rec) == rec["rejected"]
    empty = [r for r in real_hh_records if a.get_chosen(r) is None and a.get_prompt(r) is not None
             and rd.split_hh_dialogue(r["chosen"])[1].strip() == ""]
    assert len(empty) == 4  # four records of the release end with an empty chosen answer
    assert all(a.get_prompt_and_chosen(r) is None for r in empty)


def test_dispatch_order_and_unknown_name(monkeypatch):
    import datasets

    assert rd.find_adapter("./relative/Dahoas/rm-static") is rd.DahoasRmstaticDataset
    assert rd.find_adapter("Anthropic/hh-rlhf/helpful-base") is rd.AnthropicHHRLHFDataset
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here: fail at once, not after retries
    with pytest.raises(UserError) as err:  # not a built-in name: tried as a hub id
        du.get_raw_dataset("nobody/such-set", "", 0, -1)
    msg = str(err.value)
    assert "--data_path nobody/such-set" in msg and "datasets.load_dataset" in msg and "\n" not in msg
    with pytest.raises(UserError, match="no such file or directory"):
        du.get_raw_dataset("./nobody/such-set.jsonl", "", 0, -1)


def test_hub_style_loading_of_local_repo(tmp_path, monkeypatch):
    """`Anthropic/hh-rlhf/<subset>` goes through datasets.load_dataset(repo, data_dir=subset)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    repo = tmp_path / "hub" / "Anthropic" / "hh-rlhf"
    records = hh_dialogue_records(60)
    write_jsonl(repo / "harmless-base" / "train.jsonl.gz", records[:40])
    write_jsonl(repo / "harmless-base" / "test.jsonl.gz", records[40:50])
    raw = du.get_raw_dataset(str(repo / "harmless-base"), str(tmp_path / "out"), 1, -1)
    assert isinstance(raw, rd.AnthropicHHRLHFDataset)
    assert len(raw.get_train_data()) == 40 and len(raw.get_eval_data()) == 10
    assert raw.get_prompt(raw.get_train_data()[0]).endswith("\n\nAssistant:")
    # data_split=None: a local copy is a local path (whole set to the phase); a hub id keeps 2,4,4.
    assert du.effective_data_split(None, raw, 2) == "0,10,0"
    assert du.effective_data_split(None, adapter("Anthropic/hh-rlhf"), 2) == "2,4,4"
    assert du.effective_data_split(None, adapter("local/jsonfile"), 2) == "2,4,4"


# --------------------------------------------------------------------------------------------- local files


def _write_format(path: Path, records: list[dict]) -> Path:
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        write_jsonl(path, records)
    return path


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.jsonl.gz", "d.parquet"])
def test_local_file_formats(tmp_path, tiny_tokenizer, name):
    records = [pcr(i, source="extra key ignored") for i in range(20)]
    f = _write_format(tmp_path / name, records)
    raw = du.get_raw_dataset(str(f), str(tmp_path / "out"), 1234, -1)
    assert isinstance(raw, rd.LocalPromptPairDataset) and raw.get_eval_data() is None
    assert raw.get_prompt_and_chosen(raw.get_train_data()[3]) == records[3]["prompt"] + records[3]["chosen"]
    train, evals = build(tiny_tokenizer, [str(f)], 2, tmp_path / "out")
    assert (len(train), len(evals)) == (18, 2)  # data_split=None: all of it to phase 2, 9:1 train/eval


def test_local_directory_with_train_and_test(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [pcr(i) for i in range(12)])
    write_jsonl(tmp_path / "ds" / "test.jsonl", [pcr(100 + i) for i in range(5)])
    train, evals = build(tiny_tokenizer, [str(tmp_path / "ds")], 1, tmp_path / "out")
    assert (len(train), len(evals)) == (12, 5)
    train, evals = build(tiny_tokenizer, [str(tmp_path / "ds")], 1, tmp_path / "out", data_split="2,4,4")
    assert (len(train), len(evals)) == (2, 1)  # 12 -> [0,2,7,12] ; 5 -> [0,1,3,5]


def test_hh_file_autodetected_empty_answers_skipped(tmp_path, tiny_tokenizer, hh_file, capsys):
    train, evals = build(tiny_tokenizer, [str(hh_file)], 1, tmp_path / "out", max_seq_len=32, keep_truncated=True)
    out = capsys.readouterr().out
    assert len(train) + len(evals) == 60 - len(HH_EMPTY_CHOSEN)  # the unshared-prompt pair's chosen side is kept
    assert "skipped=" in out and "for train_phase=1 size=" in out
    train, evals = build(tiny_tokenizer, [str(hh_file)], 2, tmp_path / "out2", max_seq_len=256)
    assert len(train) + len(evals) == 60 - len(HH_EMPTY_CHOSEN) - 1  # a pair needs both sides


@pytest.mark.shared_data
def test_real_hh_file_autodetected_empty_answers_skipped(tmp_path, tiny_tokenizer, shared_path, capsys):
    train, evals = build(tiny_tokenizer, [str(shared_path(HH_TEST))], 1, tmp_path / "out", max_seq_len=32,
                         keep_truncated=True)
    out = capsys.readouterr().out
    assert len(train) + len(evals) == 2312 - 4
    assert "skipped=" in out and "for train_phase=1 size=" in out


def test_prompt_only_file(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:"} for i in range(10)])
    train, evaluation = build(tiny_tokenizer, [str(f)], 3, tmp_path / "out")
    assert len(train) == 10 and len(evaluation) == 0  # step 3 has no eval: every prompt trains
    with pytest.raises(UserError, match="no usable samples for phase 2"):
        build(tiny_tokenizer, [str(f)], 2, tmp_path / "out")


def test_query_csv_prompts(tmp_path, tldr_csv):
    raw = du.get_raw_dataset(str(tldr_csv), str(tmp_path), 1, -1)
    rows = tldr_rows()
    assert [raw.get_prompt(s) for s in raw.get_train_data()] == [r["query"] for r in rows]  # newlines kept
    assert all(raw.get_rejected(s) is None for s in raw.get_train_data())


@pytest.mark.shared_data
def test_real_query_csv_prompts(tmp_path, shared_path):
    csv_file = shared_path("data/tldr/oai1b.csv")
    raw = du.get_raw_dataset(str(csv_file), str(tmp_path), 1, -1)
    sample = raw.get_train_data()[0]
    assert raw.get_prompt(sample).endswith("TL;DR:") and raw.get_rejected(sample) is None
    assert len(raw.get_train_data()) == 1945


def test_local_jsonfile(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv(rd.LOCAL_JSONFILE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="local/jsonfile.*nowhere"):
        build(tiny_tokenizer, ["local/jsonfile"], 1, tmp_path / "out")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps([{"prompt": f"Human: q{i} Assistant:", "chosen": "yes",
                                                  "rejected": "no"} for i in range(10)]))
    write_jsonl(data / "eval.json", [{"prompt": "Human: e Assistant:", "chosen": "yes", "rejected": "no"}] * 5)
    monkeypatch.setenv(rd.LOCAL_JSONFILE_ENV, str(data))
    train, evals = build(tiny_tokenizer, ["local/jsonfile"], 2, tmp_path / "out")
    assert (len(train), len(evals)) == (4, 2)  # named dataset: default split 2,4,4
    assert list((tmp_path / "out").glob("jsonfile_seed1234_train_2,4,4_*.npy"))


# --------------------------------------------------------------------------------------------- phases + collators


@pytest.fixture()
def pair_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [pcr(i) for i in range(30)])


def test_phase1_items_and_sft_collator(tmp_path, tiny_tokenizer, pair_file):
    tok = tiny_tokenizer
    train, _ = build(tok, [str(pair_file)], 1, tmp_path / "out", max_seq_len=128)
    item = train[0]
    assert len(item["input_ids"]) < 128
    assert item["input_ids"].dim() == 1 and item["input_ids"].dtype == torch.long
    assert item["input_ids"][-1].item() == tok.eos_token_id  # eos appended, not truncated away
    assert torch.equal(item["labels"], item["input_ids"]) and bool(item["attention_mask"].all())
    items = [train[i] for i in range(4)]
    longest = max(len(i["input_ids"]) for i in items)
    assert len({len(i["input_ids"]) for i in items}) > 1 or longest % 8
    batch = du.DataCollatorSFT(tok.pad_token_id, 128)(items)
    assert batch["input_ids"].shape == (4, min(du.round_up(longest), 128))
    for row, it in zip(range(4), items):
        n = len(it["input_ids"])
        assert batch["labels"][row, n - 1].item() == tok.eos_token_id  # the real eos is learned
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    fixed = du.DataCollatorSFT(tok.pad_token_id, 128, padding="max_length")(items)
    assert fixed["input_ids"].shape == (4, 128) and (fixed["labels"] == -100).sum() > (batch["labels"] == -100).sum()


def test_truncation_to_max_seq_len(tmp_path, tiny_tokenizer, pair_file):
    train, _ = build(tiny_tokenizer, [str(pair_file)], 1, tmp_path / "out", max_seq_len=6, keep_truncated=True)
    assert max(len(train[i]["input_ids"]) for i in range(len(train))) == 6  # upstream's right truncation
    # By default a row the limit leaves no answer token of is dropped, and the error says why and what to do.
    with pytest.raises(UserError, match="27 were dropped because the length limit \\(6\\).*--keep_truncated"):
        build(tiny_tokenizer, [str(pair_file)], 1, tmp_path / "out", max_seq_len=6)


def test_phase2_items_and_reward_collator(tmp_path, tiny_tokenizer, pair_file):
    tok = tiny_tokenizer
    train, _ = build(tok, [str(pair_file)], 2, tmp_path / "out", max_seq_len=64)
    c_ids, c_mask, r_ids, r_mask, plen = train[0]
    assert c_ids[-1].item() == tok.eos_token_id == r_ids[-1].item()
    assert plen.dim() == 0 and 0 < plen.item() < min(len(c_ids), len(r_ids))
    assert plen.item() in {len(tok(pcr(i)["prompt"])["input_ids"]) for i in range(30)}
    assert torch.equal(c_ids[: plen.item()], r_ids[: plen.item()])  # the shared prompt
    assert not torch.equal(c_ids, r_ids)
    items = [train[i] for i in range(3)]
    batch = du.DataCollatorReward(pad_token_id=tok.pad_token_id, max_seq_len=64)(items)
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (6, width) and width % 8 == 0
    for i, it in enumerate(items):
        assert torch.equal(batch["input_ids"][i, : len(it[0])], it[0])  # chosen rows first
        assert torch.equal(batch["input_ids"][3 + i, : len(it[2])], it[2])  # then rejected rows
        assert batch["attention_mask"][3 + i].sum().item() == len(it[2])
    assert batch["prompt_lengths"].tolist() == [int(it[4]) for it in items] * 2
    four = du.DataCollatorReward(pad_token_id=tok.pad_token_id, max_seq_len=64, padding="max_length")(
        [it[:4] for it in items])
    assert four["input_ids"].shape == (6, 64) and four["prompt_lengths"].tolist() == [0] * 6


def test_phase3_items_and_rlhf_collator(tmp_path, tiny_tokenizer, pair_file):
    tok = tiny_tokenizer
    train, _ = build(tok, [str(pair_file)], 3, tmp_path / "out", max_seq_len=64)
    ids, mask, pad = train[0]
    assert pad == tok.pad_token_id and ids[0].item() == tok.bos_token_id  # stored unreversed
    assert ids[-1].item() != tok.eos_token_id  # prompts carry no end-of-text
    items = [train[i] for i in range(3)]
    batch = du.DataCollatorRLHF(64, 1)(items)
    assert batch["prompt"].shape == (3, 64)
    for row, it in enumerate(items):
        n = len(it[0])
        assert torch.equal(batch["prompt"][row, 64 - n:], it[0])  # left padded
        assert (batch["prompt"][row, : 64 - n] == tok.pad_token_id).all()
        assert batch["prompt_att_mask"][row].tolist() == [0] * (64 - n) + [1] * n
    longest = du.DataCollatorRLHF(64, 1, padding="longest")(items)
    assert longest["prompt"].shape[1] == du.round_up(max(len(it[0]) for it in items))


def test_phase3_filters_long_prompts(tmp_path, tiny_tokenizer, capsys):
    records = [pcr(i) for i in range(10)] + [dict(pcr(99), prompt="\n\nHuman: " + "very long " * 50)] * 10
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    train, evals = build(tiny_tokenizer, [str(f)], 3, tmp_path / "out", max_seq_len=48)
    assert len(train) + len(evals) == 10
    assert train.filter_counts["prompt_too_long"] + evals.filter_counts["prompt_too_long"] == 10
    out = capsys.readouterr().out
    assert "prompt_too_long=" in out and "10 prompts longer than --max_prompt_seq_len 48" in out


def test_blending_and_sft_only(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [pcr(i) for i in range(20)])
    b = write_jsonl(tmp_path / "b" / "train.jsonl", [pcr(100 + i) for i in range(10)])
    write_jsonl(tmp_path / "b" / "test.jsonl", [pcr(200 + i) for i in range(4)])
    train, evals = build(tiny_tokenizer, [str(a), str(b.parent)], 1, tmp_path / "out")
    assert (len(train), len(evals)) == (18 + 10, 2 + 4)
    sft = write_jsonl(tmp_path / "sft.jsonl", [pcr(300 + i) for i in range(10)])
    train2, evals2 = build(tiny_tokenizer, [str(a)], 1, tmp_path / "out", sft_only_data_path=[str(sft)])
    assert (len(train2), len(evals2)) == (18 + 9, 2 + 1)
    decoded = {tiny_tokenizer.decode(train2[i]["input_ids"]) for i in range(len(train2))}
    assert any("answer 300" in d or "answer 30" in d for d in decoded)


# --------------------------------------------------------------------------------------------- caching


def test_cache_reused_and_invalidated_on_edit(tmp_path, tiny_tokenizer, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [pcr(i) for i in range(10)])
    out = tmp_path / "out"
    train, _ = build(tiny_tokenizer, [str(f)], 1, out)
    assert "Creating dataset" in capsys.readouterr().out
    assert len(list(out.glob("traindata_*.safetensors"))) == 1
    again, _ = build(tiny_tokenizer, [str(f)], 1, out)
    assert "Creating dataset" not in capsys.readouterr().out  # served from the cache
    assert torch.equal(again[0]["input_ids"], train[0]["input_ids"])
    write_jsonl(f, [pcr(i) for i in range(20)])  # edit the data file in place
    edited, _ = build(tiny_tokenizer, [str(f)], 1, out)
    assert "Creating dataset" in capsys.readouterr().out and len(edited) == 18
    assert len(list(out.glob("traindata_*.safetensors"))) == 2
    build(tiny_tokenizer, [str(f)], 1, out, rebuild=True)
    assert "Creating dataset" in capsys.readouterr().out
    build(tiny_tokenizer, [str(f)], 1, out, end_of_conversation_token="<|endoftext|>")
    assert "Creating dataset" in capsys.readouterr().out  # eot string is part of the key
    cached = load_file(next(out.glob("traindata_*.safetensors")))  # tensors only: nothing to unpickle
    assert {"chosen.ids", "chosen.offsets"} <= set(cached) and all(torch.is_tensor(v) for v in cached.values())


def test_cache_key_covers_tokenizer(tiny_tokenizer):
    import copy

    key = du.data_cache_key(["x"], None, 1, 1, tiny_tokenizer, 64, "</s>")
    other = copy.deepcopy(tiny_tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<extra_tok>"]})
    assert du.data_cache_key(["x"], None, 1, 1, other, 64, "</s>") != key
    assert du.data_cache_key(["x"], None, 1, 1, tiny_tokenizer, 65, "</s>") != key


def test_non_builder_rank_waits_then_loads(tmp_path, tiny_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", [pcr(i) for i in range(10)])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="waited"):
        create_prompt_dataset(1, [str(f)], None, str(out), 1, 1, tiny_tokenizer, 64, wait_timeout_s=0.3)
    built, _ = create_prompt_dataset(0, [str(f)], None, str(out), 1, 1, tiny_tokenizer, 64)
    waited, _ = create_prompt_dataset(1, [str(f)], None, str(out), 1, 1, tiny_tokenizer, 64, wait_timeout_s=1)
    assert len(waited) == len(built) and torch.equal(waited[0]["input_ids"], built[0]["input_ids"])
    # A builder's UserError reaches the waiting ranks instead of a timeout.
    with pytest.raises(UserError, match="no usable samples"):
        create_prompt_dataset(0, [str(f)], "10,0,0", str(out), 2, 1, tiny_tokenizer, 64)
    with pytest.raises(UserError, match="no usable samples"):
        create_prompt_dataset(1, [str(f)], "10,0,0", str(out), 2, 1, tiny_tokenizer, 64, wait_timeout_s=5)
    marker = next(out.glob("*.error"))
    os.utime(marker, (1e9, 1e9))  # an old marker (earlier run) is not trusted: the rank waits instead
    with pytest.raises(UserError, match="waited"):
        create_prompt_dataset(1, [str(f)], "10,0,0", str(out), 2, 1, tiny_tokenizer, 64, wait_timeout_s=0.3)


def test_waiting_rank_sees_concurrent_build(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [pcr(i) for i in range(40)])
    out = tmp_path / "out"
    result: dict = {}

    def waiter():
        result["ds"] = create_prompt_dataset(1, [str(f)], None, str(out), 2, 1, tiny_tokenizer, 64,
                                                wait_timeout_s=60)[0]

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # still polling: nothing built yet
    built, _ = create_prompt_dataset(0, [str(f)], None, str(out), 2, 1, tiny_tokenizer, 64)
    thread.join(60)
    assert len(result["ds"]) == len(built) == 36


# --------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path, tiny_tokenizer):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=f"--data_path {missing}: no such file"):
        build(tiny_tokenizer, [str(missing)], 1, tmp_path / "out")


def test_wrong_keys(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as err:
        build(tiny_tokenizer, [str(f)], 1, tmp_path / "out")
    assert str(f) in str(err.value) and "question" in str(err.value) and "'prompt'" in str(err.value)


def test_empty_split(tmp_path, tiny_tokenizer, pair_file):
    with pytest.raises(UserError) as err:
        build(tiny_tokenizer, [str(pair_file)], 3, tmp_path / "out", data_split="10,0,0")
    assert f"--data_path {pair_file}: no usable samples for phase 3" in str(err.value)
    assert "data_split=10,0,0" in str(err.value)


def test_directory_without_train_file(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "ds" / "a.jsonl", [pcr(1)])
    write_jsonl(tmp_path / "ds" / "b.jsonl", [pcr(2)])
    with pytest.raises(UserError, match="train"):
        build(tiny_tokenizer, [str(tmp_path / "ds")], 1, tmp_path / "out")


# --------------------------------------------------------------------------------------------- step-3 helpers


def test_mini_dataset():
    mini = du.MiniDataset(2, 2)
    first = {"input_ids": torch.arange(12).view(3, 4), "reward": torch.tensor([1.0, 2.0, 3.0])}
    assert mini.add(first) is None
    small = mini.add((torch.arange(4), torch.arange(4) * 2))
    assert len(small) == 4
    assert small[0]["input_ids"].shape == (2, 4) and small[1]["reward"].tolist() == [3.0]
    assert small[2][1].tolist() == [0, 2] and small[3][0].tolist() == [2, 3]
    assert mini.dataset == []
    full = du.MiniDataset(0, 1)
    with pytest.raises(ValueError):
        full.add([torch.zeros(1)])


def test_get_unsupervised_data(tmp_path, tiny_tokenizer, monkeypatch):
    import argparse

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    write_jsonl(tmp_path / "corpus" / "train.jsonl", [{"text": "Once upon a time there was a cat. " * 3}] * 8)
    args = argparse.Namespace(unsupervised_dataset_name=str(tmp_path / "corpus"),
                              unsupervised_dataset_config_name=None, max_prompt_seq_len=8,
                              max_answer_seq_len=8, preprocessing_num_workers=None)
    ds = du.get_unsupervised_data(args, tiny_tokenizer)
    total = sum(len(tiny_tokenizer(r["text"])["input_ids"]) for r in
                [{"text": "Once upon a time there was a cat. " * 3}] * 8)
    assert len(ds) == total // 16 and all(len(r["input_ids"]) == 16 for r in ds)
    assert ds[0]["labels"] == ds[0]["input_ids"]



# --------------------------------------------------------------------------------------------- what the limit cuts


def cut_records(tok, max_seq_len: int) -> list[dict]:
    """24 pairs: 8 fit, 8 whose prompt alone fills `max_seq_len` (nothing of either answer is left), 8 whose
    answers differ only after the limit (both sides are the same tokens once cut)."""
    fill = "\n\nHuman: " + " ".join(f"word{k}" for k in range(max_seq_len)) + "?\n\nAssistant:"
    assert len(tok(fill)["input_ids"]) > max_seq_len
    records = [pcr(i) for i in range(8)]
    records += [dict(pcr(100 + i), prompt=fill + f" {i}") for i in range(8)]
    same_start = " the same long opening words" * 6
    records += [dict(pcr(200 + i), chosen=same_start + " then good", rejected=same_start + " then bad")
                for i in range(8)]
    return records


def test_fully_truncated_pairs_and_rows_are_dropped_and_counted(tmp_path, tiny_tokenizer, capsys):
    """The issue's case: a prompt that fills --max_seq_len leaves no answer; such a pair gives log-probs 0 and
    loss log 2 for nothing. Dropped and counted per split (also on a cache hit), kept with --keep_truncated."""
    tok, limit = tiny_tokenizer, 40
    f = write_jsonl(tmp_path / "cut.jsonl", cut_records(tok, limit))
    for _ in range(2):  # built, then read back from the cache with the same counts
        train, evals = build(tok, [str(f)], 2, tmp_path / "out", max_seq_len=limit, data_split="0,10,0")
        counts = {k: train.filter_counts[k] + evals.filter_counts[k] for k in du.FILTER_REASONS}
        assert counts == {"skipped": 0, "truncated": 8, "identical": 8, "prompt_too_long": 0}
        assert len(train) + len(evals) == 8
        out = capsys.readouterr().out
        assert "8 pairs with an answer that --max_seq_len 40 cuts away entirely" in out and "dropped (--keep_truncated" in out
    for c, r, plen in ((train[i][0], train[i][2], int(train[i][4])) for i in range(len(train))):
        assert len(c) > plen and len(r) > plen and not torch.equal(c, r)
    kept, kept_eval = build(tok, [str(f)], 2, tmp_path / "out", max_seq_len=limit, data_split="0,10,0",
                            keep_truncated=True)
    assert len(kept) + len(kept_eval) == 24 and kept.filter_counts["truncated"] + kept_eval.filter_counts[
        "truncated"] == 8  # upstream's rows, still counted
    assert "kept as --keep_truncated asks" in capsys.readouterr().out
    sft, sft_eval = build(tok, [str(f)], 1, tmp_path / "out", max_seq_len=limit, data_split="10,0,0")
    assert sft.filter_counts["truncated"] + sft_eval.filter_counts["truncated"] == 8  # SFT: the row's own answer
    assert len(sft) + len(sft_eval) == 16
    record = du.data_record(sft, sft_eval)
    assert record["train_rows"] == len(sft) and record["train_truncated"] + record["eval_truncated"] == 8


def test_long_prompts_phase3_dropped_or_cut_from_the_left(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    records = [pcr(i) for i in range(6)] + [dict(pcr(99), prompt="\n\nHuman: " + "very long " * 50 + "end?"
                                                 "\n\nAssistant:")] * 4
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    dropped, _ = build(tok, [str(f)], 3, tmp_path / "out", max_seq_len=24)
    assert len(dropped) == 6 and dropped.filter_counts["prompt_too_long"] == 4
    kept, _ = build(tok, [str(f)], 3, tmp_path / "out", max_seq_len=24, keep_truncated=True)
    assert len(kept) == 10 and kept.filter_counts["prompt_too_long"] == 4
    long_ids = tok(records[-1]["prompt"])["input_ids"]
    assert [p.tolist() for p in kept.prompt_dataset].count(long_ids[-24:]) == 4  # the turn the answer follows


def test_cache_key_covers_row_and_text_settings(tiny_tokenizer):
    key = du.data_cache_key(["x"], None, 2, 1, tiny_tokenizer, 64, "</s>")
    assert du.data_cache_key(["x"], None, 2, 1, tiny_tokenizer, 64, "</s>", keep_truncated=True) != key
    formats = {du.data_cache_key(["x"], None, 2, 1, tiny_tokenizer, 64, "</s>",
                                 text_format=du.text_format(tiny_tokenizer, None, fmt)) for fmt in rd.CHAT_FORMATS}
    assert len(formats) == 3


def test_selection_counts_long_prompts_and_keeps_them_on_request(tmp_path, tiny_tokenizer, tiny_llama_dir):
    records = [pcr(i) for i in range(6)] + [dict(pcr(99), prompt="\n\nHuman: " + "very long " * 50 + "?"
                                                 "\n\nAssistant:")] * 3
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    base = ["--data_path", str(f), "--sft_model_name_or_path", "sft", "--reward_model_name_or_path", "rm",
            "--output_dir", str(tmp_path / "sel"), "--max_prompt_seq_len", "24",
            "--data_output_path", str(tmp_path / "c")]
    items, stats = load_items(parse_args(base), tiny_tokenizer)
    assert len(items) == 6 and stats["prompt_too_long"] == 3
    args = parse_args([*base, "--keep_truncated"])
    items, stats = load_items(args, tiny_tokenizer)
    assert len(items) == 9 and stats["prompt_too_long"] == 3
    # the sampler then sees the end of a long prompt (the turn its answer follows), within the budget
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import Generator
    from mpo_ext.selection import ShardWorker

    generator = Generator(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_tokenizer, max_new_tokens=4)
    worker = ShardWorker(args, items, tiny_tokenizer, None, generator, max_prompt_tokens=args.max_prompt_seq_len)
    long_ids = tiny_tokenizer(records[-1]["prompt"])["input_ids"]
    assert max(worker.lengths) == 24 and long_ids[-24:] in worker.prompt_ids
