"""DeepSpeed-Chat compatible entry point: `deepspeed main.py ...`, `torchrun main.py ...` or `python main.py ...`."""

import sys
from pathlib import Path

try:
    import dschat  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.steps import run_step

if __name__ == "__main__":  # the flags are parsed before torch is imported: --help answers at once
    run_step("dschat.steps.reward_args", "dschat.steps.reward")
