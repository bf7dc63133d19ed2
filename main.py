"""Hydra entry: config -> distributed init -> train.run.

    python main.py                            # configs/local.yaml: CPU, built-in corpus, a few minutes
    python main.py -cn tpu opt.peak_lr=0.004  # another config, with overrides
"""
import logging
import sys

import hydra

import data
import train
from model import ConfigError


@hydra.main(version_base=None, config_path="configs", config_name="local")
def main(cfg):
    logging.getLogger("jax").setLevel(logging.WARNING)  # not INFO lines about absent TPU/GPU backends
    try:
        train.init_distributed(cfg.distributed)
        train.run(cfg)
    except (ConfigError, data.DataError) as e:  # bad config or data: the message says what to fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
