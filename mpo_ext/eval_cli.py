"""Click commands `mpo eval`, `mpo compare` and `mpo plot-curves` (registered in the `mpo` group).

`mpo eval` runs in one process or under `deepspeed`/`torchrun` (prompts are sharded by batch and the
answers gathered on rank 0); `compare` and `plot-curves` are single-process tools over its files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dschat.utils.errors import EXIT_USER_ERROR, UserError
from dschat.utils.files import atomic_write_json, atomic_write_jsonl
from dschat.utils.output_dir import prepare_output_dir
from dschat.utils.settings import FlagSpec, Settings
from mpo_ext.eval_settings import EvalSettings

GENERATION_EXCLUDED = ("model", "output_dir")  # `mpo compare` has its own --model and --output_dir

# The modules that load models (mpo_ext.evaluation, dschat.utils.inference, mpo_ext.judge, mpo_ext.curves)
# import transformers or matplotlib: they are imported inside the commands that use them, so `mpo --help`
# and the light commands answer without loading them.


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


def click_option(spec: FlagSpec) -> Callable:
    """The click option of one settings field: its name, default, help, accepted values (choices, ranges),
    `multiple` for a list, `--x/--no_x` for a switch with a negative; as the argparse flags are generated."""
    meta = spec.meta
    common: dict[str, Any] = {"help": meta["help"], "hidden": meta["hidden"]}
    if spec.required:
        common["required"] = True
    else:
        common.update(default=tuple(spec.default()) if spec.is_list else spec.default(), show_default=True)
    if spec.kind is bool and not spec.is_list:
        names = f"{spec.option}/{meta['negative']}" if meta["negative"] else spec.option
        return click.option(names, spec.name, is_flag=True, **common)
    if meta["choices"] is not None:
        kind: Any = click.Choice([str(c) for c in meta["choices"]])
    elif spec.kind in (int, float) and spec.range_text() is not None:
        bounds = {"min": meta["low"], "max": meta["high"], "min_open": meta["low_open"], "max_open": meta["high_open"]}
        kind = click.IntRange(**bounds) if spec.kind is int else FiniteFloatRange(**bounds)
    else:
        kind = FiniteFloatRange() if spec.kind is float else spec.kind
    return click.option(spec.option, *meta["aliases"], spec.name, type=kind, multiple=spec.is_list, **common)


def settings_options(settings_type: type[Settings], exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: a click option per field of `settings_type` (but `exclude`), in definition order."""

    def decorate(func: Callable) -> Callable:
        for spec in reversed(settings_type.flag_specs()):
            if spec.name not in exclude:
                func = click_option(spec)(func)
        return func

    return decorate


def _maybe_init_distributed(local_rank: int) -> None:
    """Join the process group only when a launcher started several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dschat.utils.dist import init_distributed  # torch: not for `mpo --help`

        init_distributed(local_rank)


def _run_evaluation(settings: EvalSettings) -> list[dict]:
    from mpo_ext.evaluation import evaluate

    settings.require_inputs()
    if not Path(settings.reward_model).is_dir() and settings.reward_model.startswith((".", "/", "~")):
        raise UserError(f"--reward_model {settings.reward_model}: no such directory")
    _maybe_init_distributed(settings.local_rank)
    return evaluate(settings)


# --------------------------------------------------------------------------------------------- eval


@click.command("eval", help=EvalSettings.description)
@settings_options(EvalSettings)
@_user_errors
def eval_command(**values: Any) -> None:
    """Mean reward-model score (with bootstrap CI) of each model on the same held-out prompts."""
    _run_evaluation(EvalSettings.from_mapping(values))


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
@settings_options(EvalSettings, exclude=GENERATION_EXCLUDED)
@click.option("--tie_margin", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True,
              help="Reward differences within +-this are ties.")
@click.option("--judge_url", type=str, default=None,
              help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for an LLM judge.")
@click.option("--judge_model", type=str, default=None, help="Model name sent to the judge endpoint.")
@click.option("--judge_api_key_env", type=str, default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the judge API key (unset: no Authorization header). The key "
                   "is sent over https only, unless --judge_send_key_over_http.")
@click.option("--judge_send_key_over_http", is_flag=True, default=False,
              help="Also send the API key to a plain http --judge_url (anyone on the path, or another local user "
                   "listening on that port, can read it).")
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
                    judge_send_key_over_http: bool, judge_rate_limit: float, judge_max_retries: int, judge_backoff: float, judge_timeout: float,
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
        _run_evaluation(EvalSettings.from_mapping({**opts, "model": model_specs, "output_dir": output_dir}))
        from dschat.utils.dist import is_rank_0

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
    if judge:
        judge["send_key_over_http"] = judge_send_key_over_http
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
                         cache_path=settings["cache"], send_key_over_http=settings.get("send_key_over_http", False))
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
              help="Instead of each stage's key panels, these (repeatable), e.g. loss, objective/kl, eval/reward.")
@_user_errors
def plot_curves_command(run_dirs: tuple[str, ...], output: str, metrics: tuple[str, ...]) -> None:
    """Training curves of one or more runs from metrics.jsonl: a row per stage in pipeline order (SFT, reward
    model, DPO, PPO) with its key panels (loss, what it optimises, KL, held-out reward); several runs are
    overlaid on the same axes, a colour each.

    RUN_DIRS: pipeline dirs (their stage dirs are found), training output dirs or metrics.jsonl files;
    NAME=DIR names a run.
    """
    from mpo_ext.curves import find_metrics_files, plot_training_curves

    files = find_metrics_files(run_dirs)
    plot = plot_training_curves(files, output, metrics or None)
    runs = list(dict.fromkeys(f.run for f in files))
    click.echo(f"[plot-curves] {len(runs)} run(s) ({', '.join(runs)}), {len(files)} metrics files: "
               f"{len(plot.panels)} panels -> {plot.path}")
    if plot.left_out:
        click.echo(f"[plot-curves] left out {len(plot.left_out)} panels beyond {len(plot.panels)} (choose with "
                   f"--metric): {', '.join(plot.left_out)}")


@click.group("mpo-eval")
def _standalone() -> None:
    """Evaluation commands (also registered in the `mpo` group)."""


_standalone.add_command(eval_command)
_standalone.add_command(compare_command)
_standalone.add_command(plot_curves_command)

if __name__ == "__main__":
    _standalone()
