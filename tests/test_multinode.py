"""Two nodes on one machine: the chain run as two nodes of one rank each equals the same chain run as one node
of two ranks, and the nodes of a per-node launch keep in step (`launcher.mode: per_node`).

Each "node" is `mpo pipeline --node_rank R` with a home, cache and temp directory of its own (node-local
disks) and the run root shared between them; each stage is then two `deepspeed --no_ssh --node_rank R`
launches with a two-entry hostfile (`localhost`, `127.0.0.1`), meeting on loopback. These runs take minutes,
so they carry the `multinode` marker: deselected by default (pyproject's addopts), run by `.ci/run` and
`python3 -m pytest -m multinode`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import child_env, free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.multinode

STAGE_DIRS = ("step1_sft", "step2_rm", "step2.5_select", "step3b_dpo", "step3_ppo")
#: Fields that measure the machine, not the result.
TIMING_KEYS = {"samples_per_second", "tokens_per_second", "seconds", "prompts_per_second", "time/generation",
               "time/training", "tokens_per_second/generation", "steps_per_second"}
LONG = 1800


def torch_extensions_dir() -> str:
    """Where this process's DeepSpeed finds its CPU comm op: given to every node, as a cluster's nodes have it
    installed (with a fresh home each node would spend minutes building it again)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(get_default_build_root(),
                        f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accelerator}")


def node_env(root: Path, rank: int, **extra: str) -> dict[str, str]:
    """A node's own disks: HOME, the cache and the temp directory are this node's; gloo on loopback only."""
    home = root / f"node{rank}"
    for sub in ("home", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return child_env(HOME=str(home / "home"), XDG_CACHE_HOME=str(home / "home" / ".cache"), TMPDIR=str(home / "tmp"),
                     TORCH_EXTENSIONS_DIR=torch_extensions_dir(), GLOO_SOCKET_IFNAME="lo", **extra)


def mpo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpo_ext.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = LONG) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_nodes(config: Path, out: Path, root: Path, steps: str, extra_env: dict[int, dict] | None = None):
    """`mpo pipeline` on node 1 and node 0 at once (node 1 first: it waits for node 0's record)."""
    args = ["pipeline", "--config", str(config), "--output_dir", str(out), "--steps", steps,
            "--set", "launcher.mode=per_node", "--set", f"launcher.hostfile={root / 'hostfile'}",
            "--set", "launcher.master_addr=127.0.0.1"]
    procs = {rank: mpo([*args, "--node_rank", str(rank)], node_env(root, rank, **(extra_env or {}).get(rank, {})), root)
             for rank in (1, 0)}
    return {rank: finish(proc) for rank, proc in procs.items()}


def chain_config(tmp_path: Path, assets: dict) -> Path:
    """The smoke chain on the suite's tiny assets, sized for several optimizer steps per stage on two ranks, with
    ZeRO 2 for SFT, the RM and DPO and ZeRO 3 for PPO's actor and critic (partitions cross the nodes)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "multinode", "base": "smoke", "assets": None, "progress_interval": 5,
        "models": {"sft": assets["model_dir"], "reward": "@sft"}, "data": {"path": [assets["data_dir"]]},
        # the tiny RM's gaps are small: half the pairs for DPO; its 4 steps check the plumbing, not the reward (its
        # final held-out accuracy is noise around 0.5), so an unhealthy verdict does not stop the chain here
        "mpo": {"threshold": None, "easy_fraction": 0.5, "allow_unhealthy_reward_model": True},
        "sft": {"per_device_train_batch_size": 4, "max_steps": 4, "zero_stage": 2},
        "rm": {"per_device_train_batch_size": 8, "max_steps": 4, "zero_stage": 2},
        "dpo": {"max_steps": 4, "zero_stage": 2},
        "ppo": {"per_device_generation_batch_size": 4, "per_device_training_batch_size": 4, "max_steps": 3,
                "actor_zero_stage": 3, "critic_zero_stage": 3, "save_steps": 1}}))
    return config


def load_tensors(path: Path) -> dict:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                   weights_only=True)


def results(path: Path) -> list[tuple[str, object]]:
    """A JSON or JSON-lines file's values as (where, value) pairs, without timing fields and progress records."""
    text = path.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [
        json.loads(text)]

    def flat(value, where: str):
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in TIMING_KEYS:
                    yield from flat(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from flat(item, f"{where}[{i}]")
        else:
            yield where, value

    kept = [r for r in records if not (isinstance(r, dict) and r.get("phase") in ("start", "progress"))]
    return list(flat(kept, ""))


def assert_same_results(one: Path, two: Path) -> None:
    """Every stage's weights, splits and metrics agree between the two run roots (float noise allowed)."""
    for prefix in STAGE_DIRS:
        (a_dir,) = one.glob(f"{prefix}-*")
        (b_dir,) = two.glob(f"{prefix}-*")
        for a in sorted(a_dir.rglob("*")):
            rel = a.relative_to(a_dir)
            if rel.parts[0] in ("checkpoints", "shards") or not a.is_file():
                continue
            b = b_dir / rel
            assert b.is_file(), f"{prefix}: {rel} missing in the two-node run"
            if a.suffix in (".safetensors", ".bin"):
                ta, tb = load_tensors(a), load_tensors(b)
                assert ta.keys() == tb.keys(), rel
                for key in ta:
                    torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-6, msg=f"{prefix}/{rel} {key}")
            elif a.name in ("easy.jsonl", "hard.jsonl", "metrics.jsonl", "health.json", "best.json"):
                ra, rb = results(a), results(b)
                assert [where for where, _ in ra] == [where for where, _ in rb], f"{prefix}/{rel}"
                for (where, x), (_, y) in zip(ra, rb):
                    assert y == (pytest.approx(x, rel=1e-5, abs=1e-6) if isinstance(x, float) else x), \
                        f"{prefix}/{rel}{where}: {x!r} (one node) != {y!r} (two nodes)"
        if prefix == "step2.5_select":
            ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a_dir, b_dir))
            assert (ma["counts"], ma["threshold"]) == (mb["counts"], mb["threshold"])


def test_two_nodes_of_one_rank_equal_one_node_of_two_and_resume_across_nodes(tmp_path, assets):
    """SFT, RM, select, DPO and PPO as two nodes of one rank each end exactly where one node of two ranks does,
    launched by the pipeline on each node and (SFT) by hand with node-local data caches; node 1's rank dying
    mid-PPO stops both nodes, and the re-run resumes from the states each global rank saved."""
    config = chain_config(tmp_path, assets)
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"

    code, output = finish(mpo(["pipeline", "--config", str(config), "--output_dir", str(one), "--num_gpus", "2",
                               "--steps", "sft,rm,select,dpo,ppo"], child_env(), tmp_path))
    assert code == 0, output[-5000:]

    # SFT launched by hand on each node (no pipeline), each node's ranks caching the tokenised data on their own
    # disk (the default --data_output_path under the node's XDG_CACHE_HOME).
    (one_sft,) = one.glob("step1_sft-*")
    recorded = json.loads((one_sft / "stage.json").read_text())["command"]
    args = recorded[recorded.index("--module"):]
    args = args[:args.index("--data_output_path")] + ["--output_dir", str(tmp_path / "direct-sft")]
    port = str(free_port())
    launches = [subprocess.Popen(["deepspeed", "--hostfile", str(tmp_path / "hostfile"), "--no_ssh", "--node_rank",
                                  str(rank), "--master_addr", "127.0.0.1", "--master_port", port, *args],
                                 env=node_env(tmp_path, rank), cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    for launch in launches:
        code, output = finish(launch)
        assert code == 0, output[-5000:]
    direct, pipelined = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "direct-sft", one_sft))
    for key, tensor in pipelined.items():
        torch.testing.assert_close(direct[key], tensor, rtol=1e-5, atol=1e-6)

    ended = run_nodes(config, two, tmp_path, "sft,rm,select,dpo")
    assert ended[0][0] == 0 and ended[1][0] == 0, ended[0][1][-5000:] + ended[1][1][-5000:]
    assert "node 0 finished the run" in ended[1][1]
    # PPO: node 1's rank is killed after optimizer step 2 (states saved at steps 1 and 2); both nodes stop.
    crashed = run_nodes(config, two, tmp_path, "ppo", {1: {"DSCHAT_KILL_AT": "after_step:2"}})
    assert crashed[0][0] == 2 and "stage ppo failed" in crashed[0][1], crashed[0][1][-5000:]
    assert crashed[1][0] == 2 and "share (node 1) exited with code" in crashed[1][1], crashed[1][1][-5000:]
    (ppo_dir,) = two.glob("step3_ppo-*")
    assert not (ppo_dir / "stage.json").exists()
    state = ppo_dir / "checkpoints" / "step-2"
    assert {p.name for p in state.glob("rank_state_*.pt")} == {"rank_state_0.pt", "rank_state_1.pt"}
    resumed = run_nodes(config, two, tmp_path, "ppo")
    assert resumed[0][0] == 0 and resumed[1][0] == 0, resumed[0][1][-5000:] + resumed[1][1][-5000:]
    assert "ppo (resuming)" in resumed[0][1]
    assert "Resumed from" in (two / "logs" / f"{ppo_dir.name}.log").read_text()

    assert_same_results(one, two)

    # Who wrote what: node 0 the books (one record per stage, the summary, the finished launch record), node 1
    # only its logs.
    record = json.loads((two / "nodes" / "launch.json").read_text())
    assert record["state"] == "finished" and record["stage"]["name"] == "ppo" and record["stage"]["resume"]
    assert len(list(two.glob("*/stage.json"))) == 5 and (two / "summary.json").is_file()
    node1_logs = sorted(p.name for p in (two / "logs").glob("*.node1.log"))
    assert len(node1_logs) == 5, node1_logs
    # The pipeline's data cache is the run root's, shared by the nodes: one per training stage (SFT, RM, DPO, PPO);
    # the nodes' own caches hold only what the hand-launched SFT built there.
    assert len(list((two / "data_cache").glob("traindata_*.safetensors"))) == 4
    for rank in (0, 1):
        assert len(list((tmp_path / f"node{rank}" / "home" / ".cache" / "dschat" / "data_files").glob(
            "traindata_*.safetensors"))) == 1


def test_a_node_follows_only_the_current_run_and_stops_its_share_when_node_0_fails(tmp_path, assets):
    """Node 1 ignores a record an earlier run left, joins the stage node 0 announces, and stops its share as soon
    as node 0 marks the stage failed (instead of waiting out the rendezvous timeout)."""
    config = chain_config(tmp_path, assets)
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    record_path = out / "nodes" / "launch.json"
    record_path.parent.mkdir(parents=True)
    old = {"run": "earlier", "state": "finished", "stage": None}
    record_path.write_text(json.dumps(old))
    from mpo_ext.pipeline import build_plan, load_config

    plan = build_plan(load_config(str(config), ["launcher.mode=per_node", f"launcher.hostfile={tmp_path / 'hostfile'}"]),
                      out)
    sft = next(stage for stage in plan if stage.name == "sft")
    node = mpo(["pipeline", "--config", str(config), "--output_dir", str(out), "--steps", "sft",
                "--set", "launcher.mode=per_node", "--set", f"launcher.hostfile={tmp_path / 'hostfile'}",
                "--node_rank", "1"], node_env(tmp_path, 1), tmp_path)
    lines: list[str] = []
    seen = {key: threading.Event() for key in ("following", "started")}

    def read() -> None:
        for line in node.stdout:
            lines.append(line)
            if "following node 0" in line:
                seen["following"].set()
            if "---=== sft" in line:
                seen["started"].set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen["following"].wait(LONG), "".join(lines)[-3000:]
    # node 0's new run announces SFT at a port where nothing listens: node 1's share waits in the rendezvous.
    run = {"run": uuid.uuid4().hex, "state": "running", "num_nodes": 2,
           "stage": {"name": "sft", "identity": sft.identity, "attempt": "a1", "master_addr": "127.0.0.1",
                     "master_port": 9, "resume": False, "state": "running"}}
    record_path.write_text(json.dumps(run))
    assert seen["started"].wait(LONG), "".join(lines)[-3000:]
    deadline = time.monotonic() + LONG
    while not [p for p in psutil.Process(node.pid).children(recursive=True) if "launch" in " ".join(p.cmdline())]:
        assert time.monotonic() < deadline and node.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.2)  # until the per-node launcher runs: the share is then waiting in the rendezvous
    run["stage"].update(state="failed", message="exit code 1")
    run.update(state="failed", message="stage sft failed with exit code 1")
    record_path.write_text(json.dumps(run))
    assert node.wait(LONG) == 2
    reader.join(60)
    text = "".join(lines)
    assert "node 0 finished the run" not in text
    assert "stopping this node's share" in text and "stage sft failed with exit code 1" in text, text[-3000:]
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
