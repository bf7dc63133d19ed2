"""Learning-dynamics snapshot files (SPEC §3): where they live, how they are written and read back.

A module of its own, apart from dynamics.py (which computes snapshots with jax), so that analyze.py and anyone
with numpy and safetensors alone can read a run's snapshots on a laptop, with no jax, orbax or flax imported.

    <run_dir>/learning_dynamics/<step>/{train,eval}.safetensors
    activations/blocks.<i>.<layer>     [N, out]  the layer's output at the last token of each sequence
    weights/blocks.<i>.<layer>         [in, out] its kernel (y = x @ W; a ReLoRA layer: W + scale (B A)^T)
    weights_base/blocks.<i>.<layer>    [in, out] ReLoRA layers only: the frozen W (earlier merges included)
    weights_update/blocks.<i>.<layer>  [in, out] ReLoRA layers only: scale (B A)^T, the current branch (0 right
                                       after a merge-and-reset); base + update == weights exactly
    gradients/blocks.<i>.<layer>       [in, out] d loss / d kernel on that batch
    tokens                             [N, T+1]  the batch itself (train split only)
`train` is the batch the trainer draws at that step (the one the next update uses); `eval` is the first
eval.batch_size sequences of valid.bin, the same at every step. Layers: checkpoint.dynamics.layers per block.

With checkpoint.dynamics.format=pico, the same arrays are also written as pico-train writes them (SPEC §5), for
pico-analyze: <run_dir>/checkpoints/step_<k>/learning_dynamics/{train,val}_{activations,weights,gradients}.pt,
torch.save dicts keyed by pico-train's module names (`layers.<i>.attention.v_proj`, `layers.<i>.swiglu.w_2`, ...),
weights and gradients in PyTorch's [out, in], activations [N, out]; the eval split is `val`. A pico-train run
(those files and no picojax snapshots) reads back through `stored_steps` and `load` the same way, in picojax's
names and layout, so analyze.py covers the released pico suite too (torch needed then).
"""
import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from config import BLOCK_LINEARS

SPLITS = ("train", "eval")


class SnapshotError(ValueError):
    """Snapshots that are not there; the message names the folder and the steps present."""


def step_dir(run_dir, step: int) -> Path:
    return Path(run_dir).expanduser() / "learning_dynamics" / str(step)


def pico_dir(run_dir, step: int) -> Path:
    return Path(run_dir).expanduser() / "checkpoints" / f"step_{step}" / "learning_dynamics"


def stored_steps(run_dir) -> list[int]:
    """The steps with at least one snapshot file, ascending: picojax's own, or else pico-train's .pt files."""
    root = Path(run_dir).expanduser()
    ours = sorted(int(p.name) for p in (root / "learning_dynamics").glob("*")
                  if p.name.isdigit() and any(p.glob("*.safetensors")))
    return ours or sorted(int(p.name.removeprefix("step_")) for p in (root / "checkpoints").glob("step_*")
                          if p.name.removeprefix("step_").isdigit() and any((p / "learning_dynamics").glob("*.pt")))


def complete(arrays: dict) -> dict:
    """dynamics_step's arrays (numpy, keyed `<kind>/<layer>`) with each ReLoRA layer's `weights/...` summed here from
    its base and update, so that the stored terms add up to it exactly (inside XLA the add fuses with the scale
    into an FMA, an ulp away from the sum of the rounded terms)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    for key in [k for k in arrays if k.startswith("weights_base/")]:
        name = key.partition("/")[2]
        arrays[f"weights/{name}"] = arrays[key] + arrays[f"weights_update/{name}"]
    return arrays


def write(directory, split: str, arrays: dict, tokens=None):
    """One split's `complete` arrays as `<split>.safetensors`, atomically."""
    arrays = dict(arrays)
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens).astype(np.int32)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{split}.safetensors.tmp"
    save_file(arrays, str(tmp))
    os.replace(tmp, directory / f"{split}.safetensors")


PICO_SPLITS = {"train": "train", "eval": "val"}
PICO_KINDS = ("activations", "weights", "gradients")


def write_pico(directory, split: str, arrays: dict, pico_names: dict):
    """One split's `complete` arrays as pico-train's three .pt files in `directory`; pico_names maps a block layer
    (attention.v) to pico-train's module name (attention.v_proj). torch is needed here only."""
    import torch
    directory = Path(directory)
    for kind in PICO_KINDS:
        out = {}
        for key, value in arrays.items():
            k, _, name = key.partition("/")
            if k == kind:
                _, i, layer = name.split(".", 2)  # blocks.<i>.<layer>
                out[f"layers.{i}.{pico_names[layer]}"] = torch.from_numpy(  # a writable copy, as torch wants
                    np.array(value if kind == "activations" else value.T, order="C"))
        torch.save(out, directory / f"{PICO_SPLITS[split]}_{kind}.pt")


PICO_LAYERS = {pico: ours for ours, (_, pico) in BLOCK_LINEARS.items() if pico}  # attention.v_proj -> attention.v


def load_pico(directory) -> dict:
    """pico-train's learning_dynamics/{train,val}_{activations,weights,gradients}.pt as `load` returns snapshots:
    keyed (train | eval, kind, blocks.<i>.<layer>) in picojax's layout ([in, out] matrices). Keys are found as
    pico-analyze finds them, by `layers.<i>.<module>` after any prefix (`_forward_module.`); a module picojax has
    no name for keeps pico-train's. q_proj / k_proj rows stay in pico's interleaved-RoPE order: every metric here
    is the same under that permutation."""
    try:
        import torch
    except ImportError:
        raise SnapshotError(f"{directory} holds pico-train's .pt files: reading them needs torch (pip install torch "
                            f"--index-url https://download.pytorch.org/whl/cpu)") from None
    out = {}
    for split, pico in PICO_SPLITS.items():
        for kind in PICO_KINDS:
            f = Path(directory) / f"{pico}_{kind}.pt"
            if not f.exists():
                continue
            for key, value in torch.load(f, map_location="cpu", weights_only=True).items():
                m = re.search(r"(?:^|\.)layers\.(\d+)\.(.+)$", key)
                if m is None:
                    raise SnapshotError(f"{f}: key {key!r} is not `layers.<i>.<module>`; is it pico-train's file?")
                a = value.float().numpy()
                out[(split, kind, f"blocks.{m.group(1)}.{PICO_LAYERS.get(m.group(2), m.group(2))}")] = \
                    a if kind == "activations" else np.ascontiguousarray(a.T)
    return out


def load(run_dir, step: int) -> dict:
    """The snapshot of `step` as numpy arrays keyed (split, kind, layer); the training batch's token ids under
    ("train", "tokens", None). A pico-train run's (no picojax snapshots): `load_pico`."""
    root = step_dir(run_dir, step)
    if not root.is_dir() and pico_dir(run_dir, step).is_dir():
        return load_pico(pico_dir(run_dir, step))
    if not root.is_dir():
        raise SnapshotError(f"no learning-dynamics data for step {step} in {root.parent} (steps present: "
                            f"{stored_steps(run_dir)})")
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        for key, value in load_file(str(f)).items():
            kind, _, layer = key.partition("/")
            out[(f.stem, kind, layer or None)] = value
    return out
