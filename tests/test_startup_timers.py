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
