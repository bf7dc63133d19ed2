"""Multi-host training: two `jax.distributed` processes of 4 CPU devices each train exactly as one process of 8.

The distributed run goes through the real entry point (`python main.py` with Hydra overrides, processes talking over
127.0.0.1 with gloo CPU collectives); the reference is the same config trained in this pytest process (8 devices).
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import train
from conftest import ROOT, TINY
from test_shards import dcfg, pico_folder
from model import BATCH_AXES
import train_state

TIMEOUT = 300  # seconds for the distributed run as a whole
LAYOUT = ["mesh.data=2", "mesh.fsdp=4"]  # data across the two processes, FSDP within each: cross-process all-reduce
SAMPLE = ["sample.max_new_tokens=4"]  # also generate after training, to check that works across processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmds, env, log_dir):
    """Start the commands concurrently, each writing stdout and stderr to log_dir/process{i}.log."""
    logs = [log_dir / f"process{i}.log" for i in range(len(cmds))]
    procs = []
    for c, log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(c, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    return procs, logs


def finish(procs, logs, deadline, problem=None):
    """Wait for the processes; if one fails, stop the others (they would wait for it). Returns the logs' text."""
    try:
        while problem is None and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                problem = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                problem = f"timed out after {TIMEOUT} s"
            else:
                time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    if problem is None and any(p.returncode for p in procs):
        problem = f"exit codes {[p.returncode for p in procs]}"
    if problem:
        dump = "\n".join(f"----- process {i} (exit {p.returncode}) stdout+stderr -----\n{t[-20000:]}"
                         for i, (p, t) in enumerate(zip(procs, texts)))
        pytest.fail(f"distributed run failed: {problem}\n{dump}", pytrace=False)
    return texts


def test_two_processes_train_like_one(corpus_cache, tmp_path, tiny_cfg, capsys):
    """On pico's data in pico-train's order (parquet shards read sequentially), so that the two processes reading
    only their own rows of each batch is checked on that path too (the .bin path shares it: data.TrainData)."""
    port = free_port()
    pico_folder(tmp_path / "shards")
    data_keys = [f"data.dir={tmp_path / 'shards'}", "data.order=sequential"]
    overrides = [*TINY, f"data.cache_dir={corpus_cache}", *LAYOUT, *SAMPLE, *data_keys]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "WANDB_MODE": "disabled"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cmds = [[sys.executable, "main.py", *overrides, f"run_dir={tmp_path / 'multi'}",
             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
             f"distributed.process_id={i}"] for i in range(2)]
    procs, logs = start(cmds, env, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    try:  # the reference meanwhile: one process (this one), 8 devices, the same config (run_dir tmp_path/run)
        assert jax.device_count() == 8 and jax.process_count() == 1
        train.run(tiny_cfg(*LAYOUT, *SAMPLE, *data_keys))
    except BaseException as e:
        finish(procs, logs, deadline, problem=f"stopped, as the single-process reference run raised {e!r}")
        raise
    texts = finish(procs, logs, deadline)
    assert "8 cpu devices, 2 process(es)" in texts[0], texts[0]
    multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    single = json.loads((tmp_path / "run" / "metrics.json").read_text())
    samples = [re.findall(r"^sample: (.*)$", text, re.M) for text in (texts[0], capsys.readouterr().out)]
    assert samples[0] == samples[1] and len(samples[0]) == 1, samples  # generation after training works too

    steps = lambda m: [h["step"] for h in m["history"]]
    assert steps(multi) == steps(single) == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([h[key] for h in multi["history"]], [h[key] for h in single["history"]],
                                   rtol=1e-5, err_msg=key)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(multi["final"][key], single["final"][key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("source", ["bin shuffled", "parquet sequential"])
def test_data_order_independent_of_device_count(corpus_cache, tmp_path, source):
    B, T, V = 16, 32, 4096
    if source == "bin shuffled":
        d = data.builtin_corpus(corpus_cache)
        td = data.TrainData(data.BinRows(data.open_tokens(d / "train.bin", "uint16", V, T), T, V), 0, B)
    else:  # pico's shards, read as pico-train reads them
        pico_folder(tmp_path)
        td = data.TrainData(data.open_source(tmp_path, "train", dcfg(), V, T), 0, B, "sequential")
    devs = np.array(jax.devices())
    meshes = {
        "1 device": jax.sharding.Mesh(devs[:1].reshape(1, 1), ("data", "fsdp")),
        "8 devices fsdp": train_state.make_mesh(1, 8),
        "8 devices data x fsdp": train_state.make_mesh(2, 4),
        "8 devices data": train_state.make_mesh(8, 1),
    }
    epoch_edge = td.n_chunks // B  # this step's rows straddle the end of epoch 0 and the start of epoch 1
    steps = [0, 1, 5, epoch_edge, epoch_edge + 1]
    assert (epoch_edge + 1) * B > td.n_chunks > epoch_edge * B
    for step in steps:
        want = td.rows(step)
        assert want.shape == (B, T + 1) and want.dtype == np.int32
        for name, mesh in meshes.items():
            got = np.asarray(jax.device_get(td.batch(step, NamedSharding(mesh, P(BATCH_AXES, None)))))
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}, {name}")
        for lo, hi in [(0, 8), (8, 16), (4, 6)]:  # a process's slice of the rows is the same rows
            np.testing.assert_array_equal(td.rows(step, lo, hi), want[lo:hi])
    assert not np.array_equal(td.rows(0), td.rows(1))
    # epoch 1 draws a different permutation: the first batch of epoch 1 is not the first of epoch 0
    assert source != "bin shuffled" or not np.array_equal(td.perm(0), td.perm(1))
