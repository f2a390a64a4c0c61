#!/bin/bash
# MPO on Llama-2-7B with the paper's settings (Gou & Nguyen 2024, Appendix A.1 / Table 9) on
# HH-RLHF helpful-base + harmless-base, one node with 8 GPUs:
#   SFT (lr 5e-5, batch 16, warmup 500) -> RM (lr 5e-6, batch 8, wd 0.1, warmup 500)
#   -> select (theta = 1) -> DPO on easy (lr 5e-6, batch 2 x grad-acc 8, wd 0.1, beta 0.1, warmup 100)
#   -> PPO on hard with the DPO model as policy start and KL reference (batch 2 x grad-acc 4,
#      actor lr 3e-6, critic lr 5e-6, wd 0.1, warmup 100, init KL coef 0.4) -> evaluation.
# Usage: bash training/run_mpo_llama2_7b.sh [OUTPUT_DIR] [extra `mpo pipeline` options]
#   DRY_RUN=1 bash training/run_mpo_llama2_7b.sh      # print the full plan without running it
#   HOSTFILE=/job/hostfile bash training/run_mpo_llama2_7b.sh   # several nodes via DeepSpeed's launcher
# A re-run skips every stage whose output is complete and continues with the next.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT=${1:-./output_mpo_llama2_7b}
shift || true
export DSCHAT_MPO_ROOT="$HERE/.."
if command -v mpo >/dev/null 2>&1; then MPO=(mpo); else MPO=(python3 -m mpo_ext.cli); export PYTHONPATH="$HERE/..:${PYTHONPATH:-}"; fi
EXTRA=()
if [ -n "${HOSTFILE:-}" ]; then EXTRA=(--deployment_type multi_node --hostfile "$HOSTFILE"); fi
"${MPO[@]}" pipeline --preset llama2-7b --output_dir "$OUTPUT" --threshold "${THETA:-1.0}" "${EXTRA[@]}" "$@"
