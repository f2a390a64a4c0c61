"""Step 3b's settings (`DPOSettings`): DeepSpeed-Chat's DPO step flags, the reference, held-out evaluations and
health guards; and the early check of the pair files (`check_pair_files`).

Imports no model code and no torch, so --help and a bad flag answer before anything heavy loads (the step
folder's main.py parses with this module first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dschat.utils import args as flags
from dschat.utils.data.raw_datasets import read_data_text
from dschat.utils.errors import UserError


@dataclass(frozen=True, kw_only=True)
class DPOFlagSettings(flags.Settings):
    flag_group = "dpo"

    beta: float = flags.flag(0.1, "DPO temperature (weight of the implicit KL).")
    label_smoothing: float = flags.flag(0.0, "Conservative DPO: assumed probability that a preference label is "
                                             "flipped.")
    reference_model_name_or_path: str | None = flags.flag(
        None, "Reference policy (default: --model_name_or_path, i.e. the SFT model).", own_default=True)
    offload_reference_model: bool = flags.flag(False, "ZeRO-offload the reference model's parameters to CPU.")
    precompute_ref_log_probs: bool = flags.flag(
        False, "Score train+eval pairs with the reference once before training, store the table in --output_dir "
               "and free the reference (no second model resident while training).")
    use_logits_to_keep: bool = flags.flag(
        False, "Compute the logits (the vocabulary-sized head and its log-softmax) only from the first answer "
               "position of each batch on, not over the shared prompt prefix whose log-probs DPO drops "
               "(transformers' logits_to_keep). The same log-probs; faster where prompts are long or the vocabulary is large. Off by "
               "default: the head's gradient is summed over fewer positions, so the trained weights can differ "
               "in the last bits.")

    def _check(self) -> None:
        if self.beta <= 0:
            raise UserError(f"--beta {self.beta}: must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing {self.label_smoothing}: must be in [0, 0.5)")
        flags.check_path_exists("--reference_model_name_or_path", self.reference_model_name_or_path,
                                "model directory")


@dataclass(frozen=True, kw_only=True)
class HeldOutRewardSettings(flags.Settings):
    flag_group = flags.HELD_OUT_GROUP

    reward_model_name_or_path: str | None = flags.flag(
        None, "Step-2 reward model scoring the held-out answers at each eval (eval/reward).")

    def _check(self) -> None:
        flags.check_path_exists("--reward_model_name_or_path", self.reward_model_name_or_path, "model directory")


@dataclass(frozen=True, kw_only=True)
class DPOSettings(flags.TrainStageSettings, DPOFlagSettings, flags.PrintLossSettings, flags.HealthSettings,
                  flags.HeldOutSettings, HeldOutRewardSettings):
    """Every setting of step 3b (DeepSpeed-Chat's DPO flags; --eval_steps is --eval_interval's alias, as in steps 1
    and 2)."""

    description = "Step 3b of two-stage MPO: DPO on the easy pairs from step2.5_select (DeepSpeed-Chat DPO flags)."
    run_label: ClassVar[str] = "step3b_dpo"  # names its tracker runs (the pipeline's directory name)

    learning_rate: float = flags.same_flag(flags.TrainBatchSettings, "learning_rate", default=1e-3)
    tensorboard_path: str = flags.same_flag(flags.LoggingSettings, "tensorboard_path", default="step3b_tensorboard")

    @property
    def reference_path(self) -> str:
        return self.reference_model_name_or_path or self.model_name_or_path

    def _check(self) -> None:
        if self.keep_best and self.best_metric == "reward" and not self.reward_model_name_or_path:
            raise UserError("--keep_best --best_metric reward needs --reward_model_name_or_path (or use "
                            "--best_metric gold with --gold_reward)")
        if self.heldout_reward_model_name_or_path and not self.reward_model_name_or_path:
            raise UserError("--heldout_reward_model_name_or_path is compared with the training reward model: give "
                            "--reward_model_name_or_path too")
        check_pair_files(self.data_path)


build_parser = DPOSettings.build_parser
parse_args = DPOSettings.parse_args


def check_pair_files(data_paths: list[str]) -> None:
    """Fail early and clearly on an empty local pair file (e.g. a threshold that left no easy pairs)."""
    for path in data_paths:
        p = Path(path)
        if p.is_file() and p.suffix in (".jsonl", ".json") and not _has_content(p):
            hint = ""
            if (p.parent / "manifest.json").is_file():
                hint = (f" (a step2.5_select output: see {p.parent / 'manifest.json'}; rerun the selection with a "
                        "lower --threshold or with --easy_fraction)")
            raise UserError(f"--data_path {path}: the file holds no preference pairs{hint}")


def _has_content(path: Path) -> bool:
    return any(line.strip() and line.strip() not in ("[]", "{}") for line in read_data_text(path).splitlines())
