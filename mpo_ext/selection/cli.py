"""Command line of step 2.5: flags, their checks, and `main` (`python -m mpo_ext.selection`,
`deepspeed --module mpo_ext.selection`, step2.5_select/main.py).

Owns the parser and `validate_args`, which refuses bad input with one line naming the flag and returns the
checked split settings (it writes nothing into args). The flags of the "sampling" group are exactly the
fields of `AnswerSamplingSettings`. Everything else is the stage's (`stage.run`).
"""

from __future__ import annotations

import argparse

from dschat.utils import args as flags
from dschat.utils.dist import init_distributed
from dschat.utils.errors import UserError
from mpo_ext.selection.gaps import DEFAULT_GAP_EDGES, DEFAULT_THRESHOLD
from mpo_ext.selection.settings import LABEL_POLICIES, PAIR_SOURCES, SplitSettings
from mpo_ext.selection.stage import run


def build_parser() -> argparse.ArgumentParser:
    parser = flags.new_parser(
        "Step 2.5 of two-stage MPO (Gou & Nguyen 2024): score answer pairs with the reward model and split "
        "them by reward gap into easy (-> DPO, step3b) and hard (-> PPO, step 3).")
    flags.add_data_args(parser, max_seq_len=None, padding=False, pad_mask=False)  # generation pads itself
    group = parser.add_argument_group("models")
    group.add_argument("--sft_model_name_or_path", type=str, default=None,
                       help="The SFT (step 1) model that samples the answers (not needed with --pair_source dataset).")
    group.add_argument("--reward_model_name_or_path", type=str, required=True,
                       help="A step-2 reward model output (ours or upstream DeepSpeed-Chat's).")
    group.add_argument("--num_padding_at_beginning", type=int, default=1,
                       help="Passed to the reward model (OPT: 1, Llama: 0); scoring reads the last answer token.")
    flags.add_reward_ending_arg(group)
    group = parser.add_argument_group("selection")
    group.add_argument("--threshold", type=float, default=None,
                       help=f"theta: pairs with |r(a) - r(b)| > theta are easy (default: {DEFAULT_THRESHOLD}, the "
                            "paper's best). Exclusive with --easy_fraction." + flags.OWN_DEFAULT)
    group.add_argument("--easy_fraction", type=float, default=None,
                       help="Instead of a fixed theta, put this fraction of pairs (the largest gaps) in easy.")
    group.add_argument("--pair_source", choices=PAIR_SOURCES, default="samples",
                       help="samples: two SFT samples per prompt (the paper's Algorithm 1); dataset: score the "
                            "dataset's own chosen/rejected pairs.")
    group.add_argument("--label_policy", choices=LABEL_POLICIES, default="reward_model",
                       help="reward_model: the higher-scored answer is chosen (the paper); human: keep the dataset "
                            "label; drop_disagreements: drop pairs where RM and human disagree (dataset pairs).")
    group.add_argument("--data_phase", type=int, choices=(1, 2, 3), default=3,
                       help="Which --data_split slice to read (3: the prompts step 3 would see).")
    group.add_argument("--max_prompts", type=int, default=0, help="Use only the first N prompts (0: all).")
    group.add_argument("--gap_bucket_edges", type=str, default=",".join(f"{e:g}" for e in DEFAULT_GAP_EDGES),
                       help="Lower edges of the gap buckets of accuracy_by_gap (last bucket open).")
    group = parser.add_argument_group("sampling", "What decides the sampled answers (recorded with every shard).")
    group.add_argument("--max_prompt_seq_len", type=int, default=256, help="Prompts longer than this are dropped.")
    group.add_argument("--max_answer_seq_len", type=int, default=256, help="Maximum new tokens per answer.")
    group.add_argument("--num_samples", type=int, default=2,
                       help="Answers sampled per prompt (2: the paper's); the pair is the best and the worst of "
                            "them by reward. The prompt's prefill is computed once for all of its samples.")
    flags.add_sampling_args(group, with_do_sample=False)  # selection always samples
    group.add_argument("--per_device_generation_batch_size", type=int, default=16,
                       help="Prompts per generate call (each yields --num_samples answers).")
    group = parser.add_argument_group("throughput and output")
    group.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Sequences per reward-model call.")
    group.add_argument("--shard_size", type=int, default=256,
                       help="Prompts per resumable shard (OUTPUT_DIR/shards/shard-NNNNN.jsonl).")
    group.add_argument("--rebuild_shards", action="store_true",
                       help="Discard shards of an earlier run with different settings instead of refusing.")
    group.add_argument("--enable_hybrid_engine", action="store_true",
                       help="Generate with the DeepSpeed Hybrid Engine where it works (GPU, supported model).")
    group.add_argument("--output_dir", type=str, required=True,
                       help="Where easy.jsonl, hard.jsonl, manifest.json, the plots and shards/ go (required).")
    group.add_argument("--seed", type=int, default=1234, help="Seed of the data split and of the sampling.")
    flags.add_deepspeed_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags (bad input: UserError naming the flag)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args) -> SplitSettings:
    """Refuse bad flags (UserError naming the flag and the fix); the checked split settings."""
    split = SplitSettings.from_args(args)
    if args.pair_source == "samples":
        if not args.sft_model_name_or_path:
            raise UserError("--sft_model_name_or_path is required with --pair_source samples (it samples the answers)")
        if args.label_policy != "reward_model":
            raise UserError(f"--label_policy {args.label_policy}: sampled pairs have no human label; use "
                            "--label_policy reward_model or --pair_source dataset")
    flags.sampling_from_args(args, do_sample=True)  # two greedy answers would be identical
    if args.num_samples < 2:
        raise UserError(f"--num_samples {args.num_samples}: a pair needs at least 2 samples per prompt")
    flags.check_positive(args, "per_device_generation_batch_size", "per_device_eval_batch_size", "shard_size",
                         "max_prompt_seq_len", "max_answer_seq_len")
    if args.max_prompts < 0:
        raise UserError(f"--max_prompts {args.max_prompts}: must be >= 0")
    flags.check_seed(args)
    if getattr(args, "deepspeed_config", None):
        raise UserError("--deepspeed_config: the DeepSpeed config is built from the flags here; drop it")
    flags.check_path_exists("--sft_model_name_or_path", args.sft_model_name_or_path, "model directory")
    flags.check_path_exists("--reward_model_name_or_path", args.reward_model_name_or_path, "model directory")
    return split


def main() -> None:
    """Step 2.5 entry point: parse, join the process group, run the stage."""
    args = parse_args()
    init_distributed(args.local_rank)
    run(args)
