#!/bin/bash
# GPU smoke test: steps 1-3 on a small Llama (built offline), bf16, ZeRO-3, Hybrid Engine requested for
# step 3; target under 5 minutes on one GPU (plus any one-off JIT build of DeepSpeed ops). Prints which
# generation path step 3 used (Hybrid Engine or the Hugging Face fallback, with the reason) and the
# generation throughput. Usage, from anywhere:
#   bash benchmarks/gpu_smoke.sh [WORK_DIR]        (NUM_GPUS=N to use N GPUs; default 1)
# Checking the script itself without a GPU: ALLOW_CPU=1 SMOKE_TINY=1 STEPS=4 (CPU ranks, tiny model).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK=${1:-$(mktemp -d /tmp/dschat-gpu-smoke.XXXXXX)}
NUM_GPUS=${NUM_GPUS:-1}
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
cd "$REPO"
START=$(date +%s)
stamp() { echo "[gpu_smoke +$(( $(date +%s) - START ))s] $*"; }
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

STEPS=${STEPS:-40}
PPO_STEPS=$(( STEPS / 4 ))
if [ -z "${ALLOW_CPU:-}" ]; then
   python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))"
fi
stamp "assets"
python3 benchmarks/gpu_smoke.py assets "$WORK/assets"
ASSETS="$WORK/assets"
COMMON=(--data_path "$ASSETS/data" --data_split 2,4,4 --data_output_path "$WORK/data_cache" --seed 1234 --dtype bf16)

stamp "step 1 (SFT, ZeRO-3, bf16)"
mkdir -p "$WORK/step1"
deepspeed --num_gpus "$NUM_GPUS" --master_port "$(free_port)" training/step1_supervised_finetuning/main.py "${COMMON[@]}" \
   --model_name_or_path "$ASSETS/tiny-llama" --per_device_train_batch_size 32 --per_device_eval_batch_size 32 \
   --max_seq_len 64 --learning_rate 1e-3 --num_train_epochs 1 --max_steps $STEPS --num_warmup_steps 5 \
   --eval_iters 5 --zero_stage 3 --deepspeed --output_dir "$WORK/step1" &> "$WORK/step1/training.log"
tail -n 3 "$WORK/step1/training.log"

stamp "step 2 (reward model, ZeRO-3, bf16)"
mkdir -p "$WORK/step2"
deepspeed --num_gpus "$NUM_GPUS" --master_port "$(free_port)" training/step2_reward_model_finetuning/main.py "${COMMON[@]}" \
   --model_name_or_path "$WORK/step1" --num_padding_at_beginning 0 --per_device_train_batch_size 32 \
   --per_device_eval_batch_size 32 --max_seq_len 64 --learning_rate 5e-4 --num_train_epochs 1 --max_steps $STEPS \
   --num_warmup_steps 5 --eval_iters 5 --zero_stage 3 --deepspeed --output_dir "$WORK/step2" \
   &> "$WORK/step2/training.log"
tail -n 3 "$WORK/step2/training.log"

stamp "step 3 (PPO, actor+critic ZeRO-3, bf16, --enable_hybrid_engine, EMA)"
mkdir -p "$WORK/step3"
deepspeed --num_gpus "$NUM_GPUS" --master_port "$(free_port)" training/step3_rlhf_finetuning/main.py "${COMMON[@]}" \
   --actor_model_name_or_path "$WORK/step1" --critic_model_name_or_path "$WORK/step2" \
   --num_padding_at_beginning 0 --per_device_generation_batch_size 32 --per_device_training_batch_size 32 \
   --max_prompt_seq_len 48 --max_answer_seq_len 32 --actor_learning_rate 1e-5 --critic_learning_rate 5e-5 \
   --num_warmup_steps 2 --max_steps $PPO_STEPS --actor_zero_stage 3 --critic_zero_stage 3 --enable_hybrid_engine \
   --enable_ema --deepspeed --output_dir "$WORK/step3" &> "$WORK/step3/training.log"
grep -E "Average reward score|KL:" "$WORK/step3/training.log" | tail -n 4

stamp "report"
python3 benchmarks/gpu_smoke.py report "$WORK/step3"
stamp "done (outputs and logs in $WORK)"
