"""Step 2.5 of two-stage MPO: `deepspeed main.py ...`, `torchrun main.py ...` or `python main.py ...`.

Samples two answers per prompt from the SFT model, scores them with the reward model and writes the
easy (gap > theta, for DPO) and hard (gap <= theta, for PPO) splits; see the package mpo_ext/selection/.
"""

import sys
from pathlib import Path

try:
    import mpo_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dschat.utils.errors import run_main
from mpo_ext.selection import main

if __name__ == "__main__":
    run_main(main)
