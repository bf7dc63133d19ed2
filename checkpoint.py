"""Orbax checkpoints of a run (the sharded train state, the loop state, the resolved config), and their upload to
the Hugging Face Hub.

Layout, pico-train's (SPEC §5): <checkpoint.dir>/step_<k>/{state, loop, config} and a link `latest -> step_<k>`
to the newest complete one; a checkpoint dir written before picojax took that layout (<checkpoint.dir>/<k>/) keeps
its own, so old runs resume and load as they are. `state` is the nnx state of (model, optimizer), params and
Adam moments, restored with the shardings of the current mesh; `loop` is JSON (step, seed, tokens seen, the latest
evaluation; the data position is the step, since the batch is a pure function of (seed, step)); `config` is the
resolved run config as JSON, so a checkpoint directory alone says what to build (state.load). Orbax writes each
step into a temporary folder and renames it when complete, so a process killed mid-save leaves the earlier
checkpoints intact. Nothing here knows the model: state.py builds the layout to restore into and decides whether a
checkpoint fits the run.
"""
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from huggingface_hub import HfApi


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the fix."""


class Checkpoints:
    def __init__(self, directory, keep: int | None = 3, use_async: bool = True):
        self.dir = Path(directory).expanduser().absolute()
        # a folder of <k>/ checkpoints (picojax before pico's layout) stays in that layout
        old = self.dir.is_dir() and any(p.name.isdigit() and p.is_dir() for p in self.dir.iterdir())
        self.prefix = None if old else "step"
        self.pending = None  # the step whose asynchronous save is under way
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{jax.process_index()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.dir} is not writable ({e.strerror}); set run_dir "
                                  f"(or checkpoint.dir) to a folder you can write") from None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async,
                                               step_prefix=self.prefix)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def step_dir(self, step: int) -> Path:
        return self.dir / (f"{self.prefix}_{step}" if self.prefix else str(step))

    def _link_latest(self):
        """After orbax finished (and renamed into place) the pending step's folder: point `latest` at it,
        atomically. Called once the save is known to be complete: at the next save and at `wait`, so that
        `latest` always names a complete checkpoint."""
        step, self.pending = self.pending, None
        link = self.dir / "latest"
        if step is None or jax.process_index() != 0 or not self.step_dir(step).is_dir() \
                or (link.exists() and not link.is_symlink()):  # a real folder named latest is the user's: kept
            return
        tmp = self.dir / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.step_dir(step).name)
        os.replace(tmp, link)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, loop: dict, config: dict):
        """Start saving (asynchronously where enabled); earlier checkpoints stay until this one is complete, and
        `latest` moves to it once it is."""
        self.wait()  # one save at a time (orbax waits too), so `pending` names the one under way
        self.pending = step
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop), config=ocp.args.JsonSave(config)))

    def config(self, step: int) -> dict:
        return self._restore(step, config=ocp.args.JsonRestore()).config

    def restore(self, step: int, abstract_state):
        """(state, loop) of `step`, placed as `abstract_state` says (ShapeDtypeStructs with shardings)."""
        r = self._restore(step, state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore())
        return r.state, r.loop

    def _restore(self, step, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # orbax / tensorstore errors on truncated or corrupt files
            raise CheckpointError(f"checkpoint {self.step_dir(step)} could not be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); it is truncated or corrupt: delete that folder to "
                                  f"resume from an earlier step ({self.all_steps()} present)") from None

    def wait(self):
        self.manager.wait_until_finished()
        self._link_latest()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) mirroring a state pytree: the target to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ---------------------------------------------------------------------------------------------- Hugging Face Hub

class Background:
    """One worker thread for what the step loop must not wait on (uploads, extra files); `wait` returns each job's
    result in order (a job reports its own failures: they never stop training)."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), []

    def submit(self, fn, *args):
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> list:
        done = [f.result() for f in self.pending]
        self.pending = []
        return done


def into_step_dir(step_dir: Path, sub: str, write, what: str, timeout_s: float = 1800) -> bool:
    """Files that belong in a checkpoint's folder (step_dir / sub) beside Orbax's items: wait until Orbax has renamed
    step_dir into place (it is complete then), let write(tmp) make them in a temporary folder inside it, and move
    them in, config.json last. For a background thread: a failure (a full disk, the step pruned by checkpoint.keep
    meanwhile) is a warning, and the Orbax checkpoint is left as it was."""
    try:
        deadline = time.monotonic() + timeout_s
        while not step_dir.is_dir():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{step_dir} did not appear within {timeout_s:.0f} s")
            time.sleep(0.05)
        dest = step_dir / sub
        tmp = step_dir / f".{sub or 'files'}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        dest.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, dest / f.name)
        tmp.rmdir()
        return True
    except Exception as e:
        print(f"warning: {what} were not written ({type(e).__name__}: {str(e).splitlines()[0][:200]}); its Orbax "
              f"checkpoint is complete")
        return False


class HubUploader(Background):
    """Pushes each checkpoint and its learning dynamics to the Hub (checkpoint.hf_repo_id), one branch per run,
    with pico's commit titles (`Saving Learning Dynamics Data (train) -- Step k`, which pico-analyze reads).
    Uploads run in one background thread; a failure is a warning and training goes on. The token comes from
    the environment only (HF_TOKEN, or huggingface_hub's own login)."""

    def __init__(self, repo_id: str, branch: str, endpoint: str | None = None):
        super().__init__()
        self.api = HfApi(endpoint=endpoint)
        self.repo_id, self.branch, self.ready = repo_id, branch, False

    def upload(self, step: int, checkpoint_dir, dynamics_dir):
        self.submit(self._upload, step, Path(checkpoint_dir), Path(dynamics_dir))

    def _upload(self, step, checkpoint_dir, dynamics_dir):
        try:
            if not self.ready:
                self.api.create_repo(self.repo_id, exist_ok=True)
                self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
                self.ready = True
            if checkpoint_dir.is_dir():
                self.api.upload_folder(repo_id=self.repo_id, folder_path=checkpoint_dir, revision=self.branch,
                                       path_in_repo=f"checkpoints/{step}",
                                       commit_message=f"Saving Checkpoint -- Step {step}")
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
