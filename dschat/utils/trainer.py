"""The one training-loop skeleton shared by SFT, reward-model and DPO training.

A subclass supplies `compute_loss(batch) -> metrics dict with "loss"`, `evaluate() -> metrics` and
`save_model()`; the base class owns epochs, gradient accumulation (through DeepSpeed), evaluation
cadence, logging (tqdm, console, TensorBoard, metrics.jsonl), periodic full states, resume and SIGTERM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from dschat.utils import startup
from dschat.utils.args import DataSettings, LoggingSettings, PrintLossSettings
from dschat.utils.checkpoint import (
    find_latest_state,
    load_training_state,
    maybe_inject_kill,
    read_trainer_state,
    save_training_state,
    state_identity,
)
from dschat.utils.data.prompt_datasets import data_record
from dschat.utils.device import to_device
from dschat.utils.dist import (
    all_reduce,
    any_rank_true,
    barrier,
    get_rank,
    get_world_size,
    is_rank_0,
    release_shm_segment,
)
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_text, jsonl_lines
from dschat.utils.model.masks import training_attention_mask
from dschat.utils.printing import print_rank_0
from dschat.utils.progress_records import data_counts_record, progress_record, start_record
from dschat.utils.safe_paths import open_append

# --------------------------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[int]):
    """Seeded, epoch-aware sharding (DistributedSampler's arithmetic) that can skip consumed samples.

    Upstream never called `set_epoch`, so every epoch replayed the same order; here the order changes per
    epoch and a resumed run continues exactly where the saved state stopped. Given `lengths`, shuffled
    samples are grouped by length (see `group_by_length`) so that per-batch padding stays small.
    `reshuffle=False` keeps epoch 0's order for every epoch (upstream's, with seed 0: `--sample_order upstream`).
    """

    def __init__(self, dataset_len: int, shuffle: bool, seed: int, rank: int | None = None,
                 world_size: int | None = None, lengths: Sequence[int] | None = None, batch_size: int = 1,
                 reshuffle: bool = True):
        if lengths is not None and len(lengths) != dataset_len:
            raise ValueError(f"{len(lengths)} lengths for {dataset_len} samples")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size = batch_size
        self.reshuffle = reshuffle
        self.num_samples = math.ceil(dataset_len / self.world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if self.reshuffle else 0))
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        order += (order * math.ceil(total / max(1, len(order))))[: total - len(order)]
        if self.shuffle and self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size * self.world_size, generator)
        return order[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start:])

    def order_settings(self) -> dict:
        """Everything `_order` depends on besides the dataset: a resumed run must see the same values."""
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size,
                "group_by_length": self.lengths is not None, "world_size": self.world_size,
                "reshuffle_each_epoch": self.reshuffle}

    def __len__(self) -> int:
        return self.num_samples - self.start


def group_by_length(order: list[int], lengths: Sequence[int], global_batch: int, generator: torch.Generator,
                    megabatch_batches: int = 50) -> list[int]:
    """Reorder a shuffled `order` into global batches of similar lengths.

    Each run of `megabatch_batches` global batches is sorted by length (longest first) and cut into
    batches, so a batch's rows are near one length while which samples meet stays random. The batches
    are then shuffled, except that the longest comes first (a too-large batch fails at step 1, not hours
    in) and a short remainder stays last (so striding by rank keeps every rank on the same batch).
    """
    mega = global_batch * megabatch_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + global_batch] for j in range(0, len(chunk), global_batch)]
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
    if not batches:
        return [i for batch in tail for i in batch]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    rest = batches[:longest] + batches[longest + 1:]
    shuffled = [rest[k] for k in torch.randperm(len(rest), generator=generator).tolist()]
    return [i for batch in [batches[longest], *shuffled, *tail] for i in batch]


def sample_lengths(dataset: Dataset) -> list[int] | None:
    """Per-sample padded row lengths, where the dataset can tell them cheaply (`dataset.lengths()`)."""
    lengths = getattr(dataset, "lengths", None)
    values = lengths() if callable(lengths) else None
    return list(values) if values is not None else None


def make_loader(dataset: Dataset, batch_size: int, collate_fn, shuffle: bool, seed: int,
                group_lengths: bool = False, upstream_order: bool = False) -> DataLoader:
    """A DataLoader over a `ResumableSampler`. `upstream_order` (--sample_order upstream): DeepSpeed-Chat's
    DistributedSampler order, shuffled from seed 0 whatever `seed` and the same every epoch (evaluation
    loaders are shuffled too then, as upstream's were)."""
    if upstream_order:
        shuffle, seed, group_lengths = True, 0, False
    lengths = sample_lengths(dataset) if group_lengths and shuffle else None
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, lengths=lengths, batch_size=batch_size,
                               reshuffle=not upstream_order)
    # Its own generator: a DataLoader iterator otherwise draws from the global RNG, and a resumed run
    # would then sample (dropout, generation) differently from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))


def count_updates(num_samples: int, per_device_batch_size: int, gradient_accumulation_steps: int,
                  num_epochs: int, max_steps: int = 0, world_size: int | None = None) -> int:
    """Optimizer steps a run will take (the LR schedule needs it before the engine exists)."""
    world_size = get_world_size() if world_size is None else world_size
    per_epoch = math.ceil(math.ceil(num_samples / world_size) / per_device_batch_size / gradient_accumulation_steps)
    total = per_epoch * num_epochs
    return min(total, max_steps) if max_steps else total


# --------------------------------------------------------------------------------------------- logging


# A pipeline stage's output directory: <stage directory>-<first 8 hex digits of its identity>.
PIPELINE_STAGE_DIR = re.compile(r"[\w.]+-[0-9a-f]{8}")


def tracker_run_name(settings, label: str) -> str:
    """The name a stage's tracker runs (TensorBoard directory, W&B run) go by: its stage and a short identity.
    Run by `mpo pipeline`, that is the stage's output folder (`step3b_dpo-1a2b3c4d`: the pipeline's identity of
    the stage); otherwise `label` and the first 8 hex digits of a hash of the settings that are not logging or
    checkpoint cadence (so reruns of one configuration share a name and other settings get another)."""
    folder = Path(settings.output_dir).name if settings.output_dir else ""
    if PIPELINE_STAGE_DIR.fullmatch(folder):
        return folder
    logging_only = set(LoggingSettings.group_names(LoggingSettings.flag_group)) - {"seed"}
    recorded = {k: v for k, v in settings.record().items() if k not in logging_only and k != "local_rank"}
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{label}-{digest}"


def tracker_dir(output_dir: str | None) -> Path | None:
    """Where a W&B run writes: the folder holding the output directory (its `wandb/` beside the model folders,
    never inside a saved model)."""
    return Path(output_dir).resolve().parent if output_dir else None


class MetricLogger:
    """Rank-0 sink for metrics: console line, `metrics.jsonl` and the trackers of `--report_to`.

    `tensorboard_dir` turns on TensorBoard scalars (under `tensorboard_dir/run_name`); `wandb_config` (the run's
    settings) starts a Weights & Biases run named `run_name` in `tracker_dir(output_dir)`, beside the output
    directory (its project, mode and entity come from wandb's own WANDB_* variables).
    """

    def __init__(self, output_dir: str | None, tensorboard_dir: str | None, name: str,
                 wandb_config: dict | None = None, run_name: str | None = None):
        self.rank0 = is_rank_0()
        self.path = Path(output_dir) / "metrics.jsonl" if output_dir else None
        self.run_name = run_name or name
        self.writer = None
        self.wandb_run = None
        if self.rank0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard: only when asked for

            self.writer = SummaryWriter(str(Path(tensorboard_dir) / self.run_name))
        if self.rank0 and wandb_config is not None:
            import wandb  # optional dependency, checked by --report_to's validation

            where = tracker_dir(output_dir)
            if where is not None:
                where.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dschat-mpo"), name=self.run_name,
                                        job_type=name, dir=str(where) if where else None, config=wandb_config)

    @classmethod
    def from_settings(cls, settings: LoggingSettings, name: str) -> MetricLogger:
        """The logger a stage's settings ask for (--report_to, and upstream's --enable_tensorboard); its trackers'
        runs are named by `tracker_run_name` (the stage's `run_label`, else `name`), and a wandb run's config is
        the settings' record."""
        chosen = settings.trackers
        run_name = tracker_run_name(settings, getattr(settings, "run_label", "") or name)
        return cls(settings.output_dir, settings.tensorboard_path if "tensorboard" in chosen else None, name,
                   wandb_config=settings.record() if "wandb" in chosen else None, run_name=run_name)

    def start_fresh(self) -> None:
        """A run that does not resume starts a new metrics file: an earlier run's records (a killed run's
        steps) are moved aside to `metrics.previous.jsonl` (replacing an older one), never appended to."""
        if not (self.rank0 and self.path) or not os.path.lexists(self.path):
            return
        previous = self.path.with_name("metrics.previous.jsonl")
        os.replace(self.path, previous)
        print(f"note: {self.path} held an earlier run's metrics; moved to {previous.name}", flush=True)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after a resumed state, so the file reads like one uninterrupted run.

        A torn line (a write cut short by a full disk or a kill) is dropped with a warning: the state
        being resumed is intact, and the lost record is rewritten when its step runs again.
        """
        if not (self.rank0 and self.path and self.path.exists()):
            return
        kept = []
        for number, line, record in jsonl_lines(self.path.read_text(encoding="utf-8", errors="replace")):
            if isinstance(record, ValueError):
                print(f"warning: {self.path}: dropping unreadable line {number} (torn write): {line[:80]!r}",
                      flush=True)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _append(self, record: dict) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open_append(self.path) as fh:
                fh.write(json.dumps(record) + "\n")

    def start(self, step: int, total_steps: int, unit: str = "steps", **fields) -> None:
        """Open a (re)started run in metrics.jsonl with how far it goes (`dschat.utils.progress_records`);
        `mpo pipeline`'s heartbeat reads it. Not a metric: trackers and the console do not see it."""
        if self.rank0:
            self._append(start_record(step, total_steps, unit, **fields))

    def progress(self, step: int, **fields) -> None:
        """How many units (prompts, answers) a stage without training steps has done."""
        if self.rank0:
            self._append(progress_record(step, **fields))

    def data_counts(self, counts: Mapping[str, int]) -> None:
        """The step-0 "data" record: rows per split and what the data build left out. Counts, not metrics:
        trackers and curves do not see it, the model card shows it."""
        if self.rank0 and counts:
            self._append(data_counts_record(0, counts))

    def log(self, step: int, phase: str, metrics: dict[str, float], echo: bool = True) -> None:
        if not self.rank0:
            return
        self._append({"step": step, "phase": phase, **{k: round(float(v), 6) for k, v in metrics.items()}})
        tags = {(key if phase == "train" else f"{phase}/{key}"): float(value) for key, value in metrics.items()}
        if self.writer:
            for tag, value in tags.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(tags, step=step)
        if echo:
            body = " | ".join(f"{k}: {_fmt(v)}" for k, v in metrics.items())
            print(f"[{phase}] step {step} | {body}", flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _fmt(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def log_data_record(logger: MetricLogger, record: dict[str, int], settings: DataSettings) -> None:
    """The run's "data" record at step 0 (metrics.jsonl, hence the model card): rows per split and what the
    data build left out or cut (`dschat.utils.data.prompt_datasets.data_record`), with --keep_truncated."""
    if record:
        logger.data_counts({**record, "keep_truncated": int(settings.keep_truncated)})


def reduce_mean_metrics(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Average accumulated metric sums over steps and ranks with a single collective."""
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([sums[k].detach().float().reshape(()) for k in keys]) / max(1, count)
    return dict(zip(keys, all_reduce(stacked, "mean").tolist()))


# --------------------------------------------------------------------------------------------- trainer


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DIVERGED_FIX = ("no model was saved; lower --learning_rate (or raise --num_warmup_steps), check the data for "
                "broken rows, or resume from an earlier state with --resume")


def check_finite_loss(loss: float, step: int, lr: float) -> None:
    """Stop a diverged run (the same value on every rank: the loss is averaged over them) before it saves a
    model full of NaN. Called at every logged step; the last step is always logged."""
    if not math.isfinite(loss):
        raise UserError(f"training diverged: the training loss is {loss} at optimizer step {step} (learning rate "
                        f"{lr:g}); {DIVERGED_FIX}")


def check_finite_weights(module: torch.nn.Module, step: int) -> None:
    """Every rank checks its own weights (its ZeRO-3 partition), all stop together, before the model is saved."""
    bad = next((name for name, param in module.named_parameters()
                if not torch.isfinite(getattr(param, "ds_tensor", param.data)).all()), None)
    if any_rank_true(bad is not None):
        raise UserError(f"training diverged: the weights hold NaN or inf after optimizer step {step}"
                        f"{f' ({bad})' if bad else ''}; {DIVERGED_FIX}")


def check_data_order(saved: dict | None, current: dict, state_dir) -> None:
    """One clear error when a state is resumed under settings that change the sample order.

    Only keys both sides record are compared: a state written by an older version (which recorded
    fewer or differently named settings, or none) is not refused for what it did not record."""
    if not saved:
        return
    changed = [key for key in sorted(set(saved) & set(current)) if saved.get(key) != current.get(key)]
    if not changed:
        return

    def describe(key: str, value) -> str:
        if key == "world_size":
            return f"{value} rank(s)"
        if key == "group_by_length":
            return "--group_by_length" if value else "--no_group_by_length (or --padding max_length)"
        if key == "shuffle":
            return "shuffled data" if value else "data in file order"
        if key == "reshuffle_each_epoch":
            return "--sample_order epoch" if value else "--sample_order upstream"
        return f"--{key} {value}"

    diffs = "; ".join(f"{describe(k, saved.get(k))} (now {describe(k, current.get(k))})" for k in changed)
    raise UserError(f"--resume: {state_dir} was saved with {diffs}; resume with the same settings, or start "
                    "a new --output_dir")


class ResumableRun:
    """State bookkeeping every training loop shares: position counters, full-state save/resume, SIGTERM.

    Subclasses set `settings`, `logger` and the counters, and describe what goes into a state through
    `engines()`, `extra_state()` / `load_extra_state()` (JSON) and `rank_state()` / `load_rank_state()`
    (per-rank tensors).
    """

    global_step = 0     # optimizer (or PPO) steps done
    _evaluated_at: int | None = None  # the step the last evaluation saw
    epoch = 0
    step_in_epoch = 0   # batches consumed in the current epoch
    _stop_requested = False
    _stop_signal: int | None = None

    def engines(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass

    batch_size_flag = "per_device_train_batch_size"  # the flag that sets the order loader's batch size

    def order_loader(self) -> DataLoader:
        """The loader whose position a state records (its sampler is a `ResumableSampler`)."""
        raise NotImplementedError

    def data_order(self) -> dict:
        """What decides which samples each step sees, read from the sampler that draws them (so a new
        setting of the sampler is recorded without a list to keep; the batch size under the name of the
        flag that sets it): resuming under other values would silently replay or skip data, so a state
        records them and `--resume` refuses a mismatch."""
        order = self.order_loader().sampler.order_settings()
        order[self.batch_size_flag] = order.pop("batch_size")
        order["gradient_accumulation_steps"] = self.settings.gradient_accumulation_steps
        return order

    def state_identity(self) -> dict:
        """What this run's states are states of (signed into each; a state of another stage is not resumed)."""
        return state_identity(self.name, self.engines())

    def _maybe_resume(self) -> None:
        """Resume from the newest state this user's runs wrote (verified before anything of it is loaded);
        the cheap checks (sample order) run before the engine files are read. A run that does not resume
        starts a new metrics file."""
        if not self.settings.resume:
            self.logger.start_fresh()
            return
        state_dir = find_latest_state(self.settings.output_dir, self.state_identity())
        if state_dir is None:
            print_rank_0(f"--resume: no resumable training state under {self.settings.output_dir}/checkpoints; "
                         "starting from scratch")
            self.logger.start_fresh()
            return
        check_data_order(read_trainer_state(state_dir).get("data_order"), self.data_order(), state_dir)
        state, per_rank = load_training_state(state_dir, self.engines())
        self.load_rank_state(per_rank)
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.load_extra_state(state.get("extra", {}))
        self.logger.truncate_after(self.global_step)
        print_rank_0(f"Resumed from {state_dir} (epoch {self.epoch}, optimizer step {self.global_step}, "
                     f"{self.step_in_epoch} batches into the epoch)")

    def save_state(self) -> None:
        if not self.settings.output_dir:
            return
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "extra": self.extra_state(),
                 "data_order": self.data_order()}
        path = save_training_state(self.settings.output_dir, self.global_step, self.engines(), state,
                                   save_total_limit=self.settings.save_total_limit, rank_state=self.rank_state(),
                                   identity=self.state_identity())
        print_rank_0(f"Saved training state to {path}")

    def _on_stop_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the state
        self._stop_requested = True
        self._stop_signal = signum

    @contextlib.contextmanager
    def sigterm_saves_state(self):
        """While training, SIGTERM and SIGINT (Ctrl-C) only set a flag; the loop saves a state at the next
        step and exits 128 + the signal number (143, 130)."""
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def after_step(self) -> None:
        """Periodic state, crash-test hook, and a clean exit after SIGTERM/SIGINT on any rank."""
        if self.settings.save_steps and self.global_step % self.settings.save_steps == 0:
            self.save_state()
        maybe_inject_kill("after_step", self.global_step)
        if any_rank_true(self._stop_requested):
            signum = self._stop_signal or signal.SIGTERM
            print_rank_0(f"{signal.Signals(signum).name} received: saving a training state before exiting")
            self.save_state()
            release_shm_segment()
            raise SystemExit(128 + signum)


class Trainer(ResumableRun):
    """Base loop. `engine` is the trained DeepSpeed engine; batches are dicts of tensors."""

    name = "train"
    rows_per_sample = 1  # pairwise trainers (RM, DPO) see chosen and rejected rows: 2

    def __init__(self, settings, engine, train_dataset: Dataset, eval_dataset: Dataset | None, collate_fn,
                 tokenizer=None):
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.device = engine.device
        self.train_loader = make_loader(train_dataset, settings.per_device_train_batch_size, collate_fn,
                                        shuffle=True, seed=settings.seed or 0, group_lengths=settings.groups_by_length,
                                        upstream_order=settings.upstream_order)
        self.eval_loader = (make_loader(eval_dataset, settings.per_device_eval_batch_size, collate_fn,
                                        shuffle=False, seed=0, upstream_order=settings.upstream_order)
                            if eval_dataset is not None and len(eval_dataset) else None)
        self.logger = MetricLogger.from_settings(settings, self.name)
        self.data_record = data_record(train_dataset, eval_dataset)
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self._stop_requested = False

    def model_attention_mask(self, batch: dict) -> torch.Tensor | None:
        """The attention mask to pass with a (right-padded) training batch; see `training_attention_mask`."""
        return training_attention_mask(batch["attention_mask"], self.settings.pad_mask)

    # ---- hooks for subclasses
    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def save_model(self) -> None:
        raise NotImplementedError

    def order_loader(self) -> DataLoader:
        return self.train_loader

    def engines(self) -> dict:
        return {"model": self.engine}

    # ---- the loop
    @property
    def updates_per_epoch(self) -> int:
        return count_updates(self.train_loader.sampler.dataset_len, self.settings.per_device_train_batch_size,
                             self.settings.gradient_accumulation_steps, 1)

    def total_updates(self) -> int:
        return count_updates(self.train_loader.sampler.dataset_len, self.settings.per_device_train_batch_size,
                             self.settings.gradient_accumulation_steps, self.settings.num_train_epochs, self.settings.max_steps)

    def after_eval(self, metrics: dict[str, float]) -> None:
        """Hook after each logged evaluation (health checks, keeping the best model)."""

    @startup.timed("initial_eval")  # counted only before the first step
    def _log_eval(self) -> None:
        self._evaluated_at = self.global_step
        metrics = self.evaluate()
        if metrics:
            self.logger.log(self.global_step, "eval", metrics)
            self.after_eval(metrics)

    def _final_eval(self) -> None:
        """An evaluation of the model as it is saved: where --max_steps (or a stop) ended the run between the
        evaluations the schedule makes, the last logged eval, the model card's "final eval metrics" and the
        health verdict would otherwise describe an earlier model."""
        if self._evaluated_at != self.global_step:
            print_rank_0(f"***** Evaluating the final model (step {self.global_step}) *****")
            self._log_eval()

    def train(self) -> None:
        with self.sigterm_saves_state():
            self._maybe_resume()
            total = self.total_updates()
            print_rank_0(f"***** Running training ({self.name}): {len(self.train_loader.sampler) * get_world_size()} "
                         f"samples, {total} optimizer steps *****")
            self.logger.start(self.global_step, total, epochs=self.settings.num_train_epochs,
                              steps_per_epoch=self.updates_per_epoch)
            if self.global_step == 0 and self.step_in_epoch == 0:
                log_data_record(self.logger, self.data_record, self.settings)
                self._log_eval()
            self._run_epochs(total)
            check_finite_weights(self.engine.module, self.global_step)
            self._final_eval()
        self.logger.close()

    def _run_epochs(self, total: int) -> None:
        settings = self.settings
        gas = settings.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        micro_count, samples, tokens, window_start = 0, 0, torch.zeros((), device=self.device), time.time()
        while self.epoch < settings.num_train_epochs and self.global_step < total:
            sampler = self.train_loader.sampler
            sampler.set_epoch(self.epoch, start=self.step_in_epoch * settings.per_device_train_batch_size)
            bar = tqdm(total=self.updates_per_epoch, initial=self.step_in_epoch // gas, disable=not is_rank_0(),
                       desc=f"{self.name} epoch {self.epoch + 1}/{settings.num_train_epochs}", dynamic_ncols=True)
            for batch in self.train_loader:
                batch = to_device(batch, self.device)
                self.engine.train()
                boundary = self.engine.is_gradient_accumulation_boundary()
                metrics = self.compute_loss(batch)
                self.engine.backward(metrics["loss"])
                self.engine.step()
                self.step_in_epoch += 1
                for key, value in metrics.items():
                    sums[key] += value.detach().float()
                micro_count += 1
                samples += int(batch["input_ids"].shape[0]) // self.rows_per_sample if "input_ids" in batch else 0
                if "attention_mask" in batch:
                    tokens += batch["attention_mask"].sum()
                if isinstance(settings, PrintLossSettings) and settings.print_loss:  # not a flag of step 2
                    print(f"Epoch: {self.epoch}, Step: {self.step_in_epoch}, Rank: {get_rank()}, "
                          f"loss = {metrics['loss'].item()}", flush=True)
                if not boundary:
                    continue
                self.global_step += 1
                startup.report()  # first optimizer step: print where start-up time went (once)
                bar.update(1)
                if self.global_step % settings.log_interval == 0 or self.global_step == total:
                    elapsed = max(time.time() - window_start, 1e-9)
                    logged = reduce_mean_metrics(dict(sums), micro_count)
                    logged["lr"] = self.engine.get_lr()[0]
                    logged["samples_per_second"] = samples * get_world_size() / elapsed
                    logged["tokens_per_second"] = float(tokens) * get_world_size() / elapsed
                    logged["epoch"] = self.epoch + self.step_in_epoch / max(1, len(self.train_loader))
                    self.logger.log(self.global_step, "train", logged, echo=False)
                    try:
                        check_finite_loss(logged["loss"], self.global_step, logged["lr"])
                    except UserError:
                        bar.close()  # end the progress line: the error gets a line of its own
                        raise
                    bar.set_postfix(loss=f"{logged['loss']:.4f}")
                    sums.clear()
                    micro_count, samples, tokens, window_start = 0, 0, torch.zeros((), device=self.device), time.time()
                if settings.eval_interval and self.global_step % settings.eval_interval == 0:
                    self._log_eval()
                self.after_step()
                if self.global_step >= total:
                    break
            bar.close()
            if self.step_in_epoch >= len(self.train_loader):
                self.epoch += 1
                self.step_in_epoch = 0
                print_rank_0(f"***** Evaluating, Epoch {self.epoch}/{settings.num_train_epochs} *****")
                self._log_eval()
                if settings.save_steps and self.epoch < settings.num_train_epochs and self.global_step < total:
                    self.save_state()
        barrier()
