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
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError

from config import brief


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
            raise CheckpointError(f"checkpoint {self.step_dir(step)} could not be read ({brief(e, 300)}); it is "
                                  f"truncated or corrupt: delete that folder to "
                                  f"resume from an earlier step ({self.all_steps()} present)") from None

    def wait(self):
        self.manager.wait_until_finished()
        self._link_latest()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) mirroring a state pytree: the target to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ---------------------------------------------------------------------------------------------- files off the loop

class Background:
    """One worker thread for what the step loop must not wait on (uploads, extra files); `wait` returns each job's
    result in order (a job reports its own failures: they never stop training)."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), []

    def submit(self, fn, *args):
        future = self.pool.submit(fn, *args)
        self.pending.append(future)
        return future

    def wait(self) -> list:
        done = [f.result() for f in self.pending]
        self.pending = []
        return done


def wait_for_dir(step_dir: Path, timeout_s: float = 1800):
    """Until Orbax has renamed a step's folder into place (it is complete then)."""
    deadline = time.monotonic() + timeout_s
    while not step_dir.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{step_dir} did not appear within {timeout_s:.0f} s")
        time.sleep(0.05)


def into_step_dir(step_dir: Path, sub: str, write, what: str, timeout_s: float = 1800) -> bool:
    """Files that belong in a checkpoint's folder (step_dir / sub) beside Orbax's items: wait until Orbax has renamed
    step_dir into place (it is complete then), let write(tmp) make them in a temporary folder inside it, and move
    them in, config.json last. For a background thread: a failure (a full disk, the step pruned by checkpoint.keep
    meanwhile) is a warning, and the Orbax checkpoint is left as it was."""
    try:
        wait_for_dir(step_dir, timeout_s)
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
        print(f"warning: {what} were not written ({brief(e)}); its Orbax "
              f"checkpoint is complete")
        return False


# ---------------------------------------------------------------------------------------------- Hugging Face Hub

HF_MODEL = ("config.json", "model.safetensors", "generation_config.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ORBAX = "checkpoint"  # the Orbax items' folder in the repository


class HubUploader(Background):
    """Pushes every checkpoint to the Hub (checkpoint.hf_repo_id) as pico-train does (SPEC §5): one branch per run,
    the files at the branch root (overwritten each step; the history keeps every version), one commit per kind
    titled `Saving HF Model -- Step k`, `Saving Tokenizer -- Step k`, `Saving Training Config -- Step k`,
    `Saving Checkpoint -- Step k` (the Orbax items, under checkpoint/), `Saving Learning Dynamics Data (train) --
    Step k` and `(val)`, and a tag `step-<k>` on the step's last commit: `from_pretrained(repo, revision="step-k")`
    loads it and pico-analyze's remote mode finds it. Uploads run on one background thread that waits for the
    step's files itself, so the step loop never waits; a failed upload is logged and retried (in step order, so the
    branch ends at the newest) with the next one and at the end of the run. The token comes from the environment
    only (HF_TOKEN, or huggingface_hub's own login)."""

    def __init__(self, repo_id: str, branch: str, run_dir, endpoint: str | None = None):
        super().__init__()
        self.api = HfApi(endpoint=endpoint)
        self.repo_id, self.branch, self.run_dir, self.ready = repo_id, branch, Path(run_dir), False
        self.failed: dict[int, tuple] = {}  # step -> the arguments of its upload, retried with the next one
        self.uploaded: list[int] = []
        self.lost: list[int] = []  # steps whose folder was gone (checkpoint.keep) before they could be retried

    def upload(self, step: int, step_dir: Path, dynamics_dir: Path, files=()):
        """Push `step` once its Orbax folder is in place and the `files` futures (its HF and pico files) are done."""
        self.submit(self._upload_all, step, (Path(step_dir), Path(dynamics_dir), tuple(f for f in files if f)))

    def _upload_all(self, step, args):
        self.failed[step] = args
        for s in sorted(self.failed):
            try:
                self._upload(s, *self.failed[s])
                self.uploaded.append(s)
                del self.failed[s]
            except Exception as e:  # the Hub being down must never stop training
                if not self.failed[s][0].is_dir():
                    self.lost.append(s)
                    del self.failed[s]
                    print(f"warning: Hub upload of step {s} to {self.repo_id}@{self.branch} failed and its folder "
                          f"is gone (checkpoint.keep pruned it); it will not be retried")
                    continue
                print(f"warning: Hub upload of step {s} to {self.repo_id}@{self.branch} failed ({brief(e)}); "
                      f"training goes on, retried with the next checkpoint")
                break  # the later steps wait, so that the branch never ends at an older one

    def _commit(self, title: str, files: dict, folder: str | None = None) -> str | None:
        """One commit of {path in repo: local path}; files under `folder` in the repo that it does not hold are
        removed (Orbax's file names change from step to step)."""
        if not files:
            return None
        ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for dest, src in files.items()]
        if folder:
            remote = self.api.list_repo_files(self.repo_id, revision=self.branch)
            ops += [CommitOperationDelete(path_in_repo=f) for f in remote
                    if f.startswith(folder + "/") and f not in files]
        return self.api.create_commit(self.repo_id, ops, commit_message=title, revision=self.branch).oid

    def _upload(self, step, step_dir, dynamics_dir, files):
        for f in files:
            f.result()  # the step's HF and pico files are in place (or were reported missing)
        wait_for_dir(step_dir)
        if not self.ready:
            self.api.create_repo(self.repo_id, exist_ok=True)
            self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            self.ready = True
        here = lambda names, root=step_dir: {n: root / n for n in names if (root / n).is_file()}
        orbax = {f"{ORBAX}/{p.relative_to(step_dir)}": p for p in sorted(step_dir.rglob("*")) if p.is_file()
                 and p.relative_to(step_dir).parts[0] not in (*HF_MODEL, *TOKENIZER, "learning_dynamics")
                 and not any(part.startswith(".") for part in p.relative_to(step_dir).parts)}
        commits = [(f"Saving HF Model -- Step {step}", here(HF_MODEL), None),
                   (f"Saving Tokenizer -- Step {step}", here(TOKENIZER), None),
                   (f"Saving Training Config -- Step {step}", here(["training_config.yaml"], self.run_dir), None),
                   (f"Saving Checkpoint -- Step {step}", orbax, ORBAX)]
        for split, title in (("train", "train"), ("eval", "val")):  # pico's .pt files and picojax's safetensors
            pico = sorted((step_dir / "learning_dynamics").glob(f"{title}_*.pt"))
            ours = [dynamics_dir / f"{split}.safetensors"]
            dyn = {f"learning_dynamics/{p.name}": p for p in [*pico, *ours] if p.is_file()}
            commits.append((f"Saving Learning Dynamics Data ({title}) -- Step {step}", dyn, None))
        last = None
        for title, paths, folder in commits:
            last = self._commit(title, paths, folder) or last
        if last:
            try:
                self.api.create_tag(self.repo_id, tag=f"step-{step}", revision=last)
            except HfHubHTTPError as e:
                if e.response is None or e.response.status_code != 409:
                    raise
                print(f"note: {self.repo_id} already has a tag step-{step} (another run's: tags are per repository); "
                      f"this run's step {step} is commit {last} on branch {self.branch}")

    def finish(self) -> str:
        """Wait for the uploads under way, retry the failed ones once more, and say how it went."""
        self.wait()
        if self.failed:
            self.submit(self._upload_all, max(self.failed), self.failed[max(self.failed)])
            self.wait()
        where = f"{self.repo_id}@{self.branch}"
        line = f"Hub: steps {self.uploaded} on {where} (tags step-<k>)"
        if self.failed or self.lost:
            line += (f"; NOT uploaded: steps {sorted(self.failed) + self.lost}; their checkpoints are on disk: push "
                     f"one with `hf upload {self.repo_id} <run_dir>/checkpoints/step_<k> . --revision {self.branch}`")
        return line
