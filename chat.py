"""Chat with a trained model: `python chat.py --path OUTPUT/actor` (DeepSpeed-Chat's chat.py flags).

Starts inference/chatbot.py with the same Python; flags other than --path and --max_new_tokens
(e.g. --device cpu, --do_sample) are passed through to it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHATBOT = Path(__file__).resolve().parent / "inference" / "chatbot.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a trained model (see inference/chatbot.py --help).")
    parser.add_argument("--path", type=str, required=True, help="Directory of the model to chat with.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest reply in tokens.")
    args, passthrough = parser.parse_known_args(argv)
    cmd = [sys.executable, str(CHATBOT), "--path", args.path, "--max_new_tokens", str(args.max_new_tokens),
           *passthrough]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
