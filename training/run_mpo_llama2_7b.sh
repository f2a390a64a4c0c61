#!/bin/bash
# MPO on Llama-2-7B with the paper's settings (Gou & Nguyen 2024) on HH-RLHF helpful-base + harmless-base,
# one node with 8 GPUs. The settings live in one config file, mpo_ext/configs/llama2-7b-hh.yaml (each number's
# source and what still differs from the paper are stated there); print it with --print_config, copy and edit
# it, or override single keys:
#   bash training/run_mpo_llama2_7b.sh [OUTPUT_DIR] [extra `mpo pipeline` options, e.g. --set dpo.beta=0.2]
#   DRY_RUN=1 bash training/run_mpo_llama2_7b.sh            # print the full plan without running it
#   HOSTFILE=/job/hostfile bash training/run_mpo_llama2_7b.sh   # several nodes via DeepSpeed's launcher
#   PRESET=llama2-7b-tldr bash training/run_mpo_llama2_7b.sh    # the TL;DR task
# A re-run does only the stages whose settings or inputs changed; a crashed stage resumes from its last state.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT=${1:-./output_mpo_llama2_7b}
shift || true
if command -v mpo >/dev/null 2>&1; then MPO=(mpo); else MPO=(python3 -m mpo_ext.cli); export PYTHONPATH="$HERE/..:${PYTHONPATH:-}"; fi
EXTRA=()
if [ -n "${HOSTFILE:-}" ]; then EXTRA=(--hostfile "$HOSTFILE"); fi
if [ -n "${THETA:-}" ]; then EXTRA+=(--threshold "$THETA"); fi
"${MPO[@]}" pipeline --preset "${PRESET:-llama2-7b-hh}" --output_dir "$OUTPUT" "${EXTRA[@]}" "$@"
