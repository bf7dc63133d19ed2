"""Orbax checkpoints of a run: the sharded train state, the loop state and the resolved config.

Layout: <checkpoint.dir>/<step>/{state, loop, config}. `state` is the nnx state of (model, optimizer), params
and Adam moments, restored with the shardings of the current mesh; `loop` is JSON (step, seed, tokens seen; the
data position is the step, since the batch is a pure function of (seed, step)); `config` is the resolved run
config as JSON, so `load(dir)` needs nothing but the directory. Orbax writes each step into a temporary folder
and renames it when complete, so a process killed mid-save leaves the earlier checkpoints intact.
"""
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from omegaconf import OmegaConf

from model import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the fix."""


class Checkpoints:
    def __init__(self, directory, keep: int | None = 3, use_async: bool = True):
        self.dir = Path(directory).expanduser().absolute()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{jax.process_index()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.dir} is not writable ({e.strerror}); set run_dir "
                                  f"(or checkpoint.dir) to a folder you can write") from None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, loop: dict, config: dict):
        """Start saving (asynchronously where enabled); earlier checkpoints stay until this one is complete."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop), config=ocp.args.JsonSave(config)))

    def config(self, step: int) -> dict:
        return self._restore(step, config=ocp.args.JsonRestore()).config

    def restore(self, step: int, abstract_state, model_config: dict | None = None):
        """(state, loop) of `step`, placed as `abstract_state` says (ShapeDtypeStructs with shardings).
        With `model_config`, first checks that the checkpoint was made by the same model."""
        if model_config is not None:
            saved = {k: v for k, v in self.config(step)["model"].items() if k != "relora"}
            now = {k: v for k, v in dict(model_config).items() if k != "relora"}
            diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                    and k in ModelConfig.__dataclass_fields__ and k not in ("dtype", "attention", "remat")}
            if diff:
                desc = ", ".join(f"model.{k}: checkpoint {a} vs this run {b}" for k, (a, b) in sorted(diff.items()))
                raise CheckpointError(f"the checkpoint in {self.dir / str(step)} was made by a different model ({desc}); "
                                      f"use the checkpoint's model config or a new run_dir")
        r = self._restore(step, state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore())
        return r.state, r.loop

    def _restore(self, step, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # orbax / tensorstore errors on truncated or corrupt files
            raise CheckpointError(f"checkpoint {self.dir / str(step)} could not be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); it is truncated or corrupt: delete that folder to "
                                  f"resume from an earlier step ({self.all_steps()} present)") from None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) mirroring a state pytree: the target to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def load(path, step: int | None = None):
    """A trained model from nothing but a checkpoint directory (a run's checkpoint dir, or a run dir holding
    `checkpoints/`): returns (model, config, loop) with the model on this host's devices."""
    import train  # the trainer builds the state layout; imported here to keep this module's import light
    path = Path(path).expanduser()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    ckpts = Checkpoints(path, keep=None, use_async=False)
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    cfg = OmegaConf.create(ckpts.config(step))
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1  # this host's devices, whatever the run used
    trainer = train.Trainer(cfg, build_data=False, resume=False)
    trainer.state, loop = ckpts.restore(step, abstract_like(trainer.state))
    return trainer.model, cfg, loop
