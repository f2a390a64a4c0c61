#!/bin/bash
# Step 3 (PPO) for an OPT-66B actor across nodes (hosts from a hostfile, default /job/hostfile; set
# HOSTFILE=PATH). Actor ZeRO-3 with LoRA and tensor-parallel Hybrid Engine generation (groups of 8 GPUs;
# falls back to Hugging Face generate, with a warning, where the Hybrid Engine cannot run).
# Usage: bash run_66b.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=${3:-3}
CRITIC_ZERO_STAGE=${4:-3}
OUTPUT=${5:-./output}
HOSTFILE=${HOSTFILE:-/job/hostfile}
if [ -z "$ACTOR_MODEL_PATH" ] || [ -z "$CRITIC_MODEL_PATH" ]; then
   echo "usage: bash run_66b.sh ACTOR_MODEL_PATH CRITIC_MODEL_PATH [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]" >&2
   exit 2
fi
mkdir -p "$OUTPUT"

Num_Padding_at_Beginning=1 # OPT

Actor_Lr=5e-4
Critic_Lr=5e-6

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed --hostfile="$HOSTFILE" --master_port 12346 main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
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
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --deepspeed --seed 1234 \
   --enable_hybrid_engine \
   --inference_tp_size 8 \
   --tp_gather_partition_size 4 \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --actor_lora_dim 128 \
   --actor_lora_module_name decoder.layers. \
   --actor_dropout 0.0 \
   --save_steps 100 \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
