#!/bin/bash
# Step 3b (DPO on the easy pairs) for an OPT-350m SFT model on one GPU, DeepSpeed-Chat's DPO settings.
# Usage: bash run_350m.sh [SFT_MODEL] [EASY_JSONL] [OUTPUT_DIR] [ZERO_STAGE]
# Run from step3b_dpo/. Logs go to $OUTPUT/training.log.
SFT_MODEL=${1:-facebook/opt-350m}
EASY=${2:-../step2.5_select/output_select/easy.jsonl}
OUTPUT=${3:-./output_step3b_dpo_opt_350m}
ZERO_STAGE=${4:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 4 go to main.py unchanged (e.g. --resume).
shift $(( $# < 4 ? $# : 4 ))
deepspeed --num_gpus 1 main.py \
   --data_path "$EASY" \
   --model_name_or_path "$SFT_MODEL" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --gradient_accumulation_steps 4 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --beta 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage $ZERO_STAGE \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
