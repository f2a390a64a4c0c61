#!/bin/bash
# Step 2 (reward model) for OPT-350M, single_node. Usage: bash run_350m.sh [OUTPUT_DIR] [ZERO_STAGE]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
