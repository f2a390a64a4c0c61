"""Interactive chat with a trained actor (DeepSpeed-Chat's `inference/chatbot.py` flags).

Reads one user turn per line from stdin, so it works in a terminal and with piped input; `quit` ends
the session, `clear` forgets the conversation, end of input ends it too. Runs on CPU (fp32) or GPU
(bf16). The tokenizer is loaded from the checkpoint directory first (upstream followed
`_name_or_path` and failed offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import dschat  # noqa: F401
except ImportError:  # running from a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM

from dschat.utils.args import new_parser
from dschat.utils.errors import UserError, run_main
from dschat.utils.model.model_utils import create_hf_model
from dschat.utils.tokenizer import load_hf_tokenizer

PROMPT_FORMATS = {
    # The project's (and HH-RLHF's) format, which our SFT/RM/PPO models are trained on.
    "hh": ("\n\nHuman: {text}\n\nAssistant:", " {reply}"),
    # Upstream chatbot's format.
    "upstream": (" Human: {text}\n Assistant: ", "{reply}"),
}
STOP_MARKERS = ("Human:", "<|endoftext|>")
INPUT_HINT = "Enter input (type 'quit' to exit, 'clear' to clean memory): "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser("Chat with a trained model.")
    parser.add_argument("--path", type=str, required=True, help="Directory of the model to chat with (actor).")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest reply in tokens.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0 ...")
    parser.add_argument("--prompt_format", choices=tuple(PROMPT_FORMATS), default="hh",
                        help="hh: '\\n\\nHuman: ...\\n\\nAssistant:' (what this project trains on); upstream: "
                             "' Human: ...\\n Assistant: '.")
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if not Path(args.path).is_dir():
        raise UserError(f"--path {args.path}: no such model directory")
    return args


def clean_reply(text: str) -> str:
    """Cut the reply where the model starts the next user turn or writes an end marker."""
    for marker in STOP_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def truncate_left(ids: list[int], max_len: int, bos_id: int | None) -> list[int]:
    """Keep the newest `max_len` tokens of the conversation (and a leading BOS)."""
    if len(ids) <= max_len:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_len > 1:
        return [bos_id] + ids[len(ids) - max_len + 1:]
    return ids[len(ids) - max_len:]


class Chatbot:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = load_hf_tokenizer(args.path)
        self.model = create_hf_model(AutoModelForCausalLM, args.path, self.tokenizer).to(self.device, dtype).eval()
        self.turn_format, self.reply_format = PROMPT_FORMATS[args.prompt_format]
        max_positions = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_context = max(8, max_positions - args.max_new_tokens)
        self.history = ""
        torch.manual_seed(args.seed)

    def reply(self, text: str) -> str:
        self.history += self.turn_format.format(text=text)
        tok = self.tokenizer
        ids = truncate_left(list(tok(self.history)["input_ids"]), self.max_context, tok.bos_token_id)
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = {"do_sample": True, "temperature": self.args.temperature, "top_p": self.args.top_p} \
            if self.args.do_sample else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=self.args.max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, **kwargs)
        answer = clean_reply(tok.decode(out[0, len(ids):], skip_special_tokens=True))
        self.history += self.reply_format.format(reply=answer)
        return answer

    def clear(self) -> None:
        self.history = ""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bot = Chatbot(args)
    while True:  # one turn per input line; ends on quit or end of input
        try:
            line = input(INPUT_HINT)
        except EOFError:
            print()
            break
        text = line.strip()
        if text == "quit":
            break
        if text == "clear":
            bot.clear()
            print("Conversation cleared.\n", flush=True)
            continue
        if not text:
            continue
        print(f"\nHuman: {text}\nAssistant: {bot.reply(text)}\n", flush=True)


if __name__ == "__main__":
    run_main(main)
