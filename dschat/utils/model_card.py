"""A README.md model card beside every saved model, and the optional upload to the Hugging Face hub.

The card is derived from the run's settings and its `metrics.jsonl`. Its front matter is huggingface_hub's
card metadata (`ModelCardData`: `base_model` and `datasets` where they are hub ids, the base model's
`license` where its own card names one, `library_name`, `pipeline_tag` and valid tags), so the hub lists the
model under its base and data. The body says how the model was made (stage, what it started from, the data;
for DPO its reference, for PPO the reward model and the KL reference, MPO's defining choice), how the data
was made (a `manifest.json` beside it, e.g. the synthetic task's or a selection step's threshold and counts),
the last training and evaluation metrics, how to use it (transformers code to load and generate, or the
reward scorer), every setting, the DeepSpeed config the engine ran with and the framework versions. Later
steps add sections (`set_card_section`), e.g. an evaluation table, each under its own key.

Paths never appear absolute: a local path is written relative to the run root (the pipeline run directory
holding `pipeline.json`, else the folder holding the stage's output) or, outside it, as its name; hub ids
as they are.

Owns the card's text, the framework versions a run records (`framework_versions`, also `mpo --version`'s) and
the hub upload (`push_to_hub`). Imports `dschat.utils.{errors,files,progress_records}` only (huggingface_hub
and the rank helpers where they are used: they take seconds to import); callers pass what the card says (no
step or trainer imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

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
HEALTH_FILE = "health.json"
RUN_ROOT_MARKER = "pipeline.json"  # what `mpo pipeline` writes in its run directory
# Settings that say where a process runs, not how the model was made.
_RUNTIME_SETTINGS = ("local_rank", "deepspeed", "deepscale", "deepscale_config", "print_loss")
FRAMEWORKS = ("dschat-mpo", "torch", "deepspeed", "transformers", "datasets", "huggingface_hub")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
MANIFEST_ROWS = 40  # a manifest's fields shown at most

# Per settings type: (hub tag of the stage, what the stage does, more tags).
STAGES = {
    "SFTSettings": ("sft", "supervised fine-tuning (DeepSpeed-Chat step 1)", ()),
    "RewardSettings": ("reward-model", "a Bradley-Terry reward model (DeepSpeed-Chat step 2)", ("rlhf",)),
    "DPOSettings": ("dpo", "DPO on preference pairs (MPO step 3b: the easy pairs of the reward-gap selection)",
                    ("mpo",)),
    "PPOSettings": ("ppo", "PPO against a reward model (MPO step 3 on the hard prompts; DeepSpeed-Chat step 3)",
                    ("rlhf", "mpo")),
}


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- paths


def run_root(model_dir: str | os.PathLike) -> Path:
    """The run a model directory belongs to: the nearest of its parents (up to three levels) holding the
    pipeline's `pipeline.json`, else the folder holding it."""
    here = Path(model_dir).resolve()
    for parent in list(here.parents)[:3]:
        if (parent / RUN_ROOT_MARKER).is_file():
            return parent
    return here.parent


def is_local(value: str) -> bool:
    """A value that names a local file or folder (it exists, or is written as a path) rather than a hub id."""
    return value.startswith(("/", ".", "~")) or os.path.exists(value)


def card_path(path: str | os.PathLike, model_dir: str | os.PathLike) -> str:
    """How a card names `path`: a hub id as it is; a local path relative to the run root of `model_dir`, or,
    outside it, by its name (never an absolute, possibly temporary, path)."""
    text = str(path)
    if not is_local(text):
        return text
    local = Path(text).expanduser().resolve()
    try:
        relative = local.relative_to(run_root(model_dir))
    except ValueError:
        return local.name or text
    return relative.as_posix() or "."


def card_value(value: Any, model_dir: str | os.PathLike) -> Any:
    """A setting's value as the card shows it: local paths (alone or in a list) through `card_path`."""
    if isinstance(value, str) and value and (value.startswith(("/", "~")) or os.path.isabs(value)
                                             or (os.sep in value and os.path.exists(value))):
        return card_path(value, model_dir)
    if isinstance(value, (list, tuple)):
        return [card_value(v, model_dir) for v in value]
    return value


def hub_dataset(path: str) -> str | None:
    """The hub dataset id a --data_path names (`org/name/subset` -> `org/name`), None for local data."""
    if is_local(path) or path.startswith("local/"):
        return None
    ident = "/".join(path.split("/")[:2])
    return ident if HUB_ID.fullmatch(ident) else None


def card_metadata(model_dir: str | os.PathLike) -> dict:
    """The front matter of a model folder's own card ({} without one)."""
    from huggingface_hub import metadata_load  # imported where used: a second of imports

    path = Path(model_dir) / CARD_FILE
    try:
        return (metadata_load(path) or {}) if path.is_file() else {}
    except Exception:  # noqa: BLE001 - a base model's own card, whatever it holds, must not stop a save
        return {}


def hub_lineage(base_model: str | None) -> tuple[str | None, str | None]:
    """(hub id the model descends from, its license): the base model itself when it is a hub id, else what the
    local base model's own card says (a chain of stages leads back to the hub model it started from)."""
    if not base_model:
        return None, None
    if not is_local(base_model):
        return base_model, None
    meta = card_metadata(base_model)
    base = meta.get("base_model")
    return (base if isinstance(base, str) else None), meta.get("license")


def framework_versions() -> dict[str, str]:
    """Installed versions of the frameworks a run depends on (read from package metadata: nothing imported)."""
    found = {"python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# --------------------------------------------------------------------------------------------- reading the run


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
                manifest = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                continue
            if isinstance(manifest, dict):
                out[path] = manifest
    return out


def _manifest_rows(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Every plain field of a manifest (the synthetic task's, a selection's), nested ones as `key: sub`
    (a selection's `counts` as `count: easy`), at most MANIFEST_ROWS."""
    rows: list[tuple[str, Any]] = []
    for key, value in manifest.items():
        if isinstance(value, Mapping):
            label = "count" if key == "counts" else key
            rows += [(f"{label}: {sub}", v) for sub, v in value.items() if not isinstance(v, (Mapping, list))]
        elif not isinstance(value, list) and value is not None:
            rows.append((key, value))
    return rows[:MANIFEST_ROWS]


def _health_status(metrics_dir: str | os.PathLike) -> str | None:
    try:
        record = json.loads((Path(metrics_dir) / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(record.get("status")) if isinstance(record, dict) and record.get("status") else None


# --------------------------------------------------------------------------------------------- the card


def made_rows(settings, base_model: str | None, model_dir: str | os.PathLike) -> list[tuple[str, Any]]:
    """The "how it was made" table: what the model started from and learned from, and for the preference stages
    what it was measured against (DPO's reference; PPO's reward model and KL reference)."""
    def path(value: str | None) -> str:
        return f"`{card_path(value, model_dir)}`" if value else "(none)"

    rows: list[tuple[str, Any]] = [("initialised from", path(base_model))]
    rows.append(("data", ", ".join(path(p) for p in getattr(settings, "data_path", []) or []) or "(none)"))
    if getattr(settings, "data_split", None):
        rows.append(("data split (phases 1,2,3)", settings.data_split))
    kind = type(settings).__name__
    if kind == "DPOSettings":
        rows += [("DPO reference (the implicit KL is taken against it)", path(settings.reference_path)),
                 ("beta", settings.beta)]
        if settings.reward_model_name_or_path:
            rows.append(("held-out evaluations scored by", path(settings.reward_model_name_or_path)))
    if kind == "PPOSettings":
        reference = settings.reference_model_name_or_path
        rows += [("reward model (and critic initialisation)", path(settings.critic_model_name_or_path)),
                 ("KL reference", path(reference) if reference else
                  f"the actor's initial weights, {path(settings.actor_model_name_or_path)}"),
                 ("KL coefficient", f"{settings.init_kl_coef:g}" + (f" (adaptive, target {settings.kl_target:g})"
                                                                      if settings.kl_target else " (fixed)"))]
    for name, label in (("learning_rate", "learning rate"), ("actor_learning_rate", "actor learning rate"),
                        ("num_train_epochs", "epochs"), ("max_steps", "max steps (0: all epochs)"),
                        ("per_device_train_batch_size", "batch per device"),
                        ("per_device_generation_batch_size", "prompts per device per generation"),
                        ("max_seq_len", "max sequence length"), ("seed", "seed")):
        if hasattr(settings, name):
            rows.append((label, getattr(settings, name)))
    derived = settings.derived() if hasattr(settings, "derived") else {}
    if "dtype" in derived:
        rows.append(("precision", derived["dtype"]))
    return rows


def usage_snippet(model_dir: str | os.PathLike, reward_layout: bool, chat_template: bool, repo_id: str | None) -> str:
    """Code that loads the model: transformers to generate with a causal LM; dschat's reward scorer for a reward
    model (its value head is not a transformers class)."""
    where = repo_id or card_path(model_dir, model_dir)
    if reward_layout:
        return "\n".join([
            "```python", "# pip install dschat-mpo  (the value head and the reward ending are read by dschat)",
            "import torch", "from dschat.utils.inference import RewardScorer", "",
            f'scorer = RewardScorer.from_path("{where}", torch.device("cpu"))',
            'prompts = ["\\n\\nHuman: Name three fruits.\\n\\nAssistant:"]',
            'print(scorer.score(prompts, [" apple, banana, cherry."]))  # one reward per answer', "```"])
    prompt = (['messages = [{"role": "user", "content": "Name three fruits."}]',
               "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
               " return_dict=True)"] if chat_template else
              ['prompt = "\\n\\nHuman: Name three fruits.\\n\\nAssistant:"  # the format it was trained on',
               'inputs = tokenizer(prompt, return_tensors="pt")'])
    return "\n".join([
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")', *prompt,
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```"])


def render_card(stage: str, settings: Mapping[str, Any], metrics_dir: str | os.PathLike, base_model: str | None,
                data_paths: Sequence[str], ds_config: Mapping[str, Any] | None = None, *,
                model_dir: str | os.PathLike | None = None, made: Sequence[tuple[str, Any]] = (),
                kind: str = "", reward_layout: bool = False, chat_template: bool = False,
                repo_id: str | None = None) -> str:
    """The card's markdown for a finished run whose metrics.jsonl is in `metrics_dir`, saved in `model_dir`
    (default: `metrics_dir`); `settings` is the run's record, `made` the "how it was made" rows."""
    from huggingface_hub import ModelCardData  # imported where used: a second of imports

    model_dir = Path(model_dir if model_dir is not None else metrics_dir)
    tag, what, more_tags = STAGES.get(kind, ("", "", ()))
    hub_base, license_name = hub_lineage(base_model)
    datasets = sorted({d for d in (hub_dataset(p) for p in data_paths) if d})
    card_data = ModelCardData(
        base_model=hub_base, datasets=datasets or None, license=license_name, library_name="transformers",
        pipeline_tag=None if reward_layout else "text-generation",
        tags=["dschat-mpo", "deepspeed-chat", *([tag] if tag else []), *more_tags])
    metrics = last_metrics(metrics_dir)
    base = f"`{card_path(base_model, model_dir)}`" if base_model else "(none recorded)"
    intro = f"Trained with dschat-mpo, stage **{stage}**" + (f": {what}" if what else "") + f", from {base}."
    if kind == "PPOSettings":
        reference = settings.get("reference_model_name_or_path") or settings.get("actor_model_name_or_path")
        intro += (f" Its reward was the reward model `{card_path(settings.get('critic_model_name_or_path'), model_dir)}`"
                  f" and its KL penalty was taken against `{card_path(reference, model_dir)}`.")
    parts = ["---", card_data.to_yaml(), "---", "", f"# {stage} model", "", intro, ""]
    rows = list(made) or [("initialised from", base),
                          ("data", ", ".join(f"`{card_path(p, model_dir)}`" for p in data_paths) or "(none)")]
    health = _health_status(metrics_dir)
    if health:
        rows.append(("health guards' verdict (health.json)", health))
    parts += ["## How it was made", "", table(rows, ("", "value")), ""]
    for path, manifest in data_manifests(data_paths).items():
        parts += [f"## How `{card_path(path, model_dir)}` was made", "",
                  table(_manifest_rows(manifest), ("field", "value")), ""]
    data = data_counts(metrics_dir)
    if data is not None:
        parts += ["## Data: rows used and left out", "", DATA_NOTE, "",
                  table([(k, v) for k, v in data.items() if k not in ("phase", "step")], ("count", "value")), ""]
    for phase, record in metrics.items():
        metric_rows = [(k, v) for k, v in record.items() if k != "phase"]
        parts += [f"## Final {phase} metrics", "", table(metric_rows, ("metric", "value")), ""]
    parts += ["## Usage", "", usage_snippet(model_dir, reward_layout, chat_template, repo_id), ""]
    setting_rows = [(k, card_value(v, model_dir)) for k, v in sorted(settings.items())
                    if k not in _RUNTIME_SETTINGS and v is not None and not callable(v)]
    parts += ["## Settings", "", table(setting_rows, ("setting", "value")), ""]
    if ds_config:
        parts += ["## DeepSpeed config (as the engine ran it)", "", "```json",
                  json.dumps(ds_config, indent=2, sort_keys=True, default=str), "```", ""]
    parts += ["## Framework versions", "", table(list(framework_versions().items()), ("framework", "version")), ""]
    return "\n".join(parts)


def card_files(settings, stage: str, base_model: str | None, engine: Any = None, *,
               model_dir: str | os.PathLike | None = None, reward_layout: bool = False,
               tokenizer: Any = None) -> dict[str, str]:
    """`extra_files` for the save helpers: {"README.md": card} from the run's settings (`record()`), its
    --output_dir (metrics, health) and the DeepSpeed engine's own config, for the model saved in `model_dir`
    (default --output_dir) in the reward-model layout or not."""
    ds_config = getattr(getattr(engine, "_config", None), "_param_dict", None)
    target = Path(model_dir if model_dir is not None else settings.output_dir)
    repo_id = hub_repo_id(settings, target) if getattr(settings, "push_to_hub", False) else None
    card = render_card(stage, settings.record(), settings.output_dir, base_model, list(settings.data_path), ds_config,
                       model_dir=target, made=made_rows(settings, base_model, target), kind=type(settings).__name__,
                       reward_layout=reward_layout, chat_template=bool(getattr(tokenizer, "chat_template", None)),
                       repo_id=repo_id)
    return {CARD_FILE: card}


def section_marker(key: str) -> str:
    """The line that identifies a keyed section (a hash of its key: keys may hold local paths)."""
    return f"<!-- dschat-mpo section {hashlib.sha256(key.encode()).hexdigest()[:16]} -->"


def set_card_section(model_dir: str | os.PathLike, title: str, body: str, key: str | None = None) -> None:
    """Add or replace a section of a model card (no card, or a read-only one: a warning). Without `key` the
    section is the one titled `## title`; with `key` (e.g. an evaluation run) the one carrying that key, so
    sections of several keys live side by side under titles that may repeat."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    marker = f"{section_marker(key)}\n" if key is not None else ""
    section = f"## {title}\n{marker}\n{body.strip()}\n"
    anchor = re.escape(marker) if key is not None else ""
    heading = r"[^\n]*" if key is not None else re.escape(title)
    pattern = re.compile(rf"^## {heading}\n{anchor}.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text, count=1) if pattern.search(text) \
        else text.rstrip() + "\n\n" + section
    try:
        atomic_write_text(path, text)
    except OSError as err:
        print(f"warning: could not update the model card {path} ({err.strerror or err})", flush=True)


def hub_repo_id(settings, output_dir: str | os.PathLike) -> str:
    return settings.hub_model_id or Path(output_dir).resolve().name


def push_to_hub(settings, output_dir: str | os.PathLike) -> None:
    """Upload a saved model directory with huggingface_hub when --push_to_hub is set (rank 0 only)."""
    from dschat.utils.dist import is_rank_0  # torch: `mpo --version` reads this module's versions

    if not settings.push_to_hub or not is_rank_0():
        return
    from huggingface_hub import HfApi  # imported where used: a second of imports

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
