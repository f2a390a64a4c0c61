"""Step 3b of two-stage MPO: DPO on the easy pairs. `deepspeed main.py ...`, `torchrun` or `python main.py`.

Flags are DeepSpeed-Chat's DPO step flags plus --reference_model_name_or_path and
--precompute_ref_log_probs; see mpo_ext/dpo.py.
"""

import sys
from pathlib import Path

try:
    import mpo_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dschat.utils.errors import run_main
from mpo_ext.dpo import main

if __name__ == "__main__":
    run_main(main)
