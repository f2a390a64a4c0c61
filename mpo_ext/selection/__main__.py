"""`python -m mpo_ext.selection ...` and `deepspeed --module mpo_ext.selection ...`: step 2.5's command line."""

from dschat.utils.errors import run_main
from mpo_ext.selection.cli import main

if __name__ == "__main__":
    run_main(main)
