"""A checkpoint and everything saved beside it: the Orbax state, the Hugging Face model folder, the
learning-dynamics snapshots (and pico-train's .pt files of them) and the Hub upload.

A module of its own because these are the loop's side effects, not the loop: the trainer (train.py) calls `save`
at checkpoint steps and `wait` / `finish` at the end, and each piece runs in the background where it can.
"""
from functools import partial
from pathlib import Path

import jax
from omegaconf import OmegaConf

import data
import dynamics
import export
import snapshots
from checkpoint import Background, Checkpoints, HubUploader, into_step_dir
from config import ConfigError


class Saver:
    """What a run saves with each checkpoint into `ckpt` (its Orbax manager), as cfg.checkpoint asks."""

    def __init__(self, cfg, ckpt: Checkpoints, mcfg, mesh, tokenizer: Path | None, train_data, dynamics_rows,
                 batch_sharding):
        c = cfg.checkpoint
        self.cfg, self.mcfg, self.mesh = cfg, mcfg, mesh
        self.train_data, self.dynamics_rows, self.batch_sharding = train_data, dynamics_rows, batch_sharding
        self.run_dir = Path(cfg.run_dir)
        self.ckpt = ckpt
        self.dynamics_layers, self.dynamics_note = dynamics.choose_layers(mcfg, c.dynamics.layers)
        self.pico_names = dynamics.check_format(c.dynamics.format, self.dynamics_layers)
        self.pico_files = Background()  # pico-train's .pt files of each snapshot (checkpoint.dynamics.format=pico)
        self.hub = HubUploader(c.hf_repo_id, cfg.name, cfg.run_dir, c.hf_endpoint) \
            if c.hf_repo_id and jax.process_index() == 0 else None
        self.hf_models, self.hf_note = None, None
        if c.hf_model:
            try:
                export.check_llama(mcfg)
                self.hf_models = export.CheckpointModels(mcfg, tokenizer)  # the run's tokenizer.json, or None
            except ConfigError as e:  # not a Llama: said once at start-up
                self.hf_note = f"checkpoints have no Hugging Face files ({e}); checkpoint.hf_model=false silences this"
        self.dynamics_step = None

    def compile(self, graphdef):
        """The learning-dynamics step for `graphdef` (again when ReLoRA wraps the model)."""
        self.dynamics_step = jax.jit(partial(dynamics.dynamics_step, graphdef, layers=self.dynamics_layers))

    def save(self, step: int, graphdef, state, loop: dict):
        """Checkpoint `step` (state and the loop's state) with its Hugging Face files, snapshots and upload."""
        self.ckpt.save(step, state, loop, OmegaConf.to_container(self.cfg, resolve=True))
        files = [self.hf_models.write(step, self.ckpt.step_dir(step), graphdef, state)
                 if self.hf_models else None]  # what the upload waits for (on its own thread)
        if self.dynamics_layers:  # this step's parameters on its train batch and on the fixed eval batch
            out = self.run_dir / "learning_dynamics" / str(step)
            with jax.set_mesh(self.mesh):  # the same context at every save, or the jitted step would recompile
                tokens = self.train_data.batch(step, self.batch_sharding)
                train_snap = dynamics.save(out, "train", self.dynamics_step(state, tokens), tokens)
                eval_tokens = next(data.valid_batches(self.dynamics_rows, self.cfg.eval.batch_size, self.mcfg.seq_len,
                                                      None, self.batch_sharding))
                eval_snap = dynamics.save(out, "eval", self.dynamics_step(state, eval_tokens))
            if self.pico_names and train_snap is not None:  # process 0, once Orbax has the step's folder in place
                splits = (("train", train_snap), ("eval", eval_snap))
                write = lambda tmp: [snapshots.write_pico(tmp, s, a, self.pico_names) for s, a in splits]
                files.append(self.pico_files.submit(into_step_dir, self.ckpt.step_dir(step), "learning_dynamics",
                                                    write, f"pico's learning-dynamics files of checkpoint step {step}"))
        if self.hub:
            self.hub.upload(step, self.ckpt.step_dir(step), self.run_dir / "learning_dynamics" / str(step), files)

    def wait(self):
        """Until every save under way is on disk: Orbax's, then the Hugging Face and pico files beside it."""
        self.ckpt.wait()
        if self.hf_models:
            self.hf_models.wait()
        self.pico_files.wait()

    def finish(self):
        """Wait for every save, then for the Hub uploads (their summary printed)."""
        self.wait()
        if self.hub:
            print(self.hub.finish())
