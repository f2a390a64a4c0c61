"""Step definitions (arguments, trainer, build) behind the thin `main.py` entry points."""
