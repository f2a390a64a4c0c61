"""The MPO chain from one config: presets and wiring (no runs), bad configs, and one real chain on a config the
test writes (crash resume, a changed theta, the sft-reference ablation), plus a run from a plain install."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mpo_ext.cli import main
from mpo_ext.pipeline import Stage, build_plan, load_config, print_final_report, stage_health

REPO_ROOT = Path(__file__).resolve().parents[1]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _plan(tmp_path, source="smoke", *sets):
    return {s.name: s for s in build_plan(load_config(source, sets), tmp_path)}


def test_llama2_dry_run_prints_the_paper_plan(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(["bash", str(REPO_ROOT / "training/run_mpo_llama2_7b.sh"), str(tmp_path / "plan")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for stage in ("# sft", "# rm", "# rm_heldout", "# select", "# dpo", "# ppo", "# eval"):
        assert stage in text
    assert text.count("deepspeed --num_gpus 8 --module") == 6  # the held-out reward model is on in the preset
    assert "--data_part 1/2" in text and "--data_part 2/2" in text
    assert "Anthropic/hh-rlhf/helpful-base Anthropic/hh-rlhf/harmless-base" in text
    assert not (tmp_path / "plan").exists()


def test_presets_carry_the_paper_settings_and_mpo_wiring(tmp_path):
    plan = _plan(tmp_path, "llama2-7b-hh")
    sft, rm, dpo, ppo = (plan[k].command for k in ("sft", "rm", "dpo", "ppo"))
    assert _flag(sft, "--learning_rate") == "5e-05" and _flag(sft, "--per_device_train_batch_size") == "16"
    assert _flag(rm, "--learning_rate") == "5e-06" and _flag(rm, "--weight_decay") == "0.1"
    assert _flag(dpo, "--beta") == "0.1" and _flag(dpo, "--gradient_accumulation_steps") == "8"
    assert _flag(dpo, "--data_path") == str(plan["select"].output / "easy.jsonl")
    assert _flag(dpo, "--model_name_or_path") == str(plan["sft"].output)
    assert _flag(ppo, "--init_kl_coef") == "0.4" and _flag(ppo, "--data_path").endswith("hard.jsonl")
    assert _flag(ppo, "--actor_model_name_or_path") == _flag(ppo, "--reference_model_name_or_path") == str(
        plan["dpo"].output)
    assert _flag(plan["select"].command, "--threshold") == "1.0"
    assert _flag(dpo, "--heldout_reward_model_name_or_path") == _flag(ppo, "--heldout_reward_model_name_or_path") \
        == str(plan["rm_heldout"].output) and _flag(ppo, "--eval_steps") == "50"
    tldr = _plan(tmp_path, "llama2-7b-tldr")
    assert _flag(tldr["sft"].command, "--data_path") == "CarperAI/openai_summarize_comparisons"
    assert _flag(tldr["sft"].command, "--learning_rate") == "5e-05"  # inherited from the HH preset


@pytest.mark.parametrize("order", ["mpo", "reverse"])
@pytest.mark.parametrize("reference", ["dpo", "sft"])
def test_order_honours_reference(tmp_path, order, reference):
    plan = _plan(tmp_path, "smoke", f"mpo.order={order}", f"mpo.reference={reference}")
    sft = str(plan["sft"].output)
    names = list(plan)
    if order == "mpo":
        first, second, start_flag = plan["dpo"], plan["ppo"], "--actor_model_name_or_path"
        start = str(plan["dpo"].output)
    else:
        first, second, start_flag = plan["ppo"], plan["dpo"], "--model_name_or_path"
        start = str(plan["ppo"].output / "actor")
        assert names.index("ppo") < names.index("dpo")
    assert first.name != second.name and _flag(second.command, start_flag) == start
    assert _flag(second.command, "--reference_model_name_or_path") == (sft if reference == "sft" else start)


def test_identities_follow_settings_and_inputs(tmp_path):
    base = _plan(tmp_path)
    theta = _plan(tmp_path, "smoke", "mpo.threshold=0.5")
    logs = _plan(tmp_path, "smoke", "ppo.log_interval=1", "ppo.save_steps=1")
    assert [base[k].output == theta[k].output for k in base] == [True, True, True, False, False, False, False]
    assert all(base[k].output == logs[k].output for k in base)  # logging/checkpoint cadence changes no result
    cold = _plan(tmp_path, "smoke", "launcher.warm_start=false")  # how a stage's process starts changes no result
    assert all(base[k].output == cold[k].output and base[k].command == cold[k].command for k in base)
    lr = _plan(tmp_path, "smoke", "dpo.learning_rate=5e-5")
    assert [base[k].output == lr[k].output for k in base] == [True, True, True, True, False, False, False]


@pytest.mark.parametrize("setting, named", [
    ("dpo.lerning_rate=1e-4", "--lerning_rate"),
    ("mpo.threshhold=0.5", "mpo.threshhold"),
    ("mpo.threshold=abc", "mpo.threshold"),
    ("mpo.threshold=.nan", "mpo.threshold"),
    ("mpo.reference=ref", "mpo.reference"),
    ("ppo.per_device_training_batch_size=0", "per_device_training_batch_size"),
    ("sft.output_dir=/tmp/x", "sft.output_dir"),
    ("launcher.num_gpus=two", "launcher.num_gpus"),
    ("launcher.warm_start=maybe", "launcher.warm_start"),
    ("assets.task=mpo-nope", "assets.task"),
])
def test_bad_config_is_one_line_naming_the_key_and_nothing_runs(tmp_path, setting, named):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "--preset", "smoke", "--output_dir", str(out), "--set", setting])
    assert result.exit_code == 2, result.output
    assert named in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_print_config_and_a_config_file_with_a_base(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("name: mine\nbase: smoke\ndpo: {beta: 0.2}\nmpo: {threshold: 0.7}\n")
    result = CliRunner().invoke(main, ["pipeline", "--config", str(config), "--set", "sft.learning_rate=1e-3",
                                       "--print_config"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["name"] == "mine" and resolved["dpo"]["beta"] == 0.2 and resolved["mpo"]["threshold"] == 0.7
    assert resolved["sft"]["learning_rate"] == 1e-3 and resolved["sft"]["max_steps"] == 6  # the base's keys kept


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, ["pipeline", *args])
    return result


def _statuses(out: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}


def test_chain_on_own_config_resumes_reruns_what_changed_and_keeps_ablations_beside(tmp_path, assets, monkeypatch):
    """One chain on a config naming a model and data the test made, then each re-run does exactly its work."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "own", "base": "smoke", "assets": None, "output_dir": str(tmp_path / "run"),
        "models": {"sft": assets["model_dir"], "reward": "@sft"}, "data": {"path": [assets["data_dir"]]},
        "progress_interval": 0.5, "ppo": {"save_steps": 1},
        "sft": {"num_train_epochs": 4},  # warm stages take ~2 s; 8 SFT steps, 6 with max_steps
        # 6 RM steps on the test's small data check the plumbing, not the reward: its final held-out accuracy
        # is noise around 0.5; the refusal of an unhealthy reward model is checked below with this turned off.
        "mpo": {"allow_unhealthy_reward_model": True}}))
    out = tmp_path / "run"
    # One stage alone from the same config (`mpo sft`): written where the pipeline looks, and reused by it.
    alone = CliRunner().invoke(main, ["sft", "--config", str(config)])
    assert alone.exit_code == 0, alone.output[-4000:]
    # The progress shown is what the stage logged: the real total with --max_steps 6, and the training loss.
    assert re.search(r"sft finished in \S+ \(step 6/6, epoch 3/4 \| loss \d", alone.output), alone.output[-3000:]
    assert "rm " not in alone.output.split("Artefacts:")[1]  # only what this command made
    first = _invoke(["--config", str(config), "--steps", "sft,rm,select,dpo"])
    assert first.exit_code == 0, first.output[-4000:]
    assert "[pipeline] sft: complete" in first.output and "[pipeline] rm |" in first.output  # heartbeats
    assert re.search(r"rm finished in \S+ \(step 6/6 \| loss \d\S*, acc ", first.output), first.output[-3000:]
    assert re.search(r"select finished in \S+ \((\d+)/\1 prompts", first.output), first.output[-3000:]
    assert re.search(r"dpo finished in \S+ \(step (\d+)/\1, epoch \d/3 \| loss ", first.output), first.output[-3000:]

    # PPO dies (SIGKILL) after its second optimizer step, with states saved at steps 1 and 2.
    monkeypatch.setenv("DSCHAT_KILL_AT", "after_step:2")
    crashed = _invoke(["--config", str(config)])
    monkeypatch.delenv("DSCHAT_KILL_AT")
    assert crashed.exit_code == 2 and "stage ppo failed" in crashed.output, crashed.output[-3000:]
    (ppo_dir,) = out.glob("step3_ppo-*")
    assert not (ppo_dir / "stage.json").exists() and (ppo_dir / "checkpoints").is_dir()
    resumed = _invoke(["--config", str(config)])
    assert resumed.exit_code == 0, resumed.output[-4000:]
    assert "ppo (resuming)" in resumed.output and "Resumed from" in resumed.output
    assert re.search(r"ppo finished in \S+ \(step (\d)/\1 \| reward ", resumed.output), resumed.output[-8000:]
    assert "eval finished in" in resumed.output and "(scoring: 48/48 answers" in resumed.output
    assert _statuses(out) == {"sft": "reused (complete)", "rm": "reused (complete)", "select": "reused (complete)",
                              "dpo": "reused (complete)", "ppo": "ok", "eval": "ok"}
    (dpo_dir,) = out.glob("step3b_dpo-*")
    run_info = json.loads((ppo_dir / "run_info.json").read_text())
    assert run_info["reference_model_name_or_path"] == str(dpo_dir) and run_info["data_path"][0].endswith("hard.jsonl")
    (eval_dir,) = out.glob("eval-*")
    rows = {r["name"]: r for r in json.loads((eval_dir / "table.json").read_text())["rows"]}
    assert list(rows) == ["sft", "dpo", "mpo"]
    # Each stage moves the policy: the answers (and so their rewards) differ from the SFT model's.
    assert abs(rows["dpo"]["mean_reward"] - rows["sft"]["mean_reward"]) > 1e-3, rows
    assert abs(rows["mpo"]["mean_reward"] - rows["dpo"]["mean_reward"]) > 1e-3, rows
    assert "Scores on " in resumed.output and "| model | RM reward" in resumed.output and str(ppo_dir) in resumed.output

    # The same PPO uninterrupted (another run dir holding copies of the upstream stages) ends at the same actor.
    other = tmp_path / "other"
    other.mkdir()
    for path in out.iterdir():
        if path.name.startswith(("step1_sft-", "step2_rm-", "step2.5_select-", "step3b_dpo-", "pipeline.json")):
            (shutil.copytree if path.is_dir() else shutil.copy)(path, other / path.name)
    straight = _invoke(["--config", str(config), "--output_dir", str(other), "--steps", "ppo"])
    assert straight.exit_code == 0, straight.output[-4000:]
    resumed_actor = load_file(str(ppo_dir / "actor" / "model.safetensors"))
    straight_actor = load_file(str(other / ppo_dir.name / "actor" / "model.safetensors"))
    for name, tensor in straight_actor.items():
        torch.testing.assert_close(resumed_actor[name], tensor, rtol=1e-4, atol=1e-5)

    # A reward model marked unhealthy (health.json, as step 2 writes one) starts nothing downstream unless told.
    (rm_dir,) = out.glob("step2_rm-*")
    health = rm_dir / "health.json"
    kept = health.read_bytes() if health.exists() else None
    health.write_text(json.dumps({"status": "unhealthy", "warnings": [{"step": 6, "signal": "reward_at_chance"}]}))
    unhealthy = _invoke(["--config", str(config), "--threshold", "0.5", "--set", "mpo.allow_unhealthy_reward_model=false"])
    assert unhealthy.exit_code == 2 and len(unhealthy.output.strip().splitlines()) == 1, unhealthy.output[-3000:]
    assert str(health) in unhealthy.output and "--allow_unhealthy_reward_model" in unhealthy.output
    assert not [p for p in out.glob("step2.5_select-*") if json.loads((p / "manifest.json").read_text())["threshold"]
                == 0.5]

    # Another theta: select, DPO, PPO and eval run again beside the old ones; SFT and RM are reused untouched.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}
    theta = _invoke(["--config", str(config), "--threshold", "0.5", "--allow_unhealthy_reward_model"])
    assert theta.exit_code == 0, theta.output[-4000:]
    health.unlink()
    if kept is not None:
        health.write_bytes(kept)
    assert _statuses(out) == {"sft": "reused (complete)", "rm": "reused (complete)", "select": "ok", "dpo": "ok",
                              "ppo": "ok", "eval": "ok"}
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing of the first run was rewritten
    manifests = {json.loads(p.read_text())["threshold"] for p in out.glob("step2.5_select-*/manifest.json")}
    assert manifests == {1.0, 0.5}

    # The sft-reference ablation: a separate PPO output naming the SFT model; the default one untouched.
    sft_kl = _invoke(["--config", str(config), "--reference", "sft", "--steps", "ppo"])
    assert sft_kl.exit_code == 0, sft_kl.output[-4000:]
    (sft_dir,) = out.glob("step1_sft-*")
    new_ppo = [p for p in out.glob("step3_ppo-*") if json.loads((p / "stage.json").read_text())["mpo"]["reference"]
               == "sft"]
    assert len(new_ppo) == 1 and new_ppo[0] != ppo_dir
    assert json.loads((new_ppo[0] / "run_info.json").read_text())["reference_model_name_or_path"] == str(sft_dir)
    assert json.loads((ppo_dir / "run_info.json").read_text())["reference_model_name_or_path"] == str(dpo_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # A run of other base models/data in this directory is refused with one line.
    refused = _invoke(["--config", str(config), "--set", f"models.reward={assets['model_dir']}"])
    assert refused.exit_code == 2 and "another config" in refused.output and len(refused.output.splitlines()) == 1


def test_pipeline_from_a_plain_install_outside_the_checkout(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(REPO_ROOT)], check=True, capture_output=True, timeout=600)
    assert (site / "mpo_ext" / "configs" / "smoke.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DSCHAT_MPO_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-m", "mpo_ext.cli", "pipeline", "--preset", "smoke", "--steps",
                           "assets,sft", "--set", "assets.num_train=200"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (sft_dir,) = (work / "runs" / "mpo-smoke").glob("step1_sft-*")
    record = json.loads((sft_dir / "stage.json").read_text())
    assert (sft_dir / "config.json").is_file() and record["stage"] == "sft"
    command = shlex.split(record["command"]) if isinstance(record["command"], str) else record["command"]
    # one rank: `python -m dschat.steps.sft` (no launcher); more: `deepspeed ... --module dschat.steps.sft`
    assert command[command.index("dschat.steps.sft") - 1] in ("-m", "--module")
    assert (work / "runs" / "mpo-smoke" / "config.yaml").is_file()


def test_stage_health_verdict_is_read_from_health_json(tmp_path, capsys):
    """The pipeline shows each DPO/PPO stage's guard verdict (health.json) and names the signals that warned."""
    assert stage_health(tmp_path) is None  # stages without guards (SFT, RM, select) keep no record
    (tmp_path / "health.json").write_text(json.dumps({"status": "warned", "warnings": [
        {"step": 7, "signal": "health/entropy", "message": "m"}, {"step": 9, "signal": "health/distinct_2",
                                                                "message": "m"}]}))
    assert stage_health(tmp_path) == "warned (health/distinct_2, health/entropy)"
    (tmp_path / "health.json").write_text("{torn")
    assert stage_health(tmp_path) is None
    (tmp_path / "health.json").write_text(json.dumps({"status": "ok", "warnings": []}))
    print_final_report([Stage("dpo", [], {}, output=tmp_path)], tmp_path)
    assert f"dpo      {tmp_path}  (health: ok)" in capsys.readouterr().out


def test_output_dir_that_is_a_file_or_a_config_not_utf8_is_one_line(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    result = CliRunner().invoke(main, ["pipeline", "--preset", "smoke", "--output_dir", str(a_file)])
    assert result.exit_code == 2 and "is a file" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and a_file.read_text() == "keep me"
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"name: caf\xe9\n")
    result = CliRunner().invoke(main, ["pipeline", "--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "latin1.yaml:1: not UTF-8" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def _start_long_sft(tmp_path: Path, assets: dict, **launcher) -> tuple[subprocess.Popen, Path, Path]:
    """`mpo pipeline --steps sft` of a 100-epoch SFT in its own process group (as a terminal's job), returned
    once the stage trains: (the pipeline's process, its config, its root)."""
    out = tmp_path / "run"
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({
        "name": "long", "base": "smoke", "assets": None, "output_dir": str(out), "progress_interval": 0.5,
        "models": {"sft": assets["model_dir"], "reward": "@sft"}, "data": {"path": [assets["data_dir"]]},
        "sft": {"max_steps": 0, "num_train_epochs": 100, "per_device_train_batch_size": 1},
        **({"launcher": launcher} if launcher else {})}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    pipeline = subprocess.Popen([sys.executable, "-m", "mpo_ext.cli", "pipeline", "--config", str(config), "--steps",
                                 "sft"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        while not any('"phase": "train"' in p.read_text() for p in out.glob("step1_sft-*/metrics.jsonl")):
            assert pipeline.poll() is None, pipeline.communicate()[0][-4000:]
            time.sleep(0.2)
    except BaseException:
        _stop(pipeline)
        raise
    return pipeline, config, out


def _stop(pipeline: subprocess.Popen) -> None:
    if pipeline.poll() is None:
        os.killpg(pipeline.pid, signal.SIGKILL)
        pipeline.wait()


def _assert_interrupted_with_a_state(pipeline: subprocess.Popen, output: str, out: Path, signum: int) -> None:
    """Exit status 128 + signum, the stage's last saved state named, the run lock released."""
    assert pipeline.returncode == 128 + signum, output[-4000:]
    (sft_dir,) = out.glob("step1_sft-*")
    states = sorted((sft_dir / "checkpoints").glob("step-*"))
    assert states and f"sft saved a training state in {states[-1]}" in output, output[-3000:]
    assert "run the same command again to resume" in output and "Aborted!" not in output and "failed" not in output
    assert not (out / ".dschat-run.lock").exists()  # released: the next run may start


def test_a_busy_root_refuses_a_second_run_and_ctrl_c_says_how_to_resume(tmp_path, assets):
    """A second `mpo pipeline` into a root in use refuses with one line naming the holder; Ctrl-C (SIGINT to
    the terminal's process group) lets the stage save a state, and the pipeline says where and how to go on."""
    first, config, out = _start_long_sft(tmp_path, assets)
    try:
        second = _invoke(["--config", str(config), "--steps", "sft"])
        assert second.exit_code == 2, second.output[-3000:]
        assert f"another run (pid {first.pid} " in second.output and len(second.output.strip().splitlines()) == 1
        os.killpg(first.pid, signal.SIGINT)
        output = first.communicate(timeout=600)[0]
    finally:
        _stop(first)
    _assert_interrupted_with_a_state(first, output, out, signal.SIGINT)


def test_a_stage_stopped_by_a_signal_of_its_own_is_an_interruption_to_resume(tmp_path, assets):
    """SIGTERM sent to the stage alone (a scheduler, `kill`, or a Ctrl-C that reached the stage before the
    pipeline): the stage saves a state and exits 143, and the pipeline reports an interruption with the way
    to resume and exit status 143, not a failed stage."""
    # without warm start the stage is the pipeline's own child, found by its command line
    pipeline, _, out = _start_long_sft(tmp_path, assets, warm_start=False)
    try:
        children = subprocess.run(["pgrep", "-P", str(pipeline.pid), "-f", "dschat.steps.sft"], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)
        output = pipeline.communicate(timeout=600)[0]
    finally:
        _stop(pipeline)
    _assert_interrupted_with_a_state(pipeline, output, out, signal.SIGTERM)
