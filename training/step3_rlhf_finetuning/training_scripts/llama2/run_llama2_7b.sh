#!/bin/bash
# Step 3 of MPO (PPO on the hard prompts) for Llama-2-7B on one 8-GPU node, rollouts with Hugging Face generate.
# The policy starts from the step-3b DPO model, which is also the KL reference (the paper's MPO); the prompts are
# step 2.5's hard split. Settings: mpo_ext/configs/llama2-7b-hh.yaml (the paper's Table 9). Run from
# training/step3_rlhf_finetuning/. Plain PPO (upstream's step 3): pass the SFT model as ACTOR and REFERENCE.
# Usage: bash run_llama2_7b.sh [ACTOR_MODEL] [CRITIC_MODEL] [HARD_JSONL] [REFERENCE_MODEL] [OUTPUT] [extra main.py flags]
ACTOR_MODEL_PATH=${1:-../../step3b_dpo/output_step3b_dpo_llama2_7b}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_llama_7b_epoch1_lr9.65e-6}
HARD=${3:-../../step2.5_select/output_select_llama2_7b/hard.jsonl}
REFERENCE_MODEL_PATH=${4:-$ACTOR_MODEL_PATH}
OUTPUT=${5:-./output_step3_mpo_llama2_7b}
mkdir -p "$OUTPUT"

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed main.py \
   --data_path "$HARD" \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --reference_model_name_or_path "$REFERENCE_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 0 \
   --per_device_generation_batch_size 2 \
   --per_device_training_batch_size 2 \
   --gradient_accumulation_steps 4 \
   --max_answer_seq_len 512 \
   --max_prompt_seq_len 512 \
   --actor_learning_rate 3e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_warmup_steps 100 \
   --init_kl_coef 0.4 \
   --do_sample \
   --temperature 0.95 \
   --num_train_epochs 1 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --offload_reference_model \
   --dtype bf16 \
   --seed 1234 \
   --actor_zero_stage 3 \
   --critic_zero_stage 3 \
   --save_steps 200 \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/training.log"
