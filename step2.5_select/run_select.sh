#!/bin/bash
# Step 2.5 of two-stage MPO: sample two answers per prompt with the SFT model, score them with the reward
# model, split by reward gap into easy.jsonl (gap > theta -> step3b DPO) and hard.jsonl (-> step 3 PPO).
# Usage: bash run_select.sh [SFT_MODEL] [REWARD_MODEL] [OUTPUT_DIR] [THETA] [ZERO_STAGE]
# Run from step2.5_select/. Re-running resumes: finished shards under $OUTPUT/shards are not redone, and a
# new THETA only re-splits the stored scores. NUM_RANKS=N for N processes (GPUs, or CPU ranks).
set -o pipefail  # the exit status is the run's, not tee's
SFT_MODEL=${1:-../training/step1_supervised_finetuning/output}
REWARD_MODEL=${2:-../training/step2_reward_model_finetuning/output}
OUTPUT=${3:-./output_select}
THETA=${4:-1.0}
ZERO_STAGE=${5:-0}
mkdir -p "$OUTPUT"

# Arguments after the first 5 go to main.py unchanged (e.g. --resume).
shift $(( $# < 5 ? $# : 5 ))
deepspeed --num_gpus ${NUM_RANKS:-1} main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --sft_model_name_or_path "$SFT_MODEL" \
   --reward_model_name_or_path "$REWARD_MODEL" \
   --num_padding_at_beginning 1 \
   --threshold $THETA \
   --pair_source samples \
   --label_policy reward_model \
   --max_prompt_seq_len 256 \
   --max_answer_seq_len 256 \
   --temperature 1.0 \
   --per_device_generation_batch_size 16 \
   --per_device_eval_batch_size 16 \
   --seed 1234 \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" \
   2>&1 | tee "$OUTPUT/select.log"
