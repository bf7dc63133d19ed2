"""The Hub in pico-train's convention, against a local stand-in for the Hub's HTTP API (no network): one branch per
run, pico's commit titles, the files at the branch root, a tag per step that `from_pretrained(revision=...)` loads,
a failed upload retried, and a loop that never waits on an upload."""
import re
import socket
import threading
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

import checkpoint
import train
from hub_standin import Hub

TITLES = ["Saving HF Model -- Step {}", "Saving Tokenizer -- Step {}", "Saving Training Config -- Step {}",
          "Saving Checkpoint -- Step {}", "Saving Learning Dynamics Data (train) -- Step {}",
          "Saving Learning Dynamics Data (val) -- Step {}"]


@pytest.fixture
def hub(monkeypatch):
    hub = Hub()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_from_the_environment")
    for name, value in (("ENDPOINT", hub.url), ("HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/"
                                                "{revision}/{filename}")):  # what from_pretrained reaches
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    yield hub
    hub.close()


def test_each_checkpoint_goes_to_the_run_branch_as_pico_train_pushes_it(hub, tiny_cfg, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    gate, seen_at_finish = threading.Event(), []
    upload = checkpoint.HubUploader._upload

    def gated(self, *args):  # every upload waits until the loop has reached the end of the run
        assert gate.wait(120), "the loop waited on an upload"
        return upload(self, *args)

    def finish(self, final):
        seen_at_finish.append(list(self.saver.hub.uploaded))
        gate.set()
        return train.Trainer.finish.__wrapped__(self, final)

    finish.__wrapped__ = train.Trainer.finish
    monkeypatch.setattr(checkpoint.HubUploader, "_upload", gated)
    monkeypatch.setattr(train.Trainer, "finish", finish)
    hub.fail_next = 1  # step 0's first commit fails: it is retried with step 2's upload
    cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=0", "name=run-a", "checkpoint.hf_repo_id=me/pico",
                   f"checkpoint.hf_endpoint={hub.url}", "checkpoint.dynamics.layers=[attention.v]",
                   "checkpoint.dynamics.format=pico")
    train.Trainer(cfg).run()
    out = capsys.readouterr().out
    assert seen_at_finish == [[]]  # nothing was uploaded while the loop ran: it never waited
    assert "warning: Hub upload of step 0 to me/pico@run-a failed" in out
    assert "Hub: steps [0, 2] on me/pico@run-a" in out

    repo = hub.repos["me/pico"]
    titles = hub.titles("me/pico", "run-a")[::-1]  # oldest first
    assert titles == ["initial commit"] + [t.format(k) for k in (0, 2) for t in TITLES]
    assert hub.titles("me/pico", "main") == ["initial commit"]  # the run's branch only
    head = repo.commits[repo.branches["run-a"]]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_config.yaml",
            "learning_dynamics/val_weights.pt", "learning_dynamics/train.safetensors",
            "checkpoint/loop/metadata"} <= set(head)
    assert repo.tags["step-2"] == repo.branches["run-a"] and set(repo.tags) == {"step-0", "step-2"}

    # from_pretrained(revision="step-k") loads that step: the same logits as its local folder
    cache, ids = tmp_path / "hf-cache", torch.tensor([[1, 5, 9, 2, 7]])
    logits = {}
    for step in (0, 2):
        remote = transformers.AutoModelForCausalLM.from_pretrained("me/pico", revision=f"step-{step}", cache_dir=cache)
        local = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"run/checkpoints/step_{step}")
        with torch.no_grad():
            logits[step] = remote(ids).logits.numpy()
            np.testing.assert_array_equal(logits[step], local(ids).logits.numpy())
    assert not np.allclose(logits[0], logits[2])
    tok = transformers.AutoTokenizer.from_pretrained("me/pico", revision="step-2", cache_dir=cache)
    assert tok.eos_token == "<|endoftext|>"

    # pico-analyze's remote mode: its title pattern over the branch's commits, then a snapshot of that commit
    api = huggingface_hub.HfApi(endpoint=hub.url)
    for split in ("train", "val"):
        found = {int(m.group(1)): c.commit_id for c in api.list_repo_commits("me/pico", revision="run-a")
                 if (m := re.search(rf"Saving Learning Dynamics Data \({split}\) -- Step (\d+)", c.title))}
        assert sorted(found) == [0, 2]
        snap = huggingface_hub.snapshot_download("me/pico", revision=found[0], cache_dir=cache)
        assert all((Path(snap) / f"learning_dynamics/{split}_{kind}.pt").is_file()
                   for kind in ("activations", "weights", "gradients"))
        assert (Path(snap) / "training_config.yaml").is_file()


def test_unreachable_hub_warns_and_training_goes_on(tiny_cfg, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=0", "checkpoint.hf_repo_id=me/pico",
                   f"checkpoint.hf_endpoint=http://127.0.0.1:{port}")
    final = train.Trainer(cfg).run()
    assert final["step"] == 2 and "val_loss" in final
    out = capsys.readouterr().out
    assert "warning: Hub upload of step 0 to me/pico@" in out and "training goes on" in out
    assert "NOT uploaded: steps [0, 2]" in out and "hf upload me/pico" in out
