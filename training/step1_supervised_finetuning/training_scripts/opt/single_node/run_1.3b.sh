#!/bin/bash
# Step 1 (SFT) for OPT-1.3B on one multi-GPU node. Usage: bash run_1.3b.sh [OUTPUT_DIR] [ZERO_STAGE]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-2}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-1.3b \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0. \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --enable_tensorboard --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
