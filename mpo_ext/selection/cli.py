"""Command line of step 2.5: `main` (`python -m mpo_ext.selection`, `deepspeed --module mpo_ext.selection`,
step2.5_select/main.py).

The flags are the fields of `SelectionSettings` (`settings.py`), whose parser is generated from them and
whose checks refuse bad input with one line naming the flag. Everything else is the stage's (`stage.run`).
"""

from __future__ import annotations

from dschat.utils.dist import init_distributed
from mpo_ext.selection.settings import SelectionSettings
from mpo_ext.selection.stage import run

build_parser = SelectionSettings.build_parser
parse_args = SelectionSettings.parse_args


def main() -> None:
    """Step 2.5 entry point: parse, join the process group, run the stage."""
    settings = parse_args()
    init_distributed(settings.local_rank)
    run(settings)
