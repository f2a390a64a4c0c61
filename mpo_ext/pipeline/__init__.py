"""The MPO chain from one config file: assets -> SFT -> RM -> select -> DPO (easy) -> PPO (hard) -> eval.

A run config (YAML; the presets in `mpo_ext/configs/` are ones) is loaded into typed dataclasses and checked
before anything runs (`config.py`): an unknown key, a bad value, a missing local path or a flag a stage
does not take is one line naming it. The config becomes a plan of stages (`plan.py`), each described once
in the stage registry (`stages.py`: order, directory, module, product, resumability, section checks,
wiring). Each stage's identity is a hash of the settings that change its result and of the identities of
the stages it reads; it writes into `OUT/<stage dir>-<identity[:8]>`, so another theta, `reference: sft` or
`order: reverse` writes beside the main run and reuses every upstream stage whose identity is unchanged.
A stage is complete only when its completion record (`stage.json`, written last, after the step exited
cleanly) carries that identity; a stage that died half-way is re-run with `--resume`.

The driver (`runner.py`) launches each step as its own process in a locked run root; the console shows
a heartbeat read from each stage's metrics.jsonl (`progress.py`); `report.py` prints what was made. On
several nodes started one launch per node (`launcher.mode: per_node`), node 0 runs the driver and the other
nodes follow the stages it announces (`nodes.py`).
The package imports no model or training-loop code; a step module is imported only to check its flags.
"""

from mpo_ext.pipeline.config import (
    AssetsConfig,
    DataConfig,
    LauncherConfig,
    ModelsConfig,
    MpoConfig,
    PipelineConfig,
    dump_config,
    load_config,
    preset_names,
)
from mpo_ext.pipeline.plan import COMPLETION_RECORD, Stage, build_plan
from mpo_ext.pipeline.report import print_final_report, save_config, stage_health
from mpo_ext.pipeline.runner import WARM_PRELOAD, claim_output_dir, run_pipeline, run_plan, start_stage
from mpo_ext.pipeline.stages import STAGE_BY_NAME, STAGE_NAMES, STAGES, Ref, StageSpec

__all__ = [
    "COMPLETION_RECORD", "STAGES", "STAGE_BY_NAME", "STAGE_NAMES", "WARM_PRELOAD", "AssetsConfig", "DataConfig",
    "LauncherConfig", "ModelsConfig", "MpoConfig", "PipelineConfig", "Ref", "Stage", "StageSpec", "build_plan",
    "claim_output_dir", "dump_config", "load_config", "preset_names", "print_final_report", "run_pipeline",
    "run_plan", "save_config", "stage_health", "start_stage",
]
