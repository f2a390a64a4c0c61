"""A README.md model card beside every saved model, and the optional upload to the Hugging Face hub.

The card is derived from the run's settings and its `metrics.jsonl`: the base model, the data, the stage,
the settings, the last training and evaluation metrics, and what a `manifest.json` beside the data says
about how that data was made (e.g. a selection step's threshold and split counts). Later steps may add
sections (`set_card_section`), e.g. an evaluation table.

Owns the card's text and the hub upload (`push_to_hub`). Imports `huggingface_hub` and
`dschat.utils.{dist,errors,files,progress_records}` only; callers pass what the card says (no step or trainer
imported).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from dschat.utils.dist import is_rank_0
from dschat.utils.errors import UserError
from dschat.utils.files import atomic_write_text, read_jsonl
from dschat.utils.progress_records import is_data_record, is_metric_record

CARD_FILE = "README.md"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
DATA_NOTE = ("Per split: `rows` trained on; `skipped`: samples without a usable prompt or answer; `truncated`: "
             "answers the length limit cut away entirely; `identical`: pairs whose two sides were the same tokens "
             "after truncation; `prompt_too_long`: prompts over the prompt limit. These were left out unless "
             "`keep_truncated` is 1.")
# Settings that say where a process runs, not how the model was made.
_RUNTIME_SETTINGS = ("local_rank", "deepspeed", "deepscale", "deepscale_config", "print_loss")


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _records(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    # a killed run may leave a torn last line
    return [r for r in read_jsonl(path, skip_unreadable=True) if isinstance(r, dict) and "phase" in r]


def last_metrics(output_dir: str | os.PathLike) -> dict[str, dict]:
    """The last record of each phase ("train", "eval", ...) in OUTPUT/metrics.jsonl."""
    return {record["phase"]: record for record in _records(output_dir) if is_metric_record(record)}


def data_counts(output_dir: str | os.PathLike) -> dict | None:
    """The run's step-0 "data" record (rows per split and what the data build left out), None without one."""
    return next((record for record in reversed(_records(output_dir)) if is_data_record(record)), None)


def data_manifests(data_paths: Sequence[str]) -> dict[str, dict]:
    """{data path: manifest.json found in it or beside it} for local data made by an earlier step."""
    out = {}
    for path in data_paths:
        p = Path(path)
        candidate = p / MANIFEST_FILE if p.is_dir() else p.parent / MANIFEST_FILE
        if p.exists() and candidate.is_file():
            try:
                out[path] = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                continue
    return out


def _manifest_rows(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows = []
    for key in ("stage", "method", "threshold", "split_mode", "pair_source", "label_policy"):
        if manifest.get(key) is not None:
            rows.append((key, manifest[key]))
    for key, value in (manifest.get("counts") or {}).items():
        rows.append((f"count: {key}", value))
    data = manifest.get("data") or {}
    for key in ("skipped", "prompt_too_long", "answers_truncated", "keep_truncated", "chat_format"):
        if data.get(key) is not None:
            rows.append((f"data: {key}", data[key]))
    return rows


def render_card(stage: str, settings: Mapping[str, Any], metrics_dir: str | os.PathLike, base_model: str | None,
                data_paths: Sequence[str], ds_config: Mapping[str, Any] | None = None) -> str:
    """The card's markdown for a finished run whose metrics.jsonl is in `metrics_dir`."""
    metrics = last_metrics(metrics_dir)
    parts = [
        "---", "library_name: transformers", "tags:", "- dschat-mpo", f"- {stage}", "---", "",
        f"# {stage} model", "",
        f"Trained with dschat-mpo, stage **{stage}**.", "",
        f"- Base model: `{base_model}`" if base_model else "- Base model: (none recorded)",
        "- Data: " + ", ".join(f"`{p}`" for p in data_paths) if data_paths else "- Data: (none recorded)",
        "",
    ]
    for path, manifest in data_manifests(data_paths).items():
        parts += [f"## How `{path}` was made", "", table(_manifest_rows(manifest), ("field", "value")), ""]
    data = data_counts(metrics_dir)
    if data is not None:
        parts += ["## Data: rows used and left out", "", DATA_NOTE, "",
                  table([(k, v) for k, v in data.items() if k not in ("phase", "step")], ("count", "value")), ""]
    for phase, record in metrics.items():
        rows = [(k, v) for k, v in record.items() if k != "phase"]
        parts += [f"## Final {phase} metrics", "", table(rows, ("metric", "value")), ""]
    rows = [(k, v) for k, v in sorted(settings.items())
            if k not in _RUNTIME_SETTINGS and v is not None and not callable(v)]
    parts += ["## Settings", "", table(rows, ("setting", "value")), ""]
    if ds_config:
        parts += ["## DeepSpeed config (as the engine ran it)", "", "```json",
                  json.dumps(ds_config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(parts)


def card_files(settings, stage: str, base_model: str | None, engine: Any = None) -> dict[str, str]:
    """`extra_files` for the save helpers: {"README.md": card} from the run's settings (`record()`), its
    --output_dir and the DeepSpeed engine's own config."""
    ds_config = getattr(getattr(engine, "_config", None), "_param_dict", None)
    return {CARD_FILE: render_card(stage, settings.record(), settings.output_dir, base_model,
                                   list(settings.data_path), ds_config)}


def set_card_section(model_dir: str | os.PathLike, title: str, body: str) -> None:
    """Add or replace the `## title` section of a model card (no card, or a read-only one: a warning)."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    try:
        atomic_write_text(path, text)
    except OSError as err:
        print(f"warning: could not update the model card {path} ({err.strerror or err})", flush=True)


def hub_repo_id(settings, output_dir: str | os.PathLike) -> str:
    return settings.hub_model_id or Path(output_dir).resolve().name


def push_to_hub(settings, output_dir: str | os.PathLike) -> None:
    """Upload a saved model directory with huggingface_hub when --push_to_hub is set (rank 0 only)."""
    if not settings.push_to_hub or not is_rank_0():
        return
    repo_id = hub_repo_id(settings, output_dir)
    try:
        api = HfApi()  # the token comes from HF_TOKEN or `huggingface-cli login`
        api.create_repo(repo_id, exist_ok=True, private=settings.hub_private_repo)
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir),
                          ignore_patterns=["checkpoints/*", "*.lock", ".tmp-*"],
                          commit_message=f"Upload {Path(output_dir).name} (dschat-mpo)")
    except Exception as err:  # network, credentials, permissions: all fixable by the user
        message = " ".join(str(err).split())[:300]
        raise UserError(f"--push_to_hub: uploading {output_dir} to {repo_id} failed ({type(err).__name__}: "
                        f"{message}); the model is saved locally; check HF_TOKEN, network access and "
                        f"--hub_model_id, then retry or upload the folder with huggingface-cli upload") from err
    print(f"pushed {output_dir} to the hub as {repo_id}", flush=True)
