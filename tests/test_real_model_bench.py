"""benchmarks/real_model.py's bookkeeping: the accuracy interval it reports and what --resume keeps (the
benchmark itself, ~45 min on 2 cores, is not run in the suite)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from real_model import FULL, STAGES, finished_record, resumable_stages, settings_record, wilson_interval  # noqa: E402

from dschat.utils.errors import UserError  # noqa: E402


def test_wilson_interval_by_hand():
    # 60 of 100, z = 1.96: centre (0.6 + 0.019208) / 1.038416 = 0.596300; half-width
    # 1.96 * sqrt(0.0024 + 0.000096040) / 1.038416 = 0.094300 -> [0.5020, 0.6906]
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.50200, abs=1e-5) and high == pytest.approx(0.69060, abs=1e-5)
    # symmetric about one half, inside [0, 1] at the edges, and everything without data
    assert wilson_interval(50, 100)[0] == pytest.approx(1 - wilson_interval(50, 100)[1])
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _finish(work: Path, *names: str) -> None:
    for name in names:
        (work / name).mkdir(parents=True, exist_ok=True)
        finished_record(work / "logs", name).parent.mkdir(parents=True, exist_ok=True)
        finished_record(work / "logs", name).write_text(json.dumps({"seconds": 1.0, "peak_rss_mib": 2.0}))


def test_resume_keeps_the_leading_finished_stages_of_the_same_settings(tmp_path):
    args = Namespace(seed=1, hh_file=tmp_path / "hh.jsonl", model_dir=None)
    settings = settings_record(args, FULL)
    assert resumable_stages(tmp_path, settings, resume=False, convert=True) == {}  # a fresh run: everything runs
    _finish(tmp_path, "convert", "sft", "rm", "dpo")  # select did not finish: dpo after it is not kept
    kept = resumable_stages(tmp_path, settings, resume=True, convert=True)
    assert list(kept) == ["convert", "sft", "rm"] and kept["rm"]["seconds"] == 1.0
    # without conversion (--model_dir) the chain starts at sft
    assert list(resumable_stages(tmp_path, settings, resume=True, convert=False)) == ["sft", "rm"]
    _finish(tmp_path, *STAGES)
    assert list(resumable_stages(tmp_path, settings, resume=True, convert=True)) == list(STAGES)
    # a recorded stage whose output folder is gone runs again
    (tmp_path / "select").rmdir()
    assert list(resumable_stages(tmp_path, settings, resume=True, convert=True)) == ["convert", "sft", "rm"]
    # a run that starts a stage again (here: without --resume) drops every record from there on, so a later
    # --resume cannot take an earlier run's record for a stage this run left half-done
    _finish(tmp_path, *STAGES)
    assert resumable_stages(tmp_path, settings, resume=False, convert=True) == {}
    assert not list((tmp_path / "logs").glob("*.done.json"))
    assert resumable_stages(tmp_path, settings, resume=True, convert=True) == {}
    # a torn record proves nothing; an unreadable settings file is one line naming it
    _finish(tmp_path, "convert", "sft")
    finished_record(tmp_path / "logs", "sft").write_text("{\"seconds\": 1")
    assert list(resumable_stages(tmp_path, settings, resume=True, convert=True)) == ["convert"]
    (tmp_path / "settings.json").write_bytes(b"\xff{")
    with pytest.raises(UserError, match="settings.json is unreadable"):
        resumable_stages(tmp_path, settings, resume=True, convert=True)
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="other settings"):
        resumable_stages(tmp_path, settings_record(Namespace(**{**vars(args), "seed": 2}), FULL), resume=True,
                         convert=True)
