"""dschat.utils.startup: nested timed calls count once (outermost), the report is printed once with every
part that ran, and the launcher share appears only when the launch time is exported."""

from __future__ import annotations

import json
from collections import defaultdict

from dschat.utils import startup


def test_timers_count_outermost_and_report_once(monkeypatch, capsys):
    monkeypatch.setattr(startup, "_wall", defaultdict(float))
    monkeypatch.setattr(startup, "_cpu", defaultdict(float))
    monkeypatch.setattr(startup, "_marks", {})
    monkeypatch.setattr(startup, "_reported", False)
    monkeypatch.setenv(startup.LAUNCH_ENV, "0")
    calls = []

    @startup.timed("model_load")
    def inner():
        calls.append("inner")

    @startup.timed("data")
    def outer():
        inner()  # nested: counted in "data" only
        return 7

    assert outer() == 7 and calls == ["inner"]
    assert "data" in startup._wall and "model_load" not in startup._wall
    inner()
    assert "model_load" in startup._wall
    startup.report()
    startup.report()  # once only
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(startup.PREFIX)]
    assert len(lines) == 1
    record = json.loads(lines[0][len(startup.PREFIX):])
    assert {"launcher", "imports", "data", "model_load", "other", "total"} <= set(record["wall"])
    assert {"imports", "data", "model_load", "other", "total"} <= set(record["cpu"])
    before = startup._wall["model_load"]
    inner()  # after the report nothing is counted any more
    assert startup._wall["model_load"] == before and calls == ["inner"] * 3
    monkeypatch.delenv(startup.LAUNCH_ENV)
    assert "launcher" not in startup.summary()["wall"]


def test_lazy_imports_are_counted_apart_only_when_asked(monkeypatch, capsys, tmp_path):
    """With DSCHAT_STARTUP_IMPORTS=1 an import made inside a timed part after dist init began is reported
    as `lazy_imports` and taken out of that part; the import hooks are gone after the report."""
    import builtins
    import importlib
    import sys

    for name in ("_wall", "_cpu"):
        monkeypatch.setattr(startup, name, defaultdict(float))
    monkeypatch.setattr(startup, "_inner_imports", defaultdict(lambda: [0.0, 0.0]))
    monkeypatch.setattr(startup, "_marks", {})
    monkeypatch.setattr(startup, "_reported", False)
    monkeypatch.setattr(builtins, "__import__", builtins.__import__)  # restored whatever happens
    monkeypatch.setattr(importlib, "import_module", importlib.import_module)
    real_import = builtins.__import__
    (tmp_path / "startup_probe_mod.py").write_text("VALUE = sum(i * i for i in range(200000))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "startup_probe_mod", raising=False)

    monkeypatch.delenv(startup.IMPORTS_ENV, raising=False)
    startup.mark("dist_init_start")
    assert builtins.__import__ is real_import  # not asked: nothing wrapped
    monkeypatch.setattr(startup, "_marks", {})
    monkeypatch.setenv(startup.IMPORTS_ENV, "1")
    startup.mark("dist_init_start")
    assert builtins.__import__ is not real_import

    @startup.timed("model_load")
    def load():
        import startup_probe_mod

        return startup_probe_mod.VALUE

    assert load() == sum(i * i for i in range(200000))
    assert startup._cpu["lazy_imports"] > 0 and startup._inner_imports["model_load"][1] > 0
    startup.report()
    record = json.loads(capsys.readouterr().out.split(startup.PREFIX, 1)[1].splitlines()[0])
    assert record["cpu"]["lazy_imports"] == round(startup._cpu["lazy_imports"], 3)
    assert record["cpu"]["model_load"] == round(startup._cpu["model_load"] - startup._inner_imports["model_load"][1], 3)
    assert builtins.__import__ is real_import and not hasattr(importlib.import_module, "counted_import")
