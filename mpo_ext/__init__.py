"""Two-stage MPO (Gou & Nguyen 2024) on top of the dschat core."""

__version__ = "0.1.0"  # setup.py reads it from here
