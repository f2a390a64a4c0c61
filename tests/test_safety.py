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
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(where)], capture_output=True,
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


def test_planted_training_state_is_never_executed(assets, tmp_path, run_ds, monkeypatch):
    """The issue's attack: a pickle payload planted in DeepSpeed's engine file of a state, then `--resume`
    (which the pipeline adds by itself). The payload would create `marker`; it must never run."""
    from dschat.utils.checkpoint import SIGNATURE_FILE, sign_state

    xdg = tmp_path / "xdg"  # this test's own signing key, shared with the runs it starts
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    env = {"XDG_CACHE_HOME": str(xdg)}
    out, cache, marker = tmp_path / "run", tmp_path / "cache", tmp_path / PAYLOAD_MARKER
    flags = _sft_flags(assets, out, cache, steps=2, extra=["--save_steps", "2"])
    proc = run_ds(STEP1, flags, num_ranks=0, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = out / "checkpoints/step-2"
    engine_file = state / "model/mp_rank_00_model_states.pt"
    assert engine_file.exists() and (state / "rank_state_0.pt").exists() and (state / SIGNATURE_FILE).exists()
    torch.load(state / "rank_state_0.pt", weights_only=True)  # what we write loads without unpickling code
    identity = json.loads((state / SIGNATURE_FILE).read_text())["identity"]

    # 1. Planted: the state no longer verifies, so it is never read; the run starts afresh (exit 0).
    for path in (engine_file, state / "rank_state_0.pt"):
        _plant_pickle(path, marker)
    proc = run_ds(STEP1, flags + ["--resume"], num_ranks=0, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not resuming from" in proc.stdout and "changed after it was written" in proc.stdout, proc.stdout[-3000:]
    assert "starting from scratch" in proc.stdout
    assert not marker.exists(), "a planted training state ran code"

    # 2. Even a payload in a state that verifies (signed with this user's key): the cheap sample-order check
    # runs before any engine file is read ...
    _plant_pickle(engine_file, marker)
    sign_state(state, identity)
    other_seed = _sft_flags(assets, out, cache, steps=2, extra=["--save_steps", "2", "--seed", "7"])
    proc = run_ds(STEP1, other_seed + ["--resume"], num_ranks=0, env=env)
    assert "--seed 1234 (now --seed 7)" in _one_error_line(proc)
    assert not marker.exists(), "the engine state was read before the sample-order check"
    # 3. ... and DeepSpeed's engine files are read weights-only.
    proc = run_ds(STEP1, flags + ["--resume"], num_ranks=0, env=env)
    assert "mp_rank_00_model_states.pt" in _one_error_line(proc)
    assert not marker.exists(), "DeepSpeed's engine file was unpickled"


def _fake_state(run: Path, step: int = 3) -> Path:
    state = run / "checkpoints" / f"step-{step}"
    (state / "model").mkdir(parents=True)
    (state / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (state / "model/mp_rank_00_model_states.pt").write_bytes(b"weights")
    return state


def test_only_states_signed_with_your_key_and_unchanged_verify(tmp_path, monkeypatch):
    from dschat.utils import checkpoint as ck

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "me"))
    identity = {"stage": "step1", "engines": ["model"]}
    run = tmp_path / "run"
    state = _fake_state(run)
    assert "no state_signature.json" in ck.verify_state(state)  # another user's, a copy, or an older version's
    assert ck.find_latest_state(run, identity) is None
    ck.sign_state(state, identity)
    key = tmp_path / "me/dschat/state-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ck.verify_state(state, identity) is None and ck.find_latest_state(run, identity) == state
    assert "not of" in ck.verify_state(state, {"stage": "step2", "engines": ["model"]})

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "someone-else"))  # another user's key
    assert "does not verify with your key" in ck.verify_state(state)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "me"))

    weights = state / "model/mp_rank_00_model_states.pt"
    weights.write_bytes(b"planted")
    assert "changed after it was written" in ck.verify_state(state)
    weights.write_bytes(b"weights")
    assert ck.verify_state(state) is None
    (state / "extra.pt").write_bytes(b"x")
    assert "differ from the signed ones" in ck.verify_state(state)
    (state / "extra.pt").unlink()
    (state / "link.pt").symlink_to(weights)
    assert "not a regular file" in ck.verify_state(state)
    (state / "link.pt").unlink()
    signature = json.loads((state / ck.SIGNATURE_FILE).read_text())
    signature["files"]["model/mp_rank_00_model_states.pt"] = "0" * 64  # a hash edited to match a planted file
    (state / ck.SIGNATURE_FILE).write_text(json.dumps(signature))
    assert "does not verify with your key" in ck.verify_state(state)

    key.chmod(0o644)  # a key others can read could sign their planted states
    with pytest.raises(UserError, match="only you can read"):
        ck.signing_key()


# --------------------------------------------------------------------------------------------- directories


def test_output_dir_another_user_prepared_is_refused(tmp_path):
    from dschat.utils.output_dir import prepare_output_dir, release_run_lock

    shared = tmp_path / "run"
    shared.mkdir()
    shared.chmod(0o777)  # e.g. /tmp/run made by anyone
    with pytest.raises(UserError, match=r"--output_dir .*writable by group or others.*chmod go-w"):
        prepare_output_dir(shared)
    assert list(shared.iterdir()) == []  # not even a lock file
    if os.geteuid() == 0:  # only root can give a directory away
        shared.chmod(0o755)
        os.chown(shared, 65534, 65534)
        with pytest.raises(UserError, match="not by you"):
            prepare_output_dir(shared)
    old = os.umask(0o002)  # a group-writable umask: the directory we create still is not
    try:
        created = prepare_output_dir(tmp_path / "new" / "run")
    finally:
        os.umask(old)
    assert stat.S_IMODE(created.stat().st_mode) & 0o022 == 0
    release_run_lock(created)


def test_appends_never_follow_a_planted_symlink_or_block_on_a_fifo(tmp_path):
    from dschat.utils.safe_paths import open_append
    from dschat.utils.trainer import MetricLogger
    from mpo_ext.judge import VerdictCache

    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl: is a symbolic link"):
        MetricLogger(str(run), None, "t").log(1, "train", {"loss": 1.0}, echo=False)
    (tmp_path / "judge_cache.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="judge_cache.jsonl: is a symbolic link"):
        VerdictCache(tmp_path / "judge_cache.jsonl")
    assert victim.read_text() == "secret\n"
    os.mkfifo(tmp_path / "fifo")  # open() for writing would block until someone reads
    with pytest.raises(UserError, match="not a regular file"):
        open_append(tmp_path / "fifo")
    # the progress records (start/progress/data) and the pipeline's stage log append the same way
    with pytest.raises(UserError, match="metrics.jsonl: is a symbolic link"):
        MetricLogger(str(run), None, "t").start(0, 10)
    with pytest.raises(UserError, match="metrics.jsonl: is a symbolic link"):
        MetricLogger(str(run), None, "t").data_counts({"train_rows": 3})
    from mpo_ext.pipeline.progress import ConsoleFilter, StageProgress
    from mpo_ext.pipeline.runner import run_stage

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "sft.log").symlink_to(victim)
    with pytest.raises(UserError, match="sft.log: is a symbolic link"):
        run_stage([sys.executable, "-c", "print('x')"], tmp_path / "logs" / "sft.log", tmp_path, 60.0,
                  ConsoleFilter(), StageProgress("sft", tmp_path / "metrics.jsonl"))
    assert victim.read_text() == "secret\n"


def test_a_fresh_run_starts_a_new_metrics_file(tmp_path):
    from dschat.utils.args import LoggingSettings
    from dschat.utils.trainer import MetricLogger, ResumableRun

    stale = '{"step": 7, "phase": "train", "loss": 9.0}\n'  # a killed run's last records
    (tmp_path / "metrics.jsonl").write_text(stale)
    run = ResumableRun()
    run.settings = LoggingSettings(resume=False, output_dir=str(tmp_path))
    run.logger = MetricLogger(str(tmp_path), None, "t")
    run._maybe_resume()
    run.logger.log(1, "train", {"loss": 1.0}, echo=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "metrics.previous.jsonl").read_text() == stale


def test_a_diverged_run_stops_without_publishing_a_model(assets, tmp_path, run_ds):
    out = tmp_path / "run"
    proc = run_ds(STEP1, _sft_flags(assets, out, tmp_path / "cache", steps=3, extra=["--learning_rate", "1e308"]),
                  num_ranks=0)
    line = _one_error_line(proc)
    assert "training diverged" in line and "--learning_rate" in line
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------- process group


PROBE = """
import os, sys
from pathlib import Path
from dschat.utils.dist import init_distributed
orphan = Path(sys.argv[1])
init_distributed(-1)
print("orphan_exists", orphan.exists())
print("own_segment", Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.environ['MASTER_PORT']}_0").exists())
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


def _stale_build_lock(root: Path) -> Path:
    """torch's build lock for DeepSpeed's CPU comm op, as a build killed half way leaves it."""
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


def test_single_process_needs_no_comm_op_listens_on_loopback_only_and_clears_orphaned_segments(tmp_path):
    """One rank builds, loads and maps nothing of DeepSpeed's CPU comm op: a stale build lock (which made every
    run wait forever) is not even looked at, no compiler runs, and no /dev/shm segment is made."""
    from conftest import run_command

    if not Path("/proc/net/tcp").exists() or not Path("/dev/shm").is_dir():
        pytest.skip("needs Linux /proc and /dev/shm")
    extensions = tmp_path / "torch_extensions"
    lock = _stale_build_lock(extensions)
    orphan = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_{os.getpid()}")
    orphan.write_bytes(b"\0" * 4096)  # a segment whose process is gone: nobody maps or holds it ...
    os.utime(orphan, (time.time() - 3600,) * 2)  # ... and nobody wrote it for an hour
    try:
        proc = run_command([sys.executable, "-c", PROBE, str(orphan)], timeout=300,
                           env={"TORCH_EXTENSIONS_DIR": str(extensions)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "orphan_exists False" in proc.stdout and "own_segment False" in proc.stdout, proc.stdout[-2000:]
        addresses = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("listening")]
        loopback = {"0100007F", "00000000000000000000000001000000"}
        assert all(a in loopback for a in addresses), f"listening beyond loopback: {addresses}"
        assert sorted(p.name for p in lock.parent.iterdir()) == ["lock"]  # nothing built
    finally:
        orphan.unlink(missing_ok=True)


def test_a_starting_run_never_removes_a_segment_another_run_is_creating(tmp_path):
    """DeepSpeed creates its segment, fills it with write() and only then maps it; a run starting meanwhile
    took it for an orphan and removed it, and the first run died with SIGSEGV. Held open = in use."""
    from dschat.utils.dist import remove_orphaned_shm_segments

    if not Path("/dev/shm").is_dir():
        pytest.skip("needs /dev/shm")
    segment = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_2_{os.getpid()}")
    try:
        with open(segment, "wb") as being_created:  # open, not mapped, just written: another run's start-up
            being_created.write(b"\0" * 4096)
            being_created.flush()
            assert segment not in remove_orphaned_shm_segments()
            os.utime(segment, (time.time() - 3600,) * 2)
            assert segment not in remove_orphaned_shm_segments() and segment.exists()  # open, however old
        assert segment not in remove_orphaned_shm_segments(min_age_s=3600 * 24)  # closed, but written recently
        assert segment in remove_orphaned_shm_segments() and not segment.exists()  # closed and old: an orphan
    finally:
        segment.unlink(missing_ok=True)


LAUNCHED_PROBE = """
from dschat.utils.errors import run_main


def main():
    import torch
    import torch.distributed as dist

    from dschat.utils.dist import init_distributed

    init_distributed()
    total = torch.ones(1)
    dist.all_reduce(total)
    print("world", dist.get_world_size(), "sum", total.item(), flush=True)


run_main(main)
"""


def test_a_stale_op_build_lock_is_one_line_not_a_silent_wait(tmp_path, run_ds):
    """Two ranks on CPU do need DeepSpeed's comm op; a lock left by a killed build made every later run
    sleep forever without a word. Now it is named, with the fix, before anything waits on it."""
    lock = _stale_build_lock(tmp_path / "torch_extensions")
    script = tmp_path / "probe.py"
    script.write_text(LAUNCHED_PROBE)
    proc = run_ds(script, [], num_ranks=2, timeout=600, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.stdout + proc.stderr)[-3000:]
    assert str(lock) in errors[0] and f"rm {lock}" in errors[0] and "Traceback" not in proc.stderr


def test_ops_build_once_per_environment_and_the_wait_is_named(tmp_path, capsys):
    from conftest import run_command

    from dschat.utils import op_build

    show = "from dschat.utils.op_build import use_per_environment_build_dir as f; print(f())"
    xdg = tmp_path / "xdg"
    proc = run_command([sys.executable, "-c", show], env={"XDG_CACHE_HOME": str(xdg), "TORCH_EXTENSIONS_DIR": ""})
    built_under = Path(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and built_under.parent == xdg / "dschat/torch_extensions", proc.stdout
    assert built_under.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-")
    assert stat.S_IMODE(built_under.stat().st_mode) == 0o700
    proc = run_command([sys.executable, "-c", show], env={"XDG_CACHE_HOME": str(xdg), "TORCH_EXTENSIONS_DIR": "/x"})
    assert proc.stdout.strip().splitlines()[-1] == "/x"  # the user's own choice stands

    op_build.check_build_lock(tmp_path / "fresh")  # nothing built yet: the wait is announced
    assert "building DeepSpeed's CPU communication op once for this environment" in capsys.readouterr().out
    built = tmp_path / "built" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    op_build.check_build_lock(tmp_path / "built")
    assert capsys.readouterr().out == ""
    lock = built / "lock"
    with open(lock, "w"):  # a live build holds its lock open: named and waited for
        op_build.check_build_lock(tmp_path / "built")
    assert f"waiting for pid {os.getpid()}" in capsys.readouterr().out
