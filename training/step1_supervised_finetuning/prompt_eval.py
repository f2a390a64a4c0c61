"""Side-by-side answers of a baseline and a fine-tuned model (DeepSpeed-Chat's `prompt_eval.py` flags).

Why: the quickest sanity check after SFT is to read both models' answers to the same questions.
Added over upstream: `--prompts_file` (your own questions) and `--device` (CPU works).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

try:
    import dschat  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.utils.args import new_parser
from dschat.utils.errors import UserError, run_main
from dschat.utils.inference import load_policy, resolve_device

# Questions written for this project, asked in the HH prompt format the models are trained on.
BUILTIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "English": (
        "Please tell me about the history of the bicycle.",
        "Why do leaves change colour in autumn?",
        "Write a short poem about the sea.",
        "How do I make a cup of green tea?",
        "What should I pack for a weekend camping trip?",
        "Explain what a prime number is to a ten-year-old.",
    ),
    "Chinese": (
        "请简单介绍一下自行车的历史。",
        "为什么秋天树叶会变色？",
        "写一首关于大海的短诗。",
        "怎样泡一杯绿茶？",
        "周末去露营需要带些什么？",
        "请向一个十岁的孩子解释什么是质数。",
    ),
    "Japanese": (
        "自転車の歴史について簡単に教えてください。",
        "秋になると葉の色が変わるのはなぜですか？",
        "海についての短い詩を書いてください。",
        "緑茶のおいしい入れ方を教えてください。",
        "週末のキャンプに何を持っていけばいいですか？",
        "素数とは何か、十歳の子どもに説明してください。",
    ),
}


def hh_prompt(question: str) -> str:
    """The project's prompt format; text that already holds a `Human:` turn is used as is."""
    return question if "Human:" in question else f"\n\nHuman: {question}\n\nAssistant:"


def parse_args(argv: list[str] | None = None):
    parser = new_parser("Compare a baseline and a fine-tuned model on a few prompts.")
    parser.add_argument("--model_name_or_path_baseline", type=str, required=True, help="Baseline model.")
    parser.add_argument("--model_name_or_path_finetune", type=str, required=True, help="Fine-tuned model.")
    parser.add_argument("--num_beams", type=int, default=1, help="> 1: beam search instead of greedy decoding.")
    parser.add_argument("--num_beam_groups", type=int, default=1,
                        help="> 1 (diverse beam search) is not available: transformers moved it to a hub repo.")
    parser.add_argument("--top_k", type=int, default=4,
                        help="Kept for script compatibility (upstream's contrastive-search setting; unused).")
    parser.add_argument("--penalty_alpha", type=float, default=0.6,
                        help="Kept for script compatibility (upstream's contrastive-search setting; unused).")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="Answers per prompt (<= --num_beams).")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--language", type=str, default="English", choices=tuple(BUILTIN_QUESTIONS))
    parser.add_argument("--add_eot_token", action="store_true", help="Add --eot_token as a special token.")
    parser.add_argument("--eot_token", type=str, default="<|endoftext|>")
    parser.add_argument("--prompts_file", type=str, default=None,
                        help="One question per line (.txt) or JSON lines with a 'prompt' key, instead of the "
                             "built-in questions.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0 ...")
    args = parser.parse_args(argv)
    if args.num_beam_groups > 1:
        raise UserError("--num_beam_groups > 1: diverse beam search is no longer part of transformers "
                        "(it moved to a hub custom_generate repo); use --num_beams alone")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        raise UserError("--num_beams and --max_new_tokens must be >= 1")
    if not 1 <= args.num_return_sequences <= args.num_beams:
        raise UserError(f"--num_return_sequences {args.num_return_sequences}: must be between 1 and "
                        f"--num_beams ({args.num_beams})")
    return args


def load_prompts(path: str | None, language: str) -> list[str]:
    if path is None:
        return [hh_prompt(q) for q in BUILTIN_QUESTIONS[language]]
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts_file {path}: no such file")
    prompts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                prompts.append(hh_prompt(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"--prompts_file {path}:{lineno}: expected a JSON object with 'prompt'") from err
        else:
            prompts.append(hh_prompt(line.strip()))
    if not prompts:
        raise UserError(f"--prompts_file {path}: no prompts")
    return prompts


def generate(model, tokenizer, prompt: str, args, device) -> list[str]:
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict[str, list[list[str]]]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    prompts = load_prompts(args.prompts_file, args.language)
    answers: dict[str, list[list[str]]] = {}
    for role, path in (("baseline", args.model_name_or_path_baseline),
                       ("finetune", args.model_name_or_path_finetune)):
        model, tokenizer = load_policy(path, device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                                       add_special_tokens=args.eot_token if args.add_eot_token else None)
        answers[role] = [generate(model, tokenizer, p, args, device) for p in prompts]
        del model
    mode = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    for i, prompt in enumerate(prompts):
        print(f"==================== prompt {i + 1}/{len(prompts)} ({mode}) ====================")
        print(prompt.strip())
        for role in ("baseline", "finetune"):
            print(f"---------- {role} ----------")
            for text in answers[role][i]:
                print(text.strip())
        print()
    return answers


if __name__ == "__main__":
    run_main(main)
