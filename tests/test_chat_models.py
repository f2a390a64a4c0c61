"""Chat models whose eos is also their pad and closes every turn inside a prompt (issue 21): padding is a
position, never a token.

1. No mask depends on token identity. A "twin" of the tiny test Llama gives `<unk>` exactly the embedding
   (and, tied, the output row) of `</s>`, the eos = pad token; a prompt holding `</s>` in its middle must
   then give the same log-probs, values and rewards as the same prompt holding `<unk>` there, which the
   model attends to like any token. Each check also shows the comparison is sharp: hiding the `</s>` (what
   a mask built as `ids != pad` did) changes the numbers. Covered: PPO experience (actor and reference
   log-probs, critic values, reward), reward-model training scores, selection / eval scoring, DPO
   log-probs and the held-out evaluator.
2. Template invariance: the embedded task rendered through a ChatML-style template (system turn, pad = eos =
   `<|im_end|>`) trains a reward model (real step 2, in process) as well as the plain-text rendering, and its
   reward index lands on each answer's end. Before the fix it read the system turn's end: accuracy 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_random_critic
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat.utils.data.collators import DataCollatorReward
from dschat.utils.dist import init_distributed
from dschat.utils.tokenizer import load_hf_tokenizer
from mpo_ext import synthetic

# --------------------------------------------------------------------------------------------- the twin model


@pytest.fixture(scope="module")
def twin(tiny_llama_dir, tiny_tokenizer, tmp_path_factory) -> dict:
    """The tiny Llama with `<unk>`'s embedding set to `</s>`'s (so the two tokens are indistinguishable to the
    model), a step-2 style critic on it, and a prompt text holding `</s>` (and its `<unk>` twin)."""
    root = tmp_path_factory.mktemp("twin")
    model_dir = root / "actor"
    shutil.copytree(tiny_llama_dir, model_dir)
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the layout of every ChatML model
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[tok.unk_token_id] = embed[tok.eos_token_id]
    assert model.config.tie_word_embeddings
    model.save_pretrained(str(model_dir))
    save_random_critic(model_dir, tok, root / "critic")
    prompt = "\n\nHuman: Hi</s> there, tell me a story.\n\nAssistant:"
    twin_prompt = prompt.replace("</s>", "<unk>")
    ids, twin_ids = tok(prompt).input_ids, tok(twin_prompt).input_ids
    inside = ids.index(tok.eos_token_id)
    assert twin_ids == ids[:inside] + [tok.unk_token_id] + ids[inside + 1:]
    return {"root": root, "model_dir": model_dir, "critic": root / "critic", "tok": tok, "prompt": prompt,
            "twin_prompt": twin_prompt, "ids": ids, "twin_ids": twin_ids, "inside": inside}


def _rows_with(ids: list[int], answers: list[list[int]], eos: int) -> list[torch.Tensor]:
    return [torch.tensor(ids + a + [eos]) for a in answers]


def _pair_batch(twin: dict, key: str) -> dict[str, torch.Tensor]:
    """A phase-2 batch (two pairs) whose prompts are `twin[key]`; answers end with eos as in step 2."""
    tok = twin["tok"]
    answers = [tok(" The cat sat.", add_special_tokens=False).input_ids,
               tok(" A dog ran far away.", add_special_tokens=False).input_ids,
               tok(" No.", add_special_tokens=False).input_ids,
               tok(" The sun was hot and big.", add_special_tokens=False).input_ids]
    rows = _rows_with(twin[key], answers, tok.eos_token_id)
    items = [(rows[0], torch.ones_like(rows[0]), rows[2], torch.ones_like(rows[2]), torch.tensor(len(twin[key]))),
             (rows[1], torch.ones_like(rows[1]), rows[3], torch.ones_like(rows[3]), torch.tensor(len(twin[key])))]
    return DataCollatorReward(pad_token_id=tok.pad_token_id, max_seq_len=64)(items)


def _hide_the_prompt_eos(batch_mask: torch.Tensor, twin: dict) -> torch.Tensor:
    """The mask a token-identity rule gave: the eos inside the prompt hidden."""
    hidden = batch_mask.clone()
    hidden[..., twin["inside"]] = 0
    return hidden


@torch.no_grad()
def test_reward_model_scores_do_not_read_an_eos_inside_the_prompt_as_padding(twin):
    from dschat.utils.model.model_utils import create_critic_model

    critic = create_critic_model(str(twin["critic"]), twin["tok"], None, 0, rlhf_training=True).eval()
    batch, other = _pair_batch(twin, "ids"), _pair_batch(twin, "twin_ids")
    out, want = critic(**batch), critic(**other)
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        torch.testing.assert_close(out[key], want[key], atol=1e-5, rtol=1e-5)
    # the scores are read at each answer's last token (before its eos), never inside the prompt
    lengths = batch["attention_mask"].sum(dim=1)
    assert critic.end_index(batch["input_ids"], batch["attention_mask"]).tolist() == (lengths - 2).tolist()
    # sharp: reading at the first pad (the prompt's eos), as the token rule did, scores every row alike
    first_pad = (batch["input_ids"] == twin["tok"].pad_token_id).long().argmax(dim=1) - 1
    values = critic.token_values(batch["input_ids"], batch["attention_mask"])
    at_prompt = values.gather(1, first_pad.unsqueeze(1)).squeeze(1)
    assert torch.allclose(at_prompt, at_prompt[0]) and not torch.allclose(out["chosen_mean_scores"], at_prompt[:2])


@torch.no_grad()
def test_dpo_log_probs_attend_to_an_eos_inside_the_prompt(twin):
    from mpo_ext.dpo import policy_log_probs

    model = AutoModelForCausalLM.from_pretrained(str(twin["model_dir"]), dtype=torch.float32).eval()
    batch, other = _pair_batch(twin, "ids"), _pair_batch(twin, "twin_ids")
    for pad_mask in ("auto", "always"):
        torch.testing.assert_close(policy_log_probs(model, batch, pad_mask), policy_log_probs(model, other, pad_mask),
                                   atol=1e-5, rtol=1e-5)
    hidden = {**batch, "attention_mask": _hide_the_prompt_eos(batch["attention_mask"], twin)}
    assert not torch.allclose(policy_log_probs(model, hidden, "always"), policy_log_probs(model, other, "always"),
                              atol=1e-3)


@torch.no_grad()
def test_selection_and_eval_scoring_attend_to_an_eos_inside_the_prompt(twin):
    from dschat.utils.inference import RewardScorer

    scorer = RewardScorer.from_path(str(twin["critic"]), torch.device("cpu"), batch_size=4)
    answers = [" The cat sat.", " A dog ran far away.", " No."]
    got = scorer.score([twin["prompt"]] * 3, answers)
    want = scorer.score([twin["twin_prompt"]] * 3, answers)
    assert got == pytest.approx(want, abs=1e-5)
    shared = RewardScorer(scorer.model, scorer.tokenizer, scorer.end_text, batch_size=4, share_prompts=True)
    assert shared.score([twin["prompt"]] * 3, answers) == pytest.approx(want, abs=1e-4)
    # sharp: with the prompt's eos hidden the scores move
    layouts = scorer.layouts([twin["prompt"]] * 3, answers)
    width = max(len(h) for h, _ in layouts)
    rows = [h + t + [scorer.pad_id] * (max(len(t) for _, t in layouts) - len(t)) for h, t in layouts]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * (len(h) + len(t)) + [0] * (len(r) - len(h) - len(t)) for (h, t), r in zip(layouts, rows)])
    mask[:, twin["inside"]] = 0
    hidden = scorer.model.end_scores(ids, mask, prompt_length=width)
    assert not torch.allclose(hidden, torch.tensor(want), atol=1e-3)


@torch.no_grad()
def test_held_out_evaluator_attends_to_an_eos_inside_the_prompt(twin):
    from dschat.rlhf.generation import Generator
    from dschat.rlhf.held_out import HeldOutEvaluator
    from dschat.utils.inference import RewardScorer, pad_with_mask

    tok = twin["tok"]
    model = AutoModelForCausalLM.from_pretrained(str(twin["model_dir"]), dtype=torch.float32).eval()
    scorer = RewardScorer.from_path(str(twin["critic"]), torch.device("cpu"))
    metrics = []
    for key in ("ids", "twin_ids"):
        ids, mask = pad_with_mask([twin[key], twin[key][3:]], len(twin[key]), tok.pad_token_id, left=True)
        evaluator = HeldOutEvaluator(ids, mask, tok, scorer=scorer)
        metrics.append(evaluator.evaluate(model, Generator(model, tok, max_new_tokens=6)))
    assert set(metrics[0]) >= {"eval/reward", "health/entropy", "eval/answer_length"}
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-5)


@pytest.fixture(scope="module")
def ppo_updater(twin):
    """A real step-3 engine set (actor, reference, critic, reward) on the twin model, built in this process."""
    from dschat.steps import ppo

    prompts = twin["root"] / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": twin["prompt"]}) + "\n")
    init_distributed()
    settings = ppo.parse_args([
        "--actor_model_name_or_path", str(twin["model_dir"]), "--critic_model_name_or_path", str(twin["critic"]),
        "--data_path", str(prompts), "--data_output_path", str(twin["root"] / "cache"),
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
        "--max_prompt_seq_len", "32", "--max_answer_seq_len", "6", "--num_padding_at_beginning", "0",
        "--seed", "1", "--output_dir", str(twin["root"] / "ppo"),
    ])
    return ppo.build(settings).updater


def test_ppo_experience_attends_to_an_eos_inside_the_prompt(twin, ppo_updater):
    from dschat.rlhf.experience import Experience

    tok = twin["tok"]
    width = len(twin["ids"]) + 2

    def experience(key: str) -> Experience:
        row = [tok.pad_token_id] * (width - len(twin[key])) + twin[key]
        ids = torch.tensor([row, row])
        mask = torch.tensor([[0] * (width - len(twin[key])) + [1] * len(twin[key])] * 2)
        return ppo_updater.generate_experience(ids, mask, step=0)

    exp, other = experience("ids"), experience("twin_ids")
    assert exp.sequences[:, width:].tolist() == other.sequences[:, width:].tolist()  # the same greedy answers
    assert exp["rewards"] is exp.sequence_rewards  # upstream's key
    for name in ("token_log_probs", "ref_token_log_probs", "values", "sequence_rewards", "kl", "entropy"):
        torch.testing.assert_close(getattr(exp, name), getattr(other, name), atol=1e-5, rtol=1e-5, msg=name)
    assert exp.attention_mask.tolist() == other.attention_mask.tolist()
    prompt_start = width - len(twin["ids"])
    assert exp.attention_mask[0, prompt_start + twin["inside"]] == 1  # the prompt's eos is attended to
    # sharp: the critic's values with that eos hidden differ (what `seq != pad_token_id` did)
    hidden = exp.attention_mask.clone()
    hidden[:, prompt_start + twin["inside"]] = 0
    with torch.no_grad():
        values = ppo_updater.critic_model.forward_value(exp.sequences, hidden, return_value_only=True)[:, :-1]
    assert not torch.allclose(values[:, width:], exp.values[:, width:], atol=1e-4)
    # the record slices as MiniDataset needs it
    half = exp[0:1]
    assert len(half) == 1 and half.generate_time.dim() == 0 and half.values.shape[0] == 1


# --------------------------------------------------------------------------------------------- template invariance

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = " Please help."


def chat_model_dir(model_dir: Path, out: Path) -> Path:
    """The embedded task's tiny Llama with a ChatML tokenizer: eos = pad = `<|im_end|>`, which closes every
    turn (the system turn included), as with SmolLM2-Instruct. Same weights (the vocabulary has room)."""
    out.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", out)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["system", "user", "assistant"])
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = CHATML
    tok.save_pretrained(str(out))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        assert name != "config.json" or config["vocab_size"] >= len(tok)
        config["eos_token_id"] = tok.eos_token_id
        config["pad_token_id"] = tok.pad_token_id if name == "generation_config.json" else None
        (out / name).write_text(json.dumps(config))
    return out


def _as_chat(record: dict) -> dict:
    question = record["prompt"][len("\n\nHuman:"):-len("\n\nAssistant:")]
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}]}


def _write(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def template_runs(assets, tmp_path_factory) -> dict:
    """Step 2 on the embedded task, plain text and ChatML-rendered, same model and pairs (in this process).

    The pairs are the task's where the preferred answer ends properly (the period) and the other was cut:
    the preference shows at the answer's end, so a reward model reading each answer's last token learns it
    within an epoch, and one reading anything else cannot."""
    root = tmp_path_factory.mktemp("template")
    model = chat_model_dir(Path(assets["model_dir"]), root / "chat-llama")
    synthetic.make_synthetic_dataset(root / "task", num_train=400, num_test=200, seed=7)
    runs = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (root / "task" / f"{split}.jsonl").read_text().splitlines()]
        pairs = [r for r in rows if r["label_correct"] and r["chosen"].endswith(".") and not r["rejected"].endswith(".")]
        _write(pairs, root / "plain" / f"{split}.jsonl")
        _write([_as_chat(r) for r in pairs], root / "chat" / f"{split}.jsonl")
    from dschat.steps import reward

    init_distributed()
    for kind in ("plain", "chat"):
        settings = reward.parse_args([
            "--data_path", str(root / kind), "--model_name_or_path", str(model), "--num_padding_at_beginning", "0",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--max_seq_len", "64",
            "--learning_rate", "3e-3", "--num_train_epochs", "1", "--num_warmup_steps", "0",
            "--data_output_path", str(root / "cache"), "--output_dir", str(root / f"rm-{kind}"),
        ])
        run = reward.build(settings)
        run.train()
        run.save_model()
        rows = [json.loads(line) for line in (root / f"rm-{kind}" / "metrics.jsonl").read_text().splitlines()]
        runs[kind] = {"evals": [r for r in rows if r["phase"] == "eval"], "settings": settings, "dir": root / f"rm-{kind}"}
    return runs


def test_chat_template_reward_model_learns_as_well_as_plain_text(template_runs):
    plain, chat = template_runs["plain"]["evals"][-1], template_runs["chat"]["evals"][-1]
    assert plain["accuracy"] > 0.8, template_runs["plain"]["evals"]  # the task is learnt at all
    assert abs(chat["accuracy"] - plain["accuracy"]) <= 0.02, (plain, chat)
    assert chat["rewards/margins"] > 0.5


@torch.no_grad()
def test_chat_template_reward_index_lands_on_each_answers_end(template_runs):
    from dschat.utils.data.prompt_datasets import create_prompt_dataset
    from dschat.utils.model.model_utils import create_critic_model

    run = template_runs["chat"]
    settings, tok = run["settings"], load_hf_tokenizer(str(run["dir"]))
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    _, held_out = create_prompt_dataset(0, settings.data_path, settings.data_split, settings.data_output_path, 2,
                                        settings.seed, tok, settings.max_seq_len, end_of_conversation_token=tok.eos_token)
    batch = DataCollatorReward(pad_token_id=tok.pad_token_id, max_seq_len=64)([held_out[i] for i in range(16)])
    model = create_critic_model(str(run["dir"]), tok, None, 0, rlhf_training=True).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    index = model.end_index(ids, mask)
    eos = tok.eos_token_id
    for row, at, prompt_length, real in zip(ids.tolist(), index.tolist(), batch["prompt_lengths"].tolist(),
                                           mask.sum(dim=1).tolist()):
        assert row[:prompt_length].count(eos) == 2  # the system and user turns end with the same token
        assert at == real - 2 and row[at + 1] == eos and at >= prompt_length  # the answer's last token
    chosen_ends = [tok.decode([ids[i, at]]) for i, at in enumerate(index[:16].tolist())]
    assert chosen_ends == ["."] * 16  # every preferred answer ends properly
