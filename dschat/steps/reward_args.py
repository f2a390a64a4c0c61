"""Step 2's settings (`RewardSettings`): every flag of `dschat.steps.reward`, DeepSpeed-Chat's names and defaults.

Imports no model code and no torch, so a step's --help and a bad flag answer before anything heavy loads
(the step folder's main.py parses with this module first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dschat.utils import args as flags
from dschat.utils.tokenizer import UPSTREAM_REWARD_ENDING


@dataclass(frozen=True, kw_only=True)
class RewardSettings(flags.TrainStageSettings, flags.RewardIndexSettings, flags.RewardHealthSettings,
                     flags.DSChatCompatSettings):
    """Every setting of step 2 (its flags, DeepSpeed-Chat's names and defaults)."""

    description = "Step 2: reward model fine-tuning (DeepSpeed-Chat compatible flags)."
    flag_group = "reward model"
    upstream_defaults = {
        "reward_loss": flags.UpstreamDefault(
            "divergence", "Bradley-Terry on the score the reward is read from; upstream's loss pushes apart every "
                          "token after the two answers diverge, padding of the shorter one included."),
        "end_of_conversation_token": flags.UpstreamDefault(
            UPSTREAM_REWARD_ENDING, "The reward model learns the ending the actor produces (its eos); upstream's "
                                    "reward model was trained on a literal its step 3 never appends.",
            ours="the tokenizer's eos token"),
    }
    run_label: ClassVar[str] = "step2_rm"  # names its tracker runs (the pipeline's directory name)

    reward_loss: str = flags.flag("end", "'end': Bradley-Terry on the end scores; 'divergence': upstream's per-token "
                                         "loss over the differing suffix.", choices=("end", "divergence"))
    data_part: str | None = flags.flag(
        None, "K/N: train on part K of N disjoint parts of the phase's training pairs (their positions permuted by "
              "--seed, then cut in N; the eval pairs stay whole). Two runs with the same data flags and seed, 1/2 "
              "and 2/2, train on disjoint halves that together are every pair: a training reward model and a "
              "held-out one (mpo pipeline's heldout_rm).")
    learning_rate: float = flags.same_flag(flags.TrainBatchSettings, "learning_rate", default=5e-5)
    tensorboard_path: str = flags.same_flag(flags.LoggingSettings, "tensorboard_path", default="step2_tensorboard")

    @property
    def part(self) -> tuple[int, int] | None:
        """(K, N) of --data_part, or None (every pair)."""
        from dschat.utils.data.splits import (
            parse_data_part,  # here: the data modules load torch; --help must not
        )

        return parse_data_part(self.data_part) if self.data_part else None

    def _check(self) -> None:
        self.part  # noqa: B018 - a malformed K/N: one line now, not after loading the data


build_parser = RewardSettings.build_parser
parse_args = RewardSettings.parse_args
