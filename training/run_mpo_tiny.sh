#!/bin/bash
# The embedded default: the whole MPO chain on CPU with the synthetic task and a tiny Llama
# (config: mpo_ext/configs/tiny.yaml). SFT -> reward model -> reward-gap selection -> DPO on easy pairs
# -> PPO on hard prompts (DPO reference) -> evaluation table. A re-run does only what changed. Usage:
#   bash training/run_mpo_tiny.sh [OUTPUT_DIR] [extra `mpo pipeline` options, e.g. --threshold 0.5]
# DRY_RUN=1 prints the commands only.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT=${1:-runs/mpo-tiny}
shift || true
if command -v mpo >/dev/null 2>&1; then MPO=(mpo); else MPO=(python3 -m mpo_ext.cli); export PYTHONPATH="$HERE/..:${PYTHONPATH:-}"; fi
"${MPO[@]}" pipeline --preset tiny --output_dir "$OUTPUT" "$@"
