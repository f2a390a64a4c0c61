#!/bin/bash
# Step 3 (PPO) for OPT-1.3B actor + OPT-350M critic on a single GPU (actor LoRA, Hybrid Engine where it
# works). Run from training/step3_rlhf_finetuning/.
# Usage: bash run_1.3b.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output}
ACTOR_ZERO_STAGE=${3:-0}
CRITIC_ZERO_STAGE=${4:-0}
OUTPUT=${5:-./output}
mkdir -p "$OUTPUT"

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed --num_gpus 1 main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage $ACTOR_ZERO_STAGE --critic_zero_stage $CRITIC_ZERO_STAGE \
   --num_padding_at_beginning 1 --gradient_accumulation_steps 2 \
   --deepspeed --actor_lora_dim 128 --enable_hybrid_engine --actor_gradient_checkpointing --actor_dropout 0.0 \
   --seed 1234 --output_dir "$OUTPUT" "$@" &> "$OUTPUT/training.log"
