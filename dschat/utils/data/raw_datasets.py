"""One adapter per dataset name: where the data comes from and how a sample becomes prompt/answer text.

Adapters only turn samples into strings (or None to skip a sample). Upstream DeepSpeed-Chat's dataset
names and the texts it builds from each are kept exactly (`DATASET_ADAPTERS` lists them); on top of them
we read Anthropic's raw HH-RLHF dialogues, the TL;DR comparison sets, and local files or directories
given directly as `--data_path`. Splitting (splits.py), tokenising (prompt_datasets.py) and caching
(cache.py) build on this module, which must import none of them.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dschat.utils.errors import UserError
from dschat.utils.files import parse_jsonl
from dschat.utils.limits import template_render_budget, time_budget

Sample = Mapping[str, Any]
Splits = Mapping[str, Any]

ASSISTANT_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
SINGLE_TURN = re.compile(r"\s*Human:\s?(.*)\sAssistant:\s*", re.S)
TLDR_MARKER = "TL;DR:"
LOCAL_DATA_EXTENSIONS = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
EVAL_SPLIT_PREFIXES = ("test", "eval", "validation", "valid", "dev")
LOCAL_JSONFILE_ENV = "DSCHAT_LOCAL_DATA_DIR"


# --------------------------------------------------------------------------------------------- text helpers


def human_prompt(text: str) -> str:
    """Upstream's single-turn prompt for non-HH datasets."""
    return f" Human: {text} Assistant:"


def is_blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


def join_prompt_response(prompt: str, response: str) -> str:
    """Concatenate like the HH convention (responses start with a space); add one only if both sides lack it."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return f"{prompt} {response}"
    return prompt + response


def split_hh_dialogue(text: Any) -> tuple[str, str] | None:
    """Split an HH dialogue into (prompt up to and including the last "\\n\\nAssistant:", response)."""
    if not isinstance(text, str):
        return None
    cut = text.rfind(ASSISTANT_MARKER)
    if cut < 0:
        return None
    cut += len(ASSISTANT_MARKER)
    return text[:cut], text[cut:]


_CITATION = re.compile(r" ?[\(\[][^\(\)\[\]]*?[\)\]]")


def strip_citations(text: str) -> str:
    """WebGPT answers carry bracketed references like "[1]" or "(2)"; upstream removes them."""
    return _CITATION.sub("", text)


# --------------------------------------------------------------------------------------------- loading


def is_save_to_disk_dir(path: str | os.PathLike) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def _as_split_mapping(obj: Any) -> dict[str, Any]:
    """DatasetDict -> {split: Dataset}; a bare Dataset is a train-only source."""
    if isinstance(obj, Mapping):
        return dict(obj)
    return {"train": obj}


def load_named_source(name: str, hub_id: str | None = None, config: str | None = None,
                      data_dir: str | None = None) -> dict[str, Any]:
    """Open a named dataset: an existing path (save_to_disk dir, data file or hub-layout dir) or a hub id."""
    if os.path.exists(name):
        if is_save_to_disk_dir(name):
            import datasets  # lazy: seconds to import; only hub ids and save_to_disk dirs need it

            return _as_split_mapping(datasets.load_from_disk(name))
        if os.path.isfile(name):
            return read_local_source(name)
    target = hub_id or name
    try:
        import datasets  # lazy: seconds to import; only hub ids and save_to_disk dirs need it

        return _as_split_mapping(datasets.load_dataset(target, config, data_dir=data_dir))
    except Exception as err:  # network, unknown repo, bad layout: all fixable by the user
        where = f" (data_dir={data_dir})" if data_dir else ""
        raise UserError(
            f"--data_path {name}: could not load dataset {target!r}{where} with datasets.load_dataset: "
            f"{type(err).__name__}: {err}; check the name and network access, or pass a local copy "
            "(a save_to_disk directory or .json/.jsonl/.parquet files)"
        ) from err


def read_data_text(path: str | os.PathLike) -> str:
    """The text of one local text file (`.gz`: decompressed), the one reader of every data file.

    Damaged archives, unreadable paths and bytes that are not UTF-8 become one UserError naming the
    file (and the line) and the fix, instead of a traceback from deep inside a loader.
    """
    p = Path(path)
    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                raw = fh.read()
        else:
            raw = p.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise UserError(f"{p}: damaged or truncated gzip archive ({err or type(err).__name__}); download or "
                        "compress the file again") from None
    except OSError as err:
        raise UserError(f"{p}: cannot be read ({err.strerror or err}); check the path and its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{p}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                        "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_json_records(path: Path) -> list[dict]:
    """A JSON array (or one object holding a list) or JSON lines; the two are told apart by parsing."""
    text = read_data_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep to read
            raise UserError(f"{path}: invalid JSON ({err}); expected a JSON array or JSON lines") from err
        return list(data)
    return parse_jsonl(text, path, hint="; expected JSON lines or a JSON array")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read one local data file (.json/.jsonl[.gz]/.parquet/.csv) into a list of dict records."""
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise UserError(f"{p}: no such data file")
    if name.endswith((".gz", ".json", ".jsonl")):
        records = _read_json_records(p)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq  # lazy: heavy, and only .parquet files need it

        try:
            records = pq.read_table(p).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError) all mean a bad file
            raise UserError(f"{p}: not a readable parquet file ({type(err).__name__}); write it again") from None
    elif name.endswith(".csv"):
        records = list(csv.DictReader(io.StringIO(read_data_text(p), newline="")))
    else:
        raise UserError(f"{p}: unsupported data file type; use one of {', '.join(LOCAL_DATA_EXTENSIONS)}")
    if any(not isinstance(r, Mapping) for r in records):
        raise UserError(f"{p}: every record must be a JSON object with prompt/chosen/rejected keys")
    return records


def is_data_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(LOCAL_DATA_EXTENSIONS)


def _stem(name: str) -> str:
    lowered = name.lower()
    for ext in LOCAL_DATA_EXTENSIONS:
        if lowered.endswith(ext):
            return lowered[: -len(ext)]
    return lowered


def classify_data_files(directory: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Pick (train files, eval files) in a directory: train.* / train-0000x.*, and test.* / eval.* / validation.*.

    A directory holding exactly one data file, whatever its name, is a train-only source.
    """
    d = Path(directory)
    files = sorted(f for f in d.iterdir() if f.is_file() and is_data_file(f) and not f.name.startswith("."))
    if not files and (d / "data").is_dir():  # hub layout: <repo>/data/train-*.parquet
        return classify_data_files(d / "data")
    train = [f for f in files if _stem(f.name).startswith("train")]
    evals = [f for f in files if _stem(f.name).startswith(EVAL_SPLIT_PREFIXES)]
    if not train and len(files) == 1:
        return files, []
    if not train:
        found = ", ".join(f.name for f in files) or "no data files"
        raise UserError(
            f"--data_path {d}: cannot tell which file is the training set (found: {found}); name it "
            f"train.<ext> (and test.<ext> or eval.<ext> for evaluation), ext one of {', '.join(LOCAL_DATA_EXTENSIONS)}"
        )
    # Prefer test.* over eval.*/validation.* when several are present, like the hub's split naming.
    for prefix in EVAL_SPLIT_PREFIXES:
        chosen = [f for f in evals if _stem(f.name).startswith(prefix)]
        if chosen:
            return train, chosen
    return train, []


def read_local_source(path: str | os.PathLike) -> dict[str, Any]:
    """Read a local file or directory into {"train": records[, "eval": records]}."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--data_path {p}: no such file or directory")
    if is_save_to_disk_dir(p):
        import datasets  # lazy: seconds to import; only hub ids and save_to_disk dirs need it

        splits = _as_split_mapping(datasets.load_from_disk(str(p)))
        out = {"train": splits["train"]} if "train" in splits else {}
        for name in ("eval", "test", "validation", "valid", "dev"):
            if name in splits:
                out["eval"] = splits[name]
                break
        if "train" not in out:
            raise UserError(f"--data_path {p}: saved dataset has splits {sorted(splits)}; a 'train' split is required")
        return out
    if p.is_file():
        return {"train": read_records(p)}
    train_files, eval_files = classify_data_files(p)
    out: dict[str, Any] = {"train": [r for f in train_files for r in read_records(f)]}
    if eval_files:
        out["eval"] = [r for f in eval_files for r in read_records(f)]
    return out


def split_names(splits: Splits) -> str:
    return ", ".join(sorted(splits))


# --------------------------------------------------------------------------------------------- base class


class PromptRawDataset:
    """Base adapter. `raw_datasets` may be given directly (tests, local files) to skip loading."""

    dataset_name_clean_default: str = ""
    hub_id: str | None = None  # load this id instead of the --data_path string (e.g. mkqa)
    config_name: str | None = None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("test",)  # () = train-only source: splits.phase_rows splits it 9:1
    is_local_path: bool = False  # whole-set-to-current-phase when data_split is None

    def __init__(self, output_path: str, seed: int, local_rank: int, dataset_name: str,
                 raw_datasets: Splits | None = None) -> None:
        self.output_path = output_path
        self.seed = seed
        self.local_rank = local_rank
        self.dataset_name = dataset_name
        self.dataset_name_clean = self.clean_name(dataset_name)
        self.raw_datasets = self.load() if raw_datasets is None else raw_datasets

    @classmethod
    def for_samples(cls, dataset_name: str | None = None) -> PromptRawDataset:
        """An adapter without data, for applying its text methods to hand-made samples."""
        return cls("", 0, -1, dataset_name or cls.default_name(), raw_datasets={})

    @classmethod
    def default_name(cls) -> str:
        for key, adapter in DATASET_ADAPTERS:
            if adapter is cls:
                return key
        return cls.__name__

    def clean_name(self, dataset_name: str) -> str:
        return self.dataset_name_clean_default or re.sub(r"[^0-9A-Za-z]+", "_", dataset_name).strip("_")

    def load(self) -> dict[str, Any]:
        return load_named_source(self.dataset_name, hub_id=self.hub_id, config=self.config_name)

    def get_train_data(self) -> Any:
        if self.train_split not in self.raw_datasets:
            raise UserError(
                f"--data_path {self.dataset_name}: no '{self.train_split}' split "
                f"(found: {split_names(self.raw_datasets) or 'none'})"
            )
        return self.raw_datasets[self.train_split]

    def get_eval_data(self) -> Any | None:
        """The eval split, or None when the source has none (the caller then splits train 9:1)."""
        if not self.eval_splits:
            return None
        for name in (*self.eval_splits, "eval"):
            if name in self.raw_datasets:
                return self.raw_datasets[name]
        return None

    # Text methods: str, or None to skip the sample.
    def get_prompt(self, sample: Sample) -> str | None:
        raise NotImplementedError

    def get_chosen(self, sample: Sample) -> str | None:
        raise NotImplementedError

    def get_rejected(self, sample: Sample) -> str | None:
        return None

    def get_prompt_and_chosen(self, sample: Sample) -> str | None:
        prompt, chosen = self.get_prompt(sample), self.get_chosen(sample)
        return None if prompt is None or chosen is None else prompt + chosen

    def get_prompt_and_rejected(self, sample: Sample) -> str | None:
        prompt, rejected = self.get_prompt(sample), self.get_rejected(sample)
        return None if prompt is None or rejected is None else prompt + rejected


class _HumanAssistantDataset(PromptRawDataset):
    """Single-turn sets formatted as ` Human: q Assistant: a` (upstream).

    Subclasses name the sample's fields (`question_key`, `answer_key`, `bad_answer_key`; None: absent) or
    override the reader of a field that needs more than a lookup.
    """

    question_key: str | None = None
    answer_key: str | None = None
    bad_answer_key: str | None = None

    @staticmethod
    def _field(sample: Sample, key: str | None) -> Any:
        return None if key is None else sample.get(key)

    def question(self, sample: Sample) -> str | None:
        return self._field(sample, self.question_key)

    def answer(self, sample: Sample) -> str | None:
        return self._field(sample, self.answer_key)

    def bad_answer(self, sample: Sample) -> str | None:
        return self._field(sample, self.bad_answer_key)

    def get_prompt(self, sample: Sample) -> str | None:
        q = self.question(sample)
        return None if q is None else human_prompt(q)

    def get_chosen(self, sample: Sample) -> str | None:
        a = self.answer(sample)
        return None if a is None else " " + a

    def get_rejected(self, sample: Sample) -> str | None:
        a = self.bad_answer(sample)
        return None if a is None else " " + a


# --------------------------------------------------------------------------------------------- upstream adapters


class _PromptChosenRejectedFields(PromptRawDataset):
    """Sets whose `prompt` already holds the HH multi-turn text; answers are appended without separator."""

    def get_prompt(self, sample: Sample) -> str | None:
        return sample.get("prompt")

    def get_chosen(self, sample: Sample) -> str | None:
        return sample.get("chosen")

    def get_rejected(self, sample: Sample) -> str | None:
        return sample.get("rejected")


class DahoasRmstaticDataset(_PromptChosenRejectedFields):
    dataset_name_clean_default = "Dahoas_rm_static"


class DahoasFullhhrlhfDataset(_PromptChosenRejectedFields):
    dataset_name_clean_default = "Dahoas_full_hh_rlhf"


class DahoasSyntheticinstructgptjpairwiseDataset(_HumanAssistantDataset):
    dataset_name_clean_default = "Dahoas_synthetic_instruct_gptj_pairwise"
    eval_splits = ()
    question_key, answer_key, bad_answer_key = "prompt", "chosen", "rejected"


class YitingxieRlhfrewarddatasetsDataset(PromptRawDataset):
    """`prompt` stops before the final "Assistant:"; `chosen`/`rejected` start with it."""

    dataset_name_clean_default = "yitingxie_rlhf_reward_datasets"

    def get_prompt(self, sample: Sample) -> str | None:
        p = sample.get("prompt")
        return None if p is None else p + "Assistant:"

    def get_chosen(self, sample: Sample) -> str | None:
        c = sample.get("chosen")
        return None if c is None else c.split("Assistant:")[-1]

    def get_rejected(self, sample: Sample) -> str | None:
        r = sample.get("rejected")
        return None if r is None else r.split("Assistant:")[-1]

    def get_prompt_and_chosen(self, sample: Sample) -> str | None:
        p, c = sample.get("prompt"), sample.get("chosen")
        return None if p is None or c is None else p + c

    def get_prompt_and_rejected(self, sample: Sample) -> str | None:
        p, r = sample.get("prompt"), sample.get("rejected")
        return None if p is None or r is None else p + r


class OpenaiWebgptcomparisonsDataset(_HumanAssistantDataset):
    """The higher-scored answer is chosen (a tie keeps answer_0); citation brackets are removed."""

    dataset_name_clean_default = "openai_webgpt_comparisons"
    eval_splits = ()

    def question(self, sample: Sample) -> str | None:
        q = sample.get("question")
        return q.get("full_text") if isinstance(q, Mapping) else q

    def _ranked(self, sample: Sample) -> tuple[str, str]:
        first_wins = float(sample.get("score_0", 0)) >= float(sample.get("score_1", 0))
        a0, a1 = sample.get("answer_0", ""), sample.get("answer_1", "")
        return (a0, a1) if first_wins else (a1, a0)

    def answer(self, sample: Sample) -> str | None:
        return strip_citations(self._ranked(sample)[0])

    def bad_answer(self, sample: Sample) -> str | None:
        return strip_citations(self._ranked(sample)[1])


class StanfordnlpSHPDataset(_HumanAssistantDataset):
    dataset_name_clean_default = "stanfordnlp_SHP"
    eval_splits = ("validation",)
    question_key = "history"

    def _a_wins(self, sample: Sample) -> bool:
        return int(sample.get("labels", 0)) == 1

    def answer(self, sample: Sample) -> str | None:
        return sample.get("human_ref_A") if self._a_wins(sample) else sample.get("human_ref_B")

    def bad_answer(self, sample: Sample) -> str | None:
        return sample.get("human_ref_B") if self._a_wins(sample) else sample.get("human_ref_A")


class _SFTOnlyHumanAssistant(_HumanAssistantDataset):
    """Chosen answer only (no pairs): meant for --sft_only_data_path; phase 3 still gets prompts."""


class PvduySharegptalpacaoavicunaformatDataset(PromptRawDataset):
    dataset_name_clean_default = "pvduy_sharegpt_alpaca_oa_vicuna_format"

    def get_prompt(self, sample: Sample) -> str | None:
        p = sample.get("prompt")
        return None if p is None else p.replace("USER", "Human").replace("ASSISTANT", "Assistant")

    def get_chosen(self, sample: Sample) -> str | None:
        label = sample.get("label")
        return None if label is None else " " + label


class Wangrui6ZhihuKOLDataset(_SFTOnlyHumanAssistant):
    dataset_name_clean_default = "wangrui6_Zhihu_KOL"
    eval_splits = ()
    question_key, answer_key = "INSTRUCTION", "RESPONSE"


class _MiraclQueries(_HumanAssistantDataset):
    """Query -> first positive passage (chosen) / first negative passage (rejected, None if absent)."""

    eval_splits = ("dev",)
    question_key = "query"

    @staticmethod
    def _first_text(passages: Any) -> str | None:
        return passages[0].get("text") if passages else None

    def answer(self, sample: Sample) -> str | None:
        return self._first_text(sample.get("positive_passages"))

    def bad_answer(self, sample: Sample) -> str | None:
        return self._first_text(sample.get("negative_passages"))


class CohereMiracljaqueries2212Dataset(_MiraclQueries):
    dataset_name_clean_default = "Cohere_miracl_ja_queries_22_12"


class CohereMiraclzhqueries2212Dataset(_MiraclQueries):
    dataset_name_clean_default = "Cohere_miracl_zh_queries_22_12"


class HelloSimpleAIHC3ChineseDataset(_SFTOnlyHumanAssistant):
    dataset_name_clean_default = "Hello_SimpleAI_HC3_Chinese"
    config_name = "all"  # the hub repo has one config per domain; "all" is their union
    eval_splits = ()
    question_key = "question"

    def answer(self, sample: Sample) -> str | None:
        answers = sample.get("human_answers")
        return answers[0] if answers else None


class _Mkqa(_SFTOnlyHumanAssistant):
    """Both language views load the HF `mkqa` set and share upstream's clean name `mkqa`."""

    dataset_name_clean_default = "mkqa"
    hub_id = "mkqa"
    eval_splits = ()
    language = ""

    def load(self) -> dict[str, Any]:
        if os.path.exists(self.dataset_name):
            return load_named_source(self.dataset_name)
        return load_named_source(self.dataset_name, hub_id=self.hub_id)

    def question(self, sample: Sample) -> str | None:
        queries = sample.get("queries") or {}
        return queries.get(self.language)

    def answer(self, sample: Sample) -> str | None:
        answers = (sample.get("answers") or {}).get(self.language)
        return answers[0].get("text") if answers else None


class MkqaChineseDataset(_Mkqa):
    language = "zh_cn"


class MkqaJapaneseDataset(_Mkqa):
    language = "ja"


class LmqgQgjaquadDataset(_SFTOnlyHumanAssistant):
    dataset_name_clean_default = "lmqg_qg_jaquad"
    eval_splits = ("validation",)
    question_key, answer_key = "question", "sentence"


class LmqgQagjaquadDataset(_SFTOnlyHumanAssistant):
    dataset_name_clean_default = "lmqg_qag_jaquad"
    eval_splits = ("validation",)
    answer_key = "paragraph"

    def question(self, sample: Sample) -> str | None:
        questions = sample.get("questions")
        return questions[0] if questions else None


def repo_root() -> Path:
    """The checkout root (three directories above this package's data module), as upstream assumes."""
    return Path(__file__).resolve().parents[3]


def local_jsonfile_candidates() -> list[Path]:
    """Where `local/jsonfile` looks, in order: $DSCHAT_LOCAL_DATA_DIR alone when set; else the checkout
    root's data/ (an editable install), then data/ in the running script's folder, the current folder,
    and up to two folders above each. Upstream reads `<DeepSpeed-Chat root>/data`, which is two above a
    step folder (`training/step3_rlhf_finetuning/../../data`): that is found from a step folder or its
    `main.py` also when the package is installed into site-packages."""
    env = os.environ.get(LOCAL_JSONFILE_ENV)
    if env:
        return [Path(env)]
    candidates = [repo_root() / "data"]
    script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    for base in ([script] if script else []) + [Path.cwd().resolve()]:
        for folder in (base, *list(base.parents)[:2]):
            if folder / "data" not in candidates:
                candidates.append(folder / "data")
    return candidates


def resolve_local_jsonfile_dir() -> Path:
    candidates = local_jsonfile_candidates()
    for directory in candidates:
        if (directory / "train.json").is_file():
            return directory
    looked = ", ".join(str(d / "train.json") for d in candidates)
    raise UserError(
        f"--data_path local/jsonfile: no train.json found (looked at: {looked}); put train.json "
        f"(and eval.json) there or set {LOCAL_JSONFILE_ENV} to their directory"
    )


def local_jsonfile_files() -> list[Path]:
    directory = resolve_local_jsonfile_dir()
    return [f for f in (directory / "train.json", directory / "eval.json") if f.is_file()]


class LocalJsonFileDataset(PromptRawDataset):
    """Upstream's `local/jsonfile`: data/train.json + data/eval.json with prompt/chosen/rejected keys."""

    dataset_name_clean_default = "jsonfile"
    eval_splits = ("eval",)

    def load(self) -> dict[str, Any]:
        directory = resolve_local_jsonfile_dir()
        out: dict[str, Any] = {"train": read_records(directory / "train.json")}
        if (directory / "eval.json").is_file():
            out["eval"] = read_records(directory / "eval.json")
        check_keys(out["train"], directory / "train.json", required=("prompt",))
        return out

    def get_prompt(self, sample: Sample) -> str | None:
        p = sample.get("prompt")
        return None if p is None else " " + p

    def get_chosen(self, sample: Sample) -> str | None:
        c = sample.get("chosen")
        return None if c is None else " " + c

    def get_rejected(self, sample: Sample) -> str | None:
        r = sample.get("rejected")
        return None if r is None else " " + r


# --------------------------------------------------------------------------------------------- our additions


class HHDialogueDataset(PromptRawDataset):
    """Raw HH-RLHF `{chosen, rejected}` dialogues: prompt = text up to the last "\\n\\nAssistant:".

    A pair whose two dialogues do not share that prompt, or with an empty answer, yields None for
    that side, so phase 2 drops it and phase 1 keeps whatever side is usable.
    """

    def get_prompt(self, sample: Sample) -> str | None:
        parts = split_hh_dialogue(sample.get("chosen")) or split_hh_dialogue(sample.get("rejected"))
        return None if parts is None else parts[0]

    def _response(self, sample: Sample, key: str) -> str | None:
        parts = split_hh_dialogue(sample.get(key))
        if parts is None or is_blank(parts[1]) or parts[0] != self.get_prompt(sample):
            return None
        return parts[1]

    def get_chosen(self, sample: Sample) -> str | None:
        return self._response(sample, "chosen")

    def get_rejected(self, sample: Sample) -> str | None:
        return self._response(sample, "rejected")


class AnthropicHHRLHFDataset(HHDialogueDataset):
    """`Anthropic/hh-rlhf[/<subset>]`; the subset is the hub repo's data_dir (e.g. harmless-base)."""

    REPO = "Anthropic/hh-rlhf"

    def _repo_and_subset(self) -> tuple[str, str | None]:
        end = self.dataset_name.find(self.REPO) + len(self.REPO)
        subset = self.dataset_name[end:].strip("/") or None
        return self.dataset_name[:end], subset

    def clean_name(self, dataset_name: str) -> str:
        end = dataset_name.find(self.REPO) + len(self.REPO)
        subset = dataset_name[end:].strip("/")
        base = "Anthropic_hh_rlhf"
        return f"{base}_{re.sub(r'[^0-9A-Za-z]+', '_', subset).strip('_')}" if subset else base

    def load(self) -> dict[str, Any]:
        if os.path.exists(self.dataset_name) and (
            os.path.isfile(self.dataset_name) or is_save_to_disk_dir(self.dataset_name)
        ):
            return load_named_source(self.dataset_name)
        repo, subset = self._repo_and_subset()
        return load_named_source(self.dataset_name, hub_id=repo, data_dir=subset)


class _TLDRPrompt:
    @staticmethod
    def tldr_prompt(text: str) -> str:
        """Reddit post prompts end with "TL;DR:"; the summary follows after a space."""
        text = text.rstrip()
        return text if text.endswith(TLDR_MARKER) else f"{text}\n\n{TLDR_MARKER}"

    @staticmethod
    def summary(text: Any) -> str | None:
        if is_blank(text):
            return None
        text = text.strip()
        if text.startswith(TLDR_MARKER):
            text = text[len(TLDR_MARKER):].strip()
        return None if not text else " " + text


class CarperAIOpenaiSummarizeComparisonsDataset(_TLDRPrompt, PromptRawDataset):
    """TL;DR pairs with `prompt`, `chosen`, `rejected` (answers carry a "TL;DR:" prefix, dropped here)."""

    dataset_name_clean_default = "CarperAI_openai_summarize_comparisons"
    eval_splits = ("test", "valid1", "validation")

    def get_prompt(self, sample: Sample) -> str | None:
        p = sample.get("prompt")
        return None if is_blank(p) else self.tldr_prompt(p)

    def get_chosen(self, sample: Sample) -> str | None:
        return self.summary(sample.get("chosen"))

    def get_rejected(self, sample: Sample) -> str | None:
        return self.summary(sample.get("rejected"))


class OpenaiSummarizeFromFeedbackDataset(_TLDRPrompt, PromptRawDataset):
    """openai/summarize_from_feedback `comparisons`: info.post, summaries[i].text, choice = index of the winner."""

    dataset_name_clean_default = "openai_summarize_from_feedback"
    config_name = "comparisons"
    eval_splits = ("validation", "test")

    def load(self) -> dict[str, Any]:
        if os.path.exists(self.dataset_name):
            return load_named_source(self.dataset_name)
        return load_named_source(self.dataset_name, hub_id="openai/summarize_from_feedback", config=self.config_name)

    def get_prompt(self, sample: Sample) -> str | None:
        info = sample.get("info") or {}
        body = info.get("post") or info.get("article")
        if is_blank(body):
            return None
        head = []
        if info.get("subreddit"):
            head.append(f"SUBREDDIT: r/{info['subreddit']}")
        if info.get("title"):
            head.append(f"TITLE: {info['title']}")
        head.append(f"POST: {body.strip()}")
        return self.tldr_prompt("\n\n".join(head))

    def _summary_at(self, sample: Sample, winner: bool) -> str | None:
        summaries = sample.get("summaries") or []
        choice = sample.get("choice")
        if choice not in (0, 1) or len(summaries) < 2:
            return None
        return self.summary(summaries[choice if winner else 1 - choice].get("text"))

    def get_chosen(self, sample: Sample) -> str | None:
        return self._summary_at(sample, True)

    def get_rejected(self, sample: Sample) -> str | None:
        return self._summary_at(sample, False)


# --------------------------------------------------------------------------------------------- local paths


class _LocalSource:
    """Mixin for adapters of a local file or directory given as --data_path (see read_local_source)."""

    is_local_path = True
    eval_splits = ("eval",)
    dataset_name: str

    def load(self) -> dict[str, Any]:
        return read_local_source(self.dataset_name)

    def clean_name(self, dataset_name: str) -> str:
        return local_clean_name(dataset_name)


class LocalPromptPairDataset(_LocalSource, PromptRawDataset):
    """Local files with prompt[/chosen/rejected] keys; HH-style texts, joined without a separator."""

    def get_prompt(self, sample: Sample) -> str | None:
        p = sample.get("prompt")
        return None if is_blank(p) else p

    def _answer(self, sample: Sample, key: str) -> str | None:
        a = sample.get(key)
        return None if is_blank(a) else a

    def get_chosen(self, sample: Sample) -> str | None:
        return self._answer(sample, "chosen")

    def get_rejected(self, sample: Sample) -> str | None:
        return self._answer(sample, "rejected")

    def get_prompt_and_chosen(self, sample: Sample) -> str | None:
        p, c = self.get_prompt(sample), self.get_chosen(sample)
        return None if p is None or c is None else join_prompt_response(p, c)

    def get_prompt_and_rejected(self, sample: Sample) -> str | None:
        p, r = self.get_prompt(sample), self.get_rejected(sample)
        return None if p is None or r is None else join_prompt_response(p, r)


class LocalHHDialogueDataset(_LocalSource, HHDialogueDataset):
    """A local file or directory of raw HH-RLHF `{chosen, rejected}` dialogues."""


class LocalQueryPromptDataset(LocalPromptPairDataset):
    """A CSV with a `query` column (e.g. TL;DR posts): prompts only; `reference_responses` is the SFT answer."""

    def get_prompt(self, sample: Sample) -> str | None:
        q = sample.get("query")
        return None if is_blank(q) else q

    def get_chosen(self, sample: Sample) -> str | None:
        ref = sample.get("reference_responses")
        if is_blank(ref):
            return None
        return ref if ref[0].isspace() else " " + ref

    def get_rejected(self, sample: Sample) -> str | None:
        return None


def local_clean_name(path: str) -> str:
    """Index-file stem for a local path: readable basename plus a hash of the absolute path (no clashes)."""
    absolute = os.path.abspath(path)
    base = re.sub(r"[^0-9A-Za-z]+", "_", _stem(os.path.basename(absolute.rstrip(os.sep))) or "data").strip("_")
    return f"local_{base}_{hashlib.sha1(absolute.encode()).hexdigest()[:8]}"


def _first_keys(records: Any) -> list[str]:
    if records is None or len(records) == 0:
        return []
    if hasattr(records, "column_names"):
        return list(records.column_names)
    return list(records[0].keys())


def check_keys(records: Any, where: str | os.PathLike, required: Sequence[str]) -> None:
    keys = _first_keys(records)
    if not keys:
        raise UserError(f"{where}: contains no records")
    missing = [k for k in required if k not in keys]
    if missing:
        raise UserError(f"{where}: missing keys {missing}; found keys {keys}; expected {list(required)}")


def detect_local_format(records: Any, where: str | os.PathLike) -> type[PromptRawDataset]:
    """prompt[/chosen/rejected] -> pairs; chosen+rejected without prompt -> HH dialogues; query -> prompts."""
    keys = _first_keys(records)
    if not keys:
        raise UserError(f"{where}: contains no records")
    if "prompt" in keys:
        return LocalPromptPairDataset
    if "chosen" in keys and "rejected" in keys:
        return LocalHHDialogueDataset
    if "query" in keys:
        return LocalQueryPromptDataset
    raise UserError(
        f"{where}: found keys {keys}; expected 'prompt' (optionally with 'chosen' and 'rejected'), "
        "or HH dialogues with 'chosen' and 'rejected', or a CSV 'query' column"
    )


def open_local_dataset(path: str, output_path: str, seed: int, local_rank: int) -> PromptRawDataset:
    """Read a local file/directory and wrap it with the adapter matching its keys."""
    return open_standard_source(path, output_path, seed, local_rank, local=True)


# --------------------------------------------------------------------------------------------- registry

# Substring keys checked in this order; the first key contained in --data_path wins (upstream order first).
DATASET_ADAPTERS: list[tuple[str, type[PromptRawDataset]]] = [
    ("Dahoas/rm-static", DahoasRmstaticDataset),
    ("Dahoas/full-hh-rlhf", DahoasFullhhrlhfDataset),
    ("Dahoas/synthetic-instruct-gptj-pairwise", DahoasSyntheticinstructgptjpairwiseDataset),
    ("yitingxie/rlhf-reward-datasets", YitingxieRlhfrewarddatasetsDataset),
    ("openai/webgpt_comparisons", OpenaiWebgptcomparisonsDataset),
    ("stanfordnlp/SHP", StanfordnlpSHPDataset),
    ("pvduy/sharegpt_alpaca_oa_vicuna_format", PvduySharegptalpacaoavicunaformatDataset),
    ("wangrui6/Zhihu-KOL", Wangrui6ZhihuKOLDataset),
    ("Cohere/miracl-zh-queries-22-12", CohereMiraclzhqueries2212Dataset),
    ("Hello-SimpleAI/HC3-Chinese", HelloSimpleAIHC3ChineseDataset),
    ("mkqa-Chinese", MkqaChineseDataset),
    ("mkqa-Japanese", MkqaJapaneseDataset),
    ("Cohere/miracl-ja-queries-22-12", CohereMiracljaqueries2212Dataset),
    ("lmqg/qg_jaquad", LmqgQgjaquadDataset),
    ("lmqg/qag_jaquad", LmqgQagjaquadDataset),
    ("local/jsonfile", LocalJsonFileDataset),
    ("Anthropic/hh-rlhf", AnthropicHHRLHFDataset),
    ("CarperAI/openai_summarize_comparisons", CarperAIOpenaiSummarizeComparisonsDataset),
    ("openai/summarize_from_feedback", OpenaiSummarizeFromFeedbackDataset),
]


def supported_dataset_names() -> list[str]:
    return [key for key, _ in DATASET_ADAPTERS]


def find_adapter(dataset_name: str) -> type[PromptRawDataset] | None:
    for key, adapter in DATASET_ADAPTERS:
        if key in dataset_name:
            return adapter
    return None


# --------------------------------------------------------------------------------------------- standard layouts
#
# The hub's common preference/SFT layouts (as TRL documents them), beside DeepSpeed-Chat's names:
#   plain:           prompt, chosen, rejected (strings)           -> the LocalPromptPairDataset texts
#   conversational:  prompt, chosen, rejected as lists of {"role", "content"} messages; without `prompt`
#                    the prompt is the shared leading messages of chosen and rejected (implicit prompt)
#   SFT:             prompt + completion (strings or messages), or messages (a whole conversation)
# Messages are rendered with the tokenizer's chat template when it has one (the prompt with the generation
# prompt, the answer as the assistant turn that follows), else as HH turns ("\n\nHuman: ...\n\nAssistant:").
# Either way the answer text never holds the final end-of-text: the data layer appends it once (the eos
# token unless --end_of_conversation_token says otherwise), the same for SFT, RM, DPO and PPO.

STANDARD_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages")
HH_ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant",
                 "system": "System"}


def is_conversation(value: Any) -> bool:
    """A non-empty list of {"role", "content"} messages."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def shared_prefix_length(first: Sequence[Any], second: Sequence[Any]) -> int:
    """Number of leading items two sequences share."""
    n = 0
    for a, b in zip(first, second):
        if a != b:
            break
        n += 1
    return n


def hh_turns(messages: Sequence[Mapping[str, Any]]) -> str:
    """Messages as HH text: "\\n\\nHuman: ...\\n\\nAssistant: ..." (other roles keep their own name)."""
    return "".join(f"\n\n{HH_ROLE_NAMES.get(str(m['role']).lower(), str(m['role']).title())}: {m['content']}"
                   for m in messages)


def hh_messages(text: str) -> list[dict[str, str]]:
    """The messages of an HH-turn text, the inverse of `hh_turns`: "\\n\\nHuman: q\\n\\nAssistant: a..." and
    upstream's single-turn " Human: q Assistant:". A trailing empty assistant turn (the HH generation prompt)
    is dropped and consecutive turns of one role are joined, so strict templates see alternating roles; a
    text without HH markers is one user message."""
    pieces = HH_TURN.split(text)
    if len(pieces) == 1:
        single = SINGLE_TURN.fullmatch(text)
        return [{"role": "user", "content": (single.group(1) if single else text).strip()}]
    messages: list[dict[str, str]] = []
    if pieces[0].strip():  # a preamble before the first turn belongs to the user
        messages.append({"role": "user", "content": pieces[0].strip()})
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


class ChatRenderer:
    """Prompt and answer texts of a conversation: the tokenizer's chat template, else HH turns."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer if getattr(tokenizer, "chat_template", None) else None
        self.eos = getattr(tokenizer, "eos_token", None) or ""
        bos = getattr(tokenizer, "bos_token", None)
        # A template that writes the BOS text itself would double it: the tokenizer adds BOS again.
        self.strip_bos = bos if bos and self.tokenizer is not None and self._adds_bos(tokenizer) else ""

    @staticmethod
    def _adds_bos(tokenizer: Any) -> bool:
        ids = tokenizer("a")["input_ids"]
        return bool(ids) and ids[0] == tokenizer.bos_token_id

    @property
    def uses_template(self) -> bool:
        return self.tokenizer is not None

    def _template(self, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
        with time_budget(template_render_budget(), "rendering one conversation with the tokenizer's chat template",
                         "the template loops far too long (nested range() loops?); fix or remove the "
                         "tokenizer's chat_template"):
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        if self.strip_bos and text.startswith(self.strip_bos):
            text = text[len(self.strip_bos):]
        return text

    def prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self.uses_template:
            return self._template(messages, True)
        return hh_turns(messages) + ASSISTANT_MARKER

    def answer(self, prompt: Sequence[Mapping[str, Any]], answer: Sequence[Mapping[str, Any]]) -> str | None:
        """The text that follows `prompt(prompt)` in the rendered conversation, without its final end-of-text."""
        head = self.prompt(prompt)
        full = self._template([*prompt, *answer], False) if self.uses_template else hh_turns([*prompt, *answer])
        if not full.startswith(head):
            raise UserError(
                "the tokenizer's chat template does not render a conversation's prompt (with the generation "
                "prompt) as the start of the whole conversation; use a tokenizer whose template does, or "
                "remove its chat_template to use HH turns"
            )
        text = full[len(head):].rstrip()
        if self.eos and text.endswith(self.eos):
            text = text[: -len(self.eos)]
        return None if is_blank(text) else text


def split_conversation(sample: Sample) -> tuple[list, list | None, list | None] | None:
    """(prompt messages, chosen messages, rejected messages) of a conversational sample, or None.

    `messages`: the prompt is everything before the last assistant turn. Without `prompt`, chosen and
    rejected carry the whole conversation and the prompt is their shared leading messages.
    """
    messages = sample.get("messages")
    if is_conversation(messages):
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        return (list(messages), None, None) if last < 0 else (list(messages[:last]), list(messages[last:]), None)
    chosen = sample.get("chosen", sample.get("completion"))
    rejected = sample.get("rejected")
    prompt = sample.get("prompt")
    if is_conversation(prompt):
        return (list(prompt), list(chosen) if is_conversation(chosen) else None,
                list(rejected) if is_conversation(rejected) else None)
    if prompt is None and is_conversation(chosen) and is_conversation(rejected):
        n = shared_prefix_length(chosen, rejected)
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the answer starts at an assistant turn
            n -= 1
        if n == 0:
            return None
        return list(chosen[:n]), list(chosen[n:]) or None, list(rejected[n:]) or None
    return None


def is_conversational_sample(sample: Sample) -> bool:
    return any(is_conversation(sample.get(key)) for key in STANDARD_COLUMNS)


class StandardLayoutDataset(PromptRawDataset):
    """TRL-style layouts (plain or conversational preference pairs, prompt/completion, messages).

    Opened by `open_standard_source` for local paths and for hub ids without a DeepSpeed-Chat adapter;
    `bind_tokenizer` decides how messages become text (see `ChatRenderer`).
    """

    eval_splits = ("test", "eval", "validation", "valid", "dev")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.renderer = ChatRenderer(None)
        super().__init__(*args, **kwargs)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        self.renderer = ChatRenderer(tokenizer)

    def clean_name(self, dataset_name: str) -> str:
        return local_clean_name(dataset_name)

    def _plain(self, sample: Sample, key: str) -> str | None:
        value = sample.get(key)
        if key == "chosen" and value is None:
            value = sample.get("completion")
        return None if is_blank(value) else value

    def get_prompt(self, sample: Sample) -> str | None:
        if is_conversational_sample(sample):
            parts = split_conversation(sample)
            return None if parts is None or not parts[0] else self.renderer.prompt(parts[0])
        return self._plain(sample, "prompt")

    def _answer(self, sample: Sample, side: int, key: str) -> str | None:
        if is_conversational_sample(sample):
            parts = split_conversation(sample)
            if parts is None or not parts[0] or not parts[side]:
                return None
            return self.renderer.answer(parts[0], parts[side])
        return self._plain(sample, key)

    def get_chosen(self, sample: Sample) -> str | None:
        return self._answer(sample, 1, "chosen")

    def get_rejected(self, sample: Sample) -> str | None:
        return self._answer(sample, 2, "rejected")

    def _join(self, sample: Sample, answer: str | None) -> str | None:
        prompt = self.get_prompt(sample)
        if prompt is None or answer is None:
            return None
        # Rendered turns are concatenated exactly; plain texts follow the HH spacing convention.
        return prompt + answer if is_conversational_sample(sample) else join_prompt_response(prompt, answer)

    def get_prompt_and_chosen(self, sample: Sample) -> str | None:
        return self._join(sample, self.get_chosen(sample))

    def get_prompt_and_rejected(self, sample: Sample) -> str | None:
        return self._join(sample, self.get_rejected(sample))


def parse_column_map(spec: str | None, **single: str | None) -> dict[str, str]:
    """{standard column: the data's column} from `--data_keys prompt=question,chosen=good` and `--X_key`."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, column = part.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or name not in STANDARD_COLUMNS or not column:
            raise UserError(f"--data_keys {spec}: expected comma-separated NAME=COLUMN with NAME one of "
                            f"{', '.join(STANDARD_COLUMNS)}, e.g. prompt=question,chosen=good,rejected=bad")
        out[name] = column
    for name, column in single.items():
        if column:
            if name in out and out[name] != column:
                raise UserError(f"--{name}_key {column} contradicts --data_keys {name}={out[name]}; give one")
            out[name] = column
    return {name: column for name, column in out.items() if name != column}


def apply_column_map(splits: Mapping[str, Any], column_map: Mapping[str, str], where: str) -> dict[str, Any]:
    """Rename the data's columns to the standard names (a renamed-over column of the same name is dropped)."""
    if not column_map:
        return dict(splits)
    out: dict[str, Any] = {}
    for split, data in splits.items():
        keys = _first_keys(data)
        missing = [column for column in column_map.values() if column not in keys]
        if keys and missing:
            flags = ", ".join(f"{name}={column}" for name, column in column_map.items())
            raise UserError(f"--data_path {where} ({split} split): no column {', '.join(missing)} for the column "
                            f"mapping {flags}; found keys {keys}")
        if hasattr(data, "rename_columns"):
            clash = [name for name in column_map if name in keys and name not in column_map.values()]
            data = data.remove_columns(clash).rename_columns({c: n for n, c in column_map.items()})
        else:
            data = [{**{k: v for k, v in r.items() if k not in column_map}, **{n: r.get(c) for n, c in column_map.items()}}
                    for r in data]
        out[split] = data
    return out


def standard_layout(records: Any) -> bool:
    """Whether a source needs StandardLayoutDataset (messages, completion, or message lists)."""
    keys = _first_keys(records)
    if "messages" in keys or "completion" in keys:
        return True
    return bool(keys) and is_conversational_sample(records[0])


def open_standard_source(name: str, output_path: str, seed: int, local_rank: int, *, local: bool,
                         column_map: Mapping[str, str] | None = None, tokenizer: Any = None) -> PromptRawDataset:
    """A local path or a hub id without a built-in adapter: read it, map its columns, pick the adapter by layout."""
    splits = read_local_source(name) if local else load_named_source(name)
    if not local:  # hub: train + the first held-out split, under the names the adapters use
        held_out = next((s for s in StandardLayoutDataset.eval_splits if s in splits), None)
        if "train" not in splits:
            raise UserError(f"--data_path {name}: dataset has splits {split_names(splits)}; a 'train' split is "
                            "required")
        splits = {"train": splits["train"], **({"eval": splits[held_out]} if held_out else {})}
    splits = apply_column_map(splits, column_map or {}, name)
    layouts = {}
    for split, data in splits.items():
        where = name if split == "train" else f"{name} (eval split)"
        layouts[split] = StandardLayoutDataset if standard_layout(data) else detect_local_format(data, where)
    if len(set(layouts.values())) > 1:
        raise UserError(f"--data_path {name}: train and eval files have different layouts (train keys "
                        f"{_first_keys(splits['train'])}, eval keys {_first_keys(splits['eval'])})")
    adapter = layouts["train"](output_path, seed, local_rank, name, raw_datasets=splits)
    adapter.is_local_path = local
    if isinstance(adapter, StandardLayoutDataset):
        adapter.bind_tokenizer(tokenizer)
    return adapter


# --------------------------------------------------------------------------------------------- chat formats
#
# `--chat_format` decides which texts go through the tokenizer's chat template (when it has one):
#   auto      conversational data (the standard layouts' messages) and HH-RLHF dialogues (`Anthropic/hh-rlhf`,
#             local files of {chosen, rejected} dialogues): what a chat model is trained on. DeepSpeed-Chat's
#             named datasets (Dahoas/rm-static, ...) keep upstream's fixed texts, so upstream recipes and
#             checkpoints see the tokens they always saw.
#   template  DeepSpeed-Chat's named datasets too (their HH or single-turn prompts become messages, see
#             `hh_messages`). Local files of plain prompt/chosen/rejected strings are taken as already formatted
#             in every mode: selection writes its easy/hard pairs that way, already rendered.
#   raw       no template: HH dialogues keep their text, conversations are written as HH turns.
# The tokenised-data cache key holds the setting (`cache.text_format`).

CHAT_FORMATS = ("auto", "template", "raw")


class ChatTemplateView(PromptRawDataset):
    """Another adapter's samples rendered as conversations through a chat template.

    The adapter's prompt text becomes messages (`hh_messages`) and each answer one assistant turn; the texts
    are `ChatRenderer`'s (prompt with the generation prompt, answer = the rest, without the final eos).
    Which samples and splits exist stays the adapter's (`inner`).
    """

    def __init__(self, inner: PromptRawDataset, renderer: ChatRenderer) -> None:  # no loading: `inner` has the data
        self.inner = inner
        self.renderer = renderer
        for name in ("output_path", "seed", "local_rank", "dataset_name", "dataset_name_clean", "raw_datasets",
                     "is_local_path", "train_split", "eval_splits"):
            setattr(self, name, getattr(inner, name))

    def get_train_data(self) -> Any:
        return self.inner.get_train_data()

    def get_eval_data(self) -> Any | None:
        return self.inner.get_eval_data()

    def _prompt_messages(self, sample: Sample) -> list[dict[str, str]] | None:
        text = self.inner.get_prompt(sample)
        return None if text is None or is_blank(text) else hh_messages(text)

    def get_prompt(self, sample: Sample) -> str | None:
        messages = self._prompt_messages(sample)
        return None if messages is None else self.renderer.prompt(messages)

    def _answer(self, sample: Sample, text: str | None) -> str | None:
        messages = self._prompt_messages(sample)
        if messages is None or text is None or is_blank(text):
            return None
        return self.renderer.answer(messages, [{"role": "assistant", "content": text.strip()}])

    def get_chosen(self, sample: Sample) -> str | None:
        return self._answer(sample, self.inner.get_chosen(sample))

    def get_rejected(self, sample: Sample) -> str | None:
        return self._answer(sample, self.inner.get_rejected(sample))


def chat_renderer(tokenizer: Any, chat_format: str = "auto") -> ChatRenderer:
    """The renderer `--chat_format` gives for `tokenizer` (UserError for a bad value, or `template` without one)."""
    if chat_format not in CHAT_FORMATS:
        raise UserError(f"--chat_format {chat_format}: expected one of {', '.join(CHAT_FORMATS)}")
    renderer = ChatRenderer(None if chat_format == "raw" else tokenizer)
    if chat_format == "template" and tokenizer is not None and not renderer.uses_template:
        raise UserError("--chat_format template: the tokenizer has no chat template; use --chat_format auto (HH "
                        "turns for conversations) or a model whose tokenizer has one")
    return renderer


def apply_chat_format(adapter: PromptRawDataset, tokenizer: Any, chat_format: str = "auto") -> PromptRawDataset:
    """The adapter whose texts follow `--chat_format` for `tokenizer` (see CHAT_FORMATS above)."""
    renderer = chat_renderer(tokenizer, chat_format)
    if isinstance(adapter, StandardLayoutDataset):  # renders its own messages; plain strings stay as they are
        adapter.renderer = renderer
        return adapter
    named = type(adapter) in {cls for _, cls in DATASET_ADAPTERS}
    wrap = isinstance(adapter, HHDialogueDataset) or (chat_format == "template" and named)
    return ChatTemplateView(adapter, renderer) if wrap and renderer.uses_template else adapter


def underlying_adapter(adapter: PromptRawDataset) -> PromptRawDataset:
    """The adapter that reads the samples (below a `ChatTemplateView`)."""
    return adapter.inner if isinstance(adapter, ChatTemplateView) else adapter
