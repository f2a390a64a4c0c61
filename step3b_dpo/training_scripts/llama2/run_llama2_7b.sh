#!/bin/bash
# Step 3b of two-stage MPO for Llama-2-7B on one 8-GPU node: DPO on the easy pairs of step 2.5, reference
# = the SFT model (its log-probs are computed once, then the reference is freed).
# Usage: bash run_llama2_7b.sh [SFT_MODEL] [EASY_JSONL] [OUTPUT_DIR] [ZERO_STAGE]
# Run from step3b_dpo/. Logs go to $OUTPUT/training.log; add --resume to continue an interrupted run.
SFT_MODEL=${1:-../training/step1_supervised_finetuning/output_step1_llama2_7b}
EASY=${2:-../step2.5_select/output_select_llama2_7b/easy.jsonl}
OUTPUT=${3:-./output_step3b_dpo_llama2_7b}
ZERO_STAGE=${4:-3}
mkdir -p "$OUTPUT"

# Arguments after the first 4 go to main.py unchanged (e.g. --resume).
shift $(( $# < 4 ? $# : 4 ))
deepspeed main.py \
   --data_path "$EASY" \
   --model_name_or_path "$SFT_MODEL" \
   --per_device_train_batch_size 2 \
   --per_device_eval_batch_size 2 \
   --gradient_accumulation_steps 8 \
   --max_seq_len 1024 \
   --learning_rate 5e-6 \
   --weight_decay 0.1 \
   --beta 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 100 \
   --seed 1234 \
   --gradient_checkpointing \
   --precompute_ref_log_probs \
   --save_steps 200 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
