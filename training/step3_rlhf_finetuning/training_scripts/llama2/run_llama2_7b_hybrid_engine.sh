#!/bin/bash
# Step 3 of MPO (PPO on the hard prompts) for Llama-2-7B on one 8-GPU node, with the DeepSpeed Hybrid Engine
# for rollouts (probed on the first batch; on failure it warns once and uses Hugging Face generate).
# The same run as run_llama2_7b.sh (DPO model as policy start and KL reference, step 2.5's hard split) plus
# --enable_hybrid_engine. Run from training/step3_rlhf_finetuning/.
# Usage: bash run_llama2_7b_hybrid_engine.sh [ACTOR_MODEL] [CRITIC_MODEL] [HARD_JSONL] [REFERENCE_MODEL] [OUTPUT]
#        [extra main.py flags]   (an empty argument takes the default)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ARGS=("${@:1:5}")
while [ ${#ARGS[@]} -lt 5 ]; do ARGS+=(""); done
ARGS[4]=${ARGS[4]:-./output_step3_mpo_llama2_7b_he}
exec bash "$HERE/run_llama2_7b.sh" "${ARGS[@]}" --enable_hybrid_engine "${@:6}"
