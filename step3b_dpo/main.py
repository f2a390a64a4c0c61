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

from dschat.steps import run_step

if __name__ == "__main__":  # the flags are parsed before torch is imported: --help answers at once
    run_step("mpo_ext.dpo_args", "mpo_ext.dpo")
