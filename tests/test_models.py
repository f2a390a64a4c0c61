"""Losses (hand-computed numbers), RewardModel end convention, critic checkpoint loading, LoRA, and a
real single-process ZeRO-3 DeepSpeed engine around a step-3 critic."""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from dschat.utils.errors import UserError
from dschat.utils.losses import (
    divergence_reward_loss,
    gather_log_probs,
    last_real_index,
    masked_mean,
    pairwise_accuracy,
    pairwise_reward_loss,
    reward_index,
)
from dschat.utils.model.model_utils import (
    causal_lm_model_to_fp32_loss,
    create_critic_model,
    create_hf_model,
    reward_model_state_dict,
)
from dschat.utils.model.reward_model import RewardModel, has_left_padding, position_ids_from_mask
from dschat.utils.module.lora import (
    LinearLayer_LoRA,
    convert_linear_layer_to_lora,
    convert_lora_to_linear_layer,
    lora_fused,
    make_model_gradient_checkpointing_compatible,
    only_optimize_lora_parameters,
    unfuse_lora_layer,
)

# --------------------------------------------------------------------------------------------
# pure losses


def test_gather_log_probs_by_hand():
    # position 0: uniform over 3 -> log(1/3); position 1: logits log(1), log(2), log(3) -> p(2) = 3/6
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0)]]])
    labels = torch.tensor([[1, 2]])
    out = gather_log_probs(logits, labels)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[math.log(1 / 3), math.log(0.5)]]))


def test_gather_log_probs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 10
    labels = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_log_probs(logits, labels), expected)


def test_pairwise_reward_loss_by_hand():
    chosen = torch.tensor([1.0, 0.0, -2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(3))) / 3
    assert pairwise_reward_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_reward_loss_is_stable_for_large_margins():
    assert pairwise_reward_loss(torch.tensor([1000.0]), torch.tensor([-1000.0])).item() == 0.0
    assert pairwise_reward_loss(torch.tensor([-1000.0]), torch.tensor([1000.0])).item() == pytest.approx(2000.0)


def test_pairwise_accuracy_ties_count_as_wrong():
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 2.5, 1.0])
    assert pairwise_accuracy(chosen, rejected).item() == 0.5


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 6.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 7.0]))
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 6 + 8) / 4)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


PAD = 0


def test_last_real_index_reads_the_mask_not_the_ids():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert last_real_index(mask).tolist() == [1, 3, 2, -1]


def test_reward_index_by_hand():
    """The rule in positions (hand-computed): last real token; one earlier when it is the end marker (the pad id,
    an eos ending whose token is the pad) at or after max(start, num_padding_at_beginning)."""
    EOS = PAD = 0
    ids = torch.tensor([
        [5, 6, EOS, PAD],   # eos-ended text, right-padded -> the token before the eos: 1
        [5, 6, 7, 8],       # cut by the length limit (no ending) -> its last real token: 3
        [EOS, 6, 7, PAD],   # a pad-valued token at 0 is content; the last real token 7 is no marker: 2
        [5, EOS, 7, EOS],   # an eos inside the text is content: the end is the last one -> 2
        [EOS, PAD, PAD, PAD],  # only an eos: clamped at 0, never -1
    ])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert reward_index(mask, ids, PAD).tolist() == [1, 3, 2, 2, 0]
    # no end marker (pad != eos, e.g. OPT): the last real token, eos included
    assert reward_index(mask, ids, None).tolist() == [2, 3, 2, 3, 0]


def test_reward_index_with_prompt_width_and_padding_at_beginning():
    PAD = 0
    # left-padded prompts of width 3 whose last prompt token is an eos (= pad) closing a chat turn, then answers
    ids = torch.tensor([[PAD, 4, PAD, 5, 6, PAD], [9, 4, PAD, 7, PAD, PAD], [PAD, 4, PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    # row 0: answer 5 6 + eos -> 4; row 1: answer 7 + eos -> 3; row 2: empty answer (only its eos) -> the
    # last prompt token, 2 (the prompt's own eos at 2 is content, not the end)
    assert reward_index(mask, ids, PAD, start=3).tolist() == [4, 3, 2]
    # with the whole row as the prompt (start 6) nothing is an end marker: the last real token
    assert reward_index(mask, ids, PAD, start=6).tolist() == [5, 4, 3]
    # OPT-style beginning tokens that are the pad: the first N positions are never the end marker
    ids = torch.tensor([[PAD, 5, 6, PAD, PAD], [5, PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert reward_index(mask, ids, PAD, num_padding_at_beginning=2).tolist() == [2, 1]
    assert reward_index(mask, ids, PAD, num_padding_at_beginning=0).tolist() == [2, 0]


def test_divergence_loss_by_hand():
    chosen_ids = torch.tensor([[1, 2, 3, PAD], [1, 2, PAD, PAD]])
    rejected_ids = torch.tensor([[1, 2, 4, 5], [1, 2, PAD, PAD]])  # pair 2 identical
    chosen_v = torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.5]])
    rejected_v = torch.tensor([[0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])

    def sp(z):
        return math.log1p(math.exp(z))

    # pair 1: div=2, end=max(3, 4)=4 -> positions 2, 3; pair 2: identical -> position L-1=3 only
    pair1 = (sp(0.0 - 1.0) + sp(3.0 - 2.0)) / 2
    pair2 = sp(0.0 - 0.5)
    chosen_mask, rejected_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    chosen_index = reward_index(chosen_mask, chosen_ids, None)  # [2, 1]: end = index + 1 = upstream's first pad
    rejected_index = reward_index(rejected_mask, rejected_ids, None)  # [3, 1]
    loss = divergence_reward_loss(chosen_ids, rejected_ids, chosen_v, rejected_v, chosen_index, rejected_index,
                                  chosen_mask, rejected_mask)
    assert loss.item() == pytest.approx((pair1 + pair2) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# RewardModel on the tiny test Llama


@pytest.fixture(scope="module")
def critic(tinystories_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = create_critic_model(str(tinystories_dir), tiny_tokenizer, None)
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    return model.eval()


def _encode(tok, text: str, eos: bool = True) -> list[int]:
    ids = tok(text).input_ids
    return ids + [tok.eos_token_id] if eos else ids


def _pad_right(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_reward_forward_end_scores_and_both_loss_types(critic, tiny_tokenizer):
    tok, pad = tiny_tokenizer, tiny_tokenizer.pad_token_id
    chosen = [_encode(tok, "Once upon a time there was a cat."), _encode(tok, "The dog ran.")]
    rejected = [_encode(tok, "Once upon a time a big tree fell down hard."), _encode(tok, "The dog sat.")]
    ids = _pad_right(chosen + rejected, pad)
    mask = (ids != pad).long()
    for row in range(ids.shape[0]):  # the eos that ends each text is attended to, like the collator
        mask[row, len((chosen + rejected)[row]) - 1] = 1
    with torch.no_grad():
        values = critic.forward_value(ids, mask, return_value_only=True)
        ends = torch.tensor([len(r) - 2 for r in chosen + rejected])  # token before the eos
        expected_end = values[torch.arange(4), ends]
        out_end = critic(ids, mask, prompt_lengths=torch.tensor([3, 3, 3, 3]))
        critic.loss_type = "divergence"
        try:
            out_div = critic(ids, mask)
        finally:
            critic.loss_type = "end"
    torch.testing.assert_close(out_end["chosen_mean_scores"], expected_end[:2])
    torch.testing.assert_close(out_end["rejected_mean_scores"], expected_end[2:])
    torch.testing.assert_close(
        out_end["loss"], torch.nn.functional.softplus(expected_end[2:] - expected_end[:2]).mean()
    )
    index = ends  # the scored positions; upstream's "first pad" is one later (the eos)
    expected_div = divergence_reward_loss(ids[:2], ids[2:], values[:2], values[2:], index[:2], index[2:],
                                          mask[:2], mask[2:])
    torch.testing.assert_close(out_div["loss"], expected_div)
    torch.testing.assert_close(out_div["chosen_mean_scores"], out_end["chosen_mean_scores"])
    assert not torch.isclose(out_div["loss"], out_end["loss"])


def test_reward_losses_with_zero_value_head_are_log2(tinystories_dir, tiny_tokenizer):
    model = create_critic_model(str(tinystories_dir), tiny_tokenizer, None, loss_type="divergence")
    torch.nn.init.zeros_(model.v_head.weight)
    ids = _pad_right([[1, 5, 6, 2], [1, 5, 2]], tiny_tokenizer.pad_token_id)
    for loss_type in ("end", "divergence"):
        model.loss_type = loss_type
        assert model(ids, torch.ones_like(ids))["loss"].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="loss_type"):
        RewardModel(model.rwtransformer, tiny_tokenizer, loss_type="token")


def test_num_padding_at_beginning_skips_leading_pad(critic, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad, 5, 6, pad, pad], [pad, 5, 7, 8, pad]])  # OPT-like: "BOS" == pad, eos == pad
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # the collator's: each text through its eos
    model = RewardModel(critic.rwtransformer, tiny_tokenizer, num_padding_at_beginning=1)
    model.v_head = critic.v_head
    with torch.no_grad():
        out = model(ids, mask)
        values = model.forward_value(ids, mask, return_value_only=True)
    torch.testing.assert_close(out["chosen_mean_scores"], values[:1, 2])
    torch.testing.assert_close(out["rejected_mean_scores"], values[1:, 3])


def test_forward_value_left_padded_prompts_match_unpadded(critic, tiny_tokenizer):
    tok, pad = tiny_tokenizer, tiny_tokenizer.pad_token_id
    prompts = [_encode(tok, "Once upon a time", eos=False), _encode(tok, "Lily saw a big red ball", eos=False)]
    answers = [tok(" there was a cat", add_special_tokens=False).input_ids,
               tok(" and she smiled", add_special_tokens=False).input_ids]
    with torch.no_grad():
        alone = []
        for p, a in zip(prompts, answers):
            row = torch.tensor([p + a + [pad]])
            alone.append(critic.forward_value(row, torch.ones_like(row), prompt_length=len(p))["chosen_end_scores"])
        alone = torch.cat(alone)
        width = max(len(p) for p in prompts)
        rows = [[pad] * (width - len(p)) + p + a for p, a in zip(prompts, answers)]
        ids = _pad_right([r + [pad] for r in rows], pad)
        mask = torch.zeros_like(ids)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            mask[i, width - len(p): width + len(a)] = 1
        batched = critic.forward_value(ids, mask, prompt_length=width)
    assert torch.isfinite(batched["values"][mask.bool()]).all()
    torch.testing.assert_close(batched["chosen_end_scores"], alone, atol=1e-4, rtol=1e-4)
    assert critic.end_scores(ids, mask, prompt_length=width).tolist() == pytest.approx(alone.tolist(), abs=1e-4)


# --------------------------------------------------------------------------------------------
# create_hf_model / create_critic_model


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 3, 3]]
    assert has_left_padding(mask) and not has_left_padding(mask[1:])


def test_a_folder_still_marked_gguf_quantised_is_refused_before_training(tinystories_dir, tiny_tokenizer, tmp_path):
    """A hand conversion that kept the GGUF quantization_config trains, then cannot be saved: refused at load."""
    import json
    import shutil

    folder = tmp_path / "converted"
    shutil.copytree(tinystories_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "m.Q4_1.gguf", "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="GGUF quantization_config"):
        create_hf_model(AutoModelForCausalLM, str(folder), tiny_tokenizer)


def test_create_hf_model_resizes_to_multiple_of_8(tinystories_dir, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<x_extra>"]})
    assert len(tok) == 513
    model = create_hf_model(AutoModelForCausalLM, str(tinystories_dir), tok, dropout=0.25)
    assert model.get_input_embeddings().weight.shape[0] == 520
    assert model.config.end_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.config.attention_dropout == 0.25
    assert next(model.parameters()).dtype == torch.float32
    same = create_hf_model(AutoModelForCausalLM, str(tinystories_dir), tiny_tokenizer)
    assert same.get_input_embeddings().weight.shape[0] == 512


@pytest.mark.shared_data
def test_pretrained_stories260k_loads_and_continues_a_story(shared_path):
    """The public stories260K checkpoint (sentencepiece Llama) through the steps' own loaders."""
    from dschat.utils.utils import load_hf_tokenizer

    path = str(shared_path("models/tinystories-260k"))
    tok = load_hf_tokenizer(path)
    model = create_hf_model(AutoModelForCausalLM, path, tok).eval()
    ids = torch.tensor([tok("Once upon a time").input_ids])
    out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0], skip_special_tokens=True).startswith("Once upon a time, there was a little girl named Lily.")


def _sample_batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _pad_right([_encode(tok, "Once upon a time"), _encode(tok, "The cat sat on the mat.")], tok.pad_token_id)
    return ids, torch.ones_like(ids)


def _save_reward_dir(model: RewardModel, path, state: dict | None = None, fmt: str = "bin") -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict() if state is None else state)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")
    model.config.to_json_file(str(path / "config.json"))


@pytest.mark.parametrize("fmt", ["bin", "bin_fp16", "safetensors", "engine_prefix"])
def test_critic_round_trip(critic, tiny_tokenizer, tmp_path, fmt):
    state = critic.state_dict()
    if fmt == "bin_fp16":  # upstream saves in the training dtype
        state = {k: v.half() for k, v in state.items()}
    if fmt == "engine_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    _save_reward_dir(critic, tmp_path / "rm", state, "safetensors" if fmt == "safetensors" else "bin")
    loaded = create_critic_model(str(tmp_path / "rm"), tiny_tokenizer, None, rlhf_training=True).eval()
    ids, mask = _sample_batch(tiny_tokenizer)
    with torch.no_grad():
        want = critic.forward_value(ids, mask, return_value_only=True)
        got = loaded.forward_value(ids, mask, return_value_only=True)
    tol = 2e-2 if fmt == "bin_fp16" else 1e-6
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert set(reward_model_state_dict(loaded)) == set(critic.state_dict())


def test_upstream_opt_layout_fp16_with_leading_pad(tiny_tokenizer, tmp_path):
    """Upstream OPT critic: `word_embed_proj_dim` head size, BOS == pad (num_padding_at_beginning=1),
    fp16 tensors in pytorch_model.bin."""
    from transformers import AutoModel, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=512, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, pad_token_id=2, bos_token_id=2)
    upstream = RewardModel(AutoModel.from_config(config), tiny_tokenizer, num_padding_at_beginning=1).eval()
    assert upstream.v_head.weight.shape == (1, 16)
    torch.nn.init.normal_(upstream.v_head.weight)
    _save_reward_dir(upstream, tmp_path / "opt", {k: v.half() for k, v in upstream.state_dict().items()})
    loaded = create_critic_model(str(tmp_path / "opt"), tiny_tokenizer, None, num_padding_at_beginning=1,
                                 rlhf_training=True).eval()
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad, 7, 8, 9, pad, pad], [pad, 7, 8, 10, 11, pad]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # each text through its eos (== pad)
    with torch.no_grad():
        out = loaded(ids, mask)
        want = upstream.half().float()(ids, mask)
        values = loaded.forward_value(ids, mask, return_value_only=True)
    torch.testing.assert_close(out["chosen_mean_scores"], want["chosen_mean_scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["chosen_mean_scores"], values[:1, 3])
    torch.testing.assert_close(out["rejected_mean_scores"], values[1:, 4])


def test_critic_from_causal_lm_checkpoint_is_a_user_error(tinystories_dir, tiny_tokenizer, tmp_path):
    lm = AutoModelForCausalLM.from_pretrained(str(tinystories_dir))
    out = tmp_path / "lm"
    out.mkdir()
    torch.save(lm.state_dict(), out / "pytorch_model.bin")
    lm.config.to_json_file(str(out / "config.json"))
    with pytest.raises(UserError) as err:
        create_critic_model(str(out), tiny_tokenizer, None, rlhf_training=True)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "no value head (v_head.weight)" in message
    assert "model.embed_tokens.weight" in message and "\n" not in message


@pytest.mark.parametrize(
    "change, expected",
    [
        ("drop", "missing keys: rwtransformer.norm.weight"),
        ("extra", "unexpected keys: rwtransformer.extra.weight"),
        ("shape", "shape mismatches: v_head.weight (file [1, 32] vs model [1, 64])"),
    ],
)
def test_critic_layout_mismatch_names_keys(critic, tiny_tokenizer, tmp_path, change, expected):
    state = dict(critic.state_dict())
    if change == "drop":
        del state["rwtransformer.norm.weight"]
    elif change == "extra":
        state["rwtransformer.extra.weight"] = torch.zeros(2)
    else:
        state["v_head.weight"] = torch.zeros(1, 32)
    _save_reward_dir(critic, tmp_path / "rm", state)
    with pytest.raises(UserError, match="does not match the reward model") as err:
        create_critic_model(str(tmp_path / "rm"), tiny_tokenizer, None, rlhf_training=True)
    assert expected in str(err.value)


def test_critic_missing_files_are_user_errors(critic, tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    critic.config.to_json_file(str(empty / "config.json"))
    with pytest.raises(UserError, match="no pytorch_model.bin or model.safetensors"):
        create_critic_model(str(empty), tiny_tokenizer, None, rlhf_training=True)
    # not a directory and not a valid hub id: the hub code path fails fast with a clear message
    with pytest.raises(UserError, match="not a local directory"):
        create_critic_model(str(tmp_path / "no" / "such" / "dir"), tiny_tokenizer, None, rlhf_training=True)


def test_fp32_loss_wrapper(tinystories_dir, tiny_tokenizer):
    ids, _ = _sample_batch(tiny_tokenizer)
    labels = ids.clone()
    labels[:, -1] = -100
    model = AutoModelForCausalLM.from_pretrained(str(tinystories_dir), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        causal_lm_model_to_fp32_loss(model)
        out = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert out.loss.dtype == torch.float32 and out[0] is out.loss
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# LoRA


def test_lora_convert_update_fuse_unfuse(tinystories_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = create_critic_model(str(tinystories_dir), tiny_tokenizer, None).eval()
    hf_keys = set(model.state_dict())
    ids, mask = _sample_batch(tiny_tokenizer)
    with torch.no_grad():
        before = model.forward_value(ids, mask, return_value_only=True)
        convert_linear_layer_to_lora(model, ["q_proj", "down_proj"], lora_dim=4, lora_scaling=2, lora_dropout=0.0)
        layers = [m for m in model.modules() if isinstance(m, LinearLayer_LoRA)]
        assert len(layers) == 2 * model.config.num_hidden_layers
        torch.testing.assert_close(model.forward_value(ids, mask, return_value_only=True), before)

        layer = model.rwtransformer.layers[0].self_attn.q_proj
        assert layer.lora_scaling == 0.5  # lora_scaling / lora_dim
        for lyr in layers:
            torch.nn.init.normal_(lyr.lora_left_weight, std=0.2)
        weight = layer.weight.detach().clone()
        x = torch.randn(3, layer.in_features)
        manual = x @ weight.T + 0.5 * (x @ layer.lora_right_weight @ layer.lora_left_weight)
        torch.testing.assert_close(layer(x), manual)
        updated = model.forward_value(ids, mask, return_value_only=True)
        assert not torch.allclose(updated, before)

        convert_lora_to_linear_layer(model)
        torch.testing.assert_close(layer.weight, weight + 0.5 * (layer.lora_right_weight @ layer.lora_left_weight).T)
        torch.testing.assert_close(layer(x), manual, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_value(ids, mask, return_value_only=True), updated, atol=1e-5, rtol=1e-5)
        assert set(reward_model_state_dict(model)) == hf_keys

        unfuse_lora_layer(model)
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=1e-6)
        assert not layer.fused
        with lora_fused(model):
            assert layer.fused
            torch.testing.assert_close(model.forward_value(ids, mask, return_value_only=True), updated,
                                       atol=1e-5, rtol=1e-5)
        assert not layer.fused
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.forward_value(ids, mask, return_value_only=True), updated, atol=1e-5, rtol=1e-5)


def test_lora_upstream_kwarg_spelling_and_only_optimize(tinystories_dir, tiny_tokenizer):
    model = create_critic_model(str(tinystories_dir), tiny_tokenizer, None)
    convert_linear_layer_to_lora(model, "self_attn.", lora_dim=2, lora_droppout=0.1)
    layer = model.rwtransformer.layers[1].self_attn.v_proj
    assert isinstance(layer.lora_dropout, torch.nn.Dropout) and layer.lora_dropout.p == 0.1
    only_optimize_lora_parameters(model, force_optimize_params=["v_head.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "v_head.weight" in trainable
    assert trainable - {"v_head.weight"} == {
        n for n, _ in model.named_parameters() if "lora_right_weight" in n or "lora_left_weight" in n
    }
    assert not model.rwtransformer.embed_tokens.weight.requires_grad

    # LoRA-only training with gradient checkpointing still reaches the LoRA params
    model.train()
    make_model_gradient_checkpointing_compatible(model)
    model.gradient_checkpointing_enable()
    ids, mask = _sample_batch(tiny_tokenizer)
    model(torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask]))["loss"].backward()
    assert layer.lora_right_weight.grad is not None or layer.lora_left_weight.grad is not None
    assert layer.lora_left_weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# real DeepSpeed engine, ZeRO-3, one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_dist():
    import deepspeed

    if not torch.distributed.is_initialized():
        for key, value in {
            "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def test_zero3_engine_loads_step2_critic(single_process_dist, critic, tiny_tokenizer, tmp_path):
    deepspeed = single_process_dist
    _save_reward_dir(critic, tmp_path / "rm")
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "bf16": {"enabled": False},
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
    }
    model = create_critic_model(str(tmp_path / "rm"), tiny_tokenizer, config, rlhf_training=True, zero_stage=3)
    embed = model.rwtransformer.embed_tokens.weight
    assert hasattr(embed, "ds_id") and tuple(embed.ds_shape) == (512, 64)  # built partitioned
    # the HF ZeRO-3 switch is scoped to the build: a later stage-0 model must not be partitioned
    assert not is_deepspeed_zero3_enabled()
    convert_linear_layer_to_lora(model, "layers.", lora_dim=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    ids, mask = _sample_batch(tiny_tokenizer)
    with torch.no_grad():
        want = critic.forward_value(ids, mask, prompt_length=2)["chosen_end_scores"]
        got = engine.module.forward_value(ids, mask, prompt_length=2)["chosen_end_scores"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    loss = engine(torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask]))["loss"]
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        trained = engine.module.forward_value(ids, mask, return_value_only=True)
        convert_lora_to_linear_layer(engine.module)  # gathers partitioned weights to fuse
        fused = engine.module.forward_value(ids, mask, return_value_only=True)
    torch.testing.assert_close(fused, trained, atol=1e-4, rtol=1e-4)
    state = reward_model_state_dict(engine)
    assert set(state) == set(critic.state_dict())
    assert tuple(state["rwtransformer.embed_tokens.weight"].shape) == (512, 64)
