"""The pipeline before anything runs: the stage registry, pinned identities, hostile and misspelled configs
(refused at load time with one line, a "did you mean" where one fits), local paths, `common`, `--dry_run`
and the single-stage commands. Nothing here trains; every test takes seconds."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import one_line_error as _one_line_error

from dschat.utils.errors import UserError
from mpo_ext.cli import main
from mpo_ext.pipeline import STAGES, build_plan, load_config
from mpo_ext.pipeline.config import local_path_error
from mpo_ext.pipeline.plan import Stage
from mpo_ext.pipeline.runner import check_reward_models
from mpo_ext.pipeline.stages import PIPELINE_FLAGS, SettingsFlags

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stage identities (first 12 hex digits) as the single-file pipeline of release 2 computed them: run roots made
# then must keep reusing their finished stages, so a refactor may not move any of them.
PINNED_IDENTITIES = {
    ("tiny",): {"assets": "0889edbafadb", "sft": "90e7a7188491", "rm": "43844a49bb3b", "select": "376879c41169",
                "dpo": "739b7f8b38c8", "ppo": "3d3919144c4f", "eval": "e3e32443d2b4"},
    ("smoke",): {"assets": "4663ab87e0e4", "sft": "493b783932cf", "rm": "b9bcacac4c6c", "select": "068d4fab0c97",
                 "dpo": "370fd2a8c6aa", "ppo": "5f2b73ccf58f", "eval": "cf15c3458ec5"},
    # the paper presets turned the held-out reward model on (and DPO/PPO evaluations every 50 steps): SFT is
    # reused, the RM (now on half its pairs) and everything downstream are new
    ("llama2-7b-hh",): {"sft": "7e9cfca5f41b", "rm": "72568d9a5dc7", "rm_heldout": "28a8148d8b99",
                        "select": "044b98297d69", "dpo": "465849772595", "ppo": "ece21998fbed",
                        "eval": "28cc7205e405"},
    ("llama2-7b-tldr",): {"sft": "008ac72c4f28", "rm": "4f970a951c79", "rm_heldout": "58b6106c146f",
                          "select": "998ebf30c5b7", "dpo": "a247280c027a", "ppo": "2be88e1a98ba",
                          "eval": "e95e2aa5a38a"},
    ("smoke", "mpo.order=reverse"): {"assets": "4663ab87e0e4", "sft": "493b783932cf", "rm": "b9bcacac4c6c",
                                     "select": "068d4fab0c97", "ppo": "41f064b77e36", "dpo": "01950a93bff4",
                                     "eval": "e12c791d432d"},
    ("smoke", "mpo.reference=sft"): {"assets": "4663ab87e0e4", "sft": "493b783932cf", "rm": "b9bcacac4c6c",
                                     "select": "068d4fab0c97", "dpo": "370fd2a8c6aa", "ppo": "8e5bfeeaf234",
                                     "eval": "d5650507b988"},
    ("smoke", "mpo.threshold=null", "mpo.easy_fraction=0.4"): {
        "assets": "4663ab87e0e4", "sft": "493b783932cf", "rm": "b9bcacac4c6c", "select": "eb9b320dbaa0",
        "dpo": "4dca3a0a2207", "ppo": "d14a5abef527", "eval": "ea6eec9b99ce"},
    ("smoke", "launcher.num_gpus=2"): {"assets": "4663ab87e0e4", "sft": "595ff58b2429", "rm": "65c4e1487c85",
                                       "select": "bce2c3d88ecf", "dpo": "f3df263b6622", "ppo": "b66ad9bf7df1",
                                       "eval": "7524751271ea"},
    # the held-out reward model switched off explicitly: the identities of before
    ("tiny", "heldout_rm=false"): {"assets": "0889edbafadb", "sft": "90e7a7188491", "rm": "43844a49bb3b",
                                   "select": "376879c41169", "dpo": "739b7f8b38c8", "ppo": "3d3919144c4f",
                                   "eval": "e3e32443d2b4"},
    ("smoke", "eval.num_prompts=8", "select.data_split=0,0,1"): {
        "assets": "4663ab87e0e4", "sft": "493b783932cf", "rm": "b9bcacac4c6c", "select": "3771abeb8dfd",
        "dpo": "2d0f85d257c3", "ppo": "e64a51383414", "eval": "e9685904f0a0"},
}


def _pipeline(*args: str):
    return CliRunner().invoke(main, ["pipeline", *args])


@pytest.mark.parametrize("case", list(PINNED_IDENTITIES), ids=" ".join)
def test_stage_identities_do_not_move(tmp_path, case):
    source, *sets = case
    plan = build_plan(load_config(source, sets), tmp_path)
    assert {s.name: s.identity[:12] for s in plan} == PINNED_IDENTITIES[case]
    assert [s.name for s in plan] == list(PINNED_IDENTITIES[case])  # the running order too


def test_registry_describes_every_stage_once():
    names = [spec.name for spec in STAGES]
    assert names == ["assets", "sft", "rm", "rm_heldout", "select", "dpo", "ppo", "eval"]
    assert len({spec.directory for spec in STAGES}) == len(STAGES)
    for spec in STAGES:
        assert bool(spec.module) != bool(spec.command), spec.name  # a step or an `mpo` command
        if spec.flags is not None:  # the hook knows the stage's flags, the pipeline's own ones included
            names = spec.flags.names()
            assert names and {"output_dir"} <= names and not (names & {"help"}), spec.name
        if spec.flags is not None:  # every stage with flags is checked through its typed settings
            assert isinstance(spec.flags, SettingsFlags), spec.name
            if spec.module:
                # the settings type lives with its step: in the module or its light `<module>_args` beside it
                assert spec.flags.settings_type.__module__.startswith(spec.module), spec.name
    assert [s.name for s in STAGES if s.resumable] == ["sft", "rm", "rm_heldout", "dpo", "ppo"]
    assert "learning_rate" not in PIPELINE_FLAGS


def _imports(tree: ast.AST) -> list[str]:
    """Modules imported anywhere in `tree` except under `if TYPE_CHECKING:` (annotations only)."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        found += _imports(node)
    return found


def test_pipeline_package_imports_no_step_or_model_code():
    """The driver runs steps as processes: it names their modules in the registry and never imports them
    (a step module is imported only by a section check, through importlib)."""
    banned = ("torch", "transformers", "deepspeed", "dschat.steps", "mpo_ext.dpo", "mpo_ext.selection",
              "mpo_ext.evaluation", "dschat.utils.build")
    order = ["stages", "config", "plan", "report", "progress", "runner"]  # each imports only those before it
    for path in sorted((REPO_ROOT / "mpo_ext" / "pipeline").glob("*.py")):
        modules = _imports(ast.parse(path.read_text()))
        assert not [m for m in modules if m.startswith(banned)], path.name
        if path.stem in order:
            later = {f"mpo_ext.pipeline.{name}" for name in order[order.index(path.stem):]}
            assert not [m for m in modules if m in later], path.name


# --------------------------------------------------------------------------------------------- hostile files


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("base: smoke\ncommon:\n" + "".join(f"  {line}\n" for line in levels))
    _one_line_error(_pipeline("--config", str(bomb), "--print_config"), "bomb.yaml:4", "aliases")
    set_bomb = "[" + ", ".join(["&a [1, 1]"] + ["*a"] * 9) + "]"
    _one_line_error(_pipeline("--preset", "smoke", "--set", f"common.x={set_bomb}", "--print_config"),
                    "--set common.x", "aliases")


def test_base_cycles_are_named_and_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    me = tmp_path / "self.yaml"
    me.write_text("base: sub/../self.yaml\nname: me\n")
    _one_line_error(_pipeline("--config", str(me), "--print_config"), "cycle", "self.yaml -> ")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\n")
    text = _one_line_error(_pipeline("--config", str(tmp_path / "a.yaml"), "--print_config"), "cycle")
    assert "a.yaml" in text and "b.yaml" in text
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: ok\ndpo: {beta: [0.1\n")
    text = _one_line_error(_pipeline("--config", str(broken), "--print_config"), "broken.yaml:3", "not valid YAML")
    assert "unicode string" not in text
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "#" * (2 << 20) + "\n")
    _one_line_error(_pipeline("--config", str(huge), "--print_config"), "huge.yaml", "at most")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    _one_line_error(_pipeline("--config", str(deep), "--print_config"), "deep.yaml")


# --------------------------------------------------------------------------------------------- failing early


@pytest.mark.parametrize("setting, named", [
    ("dpo.lerning_rate=1e-4", "did you mean learning_rate?"),
    ("ppo.actor_learning_rat=1e-4", "did you mean actor_learning_rate?"),
    ("mpo.threshhold=0.5", "did you mean threshold?"),
    ("lancher.num_gpus=2", "did you mean launcher?"),
    ("common.sed=3", "did you mean seed?"),
    ("common.bogus_flag=3", "common.bogus_flag"),
])
def test_print_config_refuses_misspelled_keys_with_a_suggestion(setting, named):
    _one_line_error(_pipeline("--preset", "smoke", "--set", setting, "--print_config"), named)


def test_common_goes_to_the_stages_that_have_the_flag(tmp_path):
    plan = {s.name: s for s in build_plan(load_config(
        "smoke", ["common.per_device_train_batch_size=8", "common.weight_decay=0.05", "common.label_smoothing=0.1"]), tmp_path)}
    assert plan["sft"].flags["weight_decay"] == 0.05 and plan["dpo"].flags["label_smoothing"] == 0.1
    assert plan["rm"].flags["weight_decay"] == 0.1  # the stage's own section wins
    assert "per_device_train_batch_size" not in plan["select"].flags and "label_smoothing" not in plan["sft"].flags
    # PPO's --per_device_train_batch_size is a deprecated alias of its generation batch: not PPO's flag
    assert "--per_device_train_batch_size" not in plan["ppo"].command and "--weight_decay" not in plan["ppo"].command


def test_sections_are_checked_by_the_stage_settings_and_false_switches_reach_the_command(tmp_path):
    """Sections go through each stage's settings type (`from_mapping`): values of the wrong type, outside a
    range or refused by the stage's own checks are one line naming the stage; `false` for a switch that is on
    by default (or decided by other flags) reaches the stage as its `--no_x` option, not as nothing."""
    _one_line_error(_pipeline("--preset", "smoke", "--set", "dpo.beta=-1", "--print_config"),
                    "config section dpo", "--beta -1")
    _one_line_error(_pipeline("--preset", "smoke", "--set", "sft.zero_stage=many", "--print_config"),
                    "config section sft", "zero_stage", "not a int")
    _one_line_error(_pipeline("--preset", "smoke", "--set", "ppo.no_compute_fp32_loss=true", "--print_config"),
                    "did you mean compute_fp32_loss?")
    plan = {s.name: s for s in build_plan(load_config(
        "smoke", ["ppo.compute_fp32_loss=false", "sft.group_by_length=false", "eval.do_sample=false"]), tmp_path)}
    assert "--no_compute_fp32_loss" in plan["ppo"].command and "--no_group_by_length" in plan["sft"].command
    assert "--greedy" not in plan["eval"].command and "--do_sample" not in plan["eval"].command  # off by default


def test_heldout_rm_trains_a_second_reward_model_on_the_other_half(tmp_path):
    """heldout_rm: the RM section runs twice, on --data_part 1/2 and 2/2 (same data, seed and flags); DPO, PPO
    and eval score with both reward models. Off, nothing of it appears (the pinned identities above)."""
    plan = {s.name: s for s in build_plan(load_config("smoke", ["heldout_rm=true", "rm.seed=7"]), tmp_path)}
    rm, heldout = plan["rm"], plan["rm_heldout"]
    assert list(plan) == ["assets", "sft", "rm", "rm_heldout", "select", "dpo", "ppo", "eval"]
    assert rm.flags == heldout.flags and rm.flags["seed"] == 7 and rm.identity != heldout.identity
    assert heldout.output.name.startswith("step2_rm_heldout-")
    part = {name: plan[name].command[plan[name].command.index("--data_part") + 1] for name in ("rm", "rm_heldout")}
    assert part == {"rm": "1/2", "rm_heldout": "2/2"}
    assert rm.command[:rm.command.index("--data_part")] == heldout.command[:heldout.command.index("--data_part")]

    def value(stage: str, flag: str) -> str:
        command = plan[stage].command
        return command[command.index(flag) + 1]

    assert value("dpo", "--reward_model_name_or_path") == str(rm.output)
    for stage, flag in (("dpo", "--heldout_reward_model_name_or_path"), ("ppo", "--heldout_reward_model_name_or_path"),
                        ("eval", "--heldout_reward_model")):
        assert value(stage, flag) == str(heldout.output), stage
    assert plan["select"].command[plan["select"].command.index("--reward_model_name_or_path") + 1] == str(rm.output)
    off = {s.name: s for s in build_plan(load_config("smoke"), tmp_path)}
    assert "rm_heldout" not in off and "--data_part" not in off["rm"].command
    assert not any(arg.startswith("--heldout") for stage in off.values() for arg in stage.command)
    _one_line_error(_pipeline("--preset", "smoke", "--set", "heldout_rm=true", "--set", "rm.data_part=1/3",
                              "--print_config"), "config key rm.data_part: set by the pipeline")
    _one_line_error(_pipeline("--preset", "smoke", "--set", "rm_heldout.seed=3", "--print_config"),
                    "config key rm_heldout: unknown")


def test_local_paths_are_checked_at_load_time(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    typo = str(tmp_path / "pairs.jsonll")
    for flag in ("--print_config", "--dry_run"):
        _one_line_error(_pipeline("--preset", "smoke", "--set", f"data.path=[{typo}]", flag),
                        "data.path", typo, f"did you mean {data}?")
    _one_line_error(_pipeline("--preset", "smoke", "--set", f"models.sft={tmp_path / 'no-model'}", "--print_config"),
                    "models.sft", "no such file or directory")
    _one_line_error(_pipeline("--preset", "smoke", "--set", f"launcher.hostfile={tmp_path / 'hosts'}",
                              "--print_config"), "launcher.hostfile")
    monkeypatch.chdir(tmp_path)
    assert local_path_error("tmp-not-here/x", 2) is None  # reads as a hub id: org/name
    (tmp_path / "datadir").mkdir()
    assert "no such file" in local_path_error("datadir/x", 3)  # its first part is a local folder
    assert "no such file" in local_path_error("x.jsonl", 3)
    assert "neither" in local_path_error("a/b/c/d", 3) and "neither" in local_path_error("org/with space", 2)
    for fine in ("Anthropic/hh-rlhf/harmless-base", "meta-llama/Llama-2-7b-hf", "gpt2", "local/jsonfile"):
        assert local_path_error(fine, 3) is None
    # A relative local path is hashed as written and handed to the stage absolute (stages run in the run root).
    plan = {s.name: s for s in build_plan(load_config("smoke", ["data.path=[pairs.jsonl]"]), tmp_path / "run")}
    command = plan["sft"].command
    assert command[command.index("--data_path") + 1] == str(data)


def test_dry_run_says_what_each_stage_would_do(tmp_path):
    out = tmp_path / "run"
    config = load_config("smoke", [f"output_dir={out}"])
    plan = {s.name: s for s in build_plan(config, out)}
    sft, rm = plan["sft"], plan["rm"]
    sft.output.mkdir(parents=True)
    (sft.output / "config.json").write_text("{}")
    (sft.output / "stage.json").write_text(json.dumps({"identity": sft.identity}))
    (rm.output / "checkpoints").mkdir(parents=True)
    result = _pipeline("--preset", "smoke", "--output_dir", str(out), "--dry_run", "--steps", "sft,rm,select")
    assert result.exit_code == 0, result.output
    assert f"# sft -> {sft.output} (done: reused)" in result.output
    assert f"# rm -> {rm.output} (resumes from its saved state)" in result.output
    assert f"# select -> {plan['select'].output} (runs)" in result.output
    assert f"# assets -> {plan['assets'].output} (not in --steps; NOT done)" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([sft.output.name, rm.output.name])  # nothing written


def test_steps_and_single_stage_commands(tmp_path):
    _one_line_error(_pipeline("--preset", "smoke", "--steps", "sft,slect", "--dry_run"), "slect", "did you mean select?")
    out = tmp_path / "run"
    needs = CliRunner().invoke(main, ["dpo", "--preset", "smoke", "--output_dir", str(out)])
    _one_line_error(needs, "stage dpo needs", "sft", "--input")
    select_dir, sft_dir = tmp_path / "my_select", tmp_path / "my_sft"
    select_dir.mkdir()
    sft_dir.mkdir()
    dry = CliRunner().invoke(main, ["dpo", "--preset", "smoke", "--output_dir", str(out), "--input",
                                    f"select={select_dir}", "--input", f"sft={sft_dir}", "--dry_run"])
    assert dry.exit_code == 0, dry.output
    assert "# dpo -> " in dry.output and "(runs)" in dry.output and "# ppo" not in dry.output
    assert f"# select -> {select_dir} (not in --steps; given (--input))" in dry.output
    assert f"--data_path {select_dir}/easy.jsonl --model_name_or_path {sft_dir}" in dry.output
    (sft_dir / "config.json").write_text("{}")
    missing = CliRunner().invoke(main, ["dpo", "--preset", "smoke", "--output_dir", str(out), "--input",
                                        f"select={select_dir}", "--input", f"sft={sft_dir}"])
    _one_line_error(missing, f"--input select={select_dir}", "no manifest.json there")
    assert not out.exists()
    assert "--input" in CliRunner().invoke(main, ["ppo", "--help"]).output


# --------------------------------------------------------------------------------------------- the run root


def test_a_root_others_can_write_or_another_user_owns_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _one_line_error(_pipeline("--preset", "smoke", "--output_dir", str(shared)), "writable by group or others")
    assert list(shared.iterdir()) == []
    if os.geteuid() == 0:  # only root can give a directory to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        _one_line_error(_pipeline("--preset", "smoke", "--output_dir", str(foreign)), "owned by uid 65534")
        assert list(foreign.iterdir()) == []


def test_an_unhealthy_reward_model_stops_the_stages_that_read_it(tmp_path):
    plan = {s.name: s for s in build_plan(load_config("smoke", []), tmp_path)}
    rm = plan["rm"]
    rm.output.mkdir(parents=True)
    health = rm.output / "health.json"
    health.write_text(json.dumps({"status": "unhealthy", "warnings": [{"signal": "reward_at_chance", "step": 6}]}))
    check_reward_models(plan["select"], plan, load_config("smoke", []))  # a crashed RM's record: it runs again
    (rm.output / "config.json").write_text("{}")
    (rm.output / "stage.json").write_text(json.dumps({"identity": rm.identity}))
    for reader in ("select", "ppo", "eval"):
        with pytest.raises(UserError) as err:
            check_reward_models(plan[reader], plan, load_config("smoke", []))
        assert str(health) in str(err.value) and "--allow_unhealthy_reward_model" in str(err.value)
        assert "reward_at_chance" in str(err.value) and "\n" not in str(err.value)
    check_reward_models(plan["select"], plan, load_config("smoke", ["mpo.allow_unhealthy_reward_model=true"]))
    check_reward_models(plan["dpo"], plan, load_config("smoke", []))  # DPO does not read the reward model
    health.write_text(json.dumps({"status": "warned", "warnings": []}))
    check_reward_models(plan["select"], plan, load_config("smoke", []))


def test_stage_is_constructible_by_name_and_reads_its_spec(tmp_path):
    stage = Stage("dpo", [], {}, output=tmp_path)
    assert stage.spec.product == "config.json" and stage.spec.resumable and not stage.is_complete()
    assert yaml.safe_load(_pipeline("--preset", "tiny", "--print_config").output)["mpo"][
        "allow_unhealthy_reward_model"] is False
