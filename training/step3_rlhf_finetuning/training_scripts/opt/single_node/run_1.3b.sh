#!/bin/bash
# Step 3 (PPO) for OPT-1.3B actor + OPT-350M critic on one 8-GPU node. The default paths are the public
# DeepSpeed-Chat step-1/step-2 checkpoints (they load as is). Run from training/step3_rlhf_finetuning/.
# Usage: bash run_1.3b.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
ACTOR_MODEL_PATH=${1:-AdamG012/chat-opt-1.3b-sft-deepspeed}
CRITIC_MODEL_PATH=${2:-AdamG012/chat-opt-350m-reward-deepspeed}
ACTOR_ZERO_STAGE=${3:-2}
CRITIC_ZERO_STAGE=${4:-2}
OUTPUT=${5:-./output}
mkdir -p "$OUTPUT"

Num_Padding_at_Beginning=1 # OPT models start every sequence with one pad-like BOS token

Actor_Lr=9.65e-6
Critic_Lr=5e-6

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed --master_port 12346 main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning $Num_Padding_at_Beginning \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 4 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate ${Actor_Lr} \
   --critic_learning_rate ${Critic_Lr} \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --deepspeed --seed 1234 \
   --enable_hybrid_engine \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --enable_ema \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
