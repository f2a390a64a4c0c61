#!/bin/bash
# Step 2.5 (reward-gap split) for Llama-2-7B SFT + RM on HH-RLHF, one 8-GPU node: the paper's setting
# (theta = 1, two samples per prompt, reward-model labels).
# Usage: bash run_llama2_7b.sh [SFT_MODEL] [REWARD_MODEL] [OUTPUT_DIR] [THETA] [ZERO_STAGE]
# Run from step2.5_select/. Logs go to $OUTPUT/select.log; re-running resumes from the finished shards.
SFT_MODEL=${1:-../training/step1_supervised_finetuning/output_step1_llama2_7b}
REWARD_MODEL=${2:-../training/step2_reward_model_finetuning/output_step2_llama_7b_epoch1_lr9.65e-6}
OUTPUT=${3:-./output_select_llama2_7b}
THETA=${4:-1.0}
ZERO_STAGE=${5:-3}
mkdir -p "$OUTPUT"

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed main.py \
   --data_path Anthropic/hh-rlhf/helpful-base Anthropic/hh-rlhf/harmless-base \
   --data_split 2,4,4 \
   --sft_model_name_or_path "$SFT_MODEL" \
   --reward_model_name_or_path "$REWARD_MODEL" \
   --num_padding_at_beginning 0 \
   --threshold $THETA \
   --pair_source samples \
   --label_policy reward_model \
   --max_prompt_seq_len 512 \
   --max_answer_seq_len 512 \
   --temperature 0.95 \
   --per_device_generation_batch_size 16 \
   --per_device_eval_batch_size 16 \
   --shard_size 512 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage $ZERO_STAGE \
   --enable_hybrid_engine \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   &> "$OUTPUT/select.log"
