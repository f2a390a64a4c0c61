"""Two-stage MPO (Gou & Nguyen 2024) on top of the dschat core."""
