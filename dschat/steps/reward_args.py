"""Step 2's settings (`RewardSettings`): every flag of `dschat.steps.reward`, DeepSpeed-Chat's names and defaults.

Imports no model code and no torch, so a step's --help and a bad flag answer before anything heavy loads
(the step folder's main.py parses with this module first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dschat.utils import args as flags


@dataclass(frozen=True, kw_only=True)
class RewardSettings(flags.TrainStageSettings, flags.RewardIndexSettings, flags.RewardHealthSettings):
    """Every setting of step 2 (its flags, DeepSpeed-Chat's names and defaults)."""

    description = "Step 2: reward model fine-tuning (DeepSpeed-Chat compatible flags)."
    flag_group = "reward model"
    run_label: ClassVar[str] = "step2_rm"  # names its tracker runs (the pipeline's directory name)

    reward_loss: str = flags.flag("end", "'end': Bradley-Terry on the end scores; 'divergence': upstream's per-token "
                                         "loss over the differing suffix.", choices=("end", "divergence"))
    learning_rate: float = flags.same_flag(flags.TrainBatchSettings, "learning_rate", default=5e-5)
    tensorboard_path: str = flags.same_flag(flags.LoggingSettings, "tensorboard_path", default="step2_tensorboard")


build_parser = RewardSettings.build_parser
parse_args = RewardSettings.parse_args
