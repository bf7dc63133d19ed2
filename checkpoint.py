"""Orbax checkpoints of a run (the sharded train state, the loop state, the resolved config) and the
learning-dynamics snapshots taken with each of them.

Layout: <checkpoint.dir>/<step>/{state, loop, config}. `state` is the nnx state of (model, optimizer), params
and Adam moments, restored with the shardings of the current mesh; `loop` is JSON (step, seed, tokens seen, the
latest evaluation; the data position is the step, since the batch is a pure function of (seed, step)); `config` is the resolved run
config as JSON, so `load(dir)` needs nothing but the directory. Orbax writes each step into a temporary folder
and renames it when complete, so a process killed mid-save leaves the earlier checkpoints intact.

Learning dynamics (SPEC §3), computed with the step's parameters inside one jitted function and written to
<run_dir>/learning_dynamics/<step>/{train,eval}.safetensors (readable with `safetensors` or numpy alone):
    activations/blocks.<i>.<layer>  [N, out]  the layer's output at the last token of each sequence
    weights/blocks.<i>.<layer>      [in, out] its kernel (y = x @ W; for a ReLoRA layer W + scale (B A)^T)
    weights_base/blocks.<i>.<layer>   [in, out] ReLoRA layers only: the frozen W (earlier merges included)
    weights_update/blocks.<i>.<layer> [in, out] ReLoRA layers only: scale (B A)^T, the current branch (0 right
                                      after a merge-and-reset); base + update == weights exactly
    gradients/blocks.<i>.<layer>    [in, out] d loss / d kernel on that batch
    tokens                          [N, T+1]  the batch itself (train split only)
`train` is the batch the trainer draws at that step (the one the next update uses); `eval` is the first
eval.batch_size sequences of valid.bin, the same at every step. Layers: checkpoint.dynamics.layers per block.
"""
import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf



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
            # the frozen configs of both (each model.kind's own fields; keys a checkpoint predates take their
            # defaults), less what does not change the parameters
            saved, now = (model_fields(m) for m in (self.config(step)["model"], model_config))
            diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                    and k not in ("dtype", "attention", "remat", "scan_layers", "loss_chunk")}
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


def model_fields(block) -> dict:
    """The `model:` config block as its family's frozen config fields named by their config keys (`lstm.d_hidden`
    for model.lstm.d_hidden), with `kind`."""
    import train
    from families import SHARED
    cfg = train.model_config(block)
    sub = "" if cfg.KIND == "decoder" else cfg.SUB + "."
    return dict(kind=cfg.KIND, **{(k if k in SHARED else sub + k): v for k, v in dataclasses.asdict(cfg).items()})


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
    if cfg.model.get("attention") == "cudnn":  # a GPU run's setting; auto still takes cuDNN on a GPU, XLA elsewhere
        cfg.model.attention = "auto"
    trainer = train.Trainer(cfg, build_data=False, resume=False)
    trainer.wrap_for(step)
    trainer.state, loop = ckpts.restore(step, abstract_like(trainer.state))
    return trainer.model, cfg, loop


# ---------------------------------------------------------------------------------------------- learning dynamics

def dynamics_step(graphdef, state, tokens, layers: tuple[str, ...]) -> dict:
    """Activations at the last token, kernels and loss gradients of `layers` (e.g. "attention.v") in every
    block, for the batch tokens [N, T + 1]. Intermediates come from nnx.capture, so nothing is sown into the
    model and the jitted function compiles once."""
    model, _ = nnx.merge(graphdef, state)
    # every kernel, trained or not: a ReLoRA layer's frozen W gets d loss / dW, which is d loss / d(W + scale B A)
    model_def, params, rest = nnx.split(model, nnx.Any(nnx.Param, nnx.PathContains("kernel")), ...)

    def loss(params):
        m = nnx.merge(model_def, params, rest)
        logits, inter = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), inter

    (_, inter), grads = jax.value_and_grad(loss, has_aux=True)(params)
    out = {}
    for i in range(len(model.blocks)):
        for layer in layers:
            path, name = ("blocks", i, *layer.split(".")), f"blocks.{i}.{layer}"
            node = lambda tree: _at(tree, path)
            out[f"activations/{name}"] = node(inter)["__call__"][0][:, -1, :]
            layer_module = _at(model, path, getattr)
            if hasattr(layer_module, "merged_kernel"):  # a ReLoRA layer: W and scale (B A)^T; save_dynamics adds them
                out[f"weights_base/{name}"], out[f"weights_update/{name}"] = layer_module.kernel[...], layer_module.update()
            else:
                out[f"weights/{name}"] = node(params)["kernel"][...]
            out[f"gradients/{name}"] = node(grads)["kernel"][...]
    return out


def _at(tree, path, get_name=lambda t, p: t[p]):
    """Walk a path of names and list indices through a state (or, with getattr, a module)."""
    for p in path:
        tree = tree[p] if isinstance(p, int) else get_name(tree, p)
    return tree


def save_dynamics(directory, split: str, arrays: dict, tokens=None):
    """Write one split's arrays as safetensors, atomically; called on every process, process 0 writes."""
    from safetensors.numpy import save_file
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        arrays = multihost_utils.process_allgather(arrays, tiled=True)
        tokens = None if tokens is None else multihost_utils.process_allgather(tokens, tiled=True)
    if jax.process_index() != 0:
        return
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in jax.device_get(arrays).items()}
    for key in [k for k in arrays if k.startswith("weights_base/")]:
        # a ReLoRA layer's kernel W + scale (B A)^T, summed here so that the stored terms add up to it exactly
        # (inside XLA the add fuses with the scale into an FMA, an ulp away from the sum of the rounded terms)
        name = key.partition("/")[2]
        arrays[f"weights/{name}"] = arrays[key] + arrays[f"weights_update/{name}"]
    if tokens is not None:
        arrays["tokens"] = np.asarray(jax.device_get(tokens)).astype(np.int32)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{split}.safetensors.tmp"
    save_file(arrays, str(tmp))
    os.replace(tmp, directory / f"{split}.safetensors")


def load_dynamics(run_dir, step: int) -> dict:
    """The learning-dynamics snapshot of `step` as numpy arrays keyed (split, kind, layer); the training
    batch's token ids under ("train", "tokens", None)."""
    from safetensors.numpy import load_file
    root = Path(run_dir).expanduser() / "learning_dynamics" / str(step)
    if not root.is_dir():
        steps = sorted(int(p.name) for p in root.parent.glob("*") if p.name.isdigit()) if root.parent.exists() else []
        raise CheckpointError(f"no learning-dynamics data for step {step} in {root.parent} (steps present: {steps})")
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        for key, value in load_file(str(f)).items():
            kind, _, layer = key.partition("/")
            out[(f.stem, kind, layer or None)] = value
    return out


# ---------------------------------------------------------------------------------------------- Hugging Face Hub

class HubUploader:
    """Pushes each checkpoint and its learning dynamics to the Hub (checkpoint.hf_repo_id), one branch per run,
    with pico's commit titles (`Saving Learning Dynamics Data (train) -- Step k`, which pico-analyze reads).
    Uploads run in one background thread; a failure is a warning and training goes on. The token comes from
    the environment only (HF_TOKEN, or huggingface_hub's own login)."""

    def __init__(self, repo_id: str, branch: str, endpoint: str | None = None):
        from concurrent.futures import ThreadPoolExecutor
        from huggingface_hub import HfApi
        self.api = HfApi(endpoint=endpoint)
        self.repo_id, self.branch, self.ready = repo_id, branch, False
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = []

    def upload(self, step: int, checkpoint_dir, dynamics_dir):
        self.pending.append(self.pool.submit(self._upload, step, Path(checkpoint_dir), Path(dynamics_dir)))

    def _upload(self, step, checkpoint_dir, dynamics_dir):
        try:
            if not self.ready:
                self.api.create_repo(self.repo_id, exist_ok=True)
                self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
                self.ready = True
            if checkpoint_dir.is_dir():
                self.api.upload_folder(repo_id=self.repo_id, folder_path=checkpoint_dir, revision=self.branch,
                                       path_in_repo=f"checkpoints/{step}", commit_message=f"Saving Checkpoint -- Step {step}")
            for split, title in (("train", "train"), ("eval", "val")):
                f = dynamics_dir / f"{split}.safetensors"
                if f.exists():
                    self.api.upload_file(path_or_fileobj=str(f), repo_id=self.repo_id, revision=self.branch,
                                         path_in_repo=f"learning_dynamics/{step}/{split}.safetensors",
                                         commit_message=f"Saving Learning Dynamics Data ({title}) -- Step {step}")
            return True
        except Exception as e:  # the Hub being down must never stop training
            print(f"warning: Hub upload of step {step} to {self.repo_id}@{self.branch} failed "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); training goes on")
            return False

    def wait(self) -> list[bool]:
        done = [f.result() for f in self.pending]
        self.pending = []
        return done
