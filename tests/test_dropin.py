"""Drop-in fidelity with DeepSpeed-Chat checkpoints and conventions (issue 13): the reward index on OPT's
real token layout, PPO's fp32 log-probs, LoRA defaults per architecture, `local/jsonfile` from a step
folder under a non-editable install, upstream Llama tokenizers, and the recorded reward-model ending."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTModel, PreTrainedTokenizerFast

from dschat.rlhf.ppo_math import token_log_probs
from dschat.utils.build import apply_lora
from dschat.utils.errors import UserError
from dschat.utils.inference import RewardScorer
from dschat.utils.losses import reward_index
from dschat.utils.model.reward_model import RewardModel
from dschat.utils.module.lora import LinearLayer_LoRA

REPO_ROOT = Path(__file__).resolve().parents[1]

# OPT's real special tokens: bos == eos == 2, pad == 1 (not bos == pad, as older tests assumed).
OPT_PAD, OPT_EOS = 1, 2


def opt_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "<pad>": OPT_PAD, "</s>": OPT_EOS, "<unk>": 3, **{f"w{i}": i for i in range(4, 32)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   bos_token="</s>", unk_token="<unk>")


def tiny_opt_reward_model(num_padding_at_beginning: int = 1) -> RewardModel:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=32, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, pad_token_id=OPT_PAD,
                       bos_token_id=OPT_EOS, eos_token_id=OPT_EOS)
    return RewardModel(OPTModel(config), opt_tokenizer(), num_padding_at_beginning).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------- OPT reward index


def _mask(rows: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """Right-padding mask: the first `lengths[i]` positions of row i are real."""
    return torch.tensor([[1] * n + [0] * (len(r) - n) for r, n in zip(rows, lengths)])


def test_reward_index_rule_on_opt_layout():
    rows = [[2, 10, 11, 12, 13, 2, 1, 1, 1]]
    opt, mask = torch.tensor(rows), _mask(rows, [6])
    # training pairs (no prompt width) and PPO / selection (prompt width 3) read the same token: the eos
    assert reward_index(mask, opt, OPT_PAD, num_padding_at_beginning=1).tolist() == [5]
    assert reward_index(mask, opt, OPT_PAD, start=3, num_padding_at_beginning=1).tolist() == [5]
    assert reward_index(mask, opt, OPT_PAD, num_padding_at_beginning=0).tolist() == [5]
    # a layout whose beginning token IS the pad: that one is skipped, the end is still after the text
    rows = [[1, 10, 11, 12, 13, 1, 1, 1, 1]]
    assert reward_index(_mask(rows, [6]), torch.tensor(rows), 1, num_padding_at_beginning=1).tolist() == [4]
    # no padding at all: the last token
    assert reward_index(torch.ones(1, 3, dtype=torch.long), torch.tensor([[2, 10, 11]]), OPT_PAD, 0, 1).tolist() == [2]
    # Llama-like rows (pad == eos == 2), prompt width 2: eos appended, a literal ending, an eos INSIDE the
    # prompt (content: read at the answer's end, not before it), an empty answer
    rows = [[1, 5, 6, 7, 2, 2], [1, 5, 6, 7, 9, 9], [1, 2, 6, 9, 2, 2], [1, 5, 2, 2, 2, 2]]
    mask = _mask(rows, [5, 6, 5, 3])
    assert reward_index(mask, torch.tensor(rows), 2, start=2).tolist() == [3, 5, 3, 1]


@torch.no_grad()
def test_opt_reward_training_ppo_and_selection_read_the_same_token():
    model = tiny_opt_reward_model(num_padding_at_beginning=1)
    chosen = [2, 10, 11, 12, 13, 2, 1, 1, 1]
    rejected = [2, 10, 11, 14, 2, 1, 1, 1, 1]
    ids = torch.tensor([chosen, rejected])
    mask = _mask([chosen, rejected], [6, 5])
    values = model.token_values(ids, mask)
    training = model(ids, mask)
    torch.testing.assert_close(training["chosen_mean_scores"], values[:1, 5])
    torch.testing.assert_close(training["rejected_mean_scores"], values[1:, 4])
    ppo = model.forward_value(ids, mask, prompt_length=3)["chosen_end_scores"]
    torch.testing.assert_close(ppo, torch.stack([values[0, 5], values[1, 4]]))
    scorer = RewardScorer(model, opt_tokenizer(), "</s>", max_seq_len=16, batch_size=2, share_prompts=True)
    selected = scorer.score_layouts([(chosen[:3], chosen[3:6]), (rejected[:3], rejected[3:5])])
    assert selected == pytest.approx([values[0, 5].item(), values[1, 4].item()], abs=1e-5)


# --------------------------------------------------------------------------------------------- PPO precision


def test_token_log_probs_fp32_on_bf16_logits():
    torch.manual_seed(0)
    vocab = 32000
    logits32 = torch.randn(2, 6, vocab) * 4
    logits16 = logits32.to(torch.bfloat16)
    seq = torch.randint(0, vocab, (2, 6))
    # reference: fp32 log-softmax of the very same (bf16-rounded) logits
    reference = torch.log_softmax(logits16.float()[:, :-1], -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
    upcast = token_log_probs(logits16, seq, fp32=True)
    assert upcast.dtype == torch.float32
    torch.testing.assert_close(upcast, reference, atol=1e-5, rtol=0)
    plain = token_log_probs(logits16, seq, fp32=False)
    assert plain.dtype == torch.bfloat16
    assert (plain.float() - reference).abs().max() > 1e-2  # what the upcast saves on a 32K vocabulary
    # per-token KL between two bf16 policies, fp32 vs a direct fp32 computation
    other16 = (logits32 + 0.1 * torch.randn_like(logits32)).to(torch.bfloat16)
    kl = upcast - token_log_probs(other16, seq, fp32=True)
    ref_kl = reference - torch.log_softmax(other16.float()[:, :-1], -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(kl, ref_kl, atol=1e-5, rtol=0)


def test_ppo_compute_fp32_loss_defaults_on_for_half_precision(tmp_path):
    from dschat.steps.ppo import parse_args

    base = ["--actor_model_name_or_path", str(tmp_path), "--critic_model_name_or_path", str(tmp_path),
            "--output_dir", str(tmp_path / "out")]
    assert parse_args(base + ["--dtype", "bf16"]).fp32_loss is True
    assert parse_args(base + ["--dtype", "fp32"]).fp32_loss is False
    assert parse_args(base + ["--dtype", "bf16", "--no_compute_fp32_loss"]).fp32_loss is False
    assert parse_args(base + ["--dtype", "fp32", "--compute_fp32_loss"]).fp32_loss is True


# --------------------------------------------------------------------------------------------- LoRA defaults


def test_lora_default_wraps_llama_decoder_layers():
    model = apply_lora(tiny_llama(), 2, None, only_optimize=True)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LinearLayer_LoRA)]
    assert wrapped and all(name.startswith("model.layers.") for name in wrapped)
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head untouched
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_default_keeps_upstream_opt_modules():
    model = apply_lora(tiny_opt_reward_model(), 2, None, only_optimize=False)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LinearLayer_LoRA)]
    assert wrapped and all(".decoder.layers." in name for name in wrapped)


def test_lora_module_name_matching_nothing_is_refused():
    with pytest.raises(UserError, match=r"--actor_lora_module_name 'decoder.layers.' matches no Linear layer"):
        apply_lora(tiny_llama(), 2, "decoder.layers.", only_optimize=True, flag="--actor_lora_module_name")


# --------------------------------------------------------------------------------------------- local/jsonfile


def test_local_jsonfile_from_step_folder_under_non_editable_install(tmp_path):
    """dschat copied into a site-packages-like folder; the data sit in the checkout's data/ as upstream."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO_ROOT / "dschat", site / "dschat", ignore=shutil.ignore_patterns("__pycache__"))
    checkout = tmp_path / "checkout"
    step = checkout / "training" / "step3_rlhf_finetuning"
    step.mkdir(parents=True)
    (checkout / "data").mkdir()
    (checkout / "data" / "train.json").write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    code = ("from dschat.utils.data.raw_datasets import local_jsonfile_files; "
            "print([str(p) for p in local_jsonfile_files()])")
    env = {k: v for k, v in os.environ.items() if k != "DSCHAT_LOCAL_DATA_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code], cwd=step, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == [
        str((checkout / "data" / "train.json").resolve())]
    # the override still wins
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "train.json").write_text("[]")
    env["DSCHAT_LOCAL_DATA_DIR"] = str(other)
    out = subprocess.run([sys.executable, "-c", code], cwd=step, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(other / "train.json") in out.stdout


# --------------------------------------------------------------------------------------------- upstream tokenizers

UPSTREAM_PROMPTS = [" Human: hi Assistant:", " Human: What is a dog? Assistant: A pet.",
                    "\n\nHuman: hello\n\nAssistant: hi there<|endoftext|>"]


def upstream_llama_dir(tinystories_dir: Path, target: Path) -> Path:
    """A Llama checkpoint in DeepSpeed-Chat's saved layout: config, weights and `tokenizer.model` only."""
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copyfile(tinystories_dir / name, target / name)
    return target


def test_upstream_llama_tokenizer_ids_match_llama_tokenizer(tinystories_dir, tmp_path):
    from transformers import LlamaTokenizer

    from dschat.utils.utils import load_hf_tokenizer

    upstream = upstream_llama_dir(tinystories_dir, tmp_path / "sft")
    ours = load_hf_tokenizer(str(upstream))
    reference = LlamaTokenizer.from_pretrained(str(upstream))  # what upstream's loader calls
    for text in UPSTREAM_PROMPTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    pieces = [p for p in reference.convert_ids_to_tokens(ours(" Human: hi")["input_ids"]) if p != reference.bos_token]
    assert "".join(pieces) == "▁Human:▁hi"  # one "▁" for the leading space, no extra one


def test_saved_tokenizer_keeps_ids_and_slow_files(tinystories_dir, tmp_path):
    from transformers import LlamaTokenizer

    from dschat.utils.utils import load_hf_tokenizer, save_causal_lm

    upstream = upstream_llama_dir(tinystories_dir, tmp_path / "sft")
    tokenizer = load_hf_tokenizer(str(upstream))
    model = LlamaForCausalLM.from_pretrained(str(upstream))
    out = tmp_path / "actor"
    save_causal_lm(model, tokenizer, out)
    assert (out / "tokenizer.model").read_bytes() == (upstream / "tokenizer.model").read_bytes()
    reloaded = load_hf_tokenizer(str(out))
    for text in UPSTREAM_PROMPTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    # upstream's savers call save_vocabulary on a LlamaTokenizer loaded from our output
    written = LlamaTokenizer.from_pretrained(str(out)).save_vocabulary(str(tmp_path))
    assert any(Path(p).name == "tokenizer.model" for p in written)
    # and a tokenizer loaded from our own full files keeps its sentencepiece file too
    again = tmp_path / "again"
    save_causal_lm(model, reloaded, again)
    assert (again / "tokenizer.model").is_file()


# --------------------------------------------------------------------------------------------- reward ending

PAIRS = [(" Human: Tell me a story. Assistant:", " Once upon a time there was a cat."),
         ("\n\nHuman: Who is Lily?\n\nAssistant:", " Lily is a little girl who likes to play."),
         (" Human: hi Assistant:", " hello.")]


def reward_model_dirs(tinystories_dir: Path, tmp_path: Path):
    """The same reward weights in upstream's layout (bin + config + tokenizer.model, no record: trained with
    `<|endoftext|>`) and in ours (full tokenizer + the eos record step 2 writes)."""
    from dschat.utils.model.model_utils import create_critic_model, reward_model_state_dict
    from dschat.utils.model.reward_model import REWARD_ENDING_FILE, reward_ending_record
    from dschat.utils.utils import load_hf_tokenizer, save_reward_model

    tokenizer = load_hf_tokenizer(str(tinystories_dir))
    torch.manual_seed(1)
    model = create_critic_model(str(tinystories_dir), tokenizer, None)
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    upstream = tmp_path / "rm_upstream"
    upstream.mkdir()
    torch.save(reward_model_state_dict(model), upstream / "pytorch_model.bin")
    model.rwtransformer.config.save_pretrained(upstream)
    shutil.copyfile(tinystories_dir / "tokenizer.model", upstream / "tokenizer.model")
    ours = tmp_path / "rm_ours"
    save_reward_model(model, tokenizer, ours,
                      extra_files={REWARD_ENDING_FILE: reward_ending_record(tokenizer.eos_token, tokenizer)})
    return model.eval(), upstream, ours


@torch.no_grad()
def direct_scores(model, tokenizer, end_text: str, read_before_last: bool) -> list[float]:
    """Each pair tokenised in one piece with `end_text`, unpadded, read at the last token (upstream's ending)
    or the one before it (the eos ending: the last answer token)."""
    from dschat.utils.data.raw_datasets import join_prompt_response

    scores = []
    for prompt, answer in PAIRS:
        ids = torch.tensor([tokenizer(join_prompt_response(prompt, answer) + end_text)["input_ids"]])
        values = model.token_values(ids, torch.ones_like(ids))
        scores.append(values[0, -2 if read_before_last else -1].item())
    return scores


def test_reward_ending_is_honoured_by_select_ppo_eval_and_rw_eval(tinystories_dir, tmp_path):
    from transformers import LlamaTokenizer

    from dschat.utils.inference import reward_layout
    from dschat.utils.model.reward_model import EOS_ENDING, ending_token_ids, resolve_reward_ending
    from training.step2_reward_model_finetuning import rw_eval

    model, upstream, ours = reward_model_dirs(tinystories_dir, tmp_path)
    assert resolve_reward_ending(str(upstream)) == "<|endoftext|>"
    assert resolve_reward_ending(str(ours)) == EOS_ENDING
    assert resolve_reward_ending(str(upstream), "eos") == EOS_ENDING  # the flag overrides
    slow = LlamaTokenizer.from_pretrained(str(upstream))
    expected_upstream = direct_scores(model, slow, "<|endoftext|>", read_before_last=False)
    prompts, answers = [p for p, _ in PAIRS], [a for _, a in PAIRS]

    # eval (mpo eval and mpo compare score through RewardScorer)
    scorer = RewardScorer.from_path(str(upstream), torch.device("cpu"))
    assert scorer.ending == "<|endoftext|>"
    assert scorer.score(prompts, answers) == pytest.approx(expected_upstream, abs=1e-4)
    ours_scorer = RewardScorer.from_path(str(ours), torch.device("cpu"))
    expected_ours = direct_scores(model, ours_scorer.tokenizer, ours_scorer.tokenizer.eos_token, read_before_last=True)
    assert ours_scorer.score(prompts, answers) == pytest.approx(expected_ours, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(expected_upstream, expected_ours)) > 1e-3  # the conventions differ

    # select
    select = RewardScorer(scorer.model, scorer.tokenizer, scorer.end_text, max_seq_len=512, batch_size=2,
                          share_prompts=True)
    assert select.score(prompts, answers) == pytest.approx(expected_upstream, abs=1e-4)

    # PPO: rollouts (left-padded prompt, answer, eos, pads) get the ending in place of their eos
    tok = scorer.tokenizer
    ending = ending_token_ids(tok, scorer.ending)
    layouts = [reward_layout(tok, p, a, scorer.end_text, 512) for p, a in PAIRS]
    width = max(len(h) for h, _ in layouts)
    rows = []
    for head, tail in layouts:
        assert tail[-len(ending):] == ending
        answer = tail[:-len(ending)]
        rows.append([tok.pad_token_id] * (width - len(head)) + head + answer + [tok.eos_token_id])
    length = max(map(len, rows)) + 2
    seq = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows])
    mask = (seq != tok.pad_token_id).long()
    ppo = model.rollout_scores(seq, mask, width, ending, tok.eos_token_id)
    assert ppo.tolist() == pytest.approx(expected_upstream, abs=1e-4)
    with torch.no_grad():  # without an ending to splice in, the rollout is read at its last answer token
        unspliced = [model.token_values(torch.tensor([head + tail[:-len(ending)]]))[0, -1].item()
                     for head, tail in layouts]
    assert model.rollout_scores(seq, mask, width).tolist() == pytest.approx(unspliced, abs=1e-4)

    # rw_eval: the recorded/detected ending by default, --eot_token overrides
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": a}) + "\n" for p, a in PAIRS))
    results = rw_eval.main(["--model_name_or_path", str(upstream), "--pairs_file", str(pairs_file), "--device", "cpu"])
    assert [r["chosen_reward"] for r in results] == pytest.approx(expected_upstream, abs=1e-4)
    results = rw_eval.main(["--model_name_or_path", str(ours), "--pairs_file", str(pairs_file), "--device", "cpu",
                            "--eot_token", "<|endoftext|>"])
    expected_forced = direct_scores(model, ours_scorer.tokenizer, "<|endoftext|>", read_before_last=False)
    assert [r["chosen_reward"] for r in results] == pytest.approx(expected_forced, abs=1e-4)


def test_reward_ending_record_and_layout_detection(tmp_path, tiny_tokenizer):
    from dschat.utils.model.reward_model import (
        EOS_ENDING,
        REWARD_ENDING_FILE,
        UPSTREAM_REWARD_ENDING,
        ending_text,
        resolve_reward_ending,
        reward_ending_record,
    )

    folder = tmp_path / "rm"
    folder.mkdir()
    assert resolve_reward_ending(str(folder)) == UPSTREAM_REWARD_ENDING  # no record, no full tokenizer
    (folder / "tokenizer_config.json").write_text("{}")
    assert resolve_reward_ending(str(folder)) == EOS_ENDING  # our older outputs: eos
    (folder / REWARD_ENDING_FILE).write_text(reward_ending_record("<|endoftext|>", tiny_tokenizer))
    assert resolve_reward_ending(str(folder)) == "<|endoftext|>"
    assert resolve_reward_ending(str(folder), "eos") == EOS_ENDING
    assert ending_text(EOS_ENDING, tiny_tokenizer) == tiny_tokenizer.eos_token
    (folder / REWARD_ENDING_FILE).write_text('{"end_text": ')  # torn
    with pytest.raises(UserError, match=f"{REWARD_ENDING_FILE}: not a reward-ending record"):
        resolve_reward_ending(str(folder))
    assert resolve_reward_ending(str(folder), "<|endoftext|>") == "<|endoftext|>"  # an override needs no record
