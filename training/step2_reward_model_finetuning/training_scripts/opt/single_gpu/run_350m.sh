#!/bin/bash
# Step 2 (reward model) for OPT-350M on a single GPU. Usage: bash run_350m.sh [OUTPUT_DIR] [ZERO_STAGE]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed --num_gpus 1 main.py --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 --weight_decay 0.1 --dropout 0.0 --gradient_accumulation_steps 4 \
   --zero_stage $ZERO_STAGE --enable_tensorboard --tensorboard_path "$OUTPUT" \
   --deepspeed --output_dir "$OUTPUT" "$@" &> "$OUTPUT/training.log"
