#!/bin/bash
# Step 3 (PPO) on CPU with the embedded synthetic task: the tiny step-1 actor and step-2 critic from the
# sibling tiny scripts (build the assets first with `mpo assets`). Rollouts use Hugging Face generate
# (the Hybrid Engine needs a GPU). Run from training/step3_rlhf_finetuning/.
# Usage: bash run_tiny_cpu.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [ASSETS_DIR]
# NUM_RANKS=2 for two CPU ranks.
set -o pipefail  # the exit status is the run's, not tee's
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_tiny}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_tiny}
ACTOR_ZERO_STAGE=${3:-0}
CRITIC_ZERO_STAGE=${4:-0}
OUTPUT=${5:-./output_step3_tiny}
ASSETS=${6:-../../runs/assets}
mkdir -p "$OUTPUT"

# Arguments after the first 6 go to main.py unchanged (e.g. --resume).
shift $(( $# < 6 ? $# : 6 ))
deepspeed --num_gpus ${NUM_RANKS:-1} main.py \
   --data_path "$ASSETS/data" \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 0 \
   --per_device_generation_batch_size 16 \
   --per_device_training_batch_size 16 \
   --max_prompt_seq_len 48 \
   --max_answer_seq_len 24 \
   --actor_learning_rate 1e-4 \
   --critic_learning_rate 5e-4 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 5 \
   --do_sample \
   --enable_ema \
   --seed 1234 \
   --dtype fp32 \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   2>&1 | tee "$OUTPUT/training.log"
