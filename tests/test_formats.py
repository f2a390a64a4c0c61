"""TRL's standard data layouts beside DeepSpeed-Chat's: plain and conversational preference pairs (explicit
and implicit prompt), prompt/completion and messages for SFT, column mapping, save_to_disk folders and
hub-style loading, rendered with a chat template through SFT, RM, select, DPO and PPO prompt building."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from dschat.utils.data import data_utils as du
from dschat.utils.data import prompt_datasets
from dschat.utils.data import raw_datasets as rd
from dschat.utils.errors import UserError
from dschat.utils.inference import RewardScorer
from mpo_ext import selection

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def rendered_prompt(q):
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture()
def chat_tok(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def write(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def explicit(i):
    return {"prompt": [user(f"q{i}")], "chosen": [bot(f"good {i}")], "rejected": [bot(f"bad {i}")]}


def implicit(i):
    return {"chosen": [user(f"q{i}"), bot(f"good {i}")], "rejected": [user(f"q{i}"), bot(f"bad {i}")]}


def expected_ids(tok, text):
    return tok(text)["input_ids"]


@pytest.mark.parametrize("layout", [explicit, implicit])
def test_conversational_pairs_use_the_chat_template_in_every_phase(tmp_path, chat_tok, layout):
    f = write(tmp_path / "conv.jsonl", [layout(i) for i in range(10)])
    raw = du.get_raw_dataset(f, str(tmp_path / "out"), 1, -1, tokenizer=chat_tok)
    assert isinstance(raw, rd.StandardLayoutDataset)
    sample = raw.get_train_data()[3]
    assert raw.get_prompt(sample) == rendered_prompt("q3")
    assert raw.get_chosen(sample) == "good 3<|im_end|>"  # the turn's end stays, the final eos is added once
    eos = chat_tok.eos_token
    sft, _ = prompt_datasets.create_prompt_dataset(-1, f, "10,0,0", str(tmp_path / "c"), 1, 1, chat_tok, 64)
    rm, _ = prompt_datasets.create_prompt_dataset(-1, f, "0,10,0", str(tmp_path / "c"), 2, 1, chat_tok, 64)
    ppo, _ = prompt_datasets.create_prompt_dataset(-1, f, "0,0,10", str(tmp_path / "c"), 3, 1, chat_tok, 64)
    prompts = {tuple(p.tolist()) for p in ppo.prompt_dataset}
    assert tuple(expected_ids(chat_tok, rendered_prompt("q3"))) in prompts  # PPO generates after the gen prompt
    want = expected_ids(chat_tok, rendered_prompt("q3") + "good 3<|im_end|>" + eos)
    assert tuple(want) in {tuple(c.tolist()) for c in rm.chosen_dataset}
    assert tuple(want) in {tuple(c.tolist()) for c in sft.chosen_dataset}
    assert len(rm.chosen_dataset) == len(sft.chosen_dataset) == len(ppo) == 9
    # The reward model's prompt length covers exactly the rendered prompt.
    k = [tuple(c.tolist()) for c in rm.chosen_dataset].index(tuple(want))
    assert rm.prompt_lengths[k] == len(expected_ids(chat_tok, rendered_prompt("q3")))


def test_without_a_chat_template_messages_become_hh_turns(tmp_path, tiny_tokenizer):
    f = write(tmp_path / "conv.jsonl", [implicit(i) for i in range(4)])
    raw = du.get_raw_dataset(f, str(tmp_path / "out"), 1, -1, tokenizer=tiny_tokenizer)
    sample = raw.get_train_data()[0]
    assert raw.get_prompt_and_chosen(sample) == "\n\nHuman: q0\n\nAssistant: good 0"
    assert raw.get_prompt_and_rejected(sample) == "\n\nHuman: q0\n\nAssistant: bad 0"


def test_sft_layouts_prompt_completion_and_messages(tmp_path, chat_tok):
    plain = write(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(10)])
    conv = write(tmp_path / "pcc.jsonl", [{"prompt": [user(f"q{i}")], "completion": [bot(f"a{i}")]}
                                          for i in range(10)])
    msgs = write(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "be brief"}, user(f"q{i}"),
                                                      bot(f"a{i}")]} for i in range(10)])
    raw = du.get_raw_dataset(plain, "", 1, -1, tokenizer=chat_tok)
    assert raw.get_prompt_and_chosen(raw.get_train_data()[1]) == "Q1: A1"
    raw = du.get_raw_dataset(conv, "", 1, -1, tokenizer=chat_tok)
    assert raw.get_prompt_and_chosen(raw.get_train_data()[1]) == rendered_prompt("q1") + "a1<|im_end|>"
    raw = du.get_raw_dataset(msgs, "", 1, -1, tokenizer=chat_tok)
    sample = raw.get_train_data()[2]
    head = "<|im_start|>system\nbe brief<|im_end|>\n"
    assert raw.get_prompt(sample) == head + rendered_prompt("q2")
    assert raw.get_prompt_and_chosen(sample) == head + rendered_prompt("q2") + "a2<|im_end|>"
    for path in (plain, conv, msgs):
        train, _ = prompt_datasets.create_prompt_dataset(-1, path, None, str(tmp_path / "c"), 1, 1, chat_tok, 256)
        assert len(train) == 9  # a local file goes wholly to phase 1, split 9:1 train/eval
        with pytest.raises(UserError, match="no usable samples for phase 2"):
            prompt_datasets.create_prompt_dataset(-1, path, None, str(tmp_path / "c"), 2, 1, chat_tok, 256)


def test_column_mapping_flags_and_save_to_disk(tmp_path, chat_tok):
    import datasets

    from dschat.utils import args as flags

    records = [{"question": [user(f"q{i}")], "good": [bot(f"y{i}")], "bad": [bot(f"n{i}")], "chosen": "x"}
               for i in range(6)]
    f = write(tmp_path / "mapped.jsonl", records)
    mapping = flags.DataSettings(data_keys="prompt=question,chosen=good", rejected_key="bad").column_map
    assert mapping == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    raw = du.get_raw_dataset(f, "", 1, -1, tokenizer=chat_tok, column_map=mapping)
    assert raw.get_prompt_and_rejected(raw.get_train_data()[0]) == rendered_prompt("q0") + "n0<|im_end|>"
    with pytest.raises(UserError, match="no column nope"):
        du.get_raw_dataset(f, "", 1, -1, column_map={"prompt": "nope"})
    with pytest.raises(UserError, match="--data_keys"):
        rd.parse_column_map("prompt")
    with pytest.raises(UserError, match="built-in dataset"):
        du.get_raw_dataset("Dahoas/rm-static", "", 1, -1, column_map=mapping)
    # A save_to_disk folder (Arrow) with the same layout, renamed through datasets' own column API.
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[:2])}).save_to_disk(str(folder))
    raw = du.get_raw_dataset(str(folder), "", 1, -1, tokenizer=chat_tok, column_map=mapping)
    assert len(raw.get_train_data()) == 6 and len(raw.get_eval_data()) == 2
    assert raw.get_prompt_and_chosen(raw.get_train_data()[5]) == rendered_prompt("q5") + "y5<|im_end|>"
    train, evals = prompt_datasets.create_prompt_dataset(-1, str(folder), None, str(tmp_path / "c"), 2, 1, chat_tok, 64,
                                            column_map=mapping)
    assert (len(train), len(evals)) == (6, 2)


def test_hub_id_goes_through_load_dataset(tmp_path, chat_tok, monkeypatch):
    """A name without a built-in adapter is a hub id: datasets.load_dataset, tested on a local repo layout."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    repo = tmp_path / "hub" / "someone" / "prefs"
    write(repo / "train.jsonl", [implicit(i) for i in range(8)])
    write(repo / "test.jsonl", [implicit(100 + i) for i in range(3)])
    raw = rd.open_standard_source(str(repo), "", 1, -1, local=False, tokenizer=chat_tok)
    assert isinstance(raw, rd.StandardLayoutDataset) and not raw.is_local_path
    assert len(raw.get_train_data()) == 8 and len(raw.get_eval_data()) == 3
    assert raw.get_prompt(raw.get_eval_data()[0]) == rendered_prompt("q100")


def test_select_and_dpo_build_the_same_texts(tmp_path, chat_tok):
    """select scores (prompt, answer) exactly as the RM trained on them; its easy.jsonl feeds DPO unchanged."""
    f = write(tmp_path / "conv.jsonl", [explicit(i) for i in range(6)])
    settings = selection.SelectionSettings.from_mapping(
        {"data_path": [f], "data_output_path": str(tmp_path / "c"), "seed": 1, "data_phase": 3,
         "pair_source": "dataset", "max_prompt_seq_len": 64, "max_answer_seq_len": 64, "reward_model_name_or_path": "r",
         "output_dir": str(tmp_path / "o")})
    items, _ = selection.load_items(settings, chat_tok)
    item = next(it for it in items if it["prompt"] == rendered_prompt("q2"))
    assert item["chosen"] == "good 2<|im_end|>"
    scorer = RewardScorer(None, chat_tok, chat_tok.eos_token, max_seq_len=64, batch_size=4)
    (head, tail), = scorer.layouts([item["prompt"]], [item["chosen"]])
    row, plen = head + tail, len(head)
    rm, _ = prompt_datasets.create_prompt_dataset(-1, f, "0,10,0", str(tmp_path / "c"), 2, 1, chat_tok, 64)
    assert tuple(row) in {tuple(c.tolist()) for c in rm.chosen_dataset}
    assert plen == len(chat_tok(rendered_prompt("q2"))["input_ids"])
    # select writes easy.jsonl with the rendered prompt and decoded answers: DPO reads it as plain pairs.
    easy = write(tmp_path / "easy.jsonl", [{"prompt": item["prompt"], "chosen": item["chosen"],
                                            "rejected": item["rejected"]}])
    pairs, _ = prompt_datasets.create_prompt_dataset(-1, easy, "0,10,0", str(tmp_path / "c"), 2, 1, chat_tok, 64)
    assert tuple(pairs.chosen_dataset[0].tolist()) == tuple(row)


# --------------------------------------------------------------------------------------------- one real run

STEP1 = Path(__file__).resolve().parents[1] / "training/step1_supervised_finetuning/main.py"


def test_sft_run_on_conversational_data_with_trackers_card_and_ds_config(tmp_path, tinystories_dir, run_ds):
    """One real step-1 run: TRL conversational pairs (mapped prompt column) on a model with a chat template,
    reporting to TensorBoard and wandb (offline), with a --deepspeed_config merged into the engine's config;
    the saved model carries a card with the run's numbers."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(tinystories_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHATML
    tok.save_pretrained(model)
    records = [{"question": [user(f"what is {i} plus one")], "chosen": [bot(f"it is {i + 1}")],
                "rejected": [bot("no idea")]} for i in range(40)]
    data = write(tmp_path / "conv.jsonl", records)
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"gradient_clipping": 0.25, "train_micro_batch_size_per_gpu": "auto",
                                   "zero_optimization": {"reduce_bucket_size": 12345}}))
    out = tmp_path / "out"
    args = ["--data_path", data, "--prompt_key", "question", "--model_name_or_path", str(model),
            "--per_device_train_batch_size", "8", "--max_seq_len", "64", "--learning_rate", "3e-3",
            "--log_interval", "1", "--report_to", "tensorboard", "wandb", "--tensorboard_path", str(tmp_path / "tb"),
            "--deepspeed_config", str(ds_file), "--data_output_path", str(tmp_path / "cache"),
            "--output_dir", str(out)]
    proc = run_ds(STEP1, args, num_ranks=0, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "for train_phase=1 size=36" in log and "skipped" not in log
    # tracker runs are named by stage and identity, and kept beside the model folder, not in it
    (tb_run,) = (tmp_path / "tb").iterdir()
    assert re.fullmatch(r"step1_sft-[0-9a-f]{8}", tb_run.name) and list(tb_run.glob("events.out.tfevents.*"))
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")) and not (out / "wandb").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if r["phase"] == "train"][-1]
    card = (out / "README.md").read_text()
    assert "step1 SFT" in card and "| initialised from | `chat-model` |" in card and "| data | `conv.jsonl` |" in card
    assert str(tmp_path) not in card and "tokenizer.apply_chat_template(messages" in card  # its usage: the template
    assert f"| loss | {last_train['loss']} |" in card and "| learning_rate | 0.003 |" in card
    engine_config = json.loads(card.split("```json")[1].split("```")[0])  # written from the engine's config
    assert engine_config["gradient_clipping"] == 0.25 and engine_config["zero_optimization"]["reduce_bucket_size"] == 12345
    assert engine_config["train_micro_batch_size_per_gpu"] == 8  # "auto" took the flag's value
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML  # later stages render the same way
    # a conflicting key is one line before any model is loaded
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    proc = run_ds(STEP1, args, num_ranks=0)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "zero_optimization.stage" in errors[0], proc.stderr[-2000:]


def test_eval_prompts_are_rendered_like_training(tmp_path, chat_tok):
    from mpo_ext.evaluation import load_eval_prompts

    f = write(tmp_path / "held_out.jsonl", [{"question": [user(f"q{i}")], "chosen": [bot("a")], "rejected": [bot("b")]}
                                            for i in range(4)])
    prompts = load_eval_prompts(f, data_output_path=str(tmp_path / "c"), tokenizer=chat_tok,
                                column_map={"prompt": "question"})
    assert prompts == [rendered_prompt(f"q{i}") for i in range(4)]


# --------------------------------------------------------------------------------------------- HH dialogues as chat


def test_hh_text_to_messages():
    assert rd.hh_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:") == [
        user("hi"), bot("hello"), user("and?")]
    assert rd.hh_messages(" Human: what is 2+2? Assistant:") == [user("what is 2+2?")]  # upstream's single turn
    assert rd.hh_messages("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [user("a\n\nb")]  # roles alternate
    assert rd.hh_messages("SUBREDDIT: r/x POST: text TL;DR:") == [user("SUBREDDIT: r/x POST: text TL;DR:")]
    assert rd.hh_turns([user("q"), bot("a")]) + rd.ASSISTANT_MARKER == "\n\nHuman: q\n\nAssistant: a\n\nAssistant:"


def test_hh_dialogues_render_through_the_template_and_raw_text_on_request(tmp_path, chat_tok, tiny_tokenizer, hh_file):
    """Anthropic/hh-rlhf-style dialogues with a chat model: the conversation through its template (prompt with
    the generation prompt, answer = the rest); --chat_format raw keeps the text; training rows, selection and
    evaluation prompts agree."""
    from mpo_ext.evaluation import load_eval_prompts

    raw_adapter = du.get_raw_dataset(str(hh_file), "", 1, -1, tokenizer=chat_tok, chat_format="raw")
    chat = du.get_raw_dataset(str(hh_file), "", 1, -1, tokenizer=chat_tok)
    sample = raw_adapter.get_train_data()[4]
    hh_prompt = raw_adapter.get_prompt(sample)
    assert hh_prompt.startswith("\n\nHuman:") and hh_prompt.endswith("\n\nAssistant:")
    messages = rd.hh_messages(hh_prompt)
    assert chat.get_prompt(sample) == chat_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.get_chosen(sample) == raw_adapter.get_chosen(sample).strip() + "<|im_end|>"
    assert "Human:" not in chat.get_prompt(sample) and chat.get_prompt(sample).endswith("<|im_start|>assistant\n")
    assert chat.get_prompt_and_chosen(sample) == chat.get_prompt(sample) + chat.get_chosen(sample)
    # The tokenised rows hold the rendered conversation; the reward model's prompt length covers its prompt.
    pairs, _ = prompt_datasets.create_prompt_dataset(-1, str(hh_file), "0,10,0", str(tmp_path / "c"), 2, 1, chat_tok, 512)
    rendered = {tuple(chat_tok(chat.get_prompt(s))["input_ids"]) for s in chat.get_train_data()}
    c_ids, _, _, _, plen = pairs[0]
    assert tuple(c_ids[: int(plen)].tolist()) in rendered and c_ids[-1].item() == chat_tok.eos_token_id
    raw_pairs, _ = prompt_datasets.create_prompt_dataset(-1, str(hh_file), "0,10,0", str(tmp_path / "c"), 2, 1, chat_tok, 512,
                                            chat_format="raw")
    assert "\n\nHuman:" in chat_tok.decode(raw_pairs[0][0]) and "\n\nHuman:" not in chat_tok.decode(c_ids)
    # Selection (step 3's prompts) and evaluation render prompts the same way.
    settings = selection.SelectionSettings.from_mapping(
        {"data_path": [str(hh_file)], "data_output_path": str(tmp_path / "c"), "seed": 1, "data_phase": 3,
         "pair_source": "samples", "sft_model_name_or_path": "s", "max_prompt_seq_len": 512, "max_answer_seq_len": 8,
         "reward_model_name_or_path": "r", "output_dir": str(tmp_path / "o"), "chat_format": "auto"})
    items, _ = selection.load_items(settings, chat_tok)
    train_prompts = {chat.get_prompt(s) for s in chat.get_train_data()}
    assert items and {it["prompt"] for it in items} <= train_prompts
    assert set(load_eval_prompts(str(hh_file), data_output_path=str(tmp_path / "c"), tokenizer=chat_tok)) <= train_prompts
    # Without a template (the tiny tokenizer) HH dialogues stay as they are, whatever the setting.
    assert du.get_raw_dataset(str(hh_file), "", 1, -1, tokenizer=tiny_tokenizer).get_prompt(sample) == hh_prompt


def test_named_datasets_keep_upstream_text_unless_template_is_asked(tmp_path, chat_tok, tiny_tokenizer):
    sample = {"prompt": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: tell me a joke\n\nAssistant:",
              "chosen": " a joke", "rejected": " no"}
    upstream = rd.DahoasRmstaticDataset.for_samples()
    assert rd.apply_chat_format(upstream, chat_tok, "auto") is upstream  # upstream recipes see upstream's tokens
    templated = rd.apply_chat_format(upstream, chat_tok, "template")
    want = chat_tok.apply_chat_template([user("hi"), bot("hey"), user("tell me a joke")], tokenize=False,
                                        add_generation_prompt=True)
    assert templated.get_prompt(sample) == want and templated.get_chosen(sample) == "a joke<|im_end|>"
    # Plain prompt/chosen/rejected files are used as written (selection's pairs are already rendered).
    f = write(tmp_path / "pairs.jsonl", [{"prompt": want, "chosen": "a joke<|im_end|>", "rejected": "no"}] * 3)
    assert du.get_raw_dataset(f, "", 1, -1, tokenizer=chat_tok, chat_format="template").get_prompt(
        {"prompt": want}) == want
    with pytest.raises(UserError, match="--chat_format template: the tokenizer has no chat template"):
        rd.apply_chat_format(upstream, tiny_tokenizer, "template")
    with pytest.raises(UserError, match="--chat_format nope"):
        rd.chat_renderer(chat_tok, "nope")
