"""The optimised paths compute the same numbers as the plain ones, on HH-format pairs and the tiny Llama.

- padding="longest" (ours) vs padding="max_length" (upstream): same SFT loss, same reward-model loss and scores;
- DPO with reference log-probs precomputed once vs a resident reference model: same loss;
- one concatenated chosen+rejected forward vs two separate forwards: same log-probs.

Kept small (a few pairs truncated to 96 tokens, the 260k-parameter test Llama) so the file runs in seconds.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from dschat.utils.data.data_utils import DataCollatorReward, DataCollatorSFT
from mpo_ext import dpo

MAX_LEN = 96
NUM_PAIRS = 4
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(tinystories_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tinystories_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(hh_file, tiny_tokenizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Phase-2 items (chosen, mask, rejected, mask, prompt_length) from the first HH-format pairs.

    Lengths differ from pair to pair, so `longest` batches really are narrower than `max_length` ones.
    """
    tok = tiny_tokenizer
    items = []
    with gzip.open(hh_file, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            cut = record["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = record["chosen"][:cut]
            if not record["rejected"].startswith(prompt):
                continue
            # truncated so that lengths vary from pair to pair and stay below MAX_LEN, answers end with eos
            k = len(items)
            prompt_ids = tok(prompt).input_ids[:20 + 6 * k]
            chosen_answer = tok(record["chosen"][cut:]).input_ids[1:][:10 + 9 * k] + [tok.eos_token_id]
            rejected_answer = tok(record["rejected"][cut:]).input_ids[1:][:6 + 13 * k] + [tok.eos_token_id]
            chosen, rejected = prompt_ids + chosen_answer, prompt_ids + rejected_answer
            c, r = torch.tensor(chosen), torch.tensor(rejected)
            items.append((c, torch.ones_like(c), r, torch.ones_like(r), torch.tensor(len(prompt_ids))))
            if len(items) == NUM_PAIRS:
                break
    assert len({len(i[0]) for i in items} | {len(i[2]) for i in items}) > 2
    assert max(len(i[0]) for i in items) < MAX_LEN and max(len(i[2]) for i in items) < MAX_LEN
    return items


def _sft_items(pairs):
    return [{"input_ids": c, "attention_mask": m, "labels": c} for c, m, _, _, _ in pairs]


def test_collators_really_differ_in_width(pairs, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    longest = DataCollatorSFT(pad, MAX_LEN, padding="longest")(_sft_items(pairs))
    fixed = DataCollatorSFT(pad, MAX_LEN, padding="max_length")(_sft_items(pairs))
    assert fixed["input_ids"].shape[1] == MAX_LEN
    assert longest["input_ids"].shape[1] % 8 == 0 and longest["input_ids"].shape[1] <= MAX_LEN
    # a shorter batch (two pairs) is narrower than MAX_LEN under "longest"
    short = DataCollatorSFT(pad, MAX_LEN, padding="longest")(_sft_items(pairs[:2]))
    assert short["input_ids"].shape[1] < MAX_LEN


@torch.no_grad()
def test_sft_loss_longest_equals_max_length(model, pairs, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    for batch_items in (_sft_items(pairs[:2]), _sft_items(pairs)):
        losses = []
        for padding in ("longest", "max_length"):
            batch = DataCollatorSFT(pad, MAX_LEN, padding=padding)(batch_items)
            losses.append(model(**batch, use_cache=False).loss)
        torch.testing.assert_close(losses[0], losses[1], **TOL)


@torch.no_grad()
def test_reward_loss_and_scores_longest_equal_max_length(tinystories_dir, pairs, tiny_tokenizer):
    from transformers import AutoModel

    from dschat.utils.model.reward_model import RewardModel

    torch.manual_seed(0)
    rm = RewardModel(AutoModel.from_pretrained(str(tinystories_dir), dtype=torch.float32), tiny_tokenizer, 0).eval()
    torch.nn.init.normal_(rm.v_head.weight, std=0.5)
    outs = []
    for padding in ("longest", "max_length"):
        batch = DataCollatorReward(pad_token_id=tiny_tokenizer.pad_token_id, max_seq_len=MAX_LEN,
                                   padding=padding)(pairs[:3])
        outs.append(rm(batch["input_ids"], batch["attention_mask"]))
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        torch.testing.assert_close(outs[0][key], outs[1][key], **TOL)
    assert outs[0]["chosen_mean_scores"].std() > 0  # really different rows, not a degenerate comparison


def _perturbed_copy(model):
    import copy

    policy = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy


@torch.no_grad()
def test_dpo_loss_precomputed_equals_resident_reference(model, pairs, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    policy = _perturbed_copy(model)
    # the table is built with upstream-style fixed-width batches of 3, training uses "longest" batches of 2
    table = dpo.compute_reference_table(model, pairs, DataCollatorReward(pad, MAX_LEN, padding="max_length"),
                                        batch_size=3, device=torch.device("cpu"), rank=0, world_size=1)
    precomputed = dpo.PrecomputedReference({"train": table})
    resident = dpo.ResidentReference(model)
    collate = dpo.IndexedCollator(DataCollatorReward(pad, MAX_LEN, padding="longest"))
    for indices in ([0, 1], [2, 3], [3, 0]):
        batch = collate([(i, pairs[i]) for i in indices])
        policy_c, policy_r = dpo.split_pairs(dpo.policy_log_probs(policy, batch))
        losses = []
        for reference in (resident, precomputed):
            ref_c, ref_r = dpo.split_pairs(reference.log_probs(batch, "train"))
            losses.append(dpo.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)[0])
        torch.testing.assert_close(losses[0], losses[1], **TOL)
        assert not torch.allclose(losses[0], torch.full_like(losses[0], 0.6931471805599453))  # policy != reference


@torch.no_grad()
def test_concatenated_forward_equals_separate_forwards(model, pairs, tiny_tokenizer):
    from dschat.utils.losses import gather_log_probs

    pad = tiny_tokenizer.pad_token_id
    batch = DataCollatorReward(pad, MAX_LEN, padding="longest")(pairs)
    n = len(pairs)

    def token_logps(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return gather_log_probs(logits[:, :-1].float(), ids[:, 1:]) * mask[:, 1:]

    joint = token_logps(batch["input_ids"], batch["attention_mask"])
    for half, rows in ((0, [(p[0], p[1]) for p in pairs]), (1, [(p[2], p[3]) for p in pairs])):
        collated = DataCollatorSFT(pad, MAX_LEN, padding="longest")(
            [{"input_ids": ids, "attention_mask": mask} for ids, mask in rows])
        alone = token_logps(collated["input_ids"], collated["attention_mask"])
        width = min(alone.shape[1], joint.shape[1])
        part = joint[half * n:(half + 1) * n]
        torch.testing.assert_close(part[:, :width], alone[:, :width], **TOL)
        assert part[:, width:].abs().sum() == 0 and alone[:, width:].abs().sum() == 0  # only padding beyond
        torch.testing.assert_close(part.sum(dim=1), alone.sum(dim=1), **TOL)


@torch.no_grad()
def test_dropping_the_right_pad_mask_changes_no_loss(model, tinystories_dir, pairs, tiny_tokenizer):
    """`--pad_mask auto` (no mask for right-padded batches) against upstream's masked forward."""
    from transformers import AutoModel

    from dschat.utils.model.masks import is_right_padded, training_attention_mask
    from dschat.utils.model.reward_model import RewardModel
    from mpo_ext.dpo import policy_log_probs

    pad = tiny_tokenizer.pad_token_id
    sft_batch = DataCollatorSFT(pad, MAX_LEN, padding="longest")(_sft_items(pairs))
    pair_batch = DataCollatorReward(pad, MAX_LEN, padding="longest")(pairs)
    for batch in (sft_batch, pair_batch):
        assert is_right_padded(batch["attention_mask"]) and not bool(batch["attention_mask"].all())
    assert training_attention_mask(sft_batch["attention_mask"], "auto") is None

    def sft_loss(pad_mask: str) -> torch.Tensor:
        mask = training_attention_mask(sft_batch["attention_mask"], pad_mask)
        return model(input_ids=sft_batch["input_ids"], attention_mask=mask, labels=sft_batch["labels"]).loss

    torch.testing.assert_close(sft_loss("auto"), sft_loss("always"), **TOL)

    torch.manual_seed(0)
    rm = RewardModel(AutoModel.from_pretrained(str(tinystories_dir), dtype=torch.float32), tiny_tokenizer, 0).eval()
    torch.nn.init.normal_(rm.v_head.weight, std=0.5)
    # as step 2 calls it: the attention mask may be left out, the positions of real tokens always travel
    outs = [rm(pair_batch["input_ids"], training_attention_mask(pair_batch["attention_mask"], p),
               sequence_mask=pair_batch["attention_mask"]) for p in ("auto", "always")]
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        torch.testing.assert_close(outs[0][key], outs[1][key], **TOL)

    torch.testing.assert_close(policy_log_probs(model, pair_batch, "auto"),
                               policy_log_probs(model, pair_batch, "always"), **TOL)
    # the test can fail: pads really are attended to when rows are LEFT-padded and the mask is dropped
    left = torch.flip(pair_batch["input_ids"], dims=[1])
    masked = model(input_ids=left, attention_mask=torch.flip(pair_batch["attention_mask"], dims=[1])).logits
    assert not torch.allclose(model(input_ids=left).logits[:, -1], masked[:, -1], **TOL)


@torch.no_grad()
def test_lora_base_weights_reference_equals_a_separate_reference(model, pairs, tiny_tokenizer):
    """A LoRA policy with its updates switched off is its own reference: same log-probs as a second copy."""
    import copy

    from dschat.utils.module.lora import convert_linear_layer_to_lora, lora_disabled
    from mpo_ext.dpo import BaseWeightsReference, ResidentReference, policy_log_probs

    policy = convert_linear_layer_to_lora(copy.deepcopy(model), "layers.", lora_dim=4)
    torch.manual_seed(2)
    for name, param in policy.named_parameters():
        if "lora_left_weight" in name:
            param.normal_(std=0.5)  # a trained-looking adapter, so policy and reference really differ
    policy.train()
    batch = DataCollatorReward(tiny_tokenizer.pad_token_id, MAX_LEN, padding="longest")(pairs)
    base = BaseWeightsReference(policy, "auto").log_probs(batch, "train")
    separate = ResidentReference(model, "auto").log_probs(batch, "train")
    torch.testing.assert_close(base, separate, **TOL)
    assert policy.training  # the policy's own mode is restored
    policy.eval()
    adapted = policy_log_probs(policy, batch, "auto")
    assert not torch.allclose(adapted, base, **TOL)  # the adapters are active again afterwards
    for layer in policy.modules():
        if hasattr(layer, "fuse_lora_weight"):
            layer.fuse_lora_weight()
    with pytest.raises(RuntimeError, match="fused"), lora_disabled(policy):
        pass
