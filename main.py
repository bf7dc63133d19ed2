"""Hydra entry: config -> distributed init -> train.run.

    python main.py                            # configs/local.yaml: CPU, built-in corpus, a few minutes
    python main.py -cn tpu opt.peak_lr=0.004  # another config, with overrides
"""
import hydra

import train


@hydra.main(version_base=None, config_path="configs", config_name="local")
def main(cfg):
    train.init_distributed(cfg.distributed)
    train.run(cfg)


if __name__ == "__main__":
    main()
