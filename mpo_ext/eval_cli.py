"""Click commands `mpo eval`, `mpo compare` and `mpo plot-curves` (registered in the `mpo` group).

`mpo eval` runs in one process or under `deepspeed`/`torchrun` (prompts are sharded by batch and the
answers gathered on rank 0); `compare` and `plot-curves` are single-process tools over its files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dschat.utils import args as flags
from dschat.utils.data.raw_datasets import parse_column_map
from dschat.utils.dist import init_distributed, is_rank_0
from dschat.utils.errors import EXIT_USER_ERROR, UserError
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.utils import atomic_write_json, atomic_write_jsonl

# The modules that load models (mpo_ext.evaluation, dschat.utils.inference, mpo_ext.judge, mpo_ext.curves)
# import transformers or matplotlib: they are imported inside the commands that use them, so `mpo --help`
# and the light commands answer without loading them.

SAMPLING_OPTIONS = ("do_sample", *(flag.name for flag in flags.SAMPLING_FLAGS))


def _user_errors(func: Callable) -> Callable:
    """UserError -> `error: <message>` on stderr and exit code 2, like every other entry point."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {' '.join(str(err).split())}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan (which passes any range check) and inf."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def sampling_click_options() -> list[Callable]:
    """click options for the shared sampling flags (`dschat.utils.args.SAMPLING_FLAGS`): the same names,
    defaults and accepted values as PPO's and selection's argparse flags, checked as click parses."""
    options = []
    for flag in flags.SAMPLING_FLAGS:
        if flag.type is int:
            kind = click.IntRange(min=int(flag.low), max=flag.high, min_open=flag.low_open)
        else:
            kind = FiniteFloatRange(min=flag.low, max=flag.high, min_open=flag.low_open)
        options.append(click.option(f"--{flag.name}", type=kind, default=flag.default, show_default=True,
                                    help=flag.help + flags.WITH_DO_SAMPLE))
    return options


def _generation_options(func: Callable) -> Callable:
    """Decoding and data flags shared by `eval` and `compare --model`."""
    options = [
        click.option("--reward_model", type=str, default=None,
                     help="Step-2 reward model output directory (scores every answer)."),
        click.option("--data_path", type=str, multiple=True,
                     help="Dataset name or local file/directory; its eval/test split gives the prompts "
                          "(a local file without one: all its prompts). Repeat it to evaluate on several "
                          "datasets together."),
        click.option("--data_keys", type=str, default=None,
                     help="Column mapping for local files and hub datasets, NAME=COLUMN comma-separated "
                          "(e.g. prompt=question), as in the training stages."),
        click.option("--chat_format", type=click.Choice(flags.CHAT_FORMATS), default="auto", show_default=True,
                     help="Which prompts go through the first model's chat template, as in the training stages "
                          "(auto: conversational data and HH dialogues; template: DeepSpeed-Chat's named datasets "
                          "too; raw: none)."),
        click.option("--num_prompts", type=click.IntRange(min=1), default=None,
                     help="Evaluate a seeded random subset of this many prompts (default: all)."),
        click.option("--max_new_tokens", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Maximum new tokens per answer."),
        click.option("--do_sample/--greedy", default=False, show_default=True,
                     help="Sample (with --temperature/--top_p/--top_k) or decode greedily."),
        *sampling_click_options(),
        click.option("--seed", type=int, default=1234, show_default=True,
                     help="Fixes the prompt subset, the sampling and the bootstrap."),
        click.option("--batch_size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Prompts per generation/scoring batch (per rank)."),
        click.option("--max_prompt_seq_len", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Longer prompts keep their last tokens."),
        click.option("--max_seq_len", type=click.IntRange(min=2), default=512, show_default=True,
                     help="Longest prompt+answer the reward model reads."),
        click.option("--num_padding_at_beginning", type=click.IntRange(min=0), default=0, show_default=True,
                     help="As in step 2 (OPT: 1, Llama: 0)."),
        click.option("--reward_end_text", type=str, default=None,
                     help="Text appended to an answer before the reward model reads it: `eos` or a literal "
                          "such as `<|endoftext|>` (default: the ending recorded with the reward model; "
                          "`<|endoftext|>` for a DeepSpeed-Chat step-2 output)."),
        click.option("--device", type=str, default="auto", show_default=True,
                     help="auto (this rank's GPU, else cpu), cpu, cuda, cuda:1, ..."),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: bf16 on GPU, fp32 on CPU."),
        click.option("--gold", type=click.Choice(["auto", "synthetic", "none"]), default="auto", show_default=True,
                     help="Also score with the synthetic task's gold reward (auto: when the data's "
                          "manifest.json says it is the synthetic task)."),
        click.option("--num_bootstrap", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Bootstrap resamples for the confidence intervals."),
        click.option("--confidence", type=FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True),
                     default=0.95, show_default=True, help="Level of the bootstrap intervals."),
        click.option("--data_output_path", type=str, default=None,
                     help="Scratch directory of the data loaders (default: ~/.cache/dschat/data_files)."),
        click.option("--local_rank", type=int, default=-1, hidden=True, help="Set by the deepspeed launcher."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _maybe_init_distributed(local_rank: int) -> None:
    """Join the process group only when a launcher started several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(local_rank)


def _run_evaluation(models: list[tuple[str, str]], output_dir: str, opts: dict) -> list[dict]:
    from mpo_ext.evaluation import Decoding, evaluate

    if not opts["reward_model"]:
        raise UserError("--reward_model is required (a step-2 reward model output directory)")
    if not opts["data_path"]:
        raise UserError("--data_path is required (the dataset whose held-out prompts are used)")
    if not Path(opts["reward_model"]).is_dir() and opts["reward_model"].startswith((".", "/", "~")):
        raise UserError(f"--reward_model {opts['reward_model']}: no such directory")
    _maybe_init_distributed(opts["local_rank"])
    sampling = flags.sampling_settings(**{name: opts[name] for name in SAMPLING_OPTIONS})
    decoding = Decoding(max_new_tokens=opts["max_new_tokens"], **dataclasses.asdict(sampling),
                        seed=opts["seed"], batch_size=opts["batch_size"],
                        max_prompt_seq_len=opts["max_prompt_seq_len"])
    return evaluate(models, opts["reward_model"], opts["data_path"], output_dir, decoding=decoding,
                    num_prompts=opts["num_prompts"], num_padding_at_beginning=opts["num_padding_at_beginning"],
                    device=opts["device"], dtype=opts["dtype"], max_seq_len=opts["max_seq_len"], gold=opts["gold"],
                    num_resamples=opts["num_bootstrap"], confidence=opts["confidence"],
                    data_output_path=opts["data_output_path"], reward_end_text=opts["reward_end_text"],
                    column_map=parse_column_map(opts["data_keys"]), chat_format=opts["chat_format"])


# --------------------------------------------------------------------------------------------- eval


@click.command("eval")
@click.option("--model", "model_specs", multiple=True, required=True,
              help="NAME=PATH of a causal LM to evaluate (repeat: --model sft=... --model mpo=...).")
@_generation_options
@click.option("--output_dir", type=str, required=True,
              help="Writes generations/NAME.jsonl and table.json here.")
@_user_errors
def eval_command(model_specs: tuple[str, ...], output_dir: str, **opts: Any) -> None:
    """Mean reward-model score (with bootstrap CI) of each model on the same held-out prompts."""
    from mpo_ext.evaluation import parse_model_specs

    _run_evaluation(parse_model_specs(model_specs), output_dir, opts)


# --------------------------------------------------------------------------------------------- compare


def _display_names(paths: list[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if names[0] == names[1]:
        names = [f"{p.parent.parent.name or p.parent.name}/{p.stem}" for p in paths]
    if names[0] == names[1]:
        names = ["a", "b"]
    return names


@click.command("compare")
@click.argument("generations", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--model", "model_specs", multiple=True,
              help="Instead of two generations files: two NAME=PATH models to generate with first "
                   "(needs --reward_model, --data_path and --output_dir).")
@_generation_options
@click.option("--tie_margin", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True,
              help="Reward differences within +-this are ties.")
@click.option("--judge_url", type=str, default=None,
              help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for an LLM judge.")
@click.option("--judge_model", type=str, default=None, help="Model name sent to the judge endpoint.")
@click.option("--judge_api_key_env", type=str, default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the judge API key (unset: no Authorization header).")
@click.option("--judge_rate_limit", type=FiniteFloatRange(min=0.0), default=1.0, show_default=True,
              help="Requests per second (0: unlimited).")
@click.option("--judge_max_retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="Retries per judge request (rate limits, server errors).")
@click.option("--judge_backoff", type=FiniteFloatRange(min=0.0), default=1.0, show_default=True,
              help="First retry delay in seconds; doubles on each retry.")
@click.option("--judge_timeout", type=FiniteFloatRange(min=0.0, min_open=True), default=60.0, show_default=True,
              help="Seconds one request may take in total (connect, send and the whole reply); then it is retried.")
@click.option("--judge_max_tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Maximum tokens of a judge's verdict.")
@click.option("--judge_tie_margin", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True,
              help="Judge score differences (0-10 scale) within +-this are ties.")
@click.option("--judge_limit", type=click.IntRange(min=1), default=None,
              help="Judge only the first N pairs (the paper used 500 prompts).")
@click.option("--judge_cache", type=str, default=None,
              help="Verdict cache (JSONL); default OUTPUT_DIR/judge_cache.jsonl, else beside the first file.")
@click.option("--output_dir", type=str, default=None, help="Writes compare.json and compare_details.jsonl here.")
@_user_errors
def compare_command(generations: tuple[str, ...], model_specs: tuple[str, ...], tie_margin: float,
                    judge_url: str | None, judge_model: str | None, judge_api_key_env: str,
                    judge_rate_limit: float, judge_max_retries: int, judge_backoff: float, judge_timeout: float,
                    judge_max_tokens: int, judge_tie_margin: float, judge_limit: int | None,
                    judge_cache: str | None, output_dir: str | None, **opts: Any) -> None:
    """Win/tie/lose of A against B by reward-model score, optionally also by an LLM judge."""
    from mpo_ext.evaluation import GENERATIONS_DIR, parse_model_specs

    if judge_url and not judge_model:
        raise UserError("--judge_url needs --judge_model (the model name the endpoint serves)")
    if generations and model_specs:
        raise UserError("give either two generations files or two --model NAME=PATH, not both")
    rescore = True
    if model_specs:
        models = parse_model_specs(model_specs)
        if len(models) != 2:
            raise UserError(f"--model: compare needs exactly two models, got {len(models)}")
        if not output_dir:
            raise UserError("--output_dir is required with --model (the generations are written there)")
        _run_evaluation(models, output_dir, opts)
        if not is_rank_0():
            return
        paths = [Path(output_dir) / GENERATIONS_DIR / f"{name}.jsonl" for name, _ in models]
        names = [name for name, _ in models]
        rescore = False  # just scored by the same reward model
    elif len(generations) == 2:
        paths = [Path(p) for p in generations]
        names = _display_names(paths)
    else:
        raise UserError(f"compare needs two generations files (got {len(generations)}) or two --model NAME=PATH")

    judge = _judge_settings(judge_url, judge_model, judge_api_key_env, judge_rate_limit, judge_max_retries,
                            judge_backoff, judge_timeout, judge_max_tokens, judge_tie_margin, judge_limit,
                            judge_cache, output_dir, paths[0])
    compare_files(paths, names, tie_margin=tie_margin, reward_model=opts["reward_model"] if rescore else None,
                  opts=opts, output_dir=output_dir, judge=judge)


def _judge_settings(url: str | None, model: str | None, key_env: str, rate: float, retries: int, backoff: float,
                    timeout: float, max_tokens: int, tie_margin: float, limit: int | None, cache: str | None,
                    output_dir: str | None, first_file: Path) -> dict | None:
    if not url:
        return None
    default_cache = Path(output_dir) if output_dir else first_file.parent
    return {"url": url, "model": model, "key_env": key_env, "rate": rate, "retries": retries, "backoff": backoff,
            "timeout": timeout, "max_tokens": max_tokens, "tie_margin": tie_margin, "limit": limit,
            "cache": cache or str(default_cache / "judge_cache.jsonl")}


def _rescore(paths: list[Path], records: list[list[dict]], opts: dict) -> None:
    from dschat.utils.inference import RewardScorer, resolve_device, resolve_torch_dtype

    device = resolve_device(opts["device"])
    scorer = RewardScorer.from_path(opts["reward_model"], device, resolve_torch_dtype(opts["dtype"], device),
                                    opts["num_padding_at_beginning"], opts["max_seq_len"], opts["batch_size"],
                                    end_text=opts.get("reward_end_text"))
    for path, recs in zip(paths, records):
        scores = scorer.score([r["prompt"] for r in recs], [r["answer"] for r in recs])
        for r, s in zip(recs, scores):
            r["reward"] = s
        click.echo(f"[compare] rescored {len(recs)} answers of {path} with {opts['reward_model']}")


def compare_files(paths: list[Path], names: list[str], *, tie_margin: float, reward_model: str | None,
                  opts: dict, output_dir: str | None, judge: dict | None) -> dict:
    """Pair two generations files by prompt, count outcomes, optionally judge; print and save."""
    from mpo_ext.evaluation import pair_by_prompt, read_generations, win_tie_lose

    records = [read_generations(p) for p in paths]
    if reward_model:
        _rescore(paths, records, opts)
    pairs = pair_by_prompt(records[0], records[1])
    if not pairs:
        raise UserError(f"{paths[0]} and {paths[1]} share no prompts; compare generations of the same prompts")
    missing = [str(p) for p, recs in zip(paths, records) if any("reward" not in r for r in recs)]
    if missing:
        raise UserError(f"{', '.join(missing)}: records without 'reward'; pass --reward_model to score them")
    a, b = names
    rm = win_tie_lose([x["reward"] for x, _ in pairs], [y["reward"] for _, y in pairs], tie_margin)
    click.echo(f"[compare] {a} vs {b} on {rm['n']} shared prompts by reward model (tie margin {tie_margin}): "
               f"{_outcome_line(rm)}")
    details = [{"prompt": x["prompt"], "answer_a": x["answer"], "answer_b": y["answer"],
                "reward_a": x["reward"], "reward_b": y["reward"]} for x, y in pairs]
    summary: dict[str, Any] = {"a": a, "b": b, "files": [str(p) for p in paths], "reward_model": rm, "judge": None}
    if judge:
        summary["judge"] = run_judge(pairs, details, judge, a, b)
    if output_dir:
        out = prepare_output_dir(output_dir)
        atomic_write_jsonl(out / "compare_details.jsonl", details)
        atomic_write_json(out / "compare.json", summary)
        click.echo(f"[compare] wrote {out / 'compare.json'}")
    else:
        click.echo(json.dumps(summary, indent=2))
    return summary


def _outcome_line(counts: dict) -> str:
    def pct(key: str) -> str:
        rate = counts.get(f"{key}_rate")
        return f"{rate:.1%}" if rate is not None else "-"

    text = f"win {counts['win']} ({pct('win')}) | tie {counts['tie']} ({pct('tie')}) | lose {counts['lose']} ({pct('lose')})"
    if "invalid" in counts:
        text += f" | invalid {counts['invalid']}"
    return text


def run_judge(pairs: list[tuple[dict, dict]], details: list[dict], settings: dict, a: str, b: str) -> dict:
    """Judge the pairs (both orders each) and add scores to `details`; returns the summary."""
    from mpo_ext.judge import JudgeClient, api_key_from_env, summarize_verdicts

    client = JudgeClient(settings["url"], settings["model"], api_key=api_key_from_env(settings["key_env"]),
                         rate_limit=settings["rate"], max_retries=settings["retries"], backoff=settings["backoff"],
                         timeout=settings["timeout"], max_tokens=settings["max_tokens"],
                         cache_path=settings["cache"])
    limit = settings["limit"] or len(pairs)
    verdicts = []
    for i, ((x, y), detail) in enumerate(zip(pairs[:limit], details[:limit]), start=1):
        verdict = client.judge_pair(x["prompt"], x["answer"], y["answer"])
        verdicts.append(verdict)
        detail.update(judge_score_a=verdict.score_a, judge_score_b=verdict.score_b,
                      judge_outcome=verdict.outcome(settings["tie_margin"]),
                      judge_position_consistent=verdict.position_consistent)
        if i % 50 == 0 or i == limit:
            click.echo(f"[compare] judged {i}/{limit} pairs ({client.requests_sent} requests, "
                       f"{len(client.cache.entries)} cached verdicts)")
    summary = summarize_verdicts(verdicts, settings["tie_margin"])
    summary.update(judge_model=settings["model"], requests_sent=client.requests_sent, cache=settings["cache"])
    consistency = summary["position_consistency"]
    click.echo(f"[compare] {a} vs {b} by judge {settings['model']}: {_outcome_line(summary)}; "
               f"mean score {_fmt(summary['mean_score_a'])} vs {_fmt(summary['mean_score_b'])}; "
               f"position-consistent {_fmt_pct(consistency)}; {client.requests_sent} requests sent")
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


# --------------------------------------------------------------------------------------------- plot-curves


@click.command("plot-curves")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--output", "output", type=str, default="training_curves.png", show_default=True,
              help="PNG to write.")
@click.option("--metric", "metrics", multiple=True,
              help="Only these panels (repeatable), e.g. loss, objective/kl, eval/loss.")
@_user_errors
def plot_curves_command(run_dirs: tuple[str, ...], output: str, metrics: tuple[str, ...]) -> None:
    """Training curves (loss, rewards, KL, ...) of one or more runs or pipeline stages from metrics.jsonl.

    RUN_DIRS: training output dirs, metrics.jsonl files or a pipeline dir (its stage dirs are found);
    NAME=DIR names a run.
    """
    from mpo_ext.curves import find_metrics_files, plot_training_curves

    files = find_metrics_files(run_dirs)
    plot = plot_training_curves(files, output, metrics or None)
    click.echo(f"[plot-curves] {len(files)} run(s): {', '.join(files)}; {len(plot.panels)} panels (one per metric "
               f"and run) -> {plot.path}")
    if plot.left_out:
        click.echo(f"[plot-curves] left out {len(plot.left_out)} panels beyond {len(plot.panels)} (choose with "
                   f"--metric or plot fewer runs): {', '.join(plot.left_out)}")


@click.group("mpo-eval")
def _standalone() -> None:
    """Evaluation commands (also registered in the `mpo` group)."""


_standalone.add_command(eval_command)
_standalone.add_command(compare_command)
_standalone.add_command(plot_curves_command)

if __name__ == "__main__":
    _standalone()
