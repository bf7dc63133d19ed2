"""Hydra entry: config -> distributed init -> train.run -> eval.tasks through lm-eval on the final checkpoint (or, with
aot.target, aot.run: compile for chips, no training).

    python main.py                            # configs/local.yaml: CPU, built-in corpus, a few minutes
    python main.py -cn tpu opt.peak_lr=0.004  # another config, with overrides
    python main.py -cn tpu aot.target=tpu:v5e-8   # will it fit a v5e-8? compiled here, nothing runs
    python main.py -m model.kind=decoder,lstm,kgram_mlp   # a sweep: one run per job, then `python report.py DIR`
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import aot
import config
import host
import lmeval
import train
from checkpoint import CheckpointError
from chips import TargetError
from data import DataError


@hydra.main(version_base=None, config_path="configs", config_name="local")
def main(cfg):
    # not INFO lines about absent backends, every Orbax save step and every Hub request (huggingface_hub's httpx)
    for name in ("jax", "absl", "httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not any(o.startswith("run_dir=") for o in hc.overrides.task):
        cfg.run_dir = hc.runtime.output_dir  # each job its own run (multirun/<date>/<time>/<job>), not runs/<name>
    try:
        if cfg.aot.target:
            aot.compile_only_host()
            aot.run(cfg)
            return
        host.init_distributed(cfg.distributed)
        lmeval.run_tasks(cfg)  # unknown task names fail before anything compiles
        lmeval.after_training(cfg, train.run(cfg))
    except (config.ConfigError, DataError, CheckpointError, TargetError) as e:  # bad input: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.TrainingError as e:  # e.g. a NaN loss; the last good checkpoint is named
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    host.reuse_host_memory()  # a restart, before jax starts: on CPU, each step reuses the last one's memory
    host.cpu_unless_accelerator()  # no plugin tracebacks on a host without chips
    config.register_resolvers()  # base.yaml's ${mul:...}, before Hydra hands over the config
    main()
