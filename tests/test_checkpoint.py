"""Checkpoints: exact resume, preemption and faults, bad checkpoints, loading from a directory alone."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

import checkpoint
import train
from checkpoint import CheckpointError
import config
import train_state
from conftest import ROOT, TINY


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_exact_resume_on_8_devices(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=6", "checkpoint.every_steps=3", "checkpoint.keep=null", "mesh.data=2", "mesh.fsdp=4")
    straight = train.Trainer(cfg)
    straight.run()
    ref_state, ref_history = leaves(straight.state), json.loads((straight.run_dir / "metrics.json").read_text())["history"]
    ckpt_dir = straight.ckpt.dir
    assert straight.ckpt.all_steps() == [0, 3, 6]
    # pico-train's run layout: checkpoints/step_<k>/, checkpoints/latest, training_config.yaml for pico-analyze
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_0", "step_3", "step_6"]
    assert (ckpt_dir / "latest").resolve() == ckpt_dir / "step_6"
    pico = yaml.safe_load((straight.run_dir / "training_config.yaml").read_text())
    assert (pico["model"]["d_model"], pico["model"]["attention_n_heads"], pico["model"]["attention_n_kv_heads"],
            pico["checkpointing"]["run_name"]) == (32, 4, 2, "local")
    shutil.rmtree(ckpt_dir / "step_6")  # as if the first run had been stopped after step 3

    resumed = train.Trainer(cfg)  # a new trainer: state from checkpoint 3, data from step 3 on
    assert resumed.start_step == 3
    resumed.run()
    history = json.loads((resumed.run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    assert_bitwise(leaves(resumed.state), ref_state)


def run_main(run_dir, *overrides, devices=8, wait=True, **kw):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "main.py"), *TINY, f"run_dir={run_dir}", *overrides]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if wait:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
        return out
    return p


def test_exact_resume_on_1_device_in_a_new_process(corpus_cache, tmp_path):
    common = [f"data.cache_dir={corpus_cache}", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=null"]
    run_main(tmp_path / "a", *common, devices=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_4")
    out = run_main(tmp_path / "b", *common, devices=1)
    assert "resumed from" in out and "(step 2)" in out
    ha, hb = (json.loads((tmp_path / r / "metrics.json").read_text())["history"] for r in "ab")
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb] and len(ha) == 4
    (ma, _, la), (mb, _, lb) = train_state.load(tmp_path / "a"), train_state.load(tmp_path / "b")
    assert la["step"] == lb["step"] == 4
    assert_bitwise(leaves(jax.tree.leaves(ma)), leaves(jax.tree.leaves(mb)))


def test_sigterm_saves_the_current_step_and_exits_cleanly(corpus_cache, tmp_path):
    p = run_main(tmp_path, f"data.cache_dir={corpus_cache}", "train.steps=100000", "checkpoint.every_steps=0",
                 wait=False)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 3:"):
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert "SIGTERM: saved step" in out
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert saved >= 3
    assert checkpoint.Checkpoints(tmp_path / "checkpoints").all_steps() == [0, saved]
    out = run_main(tmp_path, f"data.cache_dir={corpus_cache}", f"train.steps={saved + 2}")
    assert f"(step {saved})" in out and "validation loss" in out


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_restorable(corpus_cache, tmp_path):
    # a bigger model so that a save takes a while, saved every step
    p = run_main(tmp_path, f"data.cache_dir={corpus_cache}", "model.d_model=256", "model.n_layers=4",
                 "train.steps=100000", "checkpoint.every_steps=1", "checkpoint.keep=2", wait=False)
    ckpts, deadline, killed_mid_save = tmp_path / "checkpoints", time.time() + 120, False
    while time.time() < deadline and p.poll() is None:
        names = os.listdir(ckpts) if ckpts.exists() else []
        complete = [n for n in names if n.startswith("step_") and n[5:].isdigit()]
        if any("tmp" in n for n in names) and len(complete) >= 2:
            killed_mid_save = True
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert killed_mid_save, "never saw a save in progress"
    latest = checkpoint.Checkpoints(ckpts).latest_step()
    model, cfg, loop = train_state.load(tmp_path)
    assert loop["step"] == latest >= 1
    linked = (ckpts / "latest").resolve()  # never a folder still being written: it lags by at most one save
    assert linked.name in (f"step_{latest}", f"step_{latest - 1}") and (linked / "_CHECKPOINT_METADATA").exists()
    assert all(np.isfinite(x).all() for x in leaves(jax.tree.leaves(model)))


def test_nan_loss_stops_without_overwriting_the_last_good_checkpoint(tiny_cfg):
    # an absurd learning rate: step 1 is finite, then every loss is inf / NaN
    cfg = tiny_cfg("train.steps=5", "checkpoint.every_steps=1", "checkpoint.keep=null", "opt.peak_lr=1e30",
                   "opt.clip_norm=0", "opt.warmup_steps=0")
    t = train.Trainer(cfg)
    with pytest.raises(train.TrainingError, match="NaN or inf.*last good checkpoint is step 1"):
        t.run()
    assert t.ckpt.all_steps() == [0, 1]
    _, loop = t.ckpt.restore(1, checkpoint.abstract_like(t.state))
    assert loop["step"] == 1


def test_nan_policy_skip_drops_bad_updates(tiny_cfg):
    cfg = tiny_cfg("train.steps=4", "opt.peak_lr=1e30", "opt.clip_norm=0", "opt.warmup_steps=0",
                   "train.nan_policy=skip", "checkpoint.every_steps=0")
    t = train.Trainer(cfg)
    before = None
    t.start()
    with jax.set_mesh(t.mesh):
        for step in range(4):
            t.state, m = t.train_step(t.state, t.train_data.batch(step, t.batch_sharding))
            if step == 0:
                before = leaves(t.state)  # after the one finite (huge) update
            else:
                assert float(m["nonfinite"]) == 1.0
    assert_bitwise(leaves(t.state), before)


def test_checkpoint_of_another_model_is_refused(tiny_cfg):
    train.Trainer(tiny_cfg("train.steps=1")).run()
    with pytest.raises(CheckpointError, match=r"different model .*model.d_model: checkpoint 32 vs this run 64"):
        train.Trainer(tiny_cfg("train.steps=2", "model.d_model=64"))


def test_corrupt_checkpoint_gives_a_clear_error(tiny_cfg):
    t = train.Trainer(tiny_cfg("train.steps=1"))
    t.run()
    state_dir = t.ckpt.step_dir(1) / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:32])  # truncate every data file
    with pytest.raises(CheckpointError, match="truncated or corrupt: delete that folder"):
        train.Trainer(tiny_cfg("train.steps=2"))


def test_unwritable_run_dir_and_auto_resume_off(tiny_cfg, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="not writable"):
        train.Trainer(tiny_cfg(f"run_dir={tmp_path / 'file' / 'run'}"))
    train.Trainer(tiny_cfg("train.steps=1")).run()
    with pytest.raises(config.ConfigError, match="already holds checkpoints"):
        train.Trainer(tiny_cfg("checkpoint.auto_resume=false"))


def test_load_needs_only_the_directory(tiny_cfg):
    t = train.Trainer(tiny_cfg("train.steps=2"))
    t.run()
    model, cfg, loop = train_state.load(t.run_dir)
    assert loop["step"] == 2 and cfg.model.d_model == 32
    final = json.loads((t.run_dir / "metrics.json").read_text())["final"]
    assert loop["eval"] == dict(step=2, val_loss=final["val_loss"], val_ppl=final["val_ppl"])  # stored with it
    tokens = jax.numpy.asarray(t.train_data.rows(0)[:2, :-1])
    np.testing.assert_allclose(model(tokens), t.model(tokens), rtol=1e-6, atol=1e-6)
    # a run made on a GPU with model.attention=cudnn (a ConfigError on this CPU) loads here too, through auto
    saved = t.ckpt.step_dir(2) / "config" / "metadata"
    config = json.loads(saved.read_text())
    config["model"]["attention"] = "cudnn"
    saved.write_text(json.dumps(config))
    model, cfg, _ = train_state.load(t.run_dir)
    assert cfg.model.attention == "auto"
    np.testing.assert_allclose(model(tokens), t.model(tokens), rtol=1e-6, atol=1e-6)


def test_relora_resume_across_the_warm_start_wrap_is_exact(tiny_cfg):
    # checkpoints at 0 and 2 (full-rank), 4 (wrapped at 3, merged at 4): resume from 4 needs the wrapped layout
    cfg = tiny_cfg("train.steps=6", "checkpoint.every_steps=2", "checkpoint.keep=null", "model.n_layers=1",
                   "model.relora.warm_start_steps=3", "model.relora.reset_frequency=2", "model.relora.r=4",
                   "model.relora.restart_warmup_steps=1", "model.relora.lora_dropout=0.0", config="relora")
    straight = train.Trainer(cfg)
    straight.run()
    ref = leaves(straight.state)
    shutil.rmtree(straight.ckpt.step_dir(6))
    resumed = train.Trainer(cfg)
    assert resumed.start_step == 4
    resumed.run()
    assert_bitwise(leaves(resumed.state), ref)
    model, _, loop = train_state.load(straight.run_dir)  # the directory alone, wrapped layout included
    assert loop["step"] == 6
    tokens = jax.numpy.asarray(resumed.train_data.rows(0)[:2, :-1])
    np.testing.assert_allclose(model(tokens), resumed.model(tokens), rtol=1e-6, atol=1e-6)
