"""A reward model we save scores the same when DeepSpeed-Chat loads it (issue 23).

DeepSpeed-Chat's tokenizer loader (restated here in our own words, from upstream's `dschat/utils/utils.py`
at 83757d9) reads `_name_or_path` from the model's config.json (else the path itself); a name containing
"llama" is opened with `LlamaTokenizer`, which gets a new `[PAD]` and right padding only when it has no pad
token; any other name gets pad = eos and right padding. Its `rw_eval.py` then sets pad = eos, pads each
`prompt + answer + ending` to the maximum length and reads the value head at the token before the first
pad. Our saved tokenizer has pad = eos, so on the Llama branch the padding side is whatever the saved
`tokenizer_config.json` says; a Llama tokenizer class pads on the left by default, and upstream then read
every text at the same (wrong) place. We now record right padding in the saved config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, LlamaTokenizer

from dschat.utils.inference import RewardScorer
from dschat.utils.model.model_utils import create_critic_model
from dschat.utils.model.reward_model import RewardModel
from dschat.utils.saving import save_reward_model
from dschat.utils.tokenizer import load_hf_tokenizer

PROMPTS = [
    "\n\nHuman: What did Lily do with the ball?\n\nAssistant:",
    "\n\nHuman: Tell me about the red kite, please.\n\nAssistant:",
    "\n\nHuman: Where did the little dog go on day 3?\n\nAssistant:",
]
ANSWERS = [
    " She threw the ball and smiled.",
    " I do not know.",
    " Once upon a time, there was a happy cat. Tom found the kite and played and played.",
    " The dog ran to the park.",
]
MAX_LEN = 128  # every text fits: the two projects truncate differently, which is not what this checks


def upstream_style_tokenizer(model_dir: Path):
    """DeepSpeed-Chat's tokenizer rules (see the module docstring), as its `rw_eval.py` ends up with them."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("_name_or_path") or str(model_dir)
    if "llama" in name:
        tokenizer = LlamaTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            tokenizer.padding_side = "right"
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    tokenizer.pad_token = tokenizer.eos_token  # rw_eval's load_stuff
    return tokenizer


@torch.no_grad()
def upstream_style_scores(model: RewardModel, tokenizer, texts: list[str], num_padding_at_beginning: int) -> list[float]:
    """rw_eval's reading: every text padded to MAX_LEN as the tokenizer pads, one forward with the mask and no
    position ids, the value at the position before the `num_padding_at_beginning`-th pad (0-based)."""
    batch = tokenizer(texts, max_length=MAX_LEN, padding="max_length", truncation=True, return_tensors="pt")
    hidden = model.rwtransformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    values = model.v_head(hidden).squeeze(-1)
    scores = []
    for row, row_values in zip(batch["input_ids"], values):
        pads = (row == tokenizer.pad_token_id).nonzero().flatten().tolist()
        end = pads[num_padding_at_beginning] if len(pads) > num_padding_at_beginning else MAX_LEN
        scores.append(float(row_values[end - 1]))
    return scores


@pytest.fixture(scope="module")
def saved_llama_reward_model(tiny_llama_dir, tmp_path_factory) -> Path:
    """A reward model saved by our saver from a Llama whose tokenizer config names no padding side (as many
    hub checkpoints do), into a folder whose name contains "llama" (upstream's Llama branch)."""
    root = tmp_path_factory.mktemp("rm-padding")
    source = root / "base"
    shutil.copytree(tiny_llama_dir, source)
    config_file = source / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("padding_side", None)
    config_file.write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_hf_tokenizer(str(source))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_pretrained(str(source)), tokenizer, num_padding_at_beginning=0)
    torch.nn.init.normal_(model.v_head.weight, std=0.1)
    out = root / "step2-llama-rm"
    save_reward_model(model, tokenizer, out)
    return out


def test_saved_tokenizer_config_pads_right(saved_llama_reward_model):
    config = json.loads((saved_llama_reward_model / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["padding_side"] == "right"
    assert upstream_style_tokenizer(saved_llama_reward_model).padding_side == "right"


@pytest.mark.parametrize("ending", ["eos", "<|endoftext|>"])
def test_upstream_style_loader_scores_our_reward_model_like_we_do(saved_llama_reward_model, ending):
    directory = saved_llama_reward_model
    tokenizer = load_hf_tokenizer(str(directory))
    model = create_critic_model(str(directory), tokenizer, None, 0, rlhf_training=True).eval()
    end_text = tokenizer.eos_token if ending == "eos" else ending
    prompts = [p for p in PROMPTS for _ in ANSWERS]
    answers = [a for _ in PROMPTS for a in ANSWERS]
    ours = RewardScorer(model, tokenizer, end_text, max_seq_len=MAX_LEN, ending=ending).score(prompts, answers)

    theirs_tokenizer = upstream_style_tokenizer(directory)
    texts = [p + a + end_text for p, a in zip(prompts, answers)]
    theirs = upstream_style_scores(model, theirs_tokenizer, texts, num_padding_at_beginning=0)
    assert len(set(round(s, 4) for s in theirs)) > len(ANSWERS)  # not one constant misread
    assert theirs == pytest.approx(ours, abs=1e-5)
