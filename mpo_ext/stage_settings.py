"""Stage name -> settings type: the typed form of a pipeline config's stage sections.

Each stage of the chain has one frozen settings type whose fields are its flags (`dschat.utils.settings`);
`stage_settings("sft", {"zero_stage": 3, "offload": True})` builds and checks a stage's settings from the
flag values a pipeline config holds, with a `UserError` naming `config key <stage>.<key>` (and suggesting
the closest setting for a misspelled key). The pipeline merges its wired values (inputs, outputs) into the
mapping before calling it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dschat.steps.ppo_args import PPOSettings
from dschat.steps.reward_args import RewardSettings
from dschat.steps.sft_args import SFTSettings
from dschat.utils.errors import UserError
from dschat.utils.settings import Settings
from mpo_ext.dpo_args import DPOSettings
from mpo_ext.eval_settings import EvalSettings
from mpo_ext.selection.settings import SelectionSettings

STAGE_SETTINGS: dict[str, type[Settings]] = {
    "sft": SFTSettings,
    "rm": RewardSettings,
    "select": SelectionSettings,
    "dpo": DPOSettings,
    "ppo": PPOSettings,
    "eval": EvalSettings,
}


def stage_settings(stage: str, values: Mapping[str, Any], where: str | None = None) -> Settings:
    """The checked settings of pipeline stage `stage` from its flag values (flag names without dashes)."""
    if stage not in STAGE_SETTINGS:
        raise UserError(f"config section {stage}: not a stage with settings; stages: {', '.join(STAGE_SETTINGS)}")
    return STAGE_SETTINGS[stage].from_mapping(values, where=f"config key {stage}." if where is None else where)
