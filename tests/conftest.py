"""Shared pytest fixtures: access to ../shared fixtures and helpers to launch real DeepSpeed runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}
SHARED_ROOT = Path(os.environ.get("DSCHAT_SHARED_DIR", REPO_ROOT.parent / "shared"))


def pytest_sessionstart(session):
    session.config._shm_before = _shm_segments()


def pytest_sessionfinish(session, exitstatus):
    """Runs the suite SIGKILLs on purpose cannot unlink their DeepSpeed /dev/shm segments; do it here."""
    for path in _shm_segments() - getattr(session.config, "_shm_before", set()):
        path.unlink(missing_ok=True)


def _shm_segments() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if shm.is_dir() else set()


def _missing(reason: str):
    # CI must not silently skip fixture-backed tests: a missing ../shared there is a failure.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_path():
    def resolve(rel: str) -> Path:
        path = SHARED_ROOT / rel
        if not path.exists():
            _missing(f"shared fixture {path} is absent")
        return path

    return resolve


@pytest.fixture(scope="session")
def tinystories_dir(shared_path) -> Path:
    return shared_path("models/tinystories-260k")


@pytest.fixture(scope="session")
def tiny_tokenizer(tinystories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tinystories_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child job: the repo importable, no rendezvous inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def run_command(cmd: list[str], cwd: Path | str | None = None, timeout: int = 900, env: dict | None = None):
    """Run a command, return the CompletedProcess; output is kept for assertion messages."""
    full_env = child_env(**(env or {}))
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def run_ds():
    """Launch `deepspeed --num_gpus N script args...` (CPU: N ranks over gloo) or plain python for N=0."""

    def launch(script: Path | str, args: list[str], num_ranks: int = 1, cwd=None, timeout: int = 900, env=None):
        if num_ranks <= 0:
            cmd = [sys.executable, str(script), *args]
        else:
            cmd = [
                "deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
                str(script), *args,
            ]
        return run_command(cmd, cwd=cwd, timeout=timeout, env=env)

    return launch


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The embedded default at a test size: synthetic preference data and a tiny Llama."""
    from mpo_ext.bootstrap import build_default_assets

    root = tmp_path_factory.mktemp("assets")
    return build_default_assets(root, seed=1234, num_train=600, num_test=60)
