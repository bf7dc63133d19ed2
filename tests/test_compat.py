"""Runs written by earlier versions of main keep loading, resuming and analyzing: tests/fixtures/run_3ea8e0e holds a
full-rank and a ReLoRA run made by commit 3ea8e0e (on 1 device; restored here on 8), with what that commit computed
(make_run_3ea8e0e.py)."""
import json
import shutil

import numpy as np
import pytest

import analyze
import train
import train_state
from conftest import ROOT, make_cfg

FIXTURE = ROOT / "tests" / "fixtures" / "run_3ea8e0e"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def copy_run(name, tmp_path):
    run = tmp_path / name
    shutil.copytree(FIXTURE / name, run)
    return run


@pytest.mark.parametrize("name", ["full", "relora"])
def test_an_old_run_loads_with_the_same_logits(name, tmp_path):
    model, cfg, loop = train_state.load(copy_run(name, tmp_path))
    assert loop["step"] == EXPECTED[name]["step"] == 4
    logits = np.asarray(model(np.load(FIXTURE / "tokens.npy")))
    np.testing.assert_allclose(logits, np.asarray(EXPECTED[name]["logits"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["full", "relora"])
def test_an_old_run_resumes_where_it_stopped(name, tmp_path):
    e = EXPECTED[name]
    run = copy_run(name, tmp_path)
    cfg = make_cfg(*e["overrides"], f"data.dir={FIXTURE / 'data'}", f"run_dir={run}", "train.steps=6",
                   config=e["config"])
    trainer = train.Trainer(cfg)
    assert trainer.start_step == 4
    final = trainer.run()
    # the same numbers 3ea8e0e got by resuming it (on 1 device; 8 here sum in another order)
    assert final["train_loss"] == pytest.approx(e["resumed_to_6"]["train_loss"], rel=1e-5)
    assert final["val_loss"] == pytest.approx(e["resumed_to_6"]["val_loss"], rel=1e-5)
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [h["step"] for h in e["history_to_6"]] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in e["history_to_6"]], rel=1e-5)


def test_an_old_run_is_analyzed(tmp_path):
    run = copy_run("relora", tmp_path)
    out = analyze.analyze(run, metrics=["per"], steps=[4], out=tmp_path / "analysis")
    weights = out["per"][4]["weights"]
    assert 0 < weights["blocks.0.attention.v"] <= 1 and "blocks.1.swiglu.down.update" in weights
