#!/bin/bash
# Step 1 (SFT) for OPT-1.3B on a single GPU with LoRA. Usage: bash run_1.3b.sh [OUTPUT_DIR] [ZERO_STAGE]
OUTPUT=${1:-./output}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 2 go to main.py unchanged (e.g. --resume).
shift $(( $# < 2 ? $# : 2 ))
deepspeed --num_gpus 1 main.py --model_name_or_path facebook/opt-1.3b \
   --gradient_accumulation_steps 8 --lora_dim 128 --zero_stage $ZERO_STAGE \
   --enable_tensorboard --tensorboard_path "$OUTPUT" \
   --deepspeed --output_dir "$OUTPUT" "$@" &> "$OUTPUT/training.log"
