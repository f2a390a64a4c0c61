#!/bin/bash
# Step 2.5 (reward-gap split) on CPU with the embedded synthetic task, the tiny SFT model and the tiny reward
# model. Usage: bash run_tiny_cpu.sh [SFT_MODEL] [REWARD_MODEL] [OUTPUT_DIR] [THETA] [ASSETS_DIR]
# Run from step2.5_select/; NUM_RANKS=2 for two CPU ranks. Logs go to $OUTPUT/select.log.
set -o pipefail  # the exit status is the run's, not tee's
SFT_MODEL=${1:-../training/step1_supervised_finetuning/output_step1_tiny}
REWARD_MODEL=${2:-../training/step2_reward_model_finetuning/output_step2_tiny}
OUTPUT=${3:-./output_select_tiny}
THETA=${4:-1.0}
ASSETS=${5:-../runs/assets}
mkdir -p "$OUTPUT"

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed --num_gpus ${NUM_RANKS:-1} main.py \
   --data_path "$ASSETS/data" \
   --data_split 2,4,4 \
   --sft_model_name_or_path "$SFT_MODEL" \
   --reward_model_name_or_path "$REWARD_MODEL" \
   --num_padding_at_beginning 0 \
   --threshold $THETA \
   --max_prompt_seq_len 32 \
   --max_answer_seq_len 32 \
   --temperature 1.0 \
   --per_device_generation_batch_size 64 \
   --per_device_eval_batch_size 64 \
   --seed 1234 \
   --dtype fp32 \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   2>&1 | tee "$OUTPUT/select.log"
