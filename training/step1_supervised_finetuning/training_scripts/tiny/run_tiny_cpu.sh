#!/bin/bash
# Step 1 (SFT) on CPU with the embedded synthetic task and tiny model (build them with `mpo assets`).
# Usage: bash run_tiny_cpu.sh [OUTPUT_DIR] [ZERO_STAGE] [ASSETS_DIR]; NUM_RANKS=2 for two CPU ranks.
set -o pipefail  # the exit status is the run's, not tee's
OUTPUT=${1:-./output_step1_tiny}
ZERO_STAGE=${2:-0}
ASSETS=${3:-../../runs/assets}
mkdir -p "$OUTPUT"

# Arguments after the first 3 go to main.py unchanged (e.g. --resume).
shift $(( $# < 3 ? $# : 3 ))
deepspeed --num_gpus ${NUM_RANKS:-1} main.py \
   --data_path "$ASSETS/data" \
   --data_split 2,4,4 \
   --model_name_or_path "$ASSETS/tiny-llama" \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 64 \
   --learning_rate 3e-3 \
   --num_train_epochs 3 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 10 \
   --seed 1234 \
   --dtype fp32 \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   2>&1 | tee "$OUTPUT/training.log"
