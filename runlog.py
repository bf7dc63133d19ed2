"""A run's record: its log lines (stdout, W&B) and its history, kept across resumes in metrics.json.

A module of its own because the loop only reports to it, as it hands checkpoints to saving.Saver and validation to
evaluation.Evaluator; what a line looks like and where it goes is not the loop's concern.
"""
import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from config import ConfigError


def check_wandb(mode: str):
    """wandb.mode=online needs W&B credentials (WANDB_API_KEY, or the netrc entry `wandb login` writes for
    WANDB_BASE_URL's host): without them, an error at start-up that says what to do, not W&B's traceback once the
    data and the model are built."""
    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        found = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise ConfigError(f"wandb.mode=online but this machine has no W&B credentials (no WANDB_API_KEY, no entry for "
                          f"{host} in {path}); run `wandb login` or set WANDB_API_KEY, or log locally with "
                          f"wandb.mode=offline (upload later with `wandb sync`) or not at all with wandb.mode=disabled")


class RunLog:
    """The history of logged steps (dicts with "step"), written out by `finish`; W&B once `start_wandb` ran. Only
    the main process prints, logs to W&B and writes files."""

    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir, self.is_main = run_dir, is_main
        self.history, self.wandb = [], None

    def resume(self, step: int):
        """The history of earlier runs of this run_dir, up to `step` (the checkpoint resumed from)."""
        metrics = self.run_dir / "metrics.json"
        if metrics.exists():
            self.history = [h for h in json.loads(metrics.read_text())["history"] if h["step"] <= step]

    def start_wandb(self, cfg, n_params: int):
        """W&B in cfg.wandb.mode (nothing when disabled), resumed into the same run directory."""
        if not self.is_main or cfg.wandb.mode == "disabled":
            return
        import wandb
        self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name,
                                mode=cfg.wandb.mode, dir=str(self.run_dir), resume="allow",
                                config=OmegaConf.to_container(cfg, resolve=True),
                                settings=wandb.Settings(silent=True, console="off"))
        print(f"W&B ({cfg.wandb.mode}): {self.wandb.dir}"
              + ("  (upload later with `wandb sync`)" if cfg.wandb.mode == "offline" else ""))
        self.wandb.summary["params"] = n_params

    def log(self, metrics: dict, step: int, bar=None):
        """One line `step N: k=v ...` (through the progress bar when there is one) and the same to W&B."""
        if not self.is_main:
            return
        if self.wandb:
            self.wandb.log(metrics, step=step)
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        (bar.write if bar is not None else print)(f"step {step}: {line}")

    def train(self, step: int, metrics: dict, bar):
        """A logged training interval: its line and its history entry."""
        self.log(metrics, step, bar)
        self.history.append(dict(step=step, **metrics))

    def evaluation(self, step: int, ev: dict, tokens: int):
        """An evaluation into the history (into the entry of its step when that step was logged), with the tokens
        seen, so that validation loss can be plotted against tokens."""
        if not (self.history and self.history[-1]["step"] == step):
            self.history.append(dict(step=step, tokens=tokens))
        self.history[-1].update({k: v for k, v in ev.items() if k != "step"})

    def finish(self, final: dict):
        """metrics.json ({final, history}) and W&B's summary."""
        if not self.is_main:
            return
        (self.run_dir / "metrics.json").write_text(json.dumps(dict(final=final, history=self.history), indent=1))
        if self.wandb:
            self.wandb.summary.update(final)
            self.wandb.finish()
