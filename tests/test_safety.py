"""Adversarial checks of caches, training states, output directories, signals and the rendezvous: what
another local user could plant, and what a tired user could pass. Real files, real runs (tiny models)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dschat.utils.data.prompt_datasets import create_prompt_dataset
from dschat.utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP1 = REPO_ROOT / "training/step1_supervised_finetuning/main.py"
PAYLOAD_MARKER = "pwned"


class _Payload:
    """Unpickling this runs a shell command that creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.unlink(missing_ok=True)
    torch.save({"chosen": _Payload(marker)}, path)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Human: question {i}?", "chosen": f" answer {i}.", "rejected": f" no {i}."} for i in range(n)]


def _data_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    return path


def _build(tokenizer, data: Path, cache, rebuild: bool = False):
    return create_prompt_dataset(0, [str(data)], "10,0,0", cache, 1, 1234, tokenizer, 32, rebuild=rebuild)


# --------------------------------------------------------------------------------------------- data cache


def test_planted_pickle_in_the_cache_is_never_executed(tmp_path, tiny_tokenizer):
    data, cache, marker = _data_file(tmp_path), tmp_path / "cache", tmp_path / PAYLOAD_MARKER
    _build(tiny_tokenizer, data, cache)
    cached = [p for p in cache.iterdir() if p.name.startswith(("traindata_", "evaldata_"))
              and not p.name.endswith((".lock", ".error"))]
    assert cached
    for path in cached:
        _plant_pickle(path, marker)
    with pytest.raises(UserError, match="--rebuild_data_cache"):
        _build(tiny_tokenizer, data, cache)
    assert not marker.exists(), "a planted cache file ran code"
    train, _ = _build(tiny_tokenizer, data, cache, rebuild=True)  # the fix the message names
    assert len(train) == 11 and not marker.exists()


def test_planted_symlinks_in_the_cache_are_never_written_through(tmp_path, tiny_tokenizer):
    data, cache = _data_file(tmp_path), tmp_path / "cache"
    _build(tiny_tokenizer, data, cache)
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    # Every name a writer could open: the files themselves and temp names built from name + pid.
    names = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    for name in [*names, *(n.replace(".safetensors", ".pt") for n in names)]:
        for planted in (cache / f".tmp-{name}-{os.getpid()}", cache / name):
            if not planted.name.endswith(".lock"):
                planted.unlink(missing_ok=True)
                planted.symlink_to(victim)
    _build(tiny_tokenizer, data, cache, rebuild=True)
    assert victim.read_text() == "secret"
    for path in cache.iterdir():
        if not path.is_symlink():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"


def test_cache_dir_default_is_private_and_per_user(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _build(tiny_tokenizer, _data_file(tmp_path), None)
    cache = tmp_path / "xdg/dschat/data_files"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = [p for p in cache.iterdir() if p.name.startswith("traindata_")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_cache_dir_others_can_write_is_refused(tmp_path, tiny_tokenizer):
    shared = tmp_path / "data_files"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp/data_files created by anyone
    with pytest.raises(UserError, match=r"--data_output_path .*writable by group or others"):
        _build(tiny_tokenizer, _data_file(tmp_path), shared)
    assert list(shared.iterdir()) == []
    if os.geteuid() == 0:  # only root can give a directory away
        shared.chmod(0o700)
        os.chown(shared, 65534, 65534)
        with pytest.raises(UserError, match="not by you"):
            _build(tiny_tokenizer, _data_file(tmp_path), shared)


# --------------------------------------------------------------------------------------------- real runs


def _sft_flags(assets, out, cache: Path, steps: int = 4, extra: list[str] | None = None) -> list[str]:
    return [
        "--data_path", assets["data_dir"], "--data_split", "2,4,4", "--model_name_or_path", assets["model_dir"],
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_seq_len", "64",
        "--num_train_epochs", "1", "--max_steps", str(steps), "--log_interval", "1", "--eval_iters", "1",
        "--data_output_path", str(cache), "--output_dir", str(out), *(extra or []),
    ]


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_forbidden_output_dirs(tmp_path, monkeypatch):
    from dschat.utils.output_dir import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    cases = {".": "is the current directory", str(tmp_path): "is the current directory",
             "sub/..": "is the current directory", str(Path.home()): "is your home directory",
             "~": "is your home directory", "/": "is the filesystem root",
             "a_file": "exists and is not a directory"}
    for out, expected in cases.items():
        with pytest.raises(UserError, match=expected):
            check_output_dir(out)
    assert check_output_dir("runs/new") == Path("runs/new")


def test_output_dir_dot_or_a_file_refused_before_models_load(assets, tmp_path, run_ds):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (work / "a_file").write_text("not a directory")
    for out, expected in {".": "is the current directory", "a_file": "exists and is not a directory"}.items():
        proc = run_ds(STEP1, _sft_flags(assets, out, tmp_path / "cache"), num_ranks=0, cwd=work)
        assert expected in _one_error_line(proc), out
        assert "Creating dataset" not in proc.stdout  # refused before data and models load
    assert sorted(p.name for p in work.iterdir()) == ["a_file", "notes.txt"]
    assert (work / "notes.txt").read_text() == "keep me" and (work / "a_file").read_text() == "not a directory"


def _shm_segments() -> set[Path]:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def test_second_run_into_a_busy_dir_refuses_and_a_killed_runs_lock_is_taken_over(assets, tmp_path, run_ds):
    from conftest import child_env, free_port

    out, cache = tmp_path / "run", tmp_path / "cache"
    port = str(free_port())  # names the first run's shm segment
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, str(STEP1), *_sft_flags(assets, out, cache, steps=100000,
                                                     extra=["--num_train_epochs", "1000"])],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(MASTER_PORT=port))
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # training, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        proc = run_ds(STEP1, _sft_flags(assets, out, cache, steps=2), num_ranks=0)
        assert f"pid {first.pid}" in _one_error_line(proc) and "another run" in proc.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # One rank maps no shm segment on every DeepSpeed version; where it did, the next run must remove it
    # (the orphan clean-up itself is checked with a planted segment below).
    orphans = {p for p in _shm_segments() if f"_127.0.0.1_{port}_" in p.name}
    # The killed run left its lock file; the next run takes it over.
    assert json.loads((out / ".dschat-run.lock").read_text())["pid"] == first.pid
    proc = run_ds(STEP1, _sft_flags(assets, out, cache, steps=2), num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the lock of pid {first.pid}" in proc.stdout
    assert not (out / ".dschat-run.lock").exists() and (out / "config.json").exists()
    assert not (orphans & _shm_segments()), "segments of the killed run are still in /dev/shm"


def _assert_model_published(real: Path) -> None:
    assert (real / "config.json").is_file() and (real / "model.safetensors").is_file()
    assert not [p.name for p in real.iterdir() if p.name.startswith((".staging-", ".tmp-"))]
    umask = os.umask(0)
    os.umask(umask)
    for path in real.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def _mount_tmpfs(where: Path) -> str | None:
    """Mount a tmpfs at `where`; the reason it cannot be done otherwise."""
    where.mkdir()
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


@pytest.mark.parametrize("layout", ["symlink", "symlink_to_other_fs", "mount_point"])
def test_output_dir_symlink_or_on_another_filesystem(layout, assets, tmp_path, run_ds):
    real = tmp_path / "real"
    out = tmp_path / "out"
    mounted = False
    if layout == "symlink":
        real.mkdir()
        (real / "notes.txt").write_text("the target's own file")
        out.symlink_to(real)
    elif layout == "symlink_to_other_fs":
        if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is not a separate filesystem here")
        real = Path(f"/dev/shm/dschat-test-{os.getpid()}-{tmp_path.name}")
        real.mkdir()
        (real / "notes.txt").write_text("the target's own file")
        out.symlink_to(real)
    else:
        reason = _mount_tmpfs(out)
        if reason:
            pytest.skip(reason)
        mounted, real = True, out
    try:
        proc = run_ds(STEP1, _sft_flags(assets, out, tmp_path / "cache", steps=2), num_ranks=0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _assert_model_published(real)
        if layout != "mount_point":
            assert out.is_symlink() and out.resolve() == real.resolve()
            assert (real / "notes.txt").read_text() == "the target's own file"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged beside it
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)
        elif layout == "symlink_to_other_fs":
            import shutil

            shutil.rmtree(real, ignore_errors=True)


def test_sigint_saves_a_state_and_resume_survives_a_torn_metrics_line(assets, tmp_path, run_ds):
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = _sft_flags(assets, out, cache, steps=4)
    proc = run_ds(STEP1, flags, num_ranks=0, env={"DSCHAT_KILL_AT": "sigint_after_step:2"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "SIGINT received" in proc.stdout and "Traceback" not in proc.stderr
    assert (out / "checkpoints/step-2/trainer_state.json").exists()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "phase": "tr')  # a write cut short by a full disk
    proc = run_ds(STEP1, flags + ["--resume"], num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropping unreadable line" in proc.stdout and "optimizer step 2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == [1, 2, 3, 4]


def test_planted_training_state_is_never_executed(assets, tmp_path, run_ds):
    out, cache, marker = tmp_path / "run", tmp_path / "cache", tmp_path / PAYLOAD_MARKER
    flags = _sft_flags(assets, out, cache, steps=2, extra=["--save_steps", "2"])
    proc = run_ds(STEP1, flags, num_ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = out / "checkpoints/step-2"
    assert (state / "rank_state_0.pt").exists()
    torch.load(state / "rank_state_0.pt", weights_only=True)  # what we write loads without unpickling code
    _plant_pickle(state / "rank_state_0.pt", marker)
    proc = run_ds(STEP1, flags + ["--resume"], num_ranks=0)
    assert "rank_state_0.pt" in _one_error_line(proc)
    assert not marker.exists(), "a planted training state ran code"


# --------------------------------------------------------------------------------------------- process group


PROBE = """
import os, sys
from pathlib import Path
from dschat.utils.dist import init_distributed
orphan = Path(sys.argv[1])
init_distributed(-1)
print("orphan_exists", orphan.exists())
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the fd of the listing itself
        pass
inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in Path(table).read_text().splitlines()[1:]:
        cols = line.split()
        if cols[9] in inodes and cols[3] == "0A":  # LISTEN
            print("listening", cols[1].split(":")[0])
"""


def test_single_process_listens_on_loopback_only_and_clears_orphaned_segments(tmp_path):
    from conftest import run_command

    if not Path("/proc/net/tcp").exists() or not Path("/dev/shm").is_dir():
        pytest.skip("needs Linux /proc and /dev/shm")
    orphan = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_{os.getpid()}")
    orphan.write_bytes(b"\0" * 4096)  # a segment whose process is gone: nobody maps it
    try:
        proc = run_command([sys.executable, "-c", PROBE, str(orphan)], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "orphan_exists False" in proc.stdout
        addresses = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("listening")]
        loopback = {"0100007F", "00000000000000000000000001000000"}
        assert all(a in loopback for a in addresses), f"listening beyond loopback: {addresses}"
    finally:
        orphan.unlink(missing_ok=True)
