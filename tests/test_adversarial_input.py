"""Adversarial input (issue 12, input half): scripts that report failure, reward models that yield
NaN, thresholds that are not numbers, data files that are not UTF-8 or are torn, lengths too short to
hold an answer. Each bad input must end in one line naming it and the fix, a non-zero exit, and no
output written or damaged."""

from __future__ import annotations

from conftest import REPO_ROOT, run_command


def test_run_select_script_fails_when_the_run_fails(tmp_path):
    out = tmp_path / "select"
    result = run_command(["bash", "run_select.sh", str(tmp_path / "no-sft"), str(tmp_path / "no-rm"), str(out)],
                         cwd=REPO_ROOT / "step2.5_select", timeout=300)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no-sft" in (out / "select.log").read_text()  # the run did start and named the bad input
