"""Step 3 (PPO) with real DeepSpeed engines on CPU: generation, full runs, resume, ZeRO-3, bad input.

Models: the tiny test Llama (tests/conftest.py) as actor and reference, and a step-2 style critic built
from it (RewardModel + random value head) saved with `save_reward_model`. Each launcher run checks
several behaviours at once to keep the file within a few minutes on two cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_random_critic

from dschat.utils.errors import run_main
from dschat.utils.progress_records import is_metric_record

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "training" / "step3_rlhf_finetuning" / "main.py"
QUESTIONS = ["Where did the cat go?", "What is the sky like?", "Tell me about a dog.", "Who is Lily?",
             "What did Tom eat?", "Why is the sun hot?", "Can you sing a song?", "How big is the tree?"]
HE_WARNING = "--enable_hybrid_engine:"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tinystories_dir, tiny_tokenizer) -> dict[str, Path]:
    """A step-2 style critic and a prompt file (local jsonl with prompt/chosen/rejected keys)."""
    root = tmp_path_factory.mktemp("step3")
    save_random_critic(tinystories_dir, tiny_tokenizer, root / "critic")
    prompts = root / "hard.jsonl"
    with open(prompts, "w", encoding="utf-8") as fh:
        for q in QUESTIONS:
            fh.write(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": " Yes.",
                                 "rejected": " No.", "gap": 0.1}) + "\n")
    return {"root": root, "critic": root / "critic", "prompts": prompts, "actor": tinystories_dir}


def base_args(assets: dict[str, Path], output_dir: Path, **overrides) -> list[str]:
    args = {
        "actor_model_name_or_path": assets["actor"], "critic_model_name_or_path": assets["critic"],
        "data_path": assets["prompts"], "data_output_path": assets["root"] / "data_cache",
        "per_device_generation_batch_size": 2, "per_device_training_batch_size": 2,
        "max_prompt_seq_len": 48, "max_answer_seq_len": 12, "num_padding_at_beginning": 0,
        "actor_learning_rate": 1e-3, "critic_learning_rate": 1e-3, "num_warmup_steps": 0, "seed": 1,
        "output_dir": output_dir,
    }
    args.update(overrides)
    out = []
    for key, value in args.items():
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


def read_metrics(path: Path) -> list[dict]:
    """The metric records (not the progress records the pipeline's heartbeat reads, nor the step-0 "data" record)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if is_metric_record(r)]


def load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].float() - b[k].float()).norm() ** 2 for k in a) ** 0.5)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


# --------------------------------------------------------------------------------------------- generation


def test_generator_left_padding_eos_and_fallback(tinystories_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from dschat.rlhf.generation import Generator, answer_lengths, hybrid_engine_unavailable_reason

    model = AutoModelForCausalLM.from_pretrained(str(tinystories_dir)).eval()
    texts = ["Once upon a time there was a little girl", "The dog"]
    rows = [tiny_tokenizer(t).input_ids for t in texts]
    width = max(map(len, rows)) + 3
    pad = tiny_tokenizer.pad_token_id
    ids = torch.full((2, width), pad)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    gen = Generator(model, tiny_tokenizer, max_new_tokens=40, enable_hybrid_engine=True)
    out = gen.generate(ids, mask)
    assert gen.path == "hf_generate"
    assert "CPU" in hybrid_engine_unavailable_reason(model)
    assert gen.generation_config().use_cache
    assert set(gen.last_stats) >= {"generate_time", "tokens_per_second", "path"}
    lengths = answer_lengths(out, width, tiny_tokenizer.eos_token_id)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=40, do_sample=False, pad_token_id=pad)
        n = int(lengths[i])
        # left padding does not change the greedy answer
        assert out[i, width:width + n].tolist() == alone[0, len(row):len(row) + n].tolist()
        # after the answer's end everything is pad (pad == eos here)
        assert (out[i, width + n:] == pad).all()
    assert gen.last_stats["answer_tokens"] == int(lengths.sum())


# --------------------------------------------------------------------------------------------- runs


def test_one_rank_zero0_ema_hybrid_fallback_and_exact_resume(assets, run_ds, tmp_path):
    """python main.py, ZeRO 0: KL is 0 at step 1, HE falls back with one warning, outputs reload, EMA is a
    real average, and a run resumed from the step-2 state reproduces step 3 exactly."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import create_critic_model
    from dschat.utils.utils import load_hf_tokenizer

    out = tmp_path / "run"
    argv = base_args(assets, out, enable_ema=True, ema_beta=0.5, enable_hybrid_engine=True, max_steps=3,
                     save_steps=1, save_total_limit=3, print_answers=True, print_answers_interval=2,
                     actor_lora_module_name="layers.")
    proc = run_ds(MAIN, argv, num_ranks=0, timeout=600)
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    assert log.count(HE_WARNING) == 1, log[-3000:]
    assert "--- answer --> step=0" in log and "Average reward score:" in log

    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    required = {"reward/mean", "reward/std", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                "policy/clipfrac", "val/clipfrac", "policy/approxkl", "answer_length", "time/generation",
                "time/training", "tokens_per_second/generation"}
    assert required <= set(metrics[0])
    assert abs(metrics[0]["objective/kl"]) < 1e-6, "actor and reference start from the same weights"
    assert metrics[-1]["objective/kl"] > 0
    assert metrics[0]["tokens_per_second/generation"] > 0

    info = json.loads((out / "run_info.json").read_text())
    assert info["complete"] and info["global_step"] == 3 and info["seed"] == 1
    assert info["reference_model_name_or_path"] == info["actor_model_name_or_path"]
    assert info["ppo"]["init_kl_coef"] == 0.1 and info["ppo"]["lam"] == 0.95
    assert info["generation_path"] == "hf_generate"

    card = (out / "actor" / "README.md").read_text()  # model card: stage, base model, the run's last numbers
    assert "step3 PPO actor" in card and f"`{Path(assets['actor']).name}`" in card  # outside the run: by name
    assert f"| reward/mean | {metrics[-1]['reward/mean']} |" in card and "| init_kl_coef | 0.1 |" in card
    assert "step3 PPO critic" in (out / "critic" / "README.md").read_text()
    tok = load_hf_tokenizer(str(out / "actor"))
    AutoModelForCausalLM.from_pretrained(str(out / "actor"))
    AutoModelForCausalLM.from_pretrained(str(out / "actor_ema"))
    create_critic_model(str(out / "critic"), tok, None, 0, rlhf_training=True)

    init, final, ema = (load_safetensors(assets["actor"]), load_safetensors(out / "actor"),
                        load_safetensors(out / "actor_ema"))
    assert distance(init, final) > 0
    assert 0 < distance(ema, final) < distance(init, final)
    assert distance(ema, init) > 0

    # resume: drop the newest state and the outputs, continue from step 2
    states = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert states == ["step-1", "step-2", "step-3"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for sub in ("checkpoints/step-3", "actor", "actor_ema", "critic"):
        shutil.rmtree(resumed / sub)
    argv_resume = base_args(assets, resumed, enable_ema=True, ema_beta=0.5, max_steps=3, save_steps=1,
                            resume=True, actor_lora_module_name="layers.")
    proc = run_ds(MAIN, argv_resume, num_ranks=0, timeout=600)
    assert_ok(proc)
    assert "Resumed from" in proc.stdout
    again = read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in again] == [1, 2, 3]
    for key in ("reward/mean", "objective/kl", "loss/policy", "loss/value", "answer_length"):
        assert again[2][key] == pytest.approx(metrics[2][key], rel=1e-5, abs=1e-6), key
    assert distance(load_safetensors(resumed / "actor"), final) < 1e-5
    assert distance(load_safetensors(resumed / "actor_ema"), ema) < 1e-5


def test_two_ranks_zero3_ema_sampling_resume_and_deprecated_flags(assets, run_ds, tmp_path):
    """deepspeed launcher, 2 ranks, actor and critic ZeRO-3, sampled rollouts: the EMA really moves
    (upstream's ZeRO-3 EMA silently stayed at the initial weights), and a resumed run (ZeRO-3
    partitions, EMA partitions, sampling RNG) reproduces the uninterrupted one."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    common = dict(actor_zero_stage=3, critic_zero_stage=3, enable_ema=True, ema_beta=0.5, do_sample=True,
                  top_k=20, max_steps=2, save_steps=1)
    argv = base_args(assets, out, enable_hybrid_engine=True, **common)
    # old batch-flag names still work (1-sample PPO micro-batches: two updates per step)
    argv += ["--per_device_mini_train_batch_size", "1", "--generation_batch_numbers", "1"]
    proc = run_ds(MAIN, argv, num_ranks=2, timeout=900)
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    assert "--per_device_mini_train_batch_size is deprecated" in log
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert abs(metrics[0]["objective/kl"]) < 1e-6
    init, final, ema = (load_safetensors(assets["actor"]), load_safetensors(out / "actor"),
                        load_safetensors(out / "actor_ema"))
    assert set(final) == set(init) == set(ema)
    assert distance(init, final) > 0
    assert 0 < distance(ema, final) < distance(init, final)
    AutoModelForCausalLM.from_pretrained(str(out / "actor"))
    assert (out / "critic" / "pytorch_model.bin").exists()

    resumed = tmp_path / "z3_resumed"
    shutil.copytree(out, resumed)
    for sub in ("checkpoints/step-2", "actor", "actor_ema", "critic"):
        shutil.rmtree(resumed / sub)
    argv = base_args(assets, resumed, resume=True, per_device_training_batch_size=1, **common)
    proc = run_ds(MAIN, argv, num_ranks=2, timeout=900)
    assert_ok(proc)
    again = read_metrics(resumed / "metrics.jsonl")
    for key in ("reward/mean", "objective/kl", "loss/policy", "answer_length"):
        assert again[1][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-6), key
    assert distance(load_safetensors(resumed / "actor"), final) < 1e-5
    assert distance(load_safetensors(resumed / "actor_ema"), ema) < 1e-5


def test_reward_rises_on_a_fixed_reward_model(assets, run_ds, tmp_path):
    """An easy task: one prompt, 4-token sampled answers, maximise a fixed (random) reward model. A wrong
    sign anywhere (advantages, ratio, reward placement) makes the mean reward fall or wander instead.

    The random-weight test Llama samples nearly uniformly (about 5 nats per token) and the reward of an
    answer is an unsmooth function of its last token (std about 4 over sampled answers, range about -10 to
    +15), so at the usual actor learning rate 1e-3 the policy drifts without finding the good tokens in 10
    steps (rise about 1). Actor learning rate 2e-2: seeds 1-3 rise by 5.3-6.9 (last steps about +8); with the
    advantage sign flipped the reward falls (seed 1: -3.1). The check asks for +3."""
    prompts = tmp_path / "one_prompt.jsonl"
    prompts.write_text(json.dumps({"prompt": "\n\nHuman: Tell me a story.\n\nAssistant:"}) + "\n")
    prompts.write_text(prompts.read_text() * 32)
    out = tmp_path / "rise"
    argv = base_args(assets, out, data_path=prompts, per_device_generation_batch_size=16,
                     per_device_training_batch_size=16, max_answer_seq_len=4, do_sample=True, num_train_epochs=10,
                     max_steps=10, init_kl_coef=0.0, whiten_advantages=True, actor_learning_rate=2e-2,
                     critic_learning_rate=1e-3, lr_scheduler_type="constant", clip_reward_value=100, ppo_epochs=4)
    proc = run_ds(MAIN, argv, num_ranks=0, timeout=600)
    assert_ok(proc)
    rewards = [m["reward/mean"] for m in read_metrics(out / "metrics.jsonl")]
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 3.0, rewards


def test_kl_and_reward_against_a_different_reference_match_a_direct_computation(assets, run_ds, tmp_path):
    """A reference that differs from the actor: step 1's KL (sum over answer tokens of log p_actor - log
    p_ref, before any update, the eos that ends the answer included) and reward equal the same quantities
    computed directly on the greedy answer.
    One prompt repeated, greedy rollouts, so every rollout of the step is the same sequence."""
    from transformers import AutoModelForCausalLM

    from dschat.utils.model.model_utils import create_critic_model
    from dschat.utils.utils import load_hf_tokenizer

    tok = load_hf_tokenizer(str(assets["actor"]))
    actor = AutoModelForCausalLM.from_pretrained(str(assets["actor"]), dtype=torch.float32).eval()
    reference_dir = tmp_path / "reference"
    reference = AutoModelForCausalLM.from_pretrained(str(assets["actor"]), dtype=torch.float32).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    reference.save_pretrained(str(reference_dir))
    tok.save_pretrained(str(reference_dir))

    prompt = "\n\nHuman: Tell me a story.\n\nAssistant:"
    prompts = tmp_path / "one_prompt.jsonl"
    prompts.write_text((json.dumps({"prompt": prompt}) + "\n") * 4)
    out = tmp_path / "kl"
    argv = base_args(assets, out, data_path=prompts, reference_model_name_or_path=reference_dir, max_steps=1,
                     max_answer_seq_len=8)
    assert_ok(run_ds(MAIN, argv, num_ranks=0, timeout=600))
    metrics = read_metrics(out / "metrics.jsonl")[0]

    prompt_ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        seq = actor.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = seq[0, prompt_ids.shape[1]:].tolist()
        if tok.eos_token_id in answer:  # the answer's tokens, then its eos (the actor's action too: in the KL)
            answer, ending = answer[:answer.index(tok.eos_token_id)], [tok.eos_token_id]
        else:
            ending = []
        ids = torch.tensor([prompt_ids[0].tolist() + answer + ending])
        targets = ids[0, prompt_ids.shape[1]:]

        def answer_log_probs(model):
            logits = model(ids).logits[0, prompt_ids.shape[1] - 1:-1].float()
            return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)

        kl = float((answer_log_probs(actor) - answer_log_probs(reference)).sum())
        reward_model = create_critic_model(str(assets["critic"]), tok, None, 0, rlhf_training=True).eval()
        reward = float(reward_model.token_values(ids, torch.ones_like(ids))[0, len(ids[0]) - 1 - len(ending)])
    assert len(answer) > 1
    assert abs(kl) > 1e-2  # the reference really differs
    assert metrics["objective/kl"] == pytest.approx(kl, abs=1e-3, rel=1e-3)
    assert metrics["reward/mean"] == pytest.approx(reward, abs=1e-3, rel=1e-3)
    assert metrics["answer_length"] == len(answer)


# --------------------------------------------------------------------------------------------- bad input


def _run_in_process(argv: list[str]):
    from dschat.steps import ppo

    def main():
        args = ppo.parse_args(argv)
        ppo.prepare(args)

    run_main(main)


@pytest.mark.parametrize("overrides, message", [
    ({"inference_tp_size": 2}, "--inference_tp_size 2: tensor-parallel generation needs --actor_zero_stage 3"),
    ({"actor_zero_stage": 2, "critic_zero_stage": 2, "enable_hybrid_engine": True, "offload": True},
     "without --actor_lora_dim is unsupported"),
    ({"max_prompt_seq_len": 400, "max_answer_seq_len": 200}, "exceeds the max_position_embeddings 512"),
    ({"max_prompt_seq_len": 3}, "--max_prompt_seq_len"),
    ({"do_sample": True, "top_k": -1}, "--top_k -1: must be >= 0"),  # was a crash inside generate()
])
def test_bad_input_is_one_line_exit_2(assets, tmp_path, capsys, overrides, message):
    argv = base_args(assets, tmp_path / "out", **overrides)
    with pytest.raises(SystemExit) as exc:
        _run_in_process(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    if overrides.get("max_prompt_seq_len") == 3:
        assert str(assets["prompts"]) in err


def test_flags_module_records_every_flag_of_its_groups(capsys):
    """The settings live in ppo_args (ppo re-exports parse_args for upstream-style scripts); run_info's
    settings are derived from the flag groups, so a flag added to one is recorded without a list."""
    from dataclasses import dataclass

    from dschat.steps import ppo, ppo_args
    from dschat.utils import args as flags

    assert ppo.parse_args == ppo_args.parse_args
    settings = ppo.parse_args(["--output_dir", "out", "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                               "--dtype", "fp32"])
    recorded = ppo_args.recorded_settings(settings)
    before = ("init_kl_coef", "kl_target", "kl_horizon", "clip_reward_value", "cliprange", "cliprange_value",
              "gamma", "lam", "normalize_reward", "whiten_advantages", "enable_ema", "ema_beta", "do_sample",
              "temperature", "top_p", "top_k", "max_prompt_seq_len", "max_answer_seq_len",
              "per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
              "ppo_epochs", "actor_learning_rate", "critic_learning_rate", "actor_zero_stage",
              "critic_zero_stage", "dtype")  # the hand-kept list run_info used to record
    assert set(before) <= set(recorded) and recorded["dtype"] == "fp32"
    for title in ppo_args.RECORDED_GROUPS:
        for name in ppo_args.PPOSettings.group_names(title):
            assert recorded[name] == getattr(settings, name)
    assert "per_device_mini_train_batch_size" not in recorded  # deprecated aliases set no value of their own

    @dataclass(frozen=True, kw_only=True)
    class Grouped(flags.Settings):
        flag_group = "g"
        new_flag: int = flags.flag(3, "A new flag.", deprecated=("--old_name",))

    assert Grouped.group_names("g") == ("new_flag",) and Grouped.parse_args(["--old_name", "4"]).new_flag == 4

    with pytest.raises(SystemExit):
        ppo.parse_args(["--help"])
    assert "Stop after this many PPO steps" in " ".join(capsys.readouterr().out.split())


def test_upstream_ppo_trainer_names_still_import():
    """Upstream step-3 scripts import DeepSpeedPPOTrainer(Unsupervised); they are the PPOUpdater classes,
    which run one PPO iteration and are not the epoch/resume `Trainer` of SFT, RM and DPO."""
    from dschat.rlhf import ppo_trainer
    from dschat.utils.trainer import ResumableRun

    assert ppo_trainer.DeepSpeedPPOTrainer is ppo_trainer.PPOUpdater
    assert ppo_trainer.DeepSpeedPPOTrainerUnsupervised is ppo_trainer.PPOUpdaterUnsupervised
    assert not issubclass(ppo_trainer.PPOUpdater, ResumableRun)


def test_fp32_loss_default_is_derived_not_written_back():
    """The dtype-dependent --compute_fp32_loss default is a derived value: the flag keeps what was given."""
    from dschat.steps import ppo_args

    argv = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--dtype", "bf16", "--output_dir", "o"]
    settings = ppo_args.parse_args(argv)
    assert settings.compute_fp32_loss is None and settings.fp32_loss is True
    assert settings.record()["compute_fp32_loss"] is True  # what a run records is what it used


def test_critic_with_wrong_layout_exits_2(assets, run_ds, tmp_path):
    """A causal LM directory is not a step-2 critic: the error names the missing value head."""
    argv = base_args(assets, tmp_path / "out", critic_model_name_or_path=assets["actor"], max_steps=1)
    proc = run_ds(MAIN, argv, num_ranks=0, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "v_head" in last, last
