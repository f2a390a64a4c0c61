"""The MPO chain as one plan: SFT -> RM -> select -> DPO (easy) -> PPO (hard, DPO reference) -> eval.

A plan is a list of stages, each a command line (the same `deepspeed main.py ...` a user would type)
plus the file whose presence marks the stage complete. Outputs are written atomically by the stages,
so a complete marker means a complete output, and a re-run skips finished stages and continues.
`DRY_RUN=1` (or `--dry_run`) prints every command without running it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dschat.utils.errors import UserError
from dschat.utils.utils import atomic_write_json

ENTRY_POINTS = {
    "sft": "training/step1_supervised_finetuning/main.py",
    "rm": "training/step2_reward_model_finetuning/main.py",
    "select": "step2.5_select/main.py",
    "dpo": "step3b_dpo/main.py",
    "ppo": "training/step3_rlhf_finetuning/main.py",
}


def find_repo_root() -> Path:
    """The checkout holding the step entry points (`training/...`, `step2.5_select/`, `step3b_dpo/`).

    A plain `pip install .` installs the packages but not the step folders, so look in order at
    $DSCHAT_MPO_ROOT, the source tree this module came from, and the current directory.
    """
    candidates = [os.environ.get("DSCHAT_MPO_ROOT"), Path(__file__).resolve().parents[1], Path.cwd()]
    for candidate in candidates:
        if candidate and all((Path(candidate) / rel).is_file() for rel in ENTRY_POINTS.values()):
            return Path(candidate).resolve()
    raise UserError("the step entry points (training/step1_supervised_finetuning/main.py, ...) were not found; "
                    "run from a dschat-mpo checkout or set DSCHAT_MPO_ROOT to one")

STAGE_ORDER = ("assets", "sft", "rm", "select", "dpo", "ppo", "eval")


@dataclass
class Stage:
    name: str
    command: list[str]
    done_marker: Path
    output: Path
    env: dict[str, str] = field(default_factory=dict)

    def is_complete(self) -> bool:
        return self.done_marker.exists()

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in self.command)


@dataclass
class Preset:
    """Sizes and hyper-parameters of one deployment of the chain."""

    name: str
    launcher: list[str]
    sft_model: str
    rm_base_model: str
    data_path: list[str]
    data_split: str
    threshold: float
    sft: list[str]
    rm: list[str]
    select: list[str]
    dpo: list[str]
    ppo: list[str]
    eval: list[str]
    num_padding_at_beginning: int = 0
    build_assets: bool = False
    num_train: int = 5000


def tiny_preset(out: Path, ranks: int = 1, threshold: float = 1.0) -> Preset:
    """CPU-sized chain on the embedded synthetic task: a few minutes on two cores.

    Why these numbers (measured on the synthetic task's gold reward, see benchmarks/reproduce.py):
    - data: 40k records split 1,8,1. SFT saturates on 4k demonstrations (500 steps), while the RM is
      data-bound (label noise ~22%): one pass over 32k pairs beats many epochs over a few thousand, which
      overfit within ~3 epochs. 4k phase-3 prompts give ~1.5k easy pairs for DPO and ~2.5k hard prompts.
    - theta 1.0 (the paper's): this RM's scores have sd ~1, so 35-40% of the SFT sample pairs are easy,
      and their RM labels agree with gold ~88% of the time against ~67% for the hard ones.
    - DPO: lr 1e-4, ~3 epochs, beta 0.3. At beta 0.1 DPO on the easy pairs over-fits the RM's liking for
      short answers (in easy pairs the chosen answer is the shorter one 47% of the time, the longer one
      18%): over 5 seeds it lists too few items, gold 3.09 +- 0.30 (one seed at SFT level); beta 0.3 gave
      3.27-3.38 on the two worst seeds. lr 2e-4 or more epochs over-fit as well.
    - PPO: one pass over the hard prompts; actor lr 3e-4 (5e-5 barely moves the policy in ~80 steps).
    """
    assets = out / "assets"
    common = ["--dtype", "fp32", "--seed", "1234", "--data_output_path", str(out / "data_cache")]
    return Preset(
        name="tiny",
        # one rank needs no launcher: plain python skips its two extra torch+deepspeed processes (start-up)
        launcher=["deepspeed", "--num_gpus", str(ranks)] if ranks > 1 else [sys.executable],
        sft_model=str(assets / "tiny-llama"),
        rm_base_model=str(out / "step1_sft"),
        data_path=[str(assets / "data")],
        data_split="1,8,1",
        threshold=threshold,
        build_assets=True,
        num_train=40000,
        sft=[*common, "--max_seq_len", "64", "--per_device_train_batch_size", "32",
             "--per_device_eval_batch_size", "64", "--learning_rate", "5e-3", "--num_train_epochs", "4",
             "--num_warmup_steps", "20", "--log_interval", "50"],
        rm=[*common, "--max_seq_len", "64", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size",
            "64", "--learning_rate", "2e-3", "--weight_decay", "0.1", "--num_train_epochs", "1",
            "--num_warmup_steps", "20", "--log_interval", "100"],
        select=[*common, "--max_prompt_seq_len", "32", "--max_answer_seq_len", "32", "--temperature", "1.0",
                "--per_device_generation_batch_size", "64", "--per_device_eval_batch_size", "128"],
        dpo=[*common, "--max_seq_len", "64", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size",
             "64", "--learning_rate", "1e-4", "--beta", "0.3", "--num_train_epochs", "3", "--num_warmup_steps", "10",
             "--log_interval", "20", "--precompute_ref_log_probs"],
        ppo=[*common, "--max_prompt_seq_len", "32", "--max_answer_seq_len", "32",
             "--per_device_generation_batch_size", "32", "--per_device_training_batch_size", "32",
             "--actor_learning_rate", "3e-4", "--critic_learning_rate", "5e-4", "--num_warmup_steps", "5",
             "--init_kl_coef", "0.1", "--do_sample", "--num_train_epochs", "1", "--log_interval", "10"],
        eval=["--num_prompts", "200", "--max_new_tokens", "32", "--seed", "1234"],
    )


def override_flags(flags: list[str], overrides: dict[str, str]) -> list[str]:
    """Replace the values of `--flag value` pairs (appending flags that are absent)."""
    out, seen, i = [], set(), 0
    while i < len(flags):
        flag = flags[i]
        has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if flag in overrides:
            out += [flag, overrides[flag]]
            seen.add(flag)
        else:
            out += flags[i:i + 2] if has_value else [flag]
        i += 2 if has_value else 1
    return out + [x for flag, value in overrides.items() if flag not in seen for x in (flag, value)]


def smoke_preset(out: Path, ranks: int = 1, threshold: float | None = None) -> Preset:
    """The tiny chain shrunk to a smoke test (CI): every stage runs, nothing is expected to learn much."""
    preset = tiny_preset(out, ranks=ranks) if threshold is None else tiny_preset(out, ranks=ranks, threshold=threshold)
    preset.name, preset.num_train = "smoke", 400
    steps = {"--max_steps": "6"}
    preset.sft = override_flags(preset.sft, {**steps, "--num_train_epochs": "1"})
    preset.rm = override_flags(preset.rm, {**steps, "--num_train_epochs": "1"})
    preset.dpo = override_flags(preset.dpo, {**steps, "--num_train_epochs": "1"})
    preset.ppo = override_flags(preset.ppo, {"--max_steps": "3", "--num_train_epochs": "1"})
    preset.eval = override_flags(preset.eval, {"--num_prompts": "16"})
    return preset


def llama2_7b_preset(out: Path, ranks: int = 8, threshold: float = 1.0, hostfile: str | None = None) -> Preset:
    """The paper's settings (Appendix A.1, Table 9) on HH-RLHF helpful-base + harmless-base, one 8-GPU node."""
    launcher = ["deepspeed"] + ([f"--hostfile={hostfile}"] if hostfile else ["--num_gpus", str(ranks)])
    hh = ["Anthropic/hh-rlhf/helpful-base", "Anthropic/hh-rlhf/harmless-base"]
    common = ["--dtype", "bf16", "--seed", "1234"]
    return Preset(
        name="llama2-7b",
        launcher=launcher,
        sft_model="meta-llama/Llama-2-7b-hf",
        rm_base_model="meta-llama/Llama-2-7b-hf",
        data_path=hh,
        # The authors trained every stage on the whole HH train split; 2,4,4 keeps stages disjoint.
        data_split="2,4,4",
        threshold=threshold,
        sft=[*common, "--max_seq_len", "1024", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
             "16", "--learning_rate", "5e-5", "--weight_decay", "0.1", "--num_train_epochs", "1",
             "--num_warmup_steps", "500", "--lr_scheduler_type", "cosine", "--zero_stage", "3",
             "--gradient_checkpointing", "--save_steps", "500"],
        rm=[*common, "--max_seq_len", "1024", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size",
            "8", "--learning_rate", "5e-6", "--weight_decay", "0.1", "--num_train_epochs", "1",
            "--num_warmup_steps", "500", "--lr_scheduler_type", "cosine", "--zero_stage", "3",
            "--gradient_checkpointing", "--save_steps", "500"],
        select=[*common, "--max_prompt_seq_len", "512", "--max_answer_seq_len", "512", "--temperature", "0.95",
                "--per_device_generation_batch_size", "16", "--zero_stage", "3", "--enable_hybrid_engine"],
        dpo=[*common, "--max_seq_len", "1024", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size",
             "2", "--gradient_accumulation_steps", "8", "--learning_rate", "5e-6", "--weight_decay", "0.1",
             "--beta", "0.1", "--num_train_epochs", "1", "--num_warmup_steps", "100", "--zero_stage", "3",
             "--gradient_checkpointing", "--precompute_ref_log_probs", "--save_steps", "200"],
        ppo=[*common, "--max_prompt_seq_len", "512", "--max_answer_seq_len", "512",
             "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
             "--gradient_accumulation_steps", "4", "--actor_learning_rate", "3e-6", "--critic_learning_rate",
             "5e-6", "--actor_weight_decay", "0.1", "--critic_weight_decay", "0.1", "--num_warmup_steps", "100",
             "--init_kl_coef", "0.4", "--do_sample", "--temperature", "0.95", "--actor_zero_stage", "3",
             "--critic_zero_stage", "3", "--actor_gradient_checkpointing", "--critic_gradient_checkpointing",
             "--offload_reference_model", "--enable_hybrid_engine", "--num_train_epochs", "1", "--save_steps", "200"],
        eval=["--num_prompts", "500", "--max_new_tokens", "512", "--seed", "1234"],
    )


def build_plan(preset: Preset, out: Path, *, reference: str = "dpo", order: str = "mpo",
               stages: tuple[str, ...] = STAGE_ORDER) -> list[Stage]:
    """The stage list. `reference`: dpo (MPO) or sft (the paper's "sft-kl" ablation).
    `order`: mpo (DPO on easy, then PPO on hard) or reverse (PPO on hard first, then DPO on easy)."""
    if reference not in ("dpo", "sft"):
        raise UserError(f"--reference {reference}: choose dpo (MPO) or sft (ablation)")
    if order not in ("mpo", "reverse"):
        raise UserError(f"--order {order}: choose mpo or reverse")
    py = [sys.executable]
    launch = preset.launcher
    root = find_repo_root()
    step1, step2, select_main, dpo_main, step3 = (str(root / ENTRY_POINTS[k]) for k in ENTRY_POINTS)
    sft_dir, rm_dir, sel_dir = out / "step1_sft", out / "step2_rm", out / "step2.5_select"
    dpo_dir, ppo_dir, eval_dir = out / "step3b_dpo", out / "step3_ppo", out / "eval"
    npb = ["--num_padding_at_beginning", str(preset.num_padding_at_beginning)]
    data = ["--data_path", *preset.data_path, "--data_split", preset.data_split]
    plan: list[Stage] = []
    if preset.build_assets:
        plan.append(Stage("assets", [*py, "-m", "mpo_ext.cli", "assets", "--root", str(out / "assets"),
                                     "--num_train", str(preset.num_train)],
                          out / "assets" / "tiny-llama" / "config.json", out / "assets"))
    plan.append(Stage("sft", [*launch, step1, *data, "--model_name_or_path", preset.sft_model,
                              *preset.sft, "--output_dir", str(sft_dir)], sft_dir / "config.json", sft_dir))
    plan.append(Stage("rm", [*launch, step2, *data, "--model_name_or_path", preset.rm_base_model, *npb,
                             *preset.rm, "--output_dir", str(rm_dir)], rm_dir / "pytorch_model.bin", rm_dir))
    plan.append(Stage("select", [*launch, select_main, *data, "--sft_model_name_or_path", str(sft_dir),
                                 "--reward_model_name_or_path", str(rm_dir), *npb, "--threshold", str(preset.threshold),
                                 *preset.select, "--output_dir", str(sel_dir)], sel_dir / "manifest.json", sel_dir))
    easy, hard = str(sel_dir / "easy.jsonl"), str(sel_dir / "hard.jsonl")

    def dpo_stage(init: Path, dest: Path) -> Stage:
        return Stage("dpo", [*launch, dpo_main, "--data_path", easy, "--model_name_or_path", str(init),
                             *preset.dpo, "--output_dir", str(dest)], dest / "config.json", dest)

    def ppo_stage(init: Path, ref: Path, dest: Path) -> Stage:
        return Stage("ppo", [*launch, step3, "--data_path", hard, "--actor_model_name_or_path", str(init),
                             "--reference_model_name_or_path", str(ref), "--critic_model_name_or_path", str(rm_dir),
                             *npb, *preset.ppo, "--output_dir", str(dest)], dest / "run_info.json", dest)

    if order == "mpo":
        plan.append(dpo_stage(sft_dir, dpo_dir))
        plan.append(ppo_stage(dpo_dir, dpo_dir if reference == "dpo" else sft_dir, ppo_dir))
        final = ppo_dir / "actor"
        models = [f"sft={sft_dir}", f"dpo={dpo_dir}", f"mpo={final}"]
    else:
        plan.append(ppo_stage(sft_dir, sft_dir, ppo_dir))
        plan.append(dpo_stage(ppo_dir / "actor", dpo_dir))
        final = dpo_dir
        models = [f"sft={sft_dir}", f"ppo_hard={ppo_dir / 'actor'}", f"mpo_reverse={final}"]
    model_flags = [flag for m in models for flag in ("--model", m)]
    plan.append(Stage("eval", [*py, "-m", "mpo_ext.cli", "eval", *model_flags, "--reward_model", str(rm_dir),
                               "--data_path", *preset.data_path[:1], *npb, *preset.eval, "--output_dir", str(eval_dir)],
                      eval_dir / "table.json", eval_dir))
    return [s for s in plan if s.name in stages]


def run_plan(plan: list[Stage], out: Path, dry_run: bool = False, force: bool = False) -> dict:
    """Run each incomplete stage in order (logs to OUT/logs/<stage>.log) and write OUT/summary.json."""
    summary = {"stages": []}
    logs = out / "logs"
    root = find_repo_root()
    for stage in plan:
        entry = {"stage": stage.name, "output": str(stage.output), "command": stage.shell()}
        if dry_run:
            print(f"# {stage.name} -> {stage.output}\n{stage.shell()}\n", flush=True)
            continue
        if stage.is_complete() and not force:
            print(f"[pipeline] {stage.name}: complete ({stage.done_marker}), skipping", flush=True)
            entry["status"] = "skipped (complete)"
            summary["stages"].append(entry)
            continue
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{stage.name}.log"
        print(f"[pipeline] ---=== Running {stage.name} ===--- (log: {log_path})", flush=True)
        start = time.time()
        env = {**_job_env(root), **stage.env}
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(_with_free_port(stage.command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, cwd=root, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if _worth_echoing(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        elapsed = time.time() - start
        entry.update(status="ok" if code == 0 else f"failed ({code})", seconds=round(elapsed, 1), log=str(log_path))
        summary["stages"].append(entry)
        if code != 0:
            atomic_write_json(out / "summary.json", summary)
            tail = "".join(open(log_path, encoding="utf-8").readlines()[-15:])
            raise UserError(f"stage {stage.name} failed with exit code {code}; see {log_path}. Last lines:\n{tail}")
        print(f"[pipeline] ---=== Finished {stage.name} in {elapsed:.0f}s ===---", flush=True)
    if not dry_run:
        atomic_write_json(out / "summary.json", summary)
    return summary


_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _with_free_port(command: list[str]) -> list[str]:
    """A single-node launcher run gets a free rendezvous port, so two runs on one machine never collide."""
    if command[:1] != ["deepspeed"] or any(c.startswith(("--master_port", "--hostfile")) for c in command):
        return command
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [command[0], "--master_port", str(port), *command[1:]]


def _job_env(root: Path) -> dict[str, str]:
    """Each stage is a job of its own: the repo importable, no rendezvous inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["PYTHONPATH"] = f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return env


def _worth_echoing(line: str) -> bool:
    """Echo the lines a person wants to see live; everything else stays in the stage log."""
    if "%|" in line:  # progress bars stay in the stage log
        return False
    keys = ("error:", "Error", "[eval]", "saving", "split at", "Resumed", "Average reward", "| model")
    return any(k in line for k in keys)


def print_final_report(out: Path) -> None:
    table = out / "eval" / "table.json"
    print("\nArtefacts:")
    for name in ("assets", "step1_sft", "step2_rm", "step2.5_select", "step3b_dpo", "step3_ppo", "eval", "logs"):
        if (out / name).exists():
            print(f"  {name:<15} {out / name}")
    if table.exists():
        rows = json.loads(table.read_text())
        rows = rows["rows"] if isinstance(rows, dict) else rows
        print("\nMean reward on held-out prompts:")
        has_gold = any(r.get("gold_mean") is not None for r in rows)
        header = f"  {'model':<14}{'reward model':>14}{'95% CI':>20}" + (f"{'gold':>10}" if has_gold else "")
        print(header)
        for r in rows:
            ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            line = f"  {r['name']:<14}{r['mean_reward']:>14.3f}{ci:>20}"
            if has_gold:
                line += f"{r.get('gold_mean', float('nan')):>10.3f}"
            print(line)
