#!/bin/bash
# Step 3b (DPO on the easy pairs) on CPU with the embedded synthetic task: start from the tiny SFT model and
# the easy.jsonl of step 2.5. Usage: bash run_tiny_cpu.sh [SFT_MODEL] [EASY_JSONL] [OUTPUT_DIR] [ZERO_STAGE]
# Run from step3b_dpo/; NUM_RANKS=2 for two CPU ranks. Logs go to $OUTPUT/training.log.
set -o pipefail  # the exit status is the run's, not tee's
SFT_MODEL=${1:-../training/step1_supervised_finetuning/output_step1_tiny}
EASY=${2:-../step2.5_select/output_select_tiny/easy.jsonl}
OUTPUT=${3:-./output_step3b_dpo_tiny}
ZERO_STAGE=${4:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 4 go to main.py unchanged (e.g. --resume).
shift $(( $# < 4 ? $# : 4 ))
deepspeed --num_gpus ${NUM_RANKS:-1} main.py \
   --data_path "$EASY" \
   --model_name_or_path "$SFT_MODEL" \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 64 \
   --learning_rate 5e-4 \
   --beta 0.1 \
   --num_train_epochs 2 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 5 \
   --log_interval 5 \
   --seed 1234 \
   --dtype fp32 \
   --precompute_ref_log_probs \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   2>&1 | tee "$OUTPUT/training.log"
