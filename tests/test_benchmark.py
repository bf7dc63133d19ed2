"""Performance machinery: the FLOP count, the throughput benchmark, FSDP memory per device, scan and remat."""
import json
import sys

import jax
import numpy as np
import pytest

import train
from conftest import ROOT
from model import ModelConfig

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402

TINY = ["model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=256", "data.batch_size=8"]


def test_flops_per_token_matches_a_hand_count():
    c = ModelConfig(vocab_size=1000, seq_len=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_hidden=96)
    # per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate / up 32x96, down 96x32; the head 32x1000
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 96
    matmul_params = 3 * per_layer + 32 * 1000
    attention = 3 * 6 * 64 * 32  # QK^T and AV: 2 x 2 x T x D forward per layer, x3 with backward, halved (causal)
    assert train.flops_per_token(c) == 6 * matmul_params + attention == 6 * 68864 + 36864


def test_throughput_script_prints_the_documented_json(capsys):
    throughput.main([*TINY, "--steps", "2", "--warmup", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    assert set(throughput.KEYS) <= set(r), set(throughput.KEYS) - set(r)
    mcfg = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=128)
    assert r["flops_per_token"] == train.flops_per_token(mcfg)
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s"])
    assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    assert r["peak_source"] == "measured CPU matmul" and r["peak_flops_per_s"] > 1e9
    assert r["n_devices"] == 8 and np.isfinite(r["loss"]) and r["compile_s"] > 0
    assert any(line.startswith("MFU") for line in lines)


def test_training_log_mfu_is_the_benchmark_formula(tiny_cfg, monkeypatch):
    calls = []
    real = train.throughput
    monkeypatch.setattr(train, "throughput", lambda *a: calls.append(real(*a)) or calls[-1])
    t = train.Trainer(tiny_cfg("train.steps=2", "train.log_every=2", "sample.n_samples=0"))
    t.run()
    logged = t.history[-1]
    assert len(calls) == 1
    assert logged["mfu"] == calls[0]["mfu"] and logged["tokens_per_s"] == calls[0]["tokens_per_s"]
    assert calls[0]["mfu"] == pytest.approx(calls[0]["tokens_per_s"] * train.flops_per_token(t.mcfg) / t.peak_flops)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fsdp_bytes_per_device_fall_as_one_over_n(n):
    mcfg = ModelConfig(vocab_size=512, seq_len=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=128,
                       dtype="float32")
    mesh = jax.make_mesh((1, n), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])
    tx = train.make_tx(train.OmegaConf.load(train.CONFIGS / "base.yaml").opt, 1e-3)
    _, state = train.init_state(mcfg, tx, mesh, seed=0)
    params, opt = throughput.state_bytes_per_device(state)
    total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    norms = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim == 1)  # RMSNorm scales: replicated
    assert params == (total(state[0]) - norms(state[0])) / n + norms(state[0])
    opt_arrays = [x for x in jax.tree.leaves(state[1]) if x.ndim]  # Adam moments; the step counts are scalars
    assert opt - (total(state[1]) - total(opt_arrays)) == (total(opt_arrays) - norms(opt_arrays)) / n + norms(opt_arrays)
    assert params < 1.05 * total(state[0]) / n  # the replicated part is small
