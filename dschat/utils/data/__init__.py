"""DeepSpeed-Chat-compatible core of dschat-mpo."""
