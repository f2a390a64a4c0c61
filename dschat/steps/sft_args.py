"""Step 1's settings (`SFTSettings`): every flag of `dschat.steps.sft`, DeepSpeed-Chat's names and defaults.

Imports no model code and no torch, so a step's --help and a bad flag answer before anything heavy loads
(the step folder's main.py parses with this module first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dschat.utils import args as flags


@dataclass(frozen=True, kw_only=True)
class SFTSettings(flags.TrainStageSettings, flags.SFTOnlyDataSettings, flags.PrintLossSettings,
                  flags.DSChatCompatSettings):
    """Every setting of step 1 (its flags, DeepSpeed-Chat's names and defaults)."""

    description = "Step 1: supervised fine-tuning (DeepSpeed-Chat compatible flags)."
    run_label: ClassVar[str] = "step1_sft"  # names its tracker runs (the pipeline's directory name)

    learning_rate: float = flags.same_flag(flags.TrainBatchSettings, "learning_rate", default=1e-3)
    tensorboard_path: str = flags.same_flag(flags.LoggingSettings, "tensorboard_path", default="step1_tensorboard")
    eval_iters: int = flags.same_flag(flags.EvalIntervalSettings, "eval_iters", default=0)


build_parser = SFTSettings.build_parser
parse_args = SFTSettings.parse_args
