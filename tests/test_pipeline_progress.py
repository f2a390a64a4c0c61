"""The pipeline's heartbeat, read from a stage's metrics.jsonl as the stages write it (MetricLogger), never from
its printed text: real totals (max_steps included), epoch k/n, the training loss, units for selection and
evaluation, an ETA from the rate the records came in. Also the readers that must skip progress records."""

from __future__ import annotations

import json

from dschat.utils.model_card import last_metrics
from dschat.utils.trainer import MetricLogger
from mpo_ext.curves import read_metrics
from mpo_ext.pipeline.progress import ConsoleFilter, MetricsTail, StageProgress


def test_training_heartbeat_shows_real_total_epoch_loss_and_eta(tmp_path):
    logger = MetricLogger(str(tmp_path), None, "sft")
    progress = StageProgress("sft", tmp_path / "metrics.jsonl")
    progress.poll(now=0.0)
    assert progress.heartbeat(5) == "[pipeline] sft | starting | 0:00:05 elapsed"
    logger.start(0, 4, epochs=3, steps_per_epoch=2)  # e.g. --max_steps 4 of 3 epochs x 2 steps
    logger.log(0, "eval", {"loss": 9.0})  # an evaluation loss is not the training loss
    progress.poll(now=1.0)
    assert progress.summary() == "step 0/4"
    logger.log(1, "train", {"loss": 2.5, "lr": 0.1, "epoch": 0.5})
    progress.poll(now=10.0)
    logger.log(3, "train", {"loss": 1.25, "lr": 0.1, "epoch": 1.5})
    progress.poll(now=20.0)
    assert progress.summary() == "step 3/4, epoch 2/3 | loss 1.25 | 0.2 steps/s, ETA 0:00:05"
    logger.log(4, "train", {"loss": 1.0, "epoch": 2.0})
    progress.poll(now=25.0)
    assert progress.summary().startswith("step 4/4, epoch 2/3 | loss 1 |") and "ETA" not in progress.summary()


def test_a_resumed_run_rewrites_metrics_and_the_heartbeat_follows(tmp_path):
    logger = MetricLogger(str(tmp_path), None, "dpo")
    logger.start(0, 6)
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": 1.0 / step})
    progress = StageProgress("dpo", tmp_path / "metrics.jsonl")  # attached after: the earlier attempt is old news
    progress.poll(now=0.0)
    assert progress.summary() == "starting"
    logger.truncate_after(2)  # what --resume does: a new file without the steps after the state
    logger.start(2, 6)
    logger.log(3, "train", {"loss": 0.3})
    progress.poll(now=1.0)
    assert progress.summary() == "step 3/6 | loss 0.3"
    with open(tmp_path / "metrics.jsonl", "a") as fh:  # a record being written: taken once complete
        fh.write('{"step": 4, "phase": "train", "lo')
    progress.poll(now=2.0)
    assert progress.summary().startswith("step 3/6")
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('ss": 0.25}\n')
    progress.poll(now=3.0)
    assert progress.summary().startswith("step 4/6 | loss 0.25 | 0.5 steps/s")


def test_selection_and_evaluation_count_their_own_units(tmp_path):
    logger = MetricLogger(str(tmp_path / "select"), None, "select")
    progress = StageProgress("select", tmp_path / "select" / "metrics.jsonl")
    logger.start(256, 1000, unit="prompts")  # a resumed selection: one shard of 256 done before
    logger.progress(320)
    progress.poll(now=0.0)
    logger.progress(384)
    progress.poll(now=4.0)
    assert progress.summary() == "384/1000 prompts | 16 prompts/s, ETA 0:00:38"
    logger = MetricLogger(str(tmp_path / "eval"), None, "eval")
    progress = StageProgress("eval", tmp_path / "eval" / "metrics.jsonl")
    logger.start(0, 600, unit="answers", task="generating")
    logger.progress(64, model="dpo")
    progress.poll(now=0.0)
    assert progress.summary() == "generating dpo: 64/600 answers"
    logger.start(0, 600, unit="answers", task="scoring")
    progress.poll(now=1.0)
    assert progress.summary() == "scoring: 0/600 answers"


def test_progress_records_are_not_metrics(tmp_path):
    logger = MetricLogger(str(tmp_path), None, "sft")
    logger.start(0, 2, epochs=1, steps_per_epoch=2)
    logger.log(1, "train", {"loss": 2.0})
    logger.log(2, "train", {"loss": 1.0})
    logger.log(2, "eval", {"loss": 1.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "phase": "start", "total_steps": 2, "unit": "steps", "epochs": 1,
                        "steps_per_epoch": 2}
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2]  # curves
    assert set(last_metrics(tmp_path)) == {"train", "eval"}  # model cards


def test_console_shows_each_warning_once_and_no_progress_bars():
    console = ConsoleFilter()
    assert console.shown("[rank0] warning: something odd\n")
    assert console.shown("warning: something odd\n") is None
    assert console.shown("sft epoch 1/1:  50%|#####     | 3/6 [00:01<00:01]\n") is None
    assert console.shown("[eval] step 6 | loss: 1.2\n") and console.shown("Saved training state to x\n")
    assert console.shown("[train] step 3 | loss: 1.0\n") is None


def test_tail_reads_a_file_that_appears_later(tmp_path):
    tail = MetricsTail(tmp_path / "metrics.jsonl")
    assert tail.records() == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "phase": "train"}\nnot json\n')
    assert tail.records() == [{"step": 1, "phase": "train"}]
    assert tail.records() == []
