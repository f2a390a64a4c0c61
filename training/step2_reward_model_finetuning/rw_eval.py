"""Score good and bad answers with a trained step-2 reward model (DeepSpeed-Chat's `rw_eval.py` flags).

Upstream built the critic with `rlhf_training=False`, i.e. loaded the step-2 directory as a plain base
model: the `rwtransformer.*` weights did not match and the value head stayed random, so the scores
changed from run to run. Here the whole checkpoint, value head included, is loaded strictly
(`create_critic_model(..., rlhf_training=True)`), so the same inputs always get the same scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    import dschat  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.utils.args import OWN_DEFAULT, new_parser
from dschat.utils.errors import UserError, run_main
from dschat.utils.files import atomic_write_json
from dschat.utils.inference import RewardScorer, resolve_device

# (prompt, better answer, worse answer): written for this project.
BUILTIN_PAIRS: tuple[tuple[str, str, str], ...] = (
    (
        "\n\nHuman: How can I keep cut flowers fresh for longer?\n\nAssistant:",
        " Trim the stems at an angle, put them in clean water, change the water every two days and keep the "
        "vase away from direct sun and ripening fruit.",
        " Flowers are plants.",
    ),
    (
        "\n\nHuman: What is the boiling point of water at sea level?\n\nAssistant:",
        " At sea level water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
        " I don't know, maybe try looking it up somewhere.",
    ),
)


def parse_args(argv: list[str] | None = None):
    parser = new_parser("Score chosen/rejected answers with a trained reward model (step-2 output).")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="Step-2 output directory (pytorch_model.bin with rwtransformer.* and v_head.weight).")
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="As in step 2 (OPT: 1): the first N positions are never taken for the end of a "
                             "sequence. Scores are read at the answer's last real token (the one before an eos "
                             "ending whose token is the pad), as in step 2, PPO and selection.")
    parser.add_argument("--add_eot_token", action="store_true",
                        help="Add --eot_token (default <|endoftext|>) to the tokenizer as a special token.")
    parser.add_argument("--eot_token", type=str, default=None,
                        help="Text appended to every answer before scoring (`eos`: the eos token). Default: the "
                             "ending recorded with the reward model by step 2, or <|endoftext|> for a DeepSpeed-Chat "
                             "step-2 output, so each checkpoint is read the way it was trained." + OWN_DEFAULT)
    parser.add_argument("--pairs_file", type=str, default=None,
                        help="JSON lines with prompt/chosen/rejected to score instead of the built-in examples.")
    parser.add_argument("--max_seq_len", type=int, default=512, help="Longest prompt+answer read by the model.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0 ...")
    parser.add_argument("--output_json", type=str, default=None, help="Also write the scores to this JSON file.")
    return parser.parse_args(argv)


def load_pairs(path: str | None) -> list[tuple[str, str, str]]:
    if path is None:
        return list(BUILTIN_PAIRS)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--pairs_file {path}: no such file")
    pairs = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((record["prompt"], record["chosen"], record["rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"--pairs_file {path}:{lineno}: need a JSON object with prompt, chosen, rejected "
                            f"({type(err).__name__}: {err})") from err
    if not pairs:
        raise UserError(f"--pairs_file {path}: no records")
    return pairs


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    scorer = RewardScorer.from_path(args.model_name_or_path, device,
                                    num_padding_at_beginning=args.num_padding_at_beginning,
                                    max_seq_len=args.max_seq_len,
                                    add_special_tokens=(args.eot_token or "<|endoftext|>") if args.add_eot_token
                                    else None,
                                    end_text=args.eot_token)
    print(f"reward model ending: {scorer.ending!r}")
    pairs = load_pairs(args.pairs_file)
    prompts = [p for p, _, _ in pairs]
    chosen = scorer.score(prompts, [c for _, c, _ in pairs])
    rejected = scorer.score(prompts, [r for _, _, r in pairs])
    results = []
    for i, ((prompt, good, bad), cs, rs) in enumerate(zip(pairs, chosen, rejected), start=1):
        print(f"==================== pair {i} ====================")
        print(f"prompt: {prompt.strip()}")
        print(f"chosen:   {good.strip()}\n  -> reward {cs:.6f}")
        print(f"rejected: {bad.strip()}\n  -> reward {rs:.6f}")
        print(f"chosen scored higher: {cs > rs}")
        results.append({"prompt": prompt, "chosen": good, "rejected": bad, "chosen_reward": cs,
                        "rejected_reward": rs})
    if args.output_json:
        atomic_write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    run_main(main)
