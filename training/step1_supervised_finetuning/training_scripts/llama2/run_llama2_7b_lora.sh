#!/bin/bash
# Step 1 (SFT) for Llama-2-7B on one 8-GPU node. Usage: bash run_llama2_7b.sh [OUTPUT_DIR] [ZERO_STAGE]
# Run from training/step1_supervised_finetuning/. Logs go to $OUTPUT/training.log.
OUTPUT=${1:-./output_step1_llama2_7b_lora}
ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0. \
   --num_train_epochs 4 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype bf16 \
   --gradient_checkpointing \
   --lora_dim 128 \
   --lora_module_name "layers." \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
