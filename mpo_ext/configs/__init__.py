"""Run configs shipped with the package: `mpo pipeline --preset NAME` or copy one and `--config` it."""
