"""dschat.utils.warm_start: a module run from the pre-imported forkserver behaves as `python -m` in a fresh
interpreter (output in order, exit codes, env/cwd/argv, atexit, threads, seeds), except that torch is
already imported when it starts. Each case runs both ways on real processes and compares."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import child_env

from dschat.utils.warm_start import forkserver_socket_is_private, launch, module_command
from mpo_ext.pipeline import WARM_PRELOAD

PROBE = '''
import atexit, json, os, sys
preloaded = "torch" in sys.modules  # before this module imports anything heavy
mode = sys.argv[1]
print("first line", flush=True)
sys.stderr.write("second line, on stderr\\n")
facts = {"torch_preloaded": preloaded, "cwd": os.getcwd(), "argv": sys.argv[1:], "name": __name__,
         "marker": os.environ.get("WARM_PROBE")}
if preloaded or mode == "ok":  # (a fresh interpreter imports torch once, to keep the test quick)
    import torch
    with open(f"/proc/{os.getppid()}/status") as status:
        facts["parent_threads"] = int(next(line.split()[1] for line in status if line.startswith("Threads:")))
    facts.update(torch_threads=torch.get_num_threads(), unseeded=torch.rand(4).tolist())
print(json.dumps(facts), flush=True)
atexit.register(lambda: print("atexit ran", flush=True))
if mode == "exit3":
    sys.exit(3)
if mode == "raise":
    raise ValueError("boom")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "interrupt":
    raise KeyboardInterrupt
print("last line")
'''

#: mode -> the exit status `subprocess.Popen(...).wait()` gives for a fresh interpreter
EXPECTED = {"ok": 0, "exit3": 3, "raise": 1, "kill": -9, "interrupt": -2}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    (root / "mods").mkdir()
    (root / "mods" / "warm_probe.py").write_text(PROBE)
    (root / "cwd").mkdir()
    env = child_env(WARM_PROBE="set-for-the-job", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{root / 'mods'}:{env['PYTHONPATH']}"
    return root, env


def _fresh(mode: str, root, env) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "warm_probe", mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=root / "cwd")
    out = proc.stdout.read()
    return proc.wait(), out


def _warm(mode: str, root, env) -> tuple[int, str]:
    proc = launch("warm_probe", [mode], env=env, cwd=root / "cwd", preload=WARM_PRELOAD)
    assert proc is not None, "the forkserver should start on Linux"
    out = "".join(proc.stdout)  # read line by line, as the pipeline does
    return proc.wait(), out


def _facts(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_warm_child_behaves_as_a_fresh_python_m(probe, mode):
    root, env = probe
    fresh_code, fresh_out = _fresh(mode, root, env)
    warm_code, warm_out = _warm(mode, root, env)
    assert fresh_code == warm_code == EXPECTED[mode], (fresh_out, warm_out)
    fresh, warm = _facts(fresh_out), _facts(warm_out)
    assert not fresh["torch_preloaded"] and warm["torch_preloaded"]  # the preload is what makes it warm
    for key in ("cwd", "argv", "name", "marker", "torch_threads"):  # env (OMP_NUM_THREADS too), cwd, argv
        assert warm[key] == fresh.get(key, warm[key]), key
    assert warm["cwd"] == str(root / "cwd") and warm["argv"] == [mode] and warm["marker"] == "set-for-the-job"
    assert warm["torch_threads"] == 1 and warm["parent_threads"] == 1  # the server forked single-threaded
    lines = warm_out.splitlines()
    assert lines[:2] == ["first line", "second line, on stderr"] and lines[2].startswith("{")
    assert ("last line" in lines) == (mode == "ok")
    assert ("atexit ran" in lines) == (mode != "kill") == ("atexit ran" in fresh_out.splitlines())
    if mode == "raise":
        assert "Traceback (most recent call last)" in warm_out and "ValueError: boom" in warm_out
        assert "warm_start.py" not in warm_out.split("Traceback")[1].split("warm_probe.py")[1]


def test_each_warm_child_draws_fresh_seeds(probe):
    root, env = probe
    draws = [_facts(_warm("ok", root, env)[1])["unseeded"] for _ in range(2)]
    assert draws[0] != draws[1]  # unseeded torch differs per process, as in fresh interpreters


def test_only_python_m_commands_are_warm_started():
    assert module_command([sys.executable, "-m", "dschat.steps.sft", "--x", "1"]) == ("dschat.steps.sft", ["--x", "1"])
    assert module_command(["deepspeed", "--num_gpus", "2", "--module", "dschat.steps.sft"]) is None
    assert module_command(["/other/python", "-m", "dschat.steps.sft"]) is None


def test_forkserver_is_used_only_where_its_socket_is_private():
    # CVE-2022-42919: older forkservers listened where any local user could reach them
    assert not forkserver_socket_is_private((3, 10, 8))
    assert forkserver_socket_is_private((3, 10, 9))
    assert not forkserver_socket_is_private((3, 11, 0))
    assert forkserver_socket_is_private((3, 11, 1))
    assert forkserver_socket_is_private((3, 13, 0))
    assert not forkserver_socket_is_private((3, 9, 18))


def test_a_job_with_another_environment_gets_a_server_started_with_it(probe):
    """torch takes its thread count from OMP_NUM_THREADS when imported, i.e. in the server: a job with
    another value must not run in a server that imported torch under the old one."""
    root, env = probe
    for threads in ("2", "1"):
        code, out = _warm("ok", root, {**env, "OMP_NUM_THREADS": threads})
        assert code == 0, out
        assert _facts(out)["torch_threads"] == int(threads)
