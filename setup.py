"""Packaging for dschat-mpo: installs `dschat` and `mpo_ext` as real packages (no `-e` needed)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("mpo_ext/__init__.py").read_text(encoding="utf-8")).group(1)

setup(
    name="dschat-mpo",
    version=VERSION,
    description=(
        "DeepSpeed-Chat-compatible RLHF pipeline with two-stage Mixed Preference Optimization "
        "(Gou & Nguyen 2024): reward-gap data selection, DPO on easy pairs, PPO on hard prompts."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dschat", "dschat.*", "mpo_ext", "mpo_ext.*"]),
    package_data={"mpo_ext.configs": ["*.yaml"]},  # the run presets, read by `mpo pipeline --preset`
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.15",
        "transformers>=4.56",  # from_pretrained(dtype=...) arrived in 4.56
        "huggingface_hub",
        "datasets>=2.8",
        "accelerate>=0.26",
        "click>=8.0",
        "pyyaml>=5.1",
        "tensorboard",
        "matplotlib",
        "tqdm",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "ruff", "wandb"],
        "wandb": ["wandb"],
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["mpo=mpo_ext.cli:main"]},
)
