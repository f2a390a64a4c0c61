#!/bin/bash
# Step 3 (PPO) for Llama-2-7B with the DeepSpeed Hybrid Engine for rollouts (upstream's setting).
# The Hybrid Engine is probed on the first batch; if DeepSpeed has no kernels for the model, the
# installed transformers is incompatible, or its greedy output disagrees with the native model, the
# run warns once and continues with Hugging Face generate. Run from training/step3_rlhf_finetuning/.
# Usage: bash run_llama2_7b_hybrid_engine.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_llama2_7b}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_llama_7b_epoch1_lr9.65e-6}
ACTOR_ZERO_STAGE=${3:-3}
CRITIC_ZERO_STAGE=${4:-3}
OUTPUT=${5:-./output_step3_llama_he}
mkdir -p "$OUTPUT"

deepspeed --master_port 12346 main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 1 \
   --per_device_training_batch_size 1 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --offload_reference_model \
   --actor_dropout 0.0 \
   --num_warmup_steps 100 \
   --dtype bf16 \
   --deepspeed --seed 1234 \
   --enable_hybrid_engine \
   --actor_zero_stage $ACTOR_ZERO_STAGE \
   --critic_zero_stage $CRITIC_ZERO_STAGE \
   --save_steps 200 \
   --output_dir "$OUTPUT" \
   &> "$OUTPUT/training.log"
