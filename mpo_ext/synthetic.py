"""Embedded synthetic preference task with a known gold reward.

Why it exists: a user with no GPU and no hub access must still be able to run SFT -> RM -> MPO end to
end and *see* whether each stage helps. Real preference data cannot tell us the true quality of a
generated answer; this task can, because `gold_reward` is the ground truth.

The task. The human asks for a number of items of one category, e.g.
``"\\n\\nHuman: Quick question: Name three fruits.\\n\\nAssistant:"``; a response is a comma-separated
list that ends with a period, e.g. ``" apple, banana, cherry."``. Within each category items carry a
weight between 0.6 and 1.0 (the "typicality" of the item), so the best answer lists exactly the asked
number of distinct, high-weight items and ends with a period. Gold scores are graded (steps of 0.1 to
1.0), so pair gaps range from large to tiny; preference labels are drawn Bradley-Terry style from the
gold scores, hence noisy exactly where gaps are small (the MPO paper's Figure 2).

Demonstrations are deliberately middling: mid-quality writers habitually prefer the low-weight items,
often give one item too many and sometimes slip in a wrong item or forget the period. The SFT model
therefore learns a suboptimal mode, which the reward model, DPO and PPO can improve on.

A second task, ``mpo-sort`` (`SORT_TASK_NAME`), checks that defaults are not tuned to the first one: the
prompt lists 3-5 distinct numbers and asks for them sorted from smallest to largest or the reverse,
e.g. ``"...: Sort 12 3 7 from largest to smallest.\n\nAssistant:"`` -> ``" 12 7 3."``. Its answer must
copy content from the prompt (not recall it), and its gold reward is positional (see `sort_gold_reward`).
Middling writers here often ignore the requested direction and swap neighbours. `TASKS` names both;
`task_of(name)` gives a task's functions and `any_gold_reward` scores a prompt of either task.

Owns the tasks' prompts, gold rewards and data files. Pure Python plus dschat's atomic writer: no model,
no training code (`mpo_ext.bootstrap` builds the matching tokenizer and model).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dschat.utils.files import atomic_write_text

SYNTHETIC_TASK_NAME = "mpo-synthetic"

# --- Task definition --------------------------------------------------------------------------------
# Item weights by position within each category list: the first items are the most typical.
ITEM_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6)

# (phrase used in prompts, items ordered by descending weight). Categories are pairwise disjoint so that
# every word has exactly one correct category.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "mango", "pear", "plum", "peach", "lemon", "melon"),
    "animals that can swim": (
        "fish", "duck", "seal", "otter", "whale", "frog", "shark", "dolphin", "turtle", "penguin",
    ),
    "colors": ("red", "blue", "green", "yellow", "purple", "pink", "black", "white", "brown", "gray"),
    "vegetables": (
        "carrot", "potato", "onion", "pea", "bean", "corn", "celery", "spinach", "cabbage", "lettuce",
    ),
    "musical instruments": (
        "piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "banjo", "tuba",
    ),
    "words that rhyme with cat": ("hat", "bat", "mat", "rat", "sat", "fat", "flat", "chat", "pat", "vat"),
    "tools": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "axe", "ladder"),
    "things you find in a kitchen": (
        "spoon", "fork", "plate", "bowl", "cup", "pan", "kettle", "oven", "sink", "stove",
    ),
}
COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3, "four": 4, "five": 5}
TEMPLATES: tuple[str, ...] = ("Name {n} {p}.", "List {n} {p}.", "Give me {n} {p}.", "Can you tell me {n} {p}?")
PREFIXES: tuple[str, ...] = ("", "Hi. ", "Quick question: ", "Please help. ")

# Gold reward constants (documented in gold_reward).
WRONG_ITEM = -1.0
REPEATED_ITEM = -0.75
EXTRA_ITEM = -0.5
EMPTY_ITEM = -0.5
PROPER_END = 0.5
IMPROPER_END = -0.5
EMPTY_RESPONSE = -2.0
MIN_GOLD = -5.0

_ITEM_WEIGHT: dict[str, dict[str, float]] = {
    phrase: dict(zip(items, ITEM_WEIGHTS)) for phrase, items in CATEGORIES.items()
}
_ALL_ITEMS: tuple[str, ...] = tuple(w for items in CATEGORIES.values() for w in items)
_OTHER_ITEMS: dict[str, list[str]] = {
    phrase: [w for w in _ALL_ITEMS if w not in items] for phrase, items in CATEGORIES.items()
}
# Longest phrase first so that no phrase matches inside a longer one.
_PROMPT_RE = re.compile(
    r"\b(" + "|".join(COUNT_WORDS) + r") ("
    + "|".join(re.escape(p) for p in sorted(CATEGORIES, key=len, reverse=True)) + r")\b"
)

for _phrase, _items in CATEGORIES.items():
    assert len(_items) == len(ITEM_WEIGHTS), _phrase
assert len(set(_ALL_ITEMS)) == len(_ALL_ITEMS), "categories must be disjoint"


@dataclass(frozen=True)
class TaskSpec:
    """What a prompt asks for: the category phrase and the requested number of items."""

    category: str
    count: int


def format_prompt(question: str) -> str:
    """HH-style single-turn prompt (DESIGN.md text conventions)."""
    return f"\n\nHuman: {question}\n\nAssistant:"


def _question(cat_idx: int, tpl_idx: int, count_idx: int, prefix_idx: int) -> str:
    phrase = list(CATEGORIES)[cat_idx]
    count_word = list(COUNT_WORDS)[count_idx]
    return PREFIXES[prefix_idx] + TEMPLATES[tpl_idx].format(n=count_word, p=phrase)


def _is_held_out(cat_idx: int, tpl_idx: int, count_idx: int, prefix_idx: int) -> bool:
    # A fixed, seed-independent fifth of the prompt strings never appears in train: every category and
    # count still occurs in both splits, only the exact phrasing combination is new at test time.
    return (cat_idx + tpl_idx + count_idx + prefix_idx) % 5 == 0


def all_prompts(split: str | None = None) -> list[str]:
    """Every distinct prompt string; `split` = "train" / "test" restricts to that split's phrasings."""
    out = []
    for c in range(len(CATEGORIES)):
        for t in range(len(TEMPLATES)):
            for n in range(len(COUNT_WORDS)):
                for p in range(len(PREFIXES)):
                    held = _is_held_out(c, t, n, p)
                    if split is None or (split == "test") == held:
                        out.append(format_prompt(_question(c, t, n, p)))
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    return out


@functools.lru_cache(maxsize=2)
def _prompts(split: str) -> tuple[str, ...]:
    return tuple(all_prompts(split))


@functools.lru_cache(maxsize=4096)  # pure; data generation asks ~6 times per record about a few hundred prompts
def parse_prompt(prompt: str) -> TaskSpec:
    """Read category and count from the last Human turn; ValueError if it is not a task prompt."""
    turn = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0]
    match = _PROMPT_RE.search(turn)
    if match is None:
        raise ValueError(f"not a {SYNTHETIC_TASK_NAME} prompt: {prompt!r}")
    return TaskSpec(category=match.group(2), count=COUNT_WORDS[match.group(1)])


def gold_reward(prompt: str, response: str) -> float:
    """True quality of `response` to `prompt`; accepts any string (empty, garbage, unknown words).

    The response is stripped, a final "." removed, and the rest split on ",". Items are scanned in order:
    a new correct item adds its weight (0.6..1.0) while fewer than the requested count have been given,
    and costs EXTRA_ITEM (-0.5) once the count is reached; a repeat costs -0.75; anything else (a word of
    another category, unknown text) costs -1.0; an empty item costs -0.5. Ending with exactly one final
    period and nothing else (no other ".", "?", "!", newline) adds +0.5, otherwise -0.5. An empty
    response scores -2.0. The total is clipped below at -5.0 and rounded to 6 decimals.
    """
    spec = parse_prompt(prompt)
    weights = _ITEM_WEIGHT[spec.category]
    text = response.strip()
    if not text:
        return EMPTY_RESPONSE
    body = text[:-1] if text.endswith(".") else text
    proper_end = text.endswith(".") and not any(ch in body for ch in ".?!\n")
    score = PROPER_END if proper_end else IMPROPER_END
    seen: set[str] = set()
    n_correct = 0
    for raw in body.split(","):
        item = " ".join(raw.lower().split())
        if not item:
            score += EMPTY_ITEM
        elif item not in weights:
            score += WRONG_ITEM
        elif item in seen:
            score += REPEATED_ITEM
        else:
            seen.add(item)
            if n_correct < spec.count:
                score += weights[item]
                n_correct += 1
            else:
                score += EXTRA_ITEM
    return round(max(score, MIN_GOLD), 6)


def best_response(prompt: str) -> str:
    """An optimal response: the requested number of highest-weight items, then a period."""
    spec = parse_prompt(prompt)
    return " " + ", ".join(CATEGORIES[spec.category][: spec.count]) + "."


@functools.lru_cache(maxsize=4096)  # pure; the dataset summary asks once per record
def max_gold(prompt: str) -> float:
    """Best achievable gold reward for `prompt`."""
    return gold_reward(prompt, best_response(prompt))


def mean_gold(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Mean gold reward of paired prompts/responses (for evaluating generations)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("mean_gold needs equally many prompts and responses, at least one")
    return sum(gold_reward(p, r) for p, r in zip(prompts, responses)) / len(prompts)


# --- Response generator -----------------------------------------------------------------------------
def sample_response(prompt: str, quality: float, rng: random.Random) -> str:
    """Draw one response whose expected gold rises with `quality` in [0, 1].

    Each behaviour of the writer depends smoothly on quality: how often the count is exact (else mostly
    one item too many), how often a wrong item or a repeat slips in, whether high- or low-weight items
    are preferred (below ~0.65 the writer prefers the *low*-weight ones), and whether the period is
    written. Middling writers thus share a systematic bias that an SFT model will copy. Correct items
    come in alphabetical order; gold_reward ignores order.
    """
    spec = parse_prompt(prompt)
    q = min(max(float(quality), 0.0), 1.0)
    items = CATEGORIES[spec.category]

    if rng.random() < 0.15 + 0.85 * q**2:
        n = spec.count
    else:
        n = max(1, spec.count + rng.choice((1, 1, 1, 2, -1)))
    p_wrong = 0.4 * (1.0 - q) ** 1.5
    p_repeat = 0.3 * (1.0 - q) ** 2
    temperature = 15.0 * (q - 0.65)  # >0 prefers high-weight items, <0 low-weight ones
    # Choose the distinct correct items first, then the slips. A writer lists correct items in
    # alphabetical order (so a small model learns "no repeats" as a local pattern), a repeat next to its
    # original, and a wrong item at a random position.
    correct: list[str] = []
    repeats: list[str] = []
    wrong: list[str] = []
    for _ in range(n):
        r = rng.random()
        unseen = [w for w in items if w not in correct]
        if r < p_wrong or not unseen:
            wrong.append(rng.choice(_OTHER_ITEMS[spec.category]))
        elif r < p_wrong + p_repeat and correct:
            repeats.append(rng.choice(correct))
        else:
            scores = [math.exp(temperature * (_ITEM_WEIGHT[spec.category][w] - 0.8)) for w in unseen]
            correct.append(rng.choices(unseen, weights=scores, k=1)[0])
    out = sorted(correct + repeats)
    for word in wrong:
        out.insert(rng.randrange(len(out) + 1), word)
    end = "." if rng.random() < 0.35 + 0.65 * q else ""
    return " " + ", ".join(out) + end


def _sample_quality(rng: random.Random) -> float:
    # Beta(2, 2): mostly middling writers, a few very good or very bad ones.
    return rng.betavariate(2.0, 2.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def make_pair(prompt: str, rng: random.Random, label_beta: float = 1.0, task: str = SYNTHETIC_TASK_NAME) -> dict:
    """One preference record: two responses of independent quality, BT-labelled from their gold scores.

    Exact gold ties are redrawn so that "the label agrees with gold" is always well defined.
    """
    spec = task_of(task)
    first = spec.sample_response(prompt, _sample_quality(rng), rng)
    g1 = spec.gold_reward(prompt, first)
    for _ in range(100):
        second = spec.sample_response(prompt, _sample_quality(rng), rng)
        g2 = spec.gold_reward(prompt, second)
        if g1 != g2:
            break
    else:  # pragma: no cover - practically unreachable with the quality spread above
        second, g2 = spec.best_response(prompt), spec.max_gold(prompt)
    if rng.random() < _sigmoid(label_beta * (g1 - g2)):
        chosen, rejected, gc, gr = first, second, g1, g2
    else:
        chosen, rejected, gc, gr = second, first, g2, g1
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_gold": gc,
        "rejected_gold": gr,
        "label_correct": gc > gr,
    }


def generate_records(num: int, split: str, seed: int, label_beta: float = 1.0,
                     task: str = SYNTHETIC_TASK_NAME) -> list[dict]:
    """`num` preference records of `task` for `split` ("train" or "test"), deterministic in (task, seed, split)."""
    spec = task_of(task)
    rng = random.Random(f"{task}:{split}:{seed}")
    return [make_pair(spec.sample_prompt(rng, split), rng, label_beta, task) for _ in range(num)]


# --- Files ------------------------------------------------------------------------------------------
def _summary(records: list[dict], task: Task) -> dict:
    n = len(records)
    return {
        "size": n,
        "label_noise_rate": sum(not r["label_correct"] for r in records) / n if n else 0.0,
        "mean_chosen_gold": sum(r["chosen_gold"] for r in records) / n if n else 0.0,
        "mean_rejected_gold": sum(r["rejected_gold"] for r in records) / n if n else 0.0,
        "mean_max_gold": sum(task.max_gold(r["prompt"]) for r in records) / n if n else 0.0,
    }


def make_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 2000,
    num_test: int = 200,
    seed: int = 1234,
    label_beta: float = 1.0,
    task: str = SYNTHETIC_TASK_NAME,
) -> dict:
    """Write train.jsonl, test.jsonl and manifest.json of `task` into `output_dir`; return the manifest.

    Records: prompt, chosen, rejected, chosen_gold, rejected_gold, label_correct. SFT trains on
    prompt+chosen, the RM on the pairs, selection/PPO on the prompts; test prompts are held-out phrasings.
    Each file is written atomically; manifest.json is written last, so its presence marks completeness.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be positive")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = task_of(task)
    splits = {
        "train": generate_records(num_train, "train", seed, label_beta, task),
        "test": generate_records(num_test, "test", seed, label_beta, task),
    }
    for name, records in splits.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    all_max = ([max_gold(p) for p in all_prompts()] if task == SYNTHETIC_TASK_NAME
               else [spec.max_gold(r["prompt"]) for records in splits.values() for r in records])
    manifest = {
        "task": task,
        "seed": seed,
        "num_train": num_train,
        "num_test": num_test,
        "label_beta": label_beta,
        "max_achievable_gold": max(all_max),
        "mean_max_achievable_gold": sum(all_max) / len(all_max),
        "train": _summary(splits["train"], spec),
        "test": _summary(splits["test"], spec),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# --- Second task: sorting numbers --------------------------------------------------------------------
SORT_TASK_NAME = "mpo-sort"
SORT_NUMBERS: tuple[int, ...] = tuple(range(1, 21))
SORT_SIZES: tuple[int, ...] = (3, 4, 5)
SORT_DIRECTIONS: dict[str, bool] = {"from smallest to largest": False, "from largest to smallest": True}
SORT_TEMPLATES: tuple[str, ...] = ("Sort {x} {d}.", "Please sort {x} {d}.", "Order these numbers {d}: {x}.",
                                   "Can you sort {x} {d}?")
# Gold constants of the sort task (documented in sort_gold_reward).
SORT_RIGHT_PLACE = 1.0
SORT_PRESENT = 0.25
SORT_MISSING = -0.5
SORT_EXTRA = -0.75
SORT_PROPER_END = 0.3
_SORT_RE = re.compile(r"(?:Sort|sort|numbers) ((?:\d+ ?)+?)(?: (from (?:smallest to largest|largest to smallest)))"
                      r"|(from (?:smallest to largest|largest to smallest)): ((?:\d+ ?)+)")


@dataclass(frozen=True)
class SortSpec:
    numbers: tuple[int, ...]
    descending: bool

    @property
    def target(self) -> list[int]:
        return sorted(self.numbers, reverse=self.descending)


def _sort_held_out(numbers: Sequence[int], descending: bool, template: int) -> bool:
    # A fixed fifth of the (number set, direction, phrasing) combinations is kept for test.
    return (sum(numbers) + 3 * template + int(descending)) % 5 == 0


def sort_prompt(numbers: Sequence[int], descending: bool, template: int = 0) -> str:
    direction = next(d for d, desc in SORT_DIRECTIONS.items() if desc == descending)
    return format_prompt(SORT_TEMPLATES[template].format(x=" ".join(str(n) for n in numbers), d=direction))


def sample_sort_prompt(rng: random.Random, split: str) -> str:
    """A random prompt of `split` ("train" or "test"): distinct numbers in random order, a direction, a phrasing."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    while True:
        numbers = rng.sample(SORT_NUMBERS, rng.choice(SORT_SIZES))
        descending = rng.random() < 0.5
        template = rng.randrange(len(SORT_TEMPLATES))
        if _sort_held_out(numbers, descending, template) == (split == "test"):
            return sort_prompt(numbers, descending, template)


def parse_sort_prompt(prompt: str) -> SortSpec:
    turn = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0]
    match = _SORT_RE.search(turn)
    if match is None:
        raise ValueError(f"not a {SORT_TASK_NAME} prompt: {prompt!r}")
    numbers, direction = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
    return SortSpec(tuple(int(x) for x in numbers.split()), SORT_DIRECTIONS[direction])


def sort_gold_reward(prompt: str, response: str) -> float:
    """True quality of a sorting answer; accepts any string.

    The response is stripped, a final "." removed and the rest split on whitespace. Each token at
    position i equal to the i-th number of the correct order adds +1.0; a number of the prompt at a wrong
    place adds +0.25 (first occurrence only); anything else (a repeat, a number not in the prompt, a word)
    costs -0.75; each prompt number never written costs -0.5. Ending with exactly one period (no other
    punctuation) adds +0.3. An empty response scores -2.0; the total is clipped below at -5.0.
    """
    spec = parse_sort_prompt(prompt)
    text = response.strip()
    if not text:
        return EMPTY_RESPONSE
    body = text[:-1] if text.endswith(".") else text
    score = SORT_PROPER_END if text.endswith(".") and not any(ch in body for ch in ".?!,\n") else 0.0
    target, wanted, seen = spec.target, set(spec.numbers), set()
    for i, token in enumerate(body.split()):
        value = int(token) if token.isdigit() else None
        if value in wanted and value not in seen:
            seen.add(value)
            score += SORT_RIGHT_PLACE if i < len(target) and target[i] == value else SORT_PRESENT
        else:
            score += SORT_EXTRA
    score += SORT_MISSING * len(wanted - seen)
    return round(max(score, MIN_GOLD), 6)


def best_sort_response(prompt: str) -> str:
    return " " + " ".join(str(n) for n in parse_sort_prompt(prompt).target) + "."


def sample_sort_response(prompt: str, quality: float, rng: random.Random) -> str:
    """A writer of quality q in [0, 1]: below ~0.5 it mostly sorts ascending whatever was asked; it swaps
    neighbours, drops or repeats a number, or slips in a foreign one more often the lower q is, and
    writes the final period with probability 0.4 + 0.6 q."""
    spec = parse_sort_prompt(prompt)
    q = min(max(float(quality), 0.0), 1.0)
    descending = spec.descending if rng.random() < 0.3 + 0.7 * q else False
    out = sorted(spec.numbers, reverse=descending)
    for _ in range(int(rng.random() < 0.7 * (1 - q)) + int(rng.random() < 0.3 * (1 - q))):
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    if rng.random() < 0.3 * (1 - q) and len(out) > 2:
        out.pop(rng.randrange(len(out)))
    if rng.random() < 0.25 * (1 - q):
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    if rng.random() < 0.25 * (1 - q) ** 1.5:
        out.insert(rng.randrange(len(out) + 1), rng.choice([n for n in SORT_NUMBERS if n not in spec.numbers]))
    return " " + " ".join(str(n) for n in out) + ("." if rng.random() < 0.4 + 0.6 * q else "")


def sort_corpus_texts() -> Iterator[str]:
    for template in range(len(SORT_TEMPLATES)):
        for descending in (False, True):
            yield sort_prompt(SORT_NUMBERS, descending, template)
    yield " " + " ".join(str(n) for n in SORT_NUMBERS) + "."
    yield " ".join(str(n) for n in SORT_NUMBERS)
    yield ", . ? ! : ' \n"


# --- Task registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One embedded task: how to draw prompts and answers, its gold reward and its tokenizer corpus."""

    name: str
    sample_prompt: Callable[[random.Random, str], str]
    sample_response: Callable[[str, float, random.Random], str]
    gold_reward: Callable[[str, str], float]
    best_response: Callable[[str], str]
    corpus: Callable[[], Iterable[str]]

    def max_gold(self, prompt: str) -> float:
        return self.gold_reward(prompt, self.best_response(prompt))


TASKS: dict[str, Task] = {
    SYNTHETIC_TASK_NAME: Task(SYNTHETIC_TASK_NAME, lambda rng, split: rng.choice(_prompts(split)), sample_response,
                              gold_reward, best_response, lambda: corpus_texts()),
    SORT_TASK_NAME: Task(SORT_TASK_NAME, sample_sort_prompt, sample_sort_response, sort_gold_reward,
                         best_sort_response, sort_corpus_texts),
}


def task_of(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def any_gold_reward(prompt: str, response: str) -> float:
    """The gold reward of whichever embedded task `prompt` belongs to (ValueError if none)."""
    for task in TASKS.values():
        try:
            return task.gold_reward(prompt, response)
        except ValueError:
            continue
    raise ValueError(f"not a prompt of any embedded task: {prompt!r}")


def corpus_texts(extra: Iterable[str] = ()) -> Iterator[str]:
    """Every text the task can produce, for tokenizer training: all prompts, every item with and without
    a leading space, list punctuation, and `extra` texts (e.g. dataset records) if given."""
    yield from all_prompts()
    for items in CATEGORIES.values():
        yield " " + ", ".join(items) + "."
    yield " " + " ".join(_ALL_ITEMS)
    yield " ".join(_ALL_ITEMS)
    yield ", . ? ! : ' \n"
    yield from extra
