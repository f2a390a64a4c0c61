"""Several nodes without running them (the default suite): each node's command in the dry run, the per-node
launch settings checked at load time, the record node 0 keeps, and a node that refuses a stage its config does
not match. The two-node runs themselves are in tests/test_multinode.py (`-m multinode`)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import one_line_error

from dschat.utils.errors import UserError
from dschat.utils.warm_start import module_command
from mpo_ext.cli import main
from mpo_ext.pipeline import build_plan, load_config
from mpo_ext.pipeline.nodes import HeadRecord, head_run, read_hostfile, write_generated_hostfile

PER_NODE = ("--set", "launcher.mode=per_node", "--set", "launcher.num_nodes=2")
MODULE_STAGES = ("dschat.steps.sft", "dschat.steps.reward", "mpo_ext.selection", "mpo_ext.dpo", "dschat.steps.ppo")


def _pipeline(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["pipeline", *args], env=env)


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line) for line in output.splitlines() if line and not line.startswith("#")]


def test_per_node_dry_run_prints_each_nodes_command_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = _pipeline("--preset", "smoke", *PER_NODE, "--set", "launcher.num_gpus=4", "--output_dir", str(out),
                       "--dry_run")
    assert result.exit_code == 0, result.output
    assert "--node_rank R (or $SLURM_NODEID)" in result.output and "NODE0_HOST" in result.output
    commands = _commands(result.output)
    for module in MODULE_STAGES:
        mine = [c for c in commands if module in c]
        assert [c[:9] for c in mine] == [
            ["deepspeed", "--no_ssh", "--node_rank", str(rank), "--master_addr", "NODE0_HOST", "--master_port", "PORT",
             "--hostfile"] for rank in (0, 1)], mine
        assert all(c[9] == str(out / "nodes" / "hostfile") and c[10:12] == ["--num_nodes", "2"] for c in mine)
        assert mine[0][9:] == mine[1][9:]  # the nodes differ only in their rank
    # One-process stages (the embedded assets, the evaluation) run on node 0 only, as plain python.
    assert "#   node 0 only:" in result.output
    assert sum("mpo_ext.cli" in c for c in commands) == 2 and not out.exists()
    # A fixed rendezvous, and the ssh mode: one launcher command on this node starts every node.
    fixed = _pipeline("--preset", "smoke", *PER_NODE, "--set", "launcher.master_addr=10.0.0.7",
                      "--set", "launcher.master_port=29701", "--output_dir", str(out), "--dry_run")
    assert "--master_addr 10.0.0.7 --master_port 29701" in fixed.output and "NODE0_HOST" not in fixed.output
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nworker-a slots=8\nworker-b slots=8 # trailing text, as DeepSpeed reads it\n")
    ssh = _pipeline("--preset", "smoke", "--hostfile", str(hosts), "--set", "launcher.master_addr=10.0.0.7",
                    "--output_dir", str(out), "--dry_run")
    assert ssh.exit_code == 0, ssh.output
    sft = next(c for c in _commands(ssh.output) if "dschat.steps.sft" in c)
    assert sft[:7] == ["deepspeed", "--hostfile", str(hosts), "--master_addr", "10.0.0.7", "--module",
                       "dschat.steps.sft"]


def test_per_node_stages_always_go_through_the_launcher(tmp_path):
    """One rank per node still needs the rendezvous: never plain python, the warm start or an in-process store."""
    plan = build_plan(load_config("smoke", ["launcher.mode=per_node", "launcher.num_nodes=2"]), tmp_path)
    for stage in plan:
        if stage.module:
            assert stage.command[0] == "deepspeed" and module_command(stage.command) is None, stage.command
    one_node = build_plan(load_config("smoke"), tmp_path)
    assert all(module_command(s.command) is not None for s in one_node if s.module)  # one rank: warm start


@pytest.mark.parametrize("sets, named", [
    (["launcher.mode=mesh"], "launcher.mode"),
    (["launcher.mode=per_node"], "launcher.num_nodes: launcher.mode per_node needs the number of nodes"),
    (["launcher.mode=per_node", "launcher.num_nodes=2", "launcher.extra=[--master_port, '29500']"],
     "launcher.extra: --master_port is set by the pipeline"),
    (["launcher.mode=per_node", "launcher.num_nodes=2", "launcher.extra=[--launcher=slurm]"], "--launcher=slurm"),
    (["launcher.num_nodes=2"], "need launcher.hostfile"),
    (["launcher.num_nodes=0"], "launcher.num_nodes: 0"),
    (["launcher.master_port=70000"], "launcher.master_port: 70000"),
])
def test_bad_launcher_settings_are_one_line(sets, named):
    args = [arg for text in sets for arg in ("--set", text)]
    one_line_error(_pipeline("--preset", "smoke", *args, "--print_config"), named)


def test_hostfiles_are_read_as_deepspeed_reads_them(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\n\n# comment\nb slots=2\n")
    assert read_hostfile(hosts) == [("a", 2), ("b", 2)]
    for text, named in [("a slots=2\na slots=2\n", "listed twice"), ("a 2\n", f"{hosts}:1"), ("# none\n", "no host"),
                        ("a slots=0\n", "N >= 1")]:
        hosts.write_text(text)
        with pytest.raises(UserError, match=named):
            read_hostfile(hosts)
    hosts.write_text("a slots=2\nb slots=2\n")
    one_line_error(_pipeline("--preset", "smoke", "--hostfile", str(hosts), "--set", "launcher.num_nodes=3",
                              "--print_config"), "launcher.num_nodes: 3", "lists 2 host(s)")
    config = load_config("smoke", ["launcher.mode=per_node", "launcher.num_nodes=3", "launcher.num_gpus=4"])
    write_generated_hostfile(config.launcher, tmp_path)
    assert (tmp_path / "nodes" / "hostfile").read_text() == "node-0 slots=4\nnode-1 slots=4\nnode-2 slots=4\n"


def test_node_ranks_come_from_the_flag_or_slurm_and_must_fit(tmp_path):
    out = str(tmp_path / "run")
    one_line_error(_pipeline("--preset", "smoke", *PER_NODE, "--output_dir", out), "--node_rank", "SLURM_NODEID")
    one_line_error(_pipeline("--preset", "smoke", *PER_NODE, "--output_dir", out, "--node_rank", "2"),
                    "--node_rank: node rank 2 is outside the run's 2 nodes")
    one_line_error(_pipeline("--preset", "smoke", *PER_NODE, "--output_dir", out, env={"SLURM_NODEID": "5"}),
                    "$SLURM_NODEID=5: node rank 5")
    one_line_error(_pipeline("--preset", "smoke", "--output_dir", out, "--node_rank", "0"),
                    "--node_rank 0: only with launcher.mode: per_node")
    assert not Path(out).exists()


def test_a_node_refuses_a_stage_whose_identity_its_config_does_not_give(tmp_path, assets):
    """Node 1 ($SLURM_NODEID) reads node 0's record, and a stage announced under another identity (another config
    on node 0) stops it with one line before it starts anything."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base": "smoke", "assets": None, "output_dir": str(tmp_path / "run"),
                                      "models": {"sft": assets["model_dir"], "reward": "@sft"},
                                      "data": {"path": [assets["data_dir"]]},
                                      "launcher": {"mode": "per_node", "num_nodes": 2}}))
    record = tmp_path / "run" / "nodes" / "launch.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"run": "r1", "state": "running", "stage": {
        "name": "sft", "identity": "deadbeef" * 8, "attempt": "a1", "master_addr": "127.0.0.1", "master_port": 9,
        "resume": False, "state": "running"}}))
    result = _pipeline("--config", str(config), "--steps", "sft", env={"SLURM_NODEID": "1"})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    following, error = result.output.strip().splitlines()
    assert following.startswith("[pipeline node 1] following node 0 through") and str(record) in following
    assert "stage sft: node 0 runs identity deadbeef" in error and "same --config" in error, error
    assert not (tmp_path / "run" / "logs").exists()  # nothing started, nothing written


def test_node_0_records_each_stage_and_how_the_run_ended(tmp_path):
    config = load_config("smoke", ["launcher.mode=per_node", "launcher.num_nodes=2", "launcher.master_addr=10.0.0.7"])
    sft = next(s for s in build_plan(config, tmp_path) if s.name == "sft")
    path = tmp_path / "nodes" / "launch.json"

    def read() -> dict:
        return json.loads(path.read_text())

    head = HeadRecord(tmp_path, config.launcher, free_port=lambda: 29123)
    with head_run(head):
        assert read()["state"] == "running" and read()["num_nodes"] == 2
        assert head.stage_started(sft, resume=True) == ("10.0.0.7", 29123)
        first = read()["stage"]
        assert (first["name"], first["identity"], first["resume"], first["state"]) == ("sft", sft.identity, True,
                                                                                        "running")
        head.stage_ended(ok=True)
        assert read()["stage"]["state"] == "ok"
        head.stage_started(sft, resume=False)
        assert read()["stage"]["attempt"] != first["attempt"]  # a retry never joins an older attempt
        head.stage_ended(ok=True)
    assert read()["state"] == "finished"
    failing = HeadRecord(tmp_path, config.launcher, free_port=lambda: 29124)
    with pytest.raises(UserError), head_run(failing):
        failing.stage_started(sft, resume=False)
        raise UserError("stage sft failed with exit code 1; see the log")
    assert read()["state"] == "failed" and read()["stage"]["state"] == "failed"
    assert read()["run"] != head.record["run"] and "exit code 1" in read()["message"]
    stopped = HeadRecord(tmp_path, config.launcher, free_port=lambda: 29125)
    with pytest.raises(SystemExit), head_run(stopped):
        raise SystemExit(130)
    assert read()["state"] == "interrupted"
