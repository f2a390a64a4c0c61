"""Run `python -m MODULE ARGS` in a process forked from a pre-imported server instead of a fresh interpreter.

Why: a one-rank stage spends most of its CPU time before its first step importing torch, transformers'
model classes and DeepSpeed (~10 of 13 CPU-s per stage on 2 cores), and a chain of stages repeats that in
every stage. Here the imports happen once, in the standard library's forkserver (`multiprocessing`,
`set_forkserver_preload`), and each job is a child forked from it: still a fresh process with its own
torch.distributed state, seeds, signal handlers and exit status, but with those modules already loaded.

What the child does, so that it behaves as `python -m MODULE ARGS` would: it takes the job's environment
(os.environ replaced, so C libraries see it too), working directory, `sys.argv` and `sys.path` (cwd, then
PYTHONPATH, first); writes fd 1 and 2 into a pipe the caller reads like a Popen pipe; resets what it
inherited from the server (multiprocessing's "I am a child" state, numpy's global seed); runs the module
with `runpy` as `__main__`; then ends as an interpreter does: traceback and 1 for an exception,
`SystemExit(n)` -> n, KeyboardInterrupt -> killed by SIGINT, non-daemon threads joined, atexit handlers
run (multiprocessing children skip them), streams flushed. `WarmProcess` gives the caller the part of
`subprocess.Popen` it uses: `stdout` (text lines), `wait()` -> return code (negative for a signal), `pid`.

Fork-safety assumptions (checked by tests/test_warm_start.py):
- The server is single-threaded when it forks: the preload only imports (no tensor op, so torch's
  intra-op/OpenMP pools do not exist yet; tokenizers not used). Each child then sets its thread count
  from its own OMP_NUM_THREADS at its first op, as a fresh interpreter does.
- The server is started with the job's environment (its PYTHONPATH decides where the preloaded packages
  come from; torch reads OMP_NUM_THREADS at import) and restarted when a job comes with another
  environment or preload, so a child never runs under settings imported for other ones (the stages of
  one pipeline run share one environment, hence one server). Unseeded generators (torch's, numpy's, Python's) get fresh entropy per child.
- multiprocessing's own rule holds: the caller's main module must import without side effects (the
  child re-imports it, as with the spawn method). The server's socket is a private 0600 file (Python >=
  3.10.9 / 3.11.1); where the forkserver cannot start, `launch` returns None and the caller uses Popen.
"""

from __future__ import annotations

import atexit
import io
import itertools
import multiprocessing
import os
import runpy
import signal
import sys
import threading
import traceback
from multiprocessing import forkserver, process

_state: dict = {"context": None, "key": None, "failed": False}


class WarmProcess:
    """A job started by `launch`: the surface of `subprocess.Popen` the callers use."""

    def __init__(self, child: multiprocessing.Process, stdout: io.TextIOBase):
        self._child, self.stdout, self.pid = child, stdout, child.pid
        self.returncode: int | None = None

    def wait(self) -> int:
        self._child.join()
        self.returncode = self._child.exitcode
        self.stdout.close()
        return self.returncode


def module_command(command: list[str]) -> tuple[str, list[str]] | None:
    """`[sys.executable, "-m", MODULE, *ARGS]` -> (MODULE, ARGS); None for any other command line."""
    if len(command) >= 3 and command[0] == sys.executable and command[1] == "-m":
        return command[2], list(command[3:])
    return None


def launch(module: str, argv: list[str], *, env: dict[str, str], cwd: str | os.PathLike,
           preload: list[str] | tuple[str, ...]) -> WarmProcess | None:
    """Start `python -m module *argv` as a child of the warm server; None (one warning line, once) where
    no forkserver can run here, so the caller starts a fresh interpreter instead."""
    context = _server(env, preload)
    if context is None:
        return None
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(module, list(argv), dict(env), str(cwd), writer),
                            name=f"warm {module}")
    try:
        child.start()
    except (OSError, EOFError) as err:
        reader.close()
        writer.close()
        _give_up(f"the warm-start server stopped ({err})")
        return None
    writer.close()
    stdout = open(os.dup(reader.fileno()), errors="replace")  # noqa: SIM115 - closed by WarmProcess.wait
    reader.close()
    return WarmProcess(child, stdout)


def forkserver_socket_is_private(version: tuple[int, ...]) -> bool:
    """Before 3.10.9 / 3.11.1 the forkserver bound an abstract-namespace socket that any local user could
    connect to and have code run as us; those versions start fresh interpreters instead."""
    return tuple(version[:3]) >= ((3, 10, 9) if tuple(version[:2]) == (3, 10) else (3, 11, 1))


def _give_up(why: str) -> None:
    if not _state["failed"]:
        print(f"[warm_start] warning: {why}; starting each job in a fresh interpreter instead", flush=True)
    _state["failed"] = True


def _server(env: dict[str, str], preload) -> multiprocessing.context.BaseContext | None:
    """The forkserver context, started (and its preload imported) with `env` on first use."""
    if _state["failed"]:
        return None
    key = (tuple(sorted(env.items())), tuple(preload))
    if _state["context"] is not None:
        if _state["key"] == key:
            return _state["context"]
        forkserver._forkserver._stop()  # started for another environment: its imports saw other settings
        _state["context"] = None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        _give_up("this platform has no forkserver start method")
        return None
    if not forkserver_socket_is_private(sys.version_info):
        _give_up(f"Python {sys.version.split()[0]}'s forkserver listens on a socket other local users can reach "
                 "(CVE-2022-42919; fixed in 3.10.9 and 3.11.1)")
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *preload])
    saved = dict(os.environ)
    try:  # the server inherits the environment: the job's PYTHONPATH decides what the preload imports
        os.environ.clear()
        os.environ.update(env)
        forkserver.ensure_running()
    except OSError as err:
        _give_up(f"the warm-start server could not start ({err})")
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _state["context"], _state["key"] = context, key
    return context


# ------------------------------------------------------------------------------------- in the child


def _child_main(module: str, argv: list[str], env: dict[str, str], cwd: str, output) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    paths = [cwd, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    sys.path[:] = paths + [p for p in sys.path if p not in paths]
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout = sys.__stdout__ = _text_stream(1, "strict", unbuffered)
    sys.stderr = sys.__stderr__ = _text_stream(2, "backslashreplace", True)
    _forget_parent()
    sys.argv = [module, *argv]  # runpy puts the module's file in argv[0], as `python -m` does
    code, interrupted = _run_module(module)
    for thread in threading.enumerate():  # an interpreter waits for its non-daemon threads, then atexit
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:  # as CPython does since 3.8: die by the signal, so the parent sees -SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _text_stream(fd: int, errors: str, write_through: bool) -> io.TextIOWrapper:
    encoding = os.environ.get("PYTHONIOENCODING", "").split(":")[0] or "utf-8"
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=encoding, errors=errors,
                            write_through=write_through)


def _forget_parent() -> None:
    """Become a main process again: multiprocessing's child bookkeeping, and fresh seeds where a new interpreter
    would draw them (torch's default generator and numpy's global one; Python's `random` reseeds at fork)."""
    me = process.current_process()
    me._identity, me._name, me._parent_pid, me._parent_name = (), "MainProcess", None, None
    process._parent_process, process._children, process._process_counter = None, set(), itertools.count(1)
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None:
        numpy.random.seed()
    if torch is not None:
        torch.seed()


def _run_module(module: str) -> tuple[int, bool]:
    """Run `module` as __main__; (exit code an interpreter would give, whether it ended by Ctrl-C)."""
    preloaded = sys.modules.get(module)
    if preloaded is not None and not hasattr(preloaded, "__path__"):
        del sys.modules[module]  # run afresh as __main__ (and no runpy warning about it)
    sys.modules.pop(f"{module}.__main__", None)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0, False
    except SystemExit as exit_:
        return _exit_status(exit_.code), False
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130, True
    except BaseException:  # noqa: BLE001 - an uncaught exception: print it and return 1, as an interpreter does
        kind, error, trace = sys.exc_info()
        sys.excepthook(kind, error, trace.tb_next)  # from the module's frames on, without this function's
        return 1, False


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
