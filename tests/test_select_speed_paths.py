"""The fast paths of step 2.5: shared-prefill sampling equals plain `generate`, batched reward layouts equal
the one-pair layout, and a real N=4 selection (tiny Llama, its reward model, 1 rank in-process) pairs the
best with the worst sample."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dschat.rlhf.generation import Generator, shared_prefill_generate
from dschat.utils.args import SamplingSettings
from dschat.utils.inference import RewardScorer, reward_layout, reward_layouts
from mpo_ext.selection import ShardWorker, best_worst_indices, pair_from_samples


def _random_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def _left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(2, 64, (3, 9))
    mask = torch.ones_like(ids)
    for row, pad in ((0, 4), (1, 1)):  # rows of different lengths, left-padded with eos
        ids[row, :pad] = 1
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("do_sample", [False, True])
def test_shared_prefill_equals_generate_on_repeated_prompts(do_sample):
    model = _random_llama()
    ids, mask = _left_padded_prompts()
    config = GenerationConfig(max_new_tokens=10, do_sample=do_sample, top_k=0, pad_token_id=1, eos_token_id=1)
    torch.manual_seed(7)
    plain = model.generate(input_ids=ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                           generation_config=config)
    torch.manual_seed(7)
    shared = shared_prefill_generate(model.generate, model, ids, mask, 3, generation_config=config)
    assert shared.shape == plain.shape == (9, 19)
    assert torch.equal(shared, plain)
    if do_sample:  # the samples of one prompt really differ (the cache expansion did not tie them)
        assert not torch.equal(shared[0], shared[1])


def test_generator_num_samples_rows_are_grouped_by_prompt():
    model = _random_llama()
    ids, mask = _left_padded_prompts()

    class Tok:
        pad_token_id, eos_token_id = 1, 1

    generator = Generator(model, Tok(), max_new_tokens=6)
    grouped = generator.generate(ids, mask, num_samples=2)
    one_each = generator.generate(ids, mask)
    assert grouped.shape[0] == 6
    for i in range(3):  # greedy: both samples of prompt i equal the single answer of prompt i
        width = min(grouped.shape[1], one_each.shape[1])
        assert torch.equal(grouped[2 * i, :width], one_each[i, :width])
        assert torch.equal(grouped[2 * i + 1], grouped[2 * i])


def test_best_worst_indices_and_pair():
    assert best_worst_indices([0.5, 2.0, -1.0, 2.0]) == (1, 2)
    assert best_worst_indices([1.0, 1.0, 1.0]) == (0, 2)  # all tied: still two different samples
    assert best_worst_indices([3.0, 1.0]) == (0, 1)
    pair, rewards = pair_from_samples(["a", "b", "c", "d"], [0.5, -2.0, 4.0, 1.0])
    assert pair == ["b", "c"] and rewards == [-2.0, 4.0]  # sample order kept
    assert pair_from_samples(["x", "y"], [1.0, 3.0]) == (["x", "y"], [1.0, 3.0])  # N=2: both, as before


def test_reward_layouts_batch_equals_one_pair_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = ["Human: hi there\n\nAssistant:", "Human: tell me a story about a dog\n\nAssistant:"] * 2
    answers = [" hello", " once upon a time there was a dog", " ok", " " + "word " * 40]
    for end in (tok.eos_token, "<|endoftext|>"):
        for max_len in (12, 128):
            batched = reward_layouts(tok, prompts, answers, end, max_len)
            assert batched == [reward_layout(tok, p, a, end, max_len) for p, a in zip(prompts, answers)]
            assert all(len(h) + len(t) <= max_len for h, t in batched)


def test_four_samples_pair_best_with_worst(tinystories_dir, tmp_path):
    """A real selection batch: tinystories samples 4 answers per prompt, a reward model built from it
    scores them, and each record pairs the highest-scored with the lowest-scored sample."""
    from transformers import AutoModel, AutoModelForCausalLM

    from dschat.utils.model.reward_model import RewardModel
    from dschat.utils.utils import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(str(tinystories_dir))
    reward = RewardModel(AutoModel.from_pretrained(str(tinystories_dir)), tokenizer).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(reward.v_head.weight, std=0.5)
    actor = AutoModelForCausalLM.from_pretrained(str(tinystories_dir)).eval()
    items = [{"prompt": f"Once upon a time there was a {w}.", "index": i}
             for i, w in enumerate(["cat", "little girl", "big red ball", "dog", "tree"])]
    args = Namespace(seed=3, per_device_generation_batch_size=2, per_device_eval_batch_size=6, num_samples=4)
    generator = Generator(actor, tokenizer, max_new_tokens=10,
                          sampling=SamplingSettings(do_sample=True, temperature=1.0, top_k=0))
    scorer = RewardScorer(reward, tokenizer, tokenizer.eos_token, max_seq_len=64,
                          batch_size=args.per_device_eval_batch_size, share_prompts=True)
    worker = ShardWorker(args, items, tokenizer, scorer, generator)
    records = [r for batch in worker.batches(range(len(items))) for r in worker.run_batch(batch)]
    assert sorted(r["index"] for r in records) == list(range(len(items)))
    for record in records:
        samples = record["sample_rewards"]
        assert len(samples) == 4 and len(record["answer_tokens"]) == 4
        low, high = sorted(record["rewards"])
        assert high >= max(samples) - 1e-6 and low <= min(samples) + 1e-6
        assert high == pytest.approx(max(samples)) and low == pytest.approx(min(samples))
        # the stored answers really carry those scores (scored again, alone, through the same scorer)
        again = scorer.score([record["prompt"]] * 2, record["responses"])
        assert again == pytest.approx(record["rewards"], abs=1e-4)
    assert len({s for r in records for s in r["sample_rewards"]}) > len(records) * 2  # samples differ


def test_shared_prompt_scoring_equals_one_pass(tinystories_dir, tiny_tokenizer):
    """Reading each prompt once (KV cache selected per answer) gives the scores of the plain padded pass,
    eos endings (pad == eos, read before it) and empty-ish answers included."""
    from transformers import AutoModel

    from dschat.utils.inference import score_layouts
    from dschat.utils.model.reward_model import RewardModel

    tok = tiny_tokenizer
    reward = RewardModel(AutoModel.from_pretrained(str(tinystories_dir)), tok).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(reward.v_head.weight, std=0.5)
    prompts = ["Once upon a time there was a cat.", "The dog ran"] * 3 + ["Lily saw a big red ball and"]
    answers = [" It was happy.", " to the park", " It slept all day long in the sun.", " fast", " The end",
               ".", " She played."]
    layouts = reward_layouts(tok, prompts, answers, tok.eos_token, 64)
    plain = score_layouts(reward, layouts, reward.PAD_ID, torch.device("cpu"))
    shared = score_layouts(reward, layouts, reward.PAD_ID, torch.device("cpu"), share_prompts=True)
    assert shared == pytest.approx(plain, abs=1e-4)
    assert len(set(round(s, 4) for s in plain)) > 3  # a real spread of scores, not a constant
