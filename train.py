"""The training loop: steps, and the calls to evaluation (evaluation.py), checkpoints (saving.py) and the log
(runlog.py).

Each jitted step (steps.py) takes the state (donated; train_state.py builds it) and a global batch and returns the
new state and device-side metrics; the host reads metrics only every `train.log_every` steps. End-of-run lm-eval
tasks are not the loop's: main.py runs them on the final checkpoint (lmeval.after_training).
"""
import math
import signal
import threading
import time
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import aot
import chips
import config
import data
import export
import maml
import relora
import tokenizer
import train_state
from checkpoint import Checkpoints
from config import ConfigError
from evaluation import Evaluator
from host import peak_flops, throughput
from model import BATCH_AXES, LanguageModel, count_params
from runlog import RunLog, check_wandb
from saving import Saver
from steps import check_batch, jit_eval_step, jit_train_step


def training_config(cfg, mcfg) -> dict:
    """The resolved config plus the fields pico-analyze reads from pico-train's training_config.yaml (SPEC §5):
    model.attention_n_heads / attention_n_kv_heads (a decoder's) and checkpointing.run_name."""
    out = OmegaConf.to_container(cfg, resolve=True)
    if mcfg.linears():
        out["model"].update(attention_n_heads=mcfg.n_heads, attention_n_kv_heads=mcfg.n_kv_heads)
    return dict(out, checkpointing=dict(run_name=cfg.name))


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or inf loss); the message says where the last good checkpoint is."""


class Meter:
    """Sums the per-step metrics on device (no host sync per step); the host reads them at log or save time. The
    metrics named in `per_meta` are sums over a step's meta micro-batches (maml.py): they are divided by the
    `meta_batches` of the interval, not by its steps, and left out of an interval without one."""

    def __init__(self, per_meta=()):
        self.per_meta = per_meta
        self.sum, self.n, self.t = None, 0, time.perf_counter()
        self.bad = jnp.zeros(())  # non-finite steps since the last check

    def add(self, m):
        self.sum = m if self.sum is None else jax.tree.map(jnp.add, self.sum, m)
        self.n, self.bad = self.n + 1, self.bad + m["nonfinite"]

    def read(self) -> tuple[dict, int, float]:
        """Means since the last read, the number of steps and the seconds they took."""
        sums = jax.device_get(self.sum)
        meta = float(sums.get("meta_batches", 0))
        means = {k: float(v) / (meta if k in self.per_meta else self.n) for k, v in sums.items()
                 if k not in self.per_meta or meta}
        out = (means, self.n, time.perf_counter() - self.t)
        self.sum, self.n, self.t = None, 0, time.perf_counter()
        return out


class StopSignal:
    """SIGTERM / SIGINT ask the loop to save at the current step and exit cleanly; a second SIGINT aborts."""

    def __enter__(self):
        self.requested, self.prev = None, {}
        if threading.current_thread() is threading.main_thread():
            self.prev = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def agreed(self, sync: bool) -> bool:
        """Whether to stop now. Several processes agree (at log steps only, where the host syncs anyway)."""
        if jax.process_count() == 1:
            return bool(self.requested)
        if not sync:
            return False
        return bool(multihost_utils.process_allgather(np.int32(bool(self.requested))).any())

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------- the loop

class Trainer:
    """Everything a run needs, built from the config (bad input fails here, before anything compiles); `run()` is
    the loop. A run_dir that holds checkpoints continues from the latest (checkpoint.auto_resume)."""

    def __init__(self, cfg: DictConfig):
        config.check_keys(cfg)
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        if self.is_main:
            check_wandb(cfg.wandb.mode)  # before the data: a missing login is known now
        self.mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        self.accelerator, self.memory_note, self.accum_note = chips.here(), None, None
        if cfg.data.grad_accum == "auto":  # chosen by compiling for the chips here, then the run's own number
            cfg.data.grad_accum, self.accum_note, _ = aot.auto_grad_accum(cfg, self.accelerator, self.mesh)
        check_batch(self.mesh, cfg.data.batch_size, cfg.data.grad_accum, cfg.eval.batch_size)
        self.run_dir = Path(cfg.run_dir)
        self.data_dir = data.data_dir(cfg.data)
        # the tokenizer and the data first: a bad source fails before anything compiles
        self.tokenizer_path = tokenizer.path(cfg.data)
        self.train_rows, self.valid_rows, dynamics_rows, eval_sets = data.open_run_data(cfg)
        tok = tokenizer.load(self.tokenizer_path, cfg.model.vocab_size)
        self.train_data = data.TrainData(self.train_rows, cfg.seed, cfg.data.batch_size, cfg.data.order)
        c = cfg.checkpoint
        self.ckpt = Checkpoints(c.dir, c.keep, c["async"])
        weights, self.init_note = export.run_weights(cfg, resuming=self.ckpt.latest_step() is not None)
        self.mcfg, self.relora, self.schedule, self.graphdef, self.state = train_state.build(cfg, self.mesh,
                                                                                            weights)
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES, None))
        self.evaluator = Evaluator(cfg, self.mesh, self.mcfg, tok, eval_sets, self.valid_rows, self.batch_sharding)
        self.saver = Saver(cfg, self.ckpt, self.mcfg, self.mesh, self.tokenizer_path, self.train_data, dynamics_rows,
                           self.batch_sharding)
        self.objective, self.mask_note = maml.objective(maml.config_of(cfg), self.mcfg, tok)
        self.meter, self.record, self.last_eval = Meter(maml.PER_META), RunLog(self.run_dir, self.is_main), None
        self.n_params = count_params(self.model, (nnx.Param, relora.Frozen))
        self.start_step = self.saved_step = self.resume()
        self.jit_steps()

    def resume(self) -> int:
        """The latest checkpoint's state and step (0 without one) into this trainer."""
        latest = self.ckpt.latest_step()
        if latest is None:
            return 0
        if not self.cfg.checkpoint.auto_resume:
            raise ConfigError(f"{self.ckpt.dir} already holds checkpoints (steps {self.ckpt.all_steps()}) and "
                              f"checkpoint.auto_resume=false; use a new run_dir, or auto_resume=true to continue")
        self.graphdef, self.state, loop = train_state.restore(self.ckpt, latest, self.mcfg, self.relora, self.graphdef,
                                                            self.state, self.mesh, self.cfg.model.get("maml"))
        self.record.resume(loop["step"])
        if self.is_main:
            print(f"resumed from {self.ckpt.step_dir(latest)} (step {latest})")
        return loop["step"]

    def jit_steps(self):
        """Compile the train, eval and dynamics steps for self.graphdef (again when ReLoRA wraps the model). On an
        accelerator, the train and eval steps are compiled at once and their memory checked against the chip's
        (aot.preflight: a clear error, not an out-of-memory mid-run)."""
        c = self.cfg
        if self.accelerator is not None:
            self.memory_note = aot.preflight(c, self.accelerator, self.mesh, self.mcfg, self.relora, self.graphdef,
                                             self.state, self.objective)
        self.train_step = jit_train_step(self.graphdef, self.state, self.mesh, self.relora, c.data.grad_accum,
                                         c.train.nan_policy == "skip", self.objective)
        self.eval_step = jit_eval_step(self.graphdef)
        self.saver.compile(self.graphdef)

    @cached_property
    def peak(self) -> tuple[float, str]:
        """Peak FLOP/s of the devices and its source (measured on CPU: a second, hence only when first needed)."""
        return peak_flops(self.mcfg.dtype)

    @property
    def model(self) -> LanguageModel:
        return nnx.merge(self.graphdef, self.state)[0]

    def evaluate(self) -> dict:
        """<set>_loss and <set>_ppl of every validation set (val: the run's validation data; eval.sets)."""
        return self.evaluator.losses(self.eval_step, self.state)

    def check_finite(self, step: int):
        """Stop on a NaN / inf loss (train.nan_policy=stop) before anything is saved from the bad state."""
        bad = int(self.meter.bad)
        self.meter.bad = jnp.zeros(())
        if bad and self.cfg.train.nan_policy == "stop":
            self.ckpt.wait()
            raise TrainingError(f"the loss became NaN or inf in {bad} step(s) up to step {step}; the last good "
                                f"checkpoint is step {self.saved_step} in {self.ckpt.dir}; lower opt.peak_lr, check "
                                f"the data, or set train.nan_policy=skip")

    def save(self, step: int):
        """Checkpoint `step` (once), after checking that no step since the last one was NaN / inf."""
        self.check_finite(step)
        if step == self.saved_step and self.ckpt.latest_step() == step:
            return
        loop = dict(step=step, seed=self.cfg.seed, tokens_seen=self.tokens_seen(step),
                    eval=self.last_eval)  # the latest evaluation (val_loss, val_ppl and its step), if any
        self.saver.save(step, self.graphdef, self.state, loop)
        self.saved_step = step

    def log_train(self, step: int, bar):
        m, n, dt = self.meter.read()
        tp = throughput(self.tokens_seen(n), dt, self.mcfg, self.peak[0])  # the tokens of these n steps
        m.update(ppl=math.exp(min(m["loss"], 50.0)), lr=float(self.schedule(step - 1)),
                 tokens_per_s=tp["tokens_per_s"], mfu=tp["mfu"], tokens=self.tokens_seen(step))
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tp['tokens_per_s']:,.0f}", mfu=f"{m['mfu']:.1%}")
        self.record.train(step, m, bar)
        self.check_finite(step)

    def tokens_seen(self, step: int) -> int:
        return step * self.cfg.data.batch_size * self.mcfg.seq_len

    def between_steps(self, done: int, bar):
        """ReLoRA's wrap or merge-and-reset after step `done`, when its plan has one (nothing in full-rank runs)."""
        graphdef, self.state, event = self.relora.after_step(done, self.graphdef, self.state)
        if graphdef is not self.graphdef:
            self.graphdef = graphdef
            self.jit_steps()
        if event:
            self.record.log(event, done, bar)

    def start(self):
        """Run directory, banner, W&B."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.is_main:
            return
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (self.run_dir / "training_config.yaml").write_text(OmegaConf.to_yaml(training_config(cfg, self.mcfg)))
        peak, source = self.peak
        print(f"model: {self.n_params / 1e6:.2f}M params | mesh {dict(self.mesh.shape)} on {jax.device_count()} "
              f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es) | data {self.data_dir} "
              f"({self.train_rows.n_tokens:,} train tokens) | peak {peak / 1e12:.3g} TFLOP/s ({source})")
        tasks = f"eval.tasks={list(cfg.eval.tasks)} run on the final checkpoint after training (main.py; from " \
                "Python: lmeval.after_training(cfg, final))" if cfg.eval.tasks else None
        notes = [data.epochs_note(self.train_rows, cfg), tokenizer.note(self.tokenizer_path), self.init_note,
                 *self.mcfg.notes(), self.accum_note, self.memory_note, self.saver.dynamics_note, self.saver.hf_note,
                 tasks, *self.relora.notes(self.graphdef, self.state), self.mask_note,
                 *(self.objective.notes(self.model) if self.objective else ())]
        for note in notes:
            if note:
                print(note)
        self.record.start_wandb(cfg, self.n_params)

    def run(self) -> dict:
        cfg, steps = self.cfg, self.cfg.train.steps
        self.start()
        bar = tqdm(total=steps, initial=self.start_step, disable=not self.is_main, dynamic_ncols=True, mininterval=1.0)
        stopping = False
        with jax.set_mesh(self.mesh), StopSignal() as stop:
            self.save(self.start_step)  # step 0 of a new run
            batch = lambda s: self.train_data.batch(s, self.batch_sharding)
            batches = data.prefetch(batch, range(self.start_step, steps))
            for step, tokens in batches:
                self.state, m = self.train_step(self.state, tokens)
                self.meter.add(m)
                bar.update(1)
                done = step + 1
                self.between_steps(done, bar)
                is_log = done % cfg.train.log_every == 0 or done == steps
                if is_log:
                    self.log_train(done, bar)
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done != steps:
                    self.last_eval = dict(step=done, **self.evaluate())  # stored with the next checkpoint
                    self.record.log(self.last_eval, done, bar)
                    self.record.evaluation(done, self.last_eval, self.tokens_seen(done))
                stopping = stop.agreed(sync=is_log)  # every process stops at the same step
                every = cfg.checkpoint.every_steps
                if stopping or (every and done % every == 0 and done != steps):
                    self.save(done)
                if stopping:
                    break
        bar.close()
        if stopping:
            return self.finish(dict(step=self.saved_step, interrupted=stop.requested or "stop (another process)"))
        evals = self.evaluate()
        final = dict(step=steps, train_loss=self.record.history[-1]["loss"], **evals)
        self.last_eval = dict(step=steps, **evals)
        self.record.evaluation(steps, self.last_eval, self.tokens_seen(steps))
        self.save(steps)  # after the final evaluation, which it stores
        final["unigram_entropy"] = data.unigram_entropy(self.train_rows.sample(data.SCAN_LIMIT), self.mcfg.vocab_size)
        final.update(self.evaluator.diversity(self.model), params=self.n_params, tokens=self.tokens_seen(steps))
        self.record.log(final, steps)
        sample = self.evaluator.sample(self.model) if cfg.sample.max_new_tokens else None
        if self.is_main:
            print(f"validation loss {final['val_loss']:.3f} nats (perplexity {final['val_ppl']:.1f}) vs "
                  f"unigram entropy {final['unigram_entropy']:.3f} nats of the training tokens")
            if sample is not None:
                print(f"sample: {sample!r}")
        return self.finish(final)

    def wait_for_files(self):
        """Until every save under way is on disk (saving.Saver.wait)."""
        self.saver.wait()

    def finish(self, final: dict) -> dict:
        self.saver.finish()
        if self.is_main and final.get("interrupted"):
            print(f"{final['interrupted']}: saved step {final['step']} to {self.ckpt.dir}; run again to resume")
        self.record.finish(final)
        return final


def run(cfg: DictConfig) -> dict:
    return Trainer(cfg).run()
