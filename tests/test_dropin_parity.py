"""`--dschat_compat`: DeepSpeed-Chat's defaults for every flag whose default here changes the numbers (issue 23).

The switch is settings-level: each flag group declares its upstream defaults (`upstream_defaults`), and the
settings types of steps 1, 2 and 3 apply them when they are built. Each switched behaviour is checked here
against upstream's rule restated in our own words (DeepSpeedExamples 83757d9); the runs of upstream itself
beside ours, step by step, are `benchmarks/upstream_parity.py` (results in benchmarks/results/).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch.utils.data import DistributedSampler
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2Model,
    PreTrainedTokenizerFast,
    default_data_collator,
)

from dschat.rlhf.generation import pad_token_mask, rollout_attention_mask
from dschat.steps.ppo_args import PPOSettings
from dschat.steps.reward import RewardSettings
from dschat.steps.sft import SFTSettings
from dschat.utils.model.reward_model import RewardModel
from dschat.utils.saving import save_causal_lm
from dschat.utils.settings import PARITY_FLAG
from dschat.utils.tokenizer import load_hf_tokenizer, set_pad_token
from dschat.utils.trainer import make_loader

REPO = Path(__file__).resolve().parents[1]
STAGES = (SFTSettings, RewardSettings, PPOSettings)


def _required(settings_type, path: str) -> list[str]:
    if settings_type is PPOSettings:
        return ["--actor_model_name_or_path", path, "--critic_model_name_or_path", path, "--output_dir", path]
    return ["--model_name_or_path", path, "--output_dir", path]


# --------------------------------------------------------------------------------------------- the switch


def test_dschat_compat_sets_upstreams_defaults_and_explicit_flags_win(tmp_path):
    expected = {
        SFTSettings: {"padding": "max_length", "group_by_length": False, "sample_order": "upstream",
                      "pad_mask": "always", "tokenizer_rule": "upstream", "save_format": "upstream",
                      "chat_format": "raw", "keep_truncated": True},
        RewardSettings: {"padding": "max_length", "group_by_length": False, "sample_order": "upstream",
                         "pad_mask": "always", "tokenizer_rule": "upstream", "save_format": "upstream",
                         "reward_loss": "divergence", "end_of_conversation_token": "<|endoftext|>",
                         "chat_format": "raw", "keep_truncated": True},
        # step 3 drops over-long prompts as upstream does: keep_truncated keeps its default there
        PPOSettings: {"padding": "max_length", "group_by_length": False, "sample_order": "upstream", "chat_format": "raw",
                      "tokenizer_rule": "upstream", "save_format": "upstream", "compute_fp32_loss": False,
                      "reward_end_text": "eos", "position_ids": "model", "rollout_mask": "pad_token"},
    }
    for settings_type, upstream in expected.items():
        base = _required(settings_type, str(tmp_path))
        ours = settings_type.parse_args(base)
        compat = settings_type.parse_args([*base, "--dschat_compat"])
        assert {name: getattr(compat, name) for name in upstream} == upstream
        assert all(getattr(ours, name) != value for name, value in upstream.items())  # each one differs here
        assert set(settings_type.upstream_values()) == set(upstream)
        # an explicit flag still wins, and a mapping (a pipeline section) builds the same settings
        assert settings_type.parse_args([*base, "--dschat_compat", "--padding", "longest"]).padding == "longest"
        mapping = {arg.lstrip("-"): value for arg, value in zip(base[::2], base[1::2])}
        assert settings_type.from_mapping({**mapping, PARITY_FLAG: True}) == compat
        assert settings_type.from_mapping({**mapping, PARITY_FLAG: True, "padding": "longest"}).padding == "longest"
    # what a run records is the values it ran with
    assert RewardSettings.parse_args([*_required(RewardSettings, str(tmp_path)), "--dschat_compat"]).record()[
        "reward_loss"] == "divergence"
    assert PPOSettings.parse_args([*_required(PPOSettings, str(tmp_path)), "--dschat_compat", "--dtype", "bf16"]
                                  ).fp32_loss is False


def test_help_and_readme_list_every_default_that_differs_from_upstream():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("### Defaults that differ from DeepSpeed-Chat"):]
    for settings_type in STAGES:
        epilog = settings_type.build_parser().format_help()
        for name, upstream in settings_type.upstream_values().items():
            assert f"--{name}: " in epilog and upstream.why.split()[0] in epilog
            assert re.search(rf"`--{name}`", table), f"--{name} is missing from README's table"


# --------------------------------------------------------------------------------------------- pad token, vocabulary


def _word_tokenizer(pad: str | None) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 12)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>",
                                   **({"pad_token": pad} if pad else {}))


def test_upstream_tokenizer_rule_pad_token(tmp_path):
    # a Llama name without a pad: a new [PAD] token, one more row (upstream: 32000 -> 32001 for Llama-2)
    tok = _word_tokenizer(None)
    set_pad_token(tok, "meta-llama/Llama-2-7b-hf", "upstream")
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 12 and len(tok) == 13
    # a Llama name that has a pad keeps it; any other name gets pad = eos, replacing its own (OPT's <pad>)
    tok = _word_tokenizer("<pad>")
    set_pad_token(tok, "my-llama", "upstream")
    assert tok.pad_token == "<pad>"
    set_pad_token(tok, "facebook/opt-1.3b", "upstream")
    assert tok.pad_token_id == tok.eos_token_id == 2
    # ours: the tokenizer's own pad, else eos, never a new token
    tok = _word_tokenizer(None)
    set_pad_token(tok, "meta-llama/Llama-2-7b-hf", "ours")
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == 12
    # the name upstream judges a folder by is its config's _name_or_path, else the path
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/llama-base"}))
    tok = _word_tokenizer(None)
    set_pad_token(tok, str(folder), "upstream")
    assert tok.pad_token == "[PAD]"


def test_upstream_pad_token_grows_the_llama_vocabulary_to_a_multiple_of_8(tiny_llama_dir):
    from dschat.utils.model.model_utils import create_hf_model

    assert "llama" in str(tiny_llama_dir)  # the fixture's folder name takes upstream's Llama branch
    tok = load_hf_tokenizer(str(tiny_llama_dir), rule="upstream")
    assert (tok.pad_token, len(tok)) == ("[PAD]", 513)
    model = create_hf_model(AutoModelForCausalLM, str(tiny_llama_dir), tok)
    assert model.get_input_embeddings().weight.shape[0] == 520  # upstream: 8 * ceil(513 / 8)
    ours = load_hf_tokenizer(str(tiny_llama_dir))
    assert ours.pad_token_id == ours.eos_token_id and len(ours) == 512


# --------------------------------------------------------------------------------------------- sample order


@pytest.mark.parametrize("world_size", [1, 2])
def test_upstream_sample_order_is_distributed_samplers_whatever_the_seed(world_size):
    """Upstream's mains run under the launcher: `DistributedSampler(dataset)` (shuffled, seed 0) for training
    and evaluation alike, and never call `set_epoch`."""
    data = list(range(23))
    for rank in range(world_size):
        reference = list(DistributedSampler(data, num_replicas=world_size, rank=rank))
        for seed, shuffle in ((1234, True), (7, False)):
            loader = make_loader(data, 4, None, shuffle=shuffle, seed=seed, upstream_order=True)
            loader.sampler.rank, loader.sampler.world_size = rank, world_size
            loader.sampler.num_samples = len(reference)
            for epoch in range(3):
                loader.sampler.set_epoch(epoch)
                assert list(loader.sampler) == reference
    ours = make_loader(data, 4, None, shuffle=True, seed=1234)
    ours.sampler.set_epoch(1)
    assert list(ours.sampler) != list(DistributedSampler(data, num_replicas=1, rank=0))


def test_sft_under_dschat_compat_sees_upstreams_batches(tiny_llama_dir, hh_file, tmp_path):
    """Step 1 built with --dschat_compat draws, epoch after epoch, the very batches upstream's step-1 main
    builds from the same data: items padded to --max_seq_len, `default_data_collator`, DistributedSampler."""
    from dschat.steps import sft
    from dschat.utils.data.data_utils import create_prompt_dataset
    from dschat.utils.dist import init_distributed

    init_distributed()
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", str(hh_file), "--data_split", "2,4,4",
            "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "96", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "2", "--seed", "77", "--dschat_compat",
            "--output_dir", str(tmp_path / "out")]
    run = sft.build(sft.parse_args(argv))
    tok = run.tokenizer
    assert tok.pad_token == "[PAD]" and run.engine.module.get_input_embeddings().weight.shape[0] == 520
    assert run.model_attention_mask({"attention_mask": torch.ones(1, 2)}) is not None  # upstream passes the mask

    train, evals = create_prompt_dataset(-1, [str(hh_file)], "2,4,4", str(tmp_path / "upstream-cache"), 1, 77, tok, 96,
                                         end_of_conversation_token=tok.eos_token)
    # upstream trains on the rows whose answer 96 tokens cut away: this data has some, and both sides keep them
    dropped, _ = create_prompt_dataset(-1, [str(hh_file)], "2,4,4", str(tmp_path / "upstream-cache"), 1, 77, tok, 96,
                                       end_of_conversation_token=tok.eos_token, keep_truncated=False)
    assert len(dropped) < len(train) == len(run.train_loader.dataset)
    for ours_loader, data, batch_size in ((run.train_loader, train, 4), (run.eval_loader, evals, 2)):
        upstream = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, 1, 0),
                                               collate_fn=default_data_collator)
        for epoch in range(2):
            ours_loader.sampler.set_epoch(epoch)
            pairs = list(zip(ours_loader, upstream, strict=True))
            assert pairs
            for mine, theirs in pairs:
                assert {key: mine[key].tolist() for key in theirs} == {key: theirs[key].tolist() for key in theirs}


# --------------------------------------------------------------------------------------------- step 3


def test_pad_token_mask_is_upstreams_rollout_mask():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    # [PAD] = 9 of its own: the same mask as ours
    seq = torch.tensor([[9, 5, 6, 7, 2, 9], [4, 5, 6, 7, 8, 3]])
    assert torch.equal(pad_token_mask(seq, 9), rollout_attention_mask(seq, prompt_mask, 2))
    # pad = eos = 2: upstream's also hides the answer's eos and an eos inside the prompt; ours keeps both
    seq = torch.tensor([[2, 2, 6, 7, 2, 2], [4, 5, 6, 7, 8, 3]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pad_token_mask(seq, 2).tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert rollout_attention_mask(seq, prompt_mask, 2).tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


@torch.no_grad()
def test_reward_model_positions_follow_position_ids():
    """A model with absolute positions (GPT-2) reads a left-padded row differently when the padding is
    numbered too (upstream's forwards, `--position_ids model`); rotary Llama and OPT (which counts positions
    from the mask itself) do not care beyond rounding."""
    config = GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    tok = _word_tokenizer("<pad>")
    ids = torch.tensor([[1, 1, 1, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    for from_mask in (True, False):
        torch.manual_seed(0)
        model = RewardModel(GPT2Model(config), tok, positions_from_mask=from_mask).eval()
        values = model.forward_value(ids, mask, return_value_only=True)
        plain = model.v_head(model.rwtransformer(input_ids=ids, attention_mask=mask)[0]).squeeze(-1)
        assert torch.allclose(values, plain, atol=1e-6) is (not from_mask)


# --------------------------------------------------------------------------------------------- saved files


def test_upstream_save_format_writes_deepspeed_chats_files_and_replaces_the_other_format(tiny_llama_dir, tmp_path):
    tok = load_hf_tokenizer(str(tiny_llama_dir), rule="upstream")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    model.resize_token_embeddings(520)
    out = tmp_path / "step1-llama"
    save_causal_lm(model, tok, out)  # an earlier run in Hugging Face layout
    assert (out / "model.safetensors").is_file()
    save_causal_lm(model, tok, out, file_format="upstream")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.model"]
    # read back as upstream's next step reads it: LlamaTokenizer from tokenizer.model, [PAD] added again
    again = load_hf_tokenizer(str(out), rule="upstream")
    assert (again.pad_token, again.pad_token_id, len(again)) == ("[PAD]", 512, 513)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([again("Once upon a time").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    save_causal_lm(model, tok, out)  # and back: no stale pytorch_model.bin beside the new safetensors
    assert not (out / "pytorch_model.bin").exists() and (out / "model.safetensors").is_file()
    shutil.rmtree(out)


def test_upstream_tokenizer_rule_picks_the_class_by_name(tiny_llama_dir, tmp_path):
    """A folder holding only `tokenizer.model` (upstream's saved layout): upstream opens it with LlamaTokenizer
    when the name says llama and with AutoTokenizer otherwise, and the two tokenise a leading space apart."""
    from transformers import AutoTokenizer, LlamaTokenizer

    for name in ("step1-llama", "step1-tinystories"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tiny_llama_dir / "tokenizer.model", folder)
        shutil.copy(tiny_llama_dir / "config.json", folder)
        expected = (LlamaTokenizer if "llama" in name else AutoTokenizer).from_pretrained(str(folder))
        text = " Human: Once upon a time Assistant:"
        assert load_hf_tokenizer(str(folder), rule="upstream")(text).input_ids == expected(text).input_ids
        assert load_hf_tokenizer(str(folder))(text).input_ids == LlamaTokenizer.from_pretrained(str(folder))(text).input_ids
    assert expected(text).input_ids != LlamaTokenizer.from_pretrained(str(folder))(text).input_ids  # it matters
