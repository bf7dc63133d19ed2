"""train_colab.ipynb runs headless, unchanged, on CPU: a tiny config goes in through PICOJAX_OVERRIDES."""
import json
import os
import sys

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

TINY_NOTEBOOK = [  # on top of configs/colab.yaml: seconds on one CPU device
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.seq_len=32",
    "model.dtype=float32", "data.batch_size=8", "train.steps=5", "train.log_every=5", "opt.warmup_steps=1",
    "eval.every_steps=0", "eval.batch_size=8", "eval.max_tokens=1024", "checkpoint.every_steps=0",
    "checkpoint.dynamics.layers=[]", "wandb.mode=disabled", "sample.max_new_tokens=8", "sample.n_samples=4",
]


def test_notebook_trains_and_samples_headless(corpus_cache, tmp_path, monkeypatch):
    # the kernel is this interpreter (the test environment's python), whatever kernels the machine has
    kernels = tmp_path / "jupyter" / "kernels" / "picojax-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps(dict(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="picojax test", language="python")))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a plain runtime
    run_dir = tmp_path / "run"
    env.update(JAX_PLATFORMS="cpu", PICOJAX_OVERRIDES=" ".join(
        [*TINY_NOTEBOOK, f"data.cache_dir={corpus_cache}", f"run_dir={run_dir}"]))

    nb = nbformat.read(ROOT / "train_colab.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="picojax-test", timeout=240,
                   resources={"metadata": {"path": str(ROOT)}}).execute(env=env)

    out = {i: "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in c.get("outputs", []))
           for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(out.values())
    assert "not Colab" in text  # the setup cell installs nothing here
    assert "d_model: 32" in text and "distinct_5" in text
    assert json.loads((run_dir / "metrics.json").read_text())["final"]["step"] == 5
    last = list(out.values())[-1].split("\n\n")
    assert [t[:len(p)] for t, p in zip(last, ["The", "In 1900", "The river"])] == ["The", "In 1900", "The river"]
