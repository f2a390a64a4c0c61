#!/bin/bash
# Step 2 (reward model) for Llama-2-7B on one 8-GPU node. Usage: bash run_llama2_7b.sh [OUTPUT_DIR] [ZERO_STAGE]
# Run from training/step2_reward_model_finetuning/. Logs go to $OUTPUT/training.log.
OUTPUT=${1:-./output_step2_llama_7b_epoch1_lr9.65e-6}
ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_padding_at_beginning 0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype bf16 \
   --gradient_checkpointing \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --offload \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
