"""Step 3b (DPO): loss, metrics and masks against hand-computed numbers; a precomputed reference table
equals a resident reference; real runs of step3b_dpo/main.py (2 ranks under the deepspeed launcher,
and a 1-rank run resumed through the shared Trainer with its stored reference table)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from dschat.utils.errors import UserError
from mpo_ext.dpo import (
    REFERENCE_FILE,
    IndexedCollator,
    PrecomputedReference,
    ResidentReference,
    check_pair_files,
    compute_reference_table,
    dpo_loss,
    dpo_metrics,
    response_mask,
    sequence_log_prob_sums,
    split_pairs,
)

REPO = Path(__file__).resolve().parents[1]
DPO_MAIN = REPO / "step3b_dpo" / "main.py"
QUIET = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------------------------- pure maths


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; -log sigmoid(0.5) = softplus(-0.5)
    torch.testing.assert_close(losses, torch.tensor([_softplus(-0.5)]))
    torch.testing.assert_close(chosen, torch.tensor([0.25]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25]))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor([0.9 * _softplus(-0.5) + 0.1 * _softplus(0.5)]))
    # equal policy and reference: loss log 2, zero rewards
    zero, c0, r0 = dpo_loss(pc, pr, pc, pr, beta=0.1)
    torch.testing.assert_close(zero, torch.tensor([math.log(2.0)]))
    assert c0.item() == 0.0 and r0.item() == 0.0
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)


def test_dpo_loss_gradient_flows_only_through_the_policy():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, chosen, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=1.0)
    losses.sum().backward()
    # d/dpc softplus(-(pc - pr)) = -sigmoid(-(h)), h = 1
    assert math.isclose(pc.grad.item(), -1.0 / (1.0 + math.e), rel_tol=1e-6)
    assert math.isclose(pr.grad.item(), 1.0 / (1.0 + math.e), rel_tol=1e-6)
    assert not chosen.requires_grad


def test_dpo_metrics_by_hand():
    losses = torch.tensor([0.2, 0.4, 0.6], requires_grad=True)
    chosen = torch.tensor([1.0, 0.0, -1.0])
    rejected = torch.tensor([0.5, 0.0, 1.0])  # win, tie (not counted), loss
    metrics = dpo_metrics(losses, chosen, rejected, torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-6.0, -6.0, -6.0]))
    expected = {"loss": 0.4, "rewards/chosen": 0.0, "rewards/rejected": 0.5, "rewards/margins": -0.5,
                "rewards/accuracies": 1 / 3, "logps/chosen": -4.0, "logps/rejected": -6.0}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert math.isclose(metrics[key].item(), value, rel_tol=1e-6, abs_tol=1e-7), key
    assert metrics["loss"].requires_grad


def test_response_mask_and_sequence_log_prob_sums_by_hand():
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    mask = response_mask(attention, torch.tensor([2, 3]))
    assert mask.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    # vocabulary of 2: every position predicts token 1 with probability sigmoid(z_t)
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    logits = torch.stack([torch.zeros_like(z), z], dim=-1)  # [1, 5, 2]
    ids = torch.tensor([[0, 1, 1, 0, 1]])
    logps = sequence_log_prob_sums(logits, ids, torch.tensor([[0, 0, 1, 1, 0]]))
    # token 2 (=1) predicted at position 1: log sigmoid(1); token 3 (=0) at position 2: log sigmoid(-2)
    expected = -_softplus(-1.0) - _softplus(2.0)
    torch.testing.assert_close(logps, torch.tensor([expected]))
    assert split_pairs(torch.arange(6))[1].tolist() == [3, 4, 5]


def test_empty_pair_file_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "easy.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no preference pairs.*--threshold"):
        check_pair_files([str(tmp_path / "easy.jsonl")])


def test_dpo_flags_keep_upstream_defaults():
    from mpo_ext.dpo import parse_args

    args = parse_args(["--output_dir", "out", "--model_name_or_path", "m"])
    assert (args.beta, args.label_smoothing, args.learning_rate, args.tensorboard_path) == (
        0.1, 0.0, 1e-3, "step3b_tensorboard")
    assert args.reference_model_name_or_path is None and not args.precompute_ref_log_probs
    assert not args.offload_reference_model and args.data_path == ["Dahoas/rm-static"]
    assert not args.use_logits_to_keep  # opt-in: the default keeps full logits (bit-for-bit upstream's sums)
    with pytest.raises(UserError, match="--label_smoothing"):
        parse_args(["--output_dir", "out", "--model_name_or_path", "m", "--label_smoothing", "0.5"])


@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_evaluation_scorers_run_in_the_stage_precision(tinystories_dir, tiny_tokenizer, tmp_path, dtype, expected):
    """Both reward models of DPO's held-out evaluations load in the stage's precision (a bf16 run scores like
    PPO's reward engine and holds no fp32 copies); one not given is None."""
    from conftest import save_random_critic

    from mpo_ext.dpo import evaluation_scorers, parse_args

    rm = save_random_critic(tinystories_dir, tiny_tokenizer, tmp_path / "rm", seed=1)
    heldout = save_random_critic(tinystories_dir, tiny_tokenizer, tmp_path / "rm_heldout", seed=2)
    flags = ["--model_name_or_path", str(tinystories_dir), "--reward_model_name_or_path", str(rm),
             "--output_dir", str(tmp_path / "out"), *(["--dtype", dtype] if dtype else [])]
    scorer, none = evaluation_scorers(parse_args(flags), torch.device("cpu"))
    assert none is None and next(scorer.model.parameters()).dtype == expected
    scorers = evaluation_scorers(parse_args([*flags, "--heldout_reward_model_name_or_path", str(heldout)]),
                                 torch.device("cpu"))
    assert [next(s.model.parameters()).dtype for s in scorers] == [expected, expected]


# --------------------------------------------------------------------------------------------- reference


def _pair_items(tokenizer, n: int, seed: int = 0) -> list[tuple]:
    from mpo_ext import synthetic

    rng = random.Random(seed)
    prompts = synthetic.all_prompts("train")
    items = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        texts = [prompt + synthetic.best_response(prompt) + tokenizer.eos_token,
                 prompt + synthetic.sample_response(prompt, 0.0, rng) + tokenizer.eos_token]
        chosen, rejected = (torch.tensor(tokenizer(t)["input_ids"]) for t in texts)
        plen = len(tokenizer(prompt)["input_ids"])
        items.append((chosen, torch.ones_like(chosen), rejected, torch.ones_like(rejected), torch.tensor(plen)))
    return items


def test_precomputed_reference_equals_resident(tinystories_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from dschat.utils.data.data_utils import DataCollatorReward

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(str(tinystories_dir)).eval()
    policy = AutoModelForCausalLM.from_pretrained(str(tinystories_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    items = _pair_items(tiny_tokenizer, 7)
    collator = DataCollatorReward(pad_token_id=tiny_tokenizer.pad_token_id, max_seq_len=96)
    table = compute_reference_table(reference, items, collator, batch_size=3, device=torch.device("cpu"),
                                    rank=0, world_size=1)
    assert table.shape == (7, 2)
    batch = IndexedCollator(collator)([(i, items[i]) for i in (5, 1, 6, 2)])  # another batch composition
    resident = ResidentReference(reference).log_probs(batch, "train")
    precomputed = PrecomputedReference({"train": table}).log_probs(batch, "train")
    torch.testing.assert_close(precomputed, resident, atol=1e-4, rtol=1e-5)
    from mpo_ext.dpo import policy_log_probs

    logps = policy_log_probs(policy, batch)
    pc, pr = split_pairs(logps)
    loss_resident = dpo_loss(pc, pr, *split_pairs(resident), beta=0.1)[0].mean()
    loss_pre = dpo_loss(pc, pr, *split_pairs(precomputed), beta=0.1)[0].mean()
    torch.testing.assert_close(loss_pre, loss_resident, atol=1e-6, rtol=1e-5)
    assert abs(loss_resident.item() - math.log(2.0)) > 1e-4  # the policy really differs from the reference


def test_logits_to_keep_skips_the_shared_prompt_and_keeps_the_log_probs(tinystories_dir, tiny_tokenizer):
    """--use_logits_to_keep: the head runs from the earliest answer's previous position on (fewer logits), and
    the answer log-probs and their gradients are those of the full forward (up to summation order)."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.data.data_utils import DataCollatorReward
    from mpo_ext.dpo import answer_logits_start, check_logits_to_keep, policy_log_probs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tinystories_dir))
    items = _pair_items(tiny_tokenizer, 4)
    batch = IndexedCollator(DataCollatorReward(pad_token_id=tiny_tokenizer.pad_token_id, max_seq_len=96))(
        list(enumerate(items)))
    start = answer_logits_start(batch["prompt_lengths"])
    assert start == int(batch["prompt_lengths"].min()) - 1 > 0
    widths: list[int] = []
    hook = model.register_forward_hook(lambda _m, _a, out: widths.append(out.logits.shape[1]))
    results = []
    for keep in (False, True):
        model.zero_grad()
        logps = policy_log_probs(model, batch, "auto", answer_logits_only=keep)
        logps.sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    width = batch["input_ids"].shape[1]
    assert widths == [width, width - start]
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-5)
    for kept, full in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-4)
    assert answer_logits_start(torch.tensor([1, 9])) == 0  # a one-token prompt: every position is needed

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return input_ids

    with pytest.raises(UserError, match="--use_logits_to_keep: NoKeep.forward takes no logits_to_keep"):
        check_logits_to_keep(NoKeep())
    check_logits_to_keep(model)


# --------------------------------------------------------------------------------------------- real runs


def _dpo_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data / "easy.jsonl"), "--model_name_or_path", str(model), "--max_seq_len", "64",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-3",
            "--beta", "0.1", "--num_warmup_steps", "0", "--lr_scheduler_type", "constant", "--log_interval", "1",
            "--data_output_path", str(data / "cache"), "--output_dir", str(out), *extra]


def _eval_lines(stdout: str) -> list[dict[str, float]]:
    rows = []
    for line in stdout.splitlines():
        if line.startswith("[eval] step"):
            rows.append({k: float(v) for k, v in re.findall(r"([\w/]+): (-?[\d.e+-]+)", line)})
    return rows


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_rank_dpo_raises_reward_accuracy(easy_pairs, tinystories_dir, run_ds, tmp_path):
    out = tmp_path / "dpo"
    proc = run_ds(DPO_MAIN, _dpo_args(easy_pairs, tinystories_dir, out, "--num_train_epochs", "1",
                                      "--precompute_ref_log_probs"), num_ranks=2, env=QUIET)
    _check(proc)
    assert "Precomputing reference log-probs" in proc.stdout
    evals = _eval_lines(proc.stdout)
    assert evals[0]["rewards/accuracies"] == 0.0 and abs(evals[0]["loss"] - math.log(2)) < 1e-3  # policy == ref
    assert evals[-1]["rewards/accuracies"] >= 0.75 and evals[-1]["rewards/margins"] > 0
    assert evals[-1]["loss"] < evals[0]["loss"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(train[-1])
    assert train[-1]["rewards/accuracies"] > train[0]["rewards/accuracies"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    table = torch.load(out / REFERENCE_FILE, weights_only=True)
    assert table["train"].shape == (72, 2) and table["eval"].shape == (8, 2)  # 9:1 of 80 pairs, all filled
    assert (table["train"] < 0).all() and (table["eval"] < 0).all()


@pytest.mark.slow
def test_resume_reuses_the_stored_reference_table(easy_pairs, tinystories_dir, run_ds, tmp_path):
    out = tmp_path / "dpo"
    first = run_ds(DPO_MAIN, _dpo_args(easy_pairs, tinystories_dir, out, "--max_steps", "3", "--save_steps", "3",
                                       "--precompute_ref_log_probs"), num_ranks=0, env=QUIET)
    _check(first)
    table = out / REFERENCE_FILE
    stamp = (table.stat().st_mtime_ns, table.read_bytes())
    assert (out / "checkpoints" / "step-3").is_dir()
    resumed = run_ds(DPO_MAIN, _dpo_args(easy_pairs, tinystories_dir, out, "--max_steps", "6", "--save_steps", "3",
                                         "--precompute_ref_log_probs", "--resume"), num_ranks=0, env=QUIET)
    _check(resumed)
    assert "Loaded precomputed reference log-probs" in resumed.stdout
    assert "Precomputing" not in resumed.stdout and "Resumed from" in resumed.stdout
    assert (table.stat().st_mtime_ns, table.read_bytes()) == stamp
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_lora_dpo_uses_its_base_weights_as_reference(easy_pairs, tinystories_dir, run_ds, tmp_path):
    """LoRA-only DPO (ZeRO-3, one rank) keeps no second model: its reference is the adapter-free policy.
    Gradient checkpointing goes through the stages' one builder (transformers 5's name, no deprecation)."""
    out = tmp_path / "dpo-lora"
    proc = run_ds(DPO_MAIN, _dpo_args(easy_pairs, tinystories_dir, out, "--max_steps", "6", "--zero_stage", "3",
                                      "--lora_dim", "4", "--lora_module_name", "layers.", "--only_optimize_lora",
                                      "--lora_learning_rate", "2e-2", "--eval_interval", "6",
                                      "--gradient_checkpointing"),
                  num_ranks=0, env=QUIET)
    _check(proc)
    assert "gradient_checkpointing_enable` is deprecated" not in proc.stdout + proc.stderr
    assert "no second model" in proc.stdout and "Precomputing" not in proc.stdout
    evals = _eval_lines(proc.stdout)
    assert abs(evals[0]["loss"] - math.log(2)) < 1e-4 and evals[0]["rewards/margins"] == 0.0  # policy == ref
    assert evals[-1]["rewards/margins"] > 0 and evals[-1]["loss"] < evals[0]["loss"]
    from safetensors.torch import load_file

    assert not [key for key in load_file(out / "model.safetensors") if "lora" in key]
