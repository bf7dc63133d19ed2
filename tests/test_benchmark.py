"""Performance machinery: the FLOP count, the throughput benchmark, FSDP memory per device, scan and remat."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from conftest import ROOT
from model import ModelConfig

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402
from omegaconf import OmegaConf
import config
import families
import host
import optax
import train_state
from loss import cross_entropy, fused_cross_entropy, loss_fn

TINY = ["model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=256", "data.batch_size=8"]


def test_flops_per_token_matches_a_hand_count():
    c = ModelConfig(vocab_size=1000, seq_len=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_hidden=96)
    # per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate / up 32x96, down 96x32; the head 32x1000
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 96
    matmul_params = 3 * per_layer + 32 * 1000
    attention = 3 * 6 * 64 * 32  # QK^T and AV: 2 x 2 x T x D forward per layer, x3 with backward, halved (causal)
    assert c.flops_per_token() == 6 * matmul_params + attention == 6 * 68864 + 36864


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_entry_points_restart_once_with_the_host_malloc_settings_unless_the_user_set_them():
    code = ("import os, host; print('start', flush=True); host.reuse_host_memory(); "
            "print(*(os.environ.get(k) for k in host.HOST_MALLOC))")
    env = {k: v for k, v in os.environ.items() if k not in host.HOST_MALLOC}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout.split("\n")
    assert run(env)[:3] == ["start", "start", " ".join(host.HOST_MALLOC.values())]  # restarted once, then kept
    assert run({**env, "MALLOC_ARENA_MAX": "8"})[:2] == ["start", "8 None None"]  # the user's own: no restart


@pytest.mark.parametrize("flags", [[], ["--relora"]])
def test_throughput_script_prints_the_documented_json(capsys, flags):
    throughput.main([*TINY, "--steps", "2", "--warmup", "0", *flags])
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    assert set(throughput.KEYS) <= set(r), set(throughput.KEYS) - set(r)
    mcfg = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=128)
    assert r["flops_per_token"] == mcfg.flops_per_token()
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s"])
    assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    assert r["peak_source"] == "measured CPU matmul" and r["peak_flops_per_s"] > 1e9
    assert r["n_devices"] == 8 and np.isfinite(r["loss"]) and r["compile_s"] > 0
    assert any(line.startswith("MFU") for line in lines)
    full = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 128 + 2 * 32) + 2 * 256 * 32 + 32  # Decoder params
    # ReLoRA (configs/relora.yaml: rank 32 on every projection): the kernels frozen, A [R, in] and B [out, R] trained
    kernels, lora = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 128, 32 * (64 + 48 + 48 + 64 + 3 * 160)
    assert r["params"] == (full if not flags else full + 2 * (lora - kernels))


def test_training_log_mfu_is_the_benchmark_formula(tiny_cfg, monkeypatch):
    calls = []
    real = host.throughput
    monkeypatch.setattr(train, "throughput", lambda *a: calls.append(real(*a)) or calls[-1])
    t = train.Trainer(tiny_cfg("train.steps=2", "train.log_every=2", "sample.n_samples=0"))
    t.run()
    logged = t.record.history[-1]
    assert len(calls) == 1
    assert logged["mfu"] == calls[0]["mfu"] and logged["tokens_per_s"] == calls[0]["tokens_per_s"]
    assert calls[0]["mfu"] == pytest.approx(calls[0]["tokens_per_s"] * t.mcfg.flops_per_token() / t.peak[0])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fsdp_bytes_per_device_fall_as_one_over_n(n):
    mcfg = ModelConfig(vocab_size=512, seq_len=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=128,
                       dtype="float32")
    mesh = jax.make_mesh((1, n), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])
    tx = train_state.make_tx(OmegaConf.load(config.CONFIGS / "base.yaml").opt, 1e-3)
    _, state = train_state.init_state(mcfg, tx, mesh, seed=0)
    params, opt = throughput.state_bytes_per_device(state)
    total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    norms = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim == 1)  # RMSNorm scales: replicated
    assert params == (total(state[0]) - norms(state[0])) / n + norms(state[0])
    opt_arrays = [x for x in jax.tree.leaves(state[1]) if x.ndim]  # Adam moments; the step counts are scalars
    assert opt - (total(state[1]) - total(opt_arrays)) == (total(opt_arrays) - norms(opt_arrays)) / n + norms(opt_arrays)
    assert params < 1.05 * total(state[0]) / n  # the replicated part is small


# ---------------------------------------------------------------------------------------------- speed knobs

SMALL = ModelConfig(vocab_size=300, seq_len=16, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_hidden=64,
                    dtype="float32")


def _loss_and_grads(**knobs):
    import dataclasses
    from flax import nnx
    from model import Decoder
    model = Decoder(dataclasses.replace(SMALL, **knobs), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, SMALL.seq_len + 1), 0, SMALL.vocab_size)
    loss, grads = jax.jit(lambda m, t: nnx.value_and_grad(loss_fn)(m, t))(model, tokens)
    return model, loss, grads


@pytest.mark.parametrize("knobs", [dict(scan_layers=True), dict(remat="block"), dict(remat="dots"),
                                   dict(remat="dots", scan_layers=True), dict(remat="block", scan_layers=True),
                                   dict(loss_chunk=7), dict(loss_chunk=64, scan_layers=True, remat="block")])
def test_speed_knobs_give_the_same_loss_gradients_and_layout(knobs):
    from flax import nnx
    ref_model, ref_loss, ref_grads = _loss_and_grads()
    model, loss, grads = _loss_and_grads(**knobs)
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(ref_model))  # checkpoints interchange
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("block", [
    dict(z_loss=1e-2), dict(tie_embeddings=True, z_loss=1e-2), dict(norm_placement="post", mlp="gelu"),
    dict(kind="lstm", lstm=dict(d_embed=16, d_hidden=24, n_layers=2), z_loss=1e-2),
    dict(kind="kgram_mlp", kgram=dict(k=3, embedding="onehot", d_embed=8, d_hidden=24, n_inner=1))])
def test_fused_loss_equals_the_plain_loss_for_every_family_and_head(block):
    """loss_chunk fuses the head into the loss for any model with features() and head_kernel(): a tied head (the
    embedding's transpose), post-norm (no final norm), the z-loss term and the other families give the plain
    loss's value and gradients."""
    import dataclasses
    from flax import nnx
    base = {f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)}
    tokens = jax.random.randint(jax.random.key(1), (3, SMALL.seq_len + 1), 0, SMALL.vocab_size)
    out = []
    for chunk in (0, 7):
        model = families.build_model(families.model_config(dict(base, **block, loss_chunk=chunk)), nnx.Rngs(0))
        out.append(jax.jit(lambda m, t: nnx.value_and_grad(loss_fn)(m, t))(model, tokens))
    (ref_loss, ref_grads), (loss, grads) = out
    if block.get("z_loss"):  # the z-term is in both: it moves the loss above the plain cross-entropy
        logits = model(tokens[:, :-1])
        assert loss > cross_entropy(logits, tokens[:, 1:]) + 1e-3
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_remat_policies_and_old_boolean_checkpoints():
    from model import ConfigError
    with pytest.raises(ConfigError, match="model.remat='everything'"):
        ModelConfig.from_dict(dict(remat="everything"))
    with pytest.raises(ConfigError, match="model.remat=True.*an old true / false is block / none"):
        ModelConfig.from_dict(dict(remat=True))
    # a checkpoint from before the policies saved a boolean: loading reads it as the policy it was
    assert [train_state.saved_model_block(dict(remat=b))["remat"] for b in (True, False)] == ["block", "none"]


def test_fused_cross_entropy_keeps_float32_logits_in_bfloat16():
    """The fused loss equals cross_entropy(h @ w) also with padding rows (N not a multiple of the chunk), and in
    bf16 compute its loss and softmax stay float32."""
    h = jax.random.normal(jax.random.key(0), (2, 5, 16))
    w = jax.random.normal(jax.random.key(1), (16, 40))
    labels = jax.random.randint(jax.random.key(2), (2, 5), 0, 40)
    plain = lambda h, w: cross_entropy(h @ w, labels)
    fused = lambda h, w: fused_cross_entropy(h, w, labels, 4)
    (l1, g1), (l2, g2) = [jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (plain, fused)]
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    lb, (gh, gw) = jax.value_and_grad(fused, argnums=(0, 1))(h.astype("bfloat16"), w)
    assert lb.dtype == np.float32 and gw.dtype == np.float32 and gh.dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(lb, l1, rtol=2e-2)


def test_fused_cross_entropy_under_a_mesh_runs_each_devices_rows_and_gives_the_same_loss():
    """Under an 8-device mesh the fused loss runs per device on its rows of the batch (the head gathered, d/dw
    summed and split over the devices): the same loss and gradients as on one device, with a chunk that does not
    divide a device's rows (2 rows x 5 tokens in chunks of 4), the z-loss on, and a head width that the devices
    do not divide (d/dw summed whole)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = train_state.make_mesh(2, 4)
    labels = jax.random.randint(jax.random.key(2), (16, 5), 0, 40)
    for d in (16, 12):
        h = jax.random.normal(jax.random.key(0), (16, 5, d))
        w = jax.random.normal(jax.random.key(1), (d, 40))
        fused = jax.jit(jax.value_and_grad(lambda h, w: fused_cross_entropy(h, w, labels, 4, 1e-2), argnums=(0, 1)))
        ref_loss, ref_grads = fused(h, w)
        with jax.set_mesh(mesh):
            rows = NamedSharding(mesh, P(("data", "fsdp")))
            loss, grads = fused(jax.device_put(h, rows), jax.device_put(w, NamedSharding(mesh, P("fsdp"))))
            assert grads[0].sharding.is_equivalent_to(rows, 3)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scanned_model_still_captures_learning_dynamics():
    import dataclasses
    from flax import nnx
    from dynamics import dynamics_step
    from model import Decoder
    tokens = jax.random.randint(jax.random.key(1), (4, SMALL.seq_len + 1), 0, SMALL.vocab_size)
    out = []
    for scan in (False, True):
        model = Decoder(dataclasses.replace(SMALL, scan_layers=scan), nnx.Rngs(0))
        graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
        out.append(jax.jit(lambda s, t: dynamics_step(graphdef, s, t, layers=("attention.v", "swiglu.down")))(state, tokens))
    assert set(out[1]) == set(out[0]) and "activations/blocks.2.swiglu.down" in out[1]
    for k in out[0]:
        np.testing.assert_allclose(out[1][k], out[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_cudnn_attention_is_a_config_error_on_cpu_and_auto_falls_back_saying_why(monkeypatch):
    import dataclasses
    import model
    with pytest.raises(model.ConfigError, match="model.attention=cudnn needs an NVIDIA GPU"):
        ModelConfig.from_dict(dict(attention="cudnn", dtype="bfloat16"))
    auto = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, dtype="bfloat16")  # head dim 16
    assert auto.attention_impl() == ("xla", "auto: cuDNN flash attention needs an NVIDIA GPU, this is cpu")
    assert dataclasses.replace(auto, dtype="float32").notes() == [
        "attention: xla (auto: cuDNN flash attention needs an NVIDIA GPU, this is cpu)"]
    q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16), "bfloat16")
    k, v = q[:, :, :2], q[:, :, 2:]
    xla = model.causal_attention(q, k, v, dataclasses.replace(auto, attention="xla"))
    monkeypatch.setattr(model, "platform", lambda: "gpu")  # auto tries cuDNN, which cannot run here: XLA instead
    assert auto.attention_impl()[0] == "cudnn"
    assert dataclasses.replace(auto, dtype="float32").attention_impl() == \
        ("xla", "auto: cuDNN flash attention needs bf16 / fp16, model.dtype=float32")
    with pytest.warns(UserWarning, match=r"model.attention=auto: cuDNN refused q \(2, 8, 4, 16\) bfloat16 .*runs on XLA"):
        np.testing.assert_array_equal(model.causal_attention(q, k, v, auto), xla)


def test_checkpoint_restores_across_scan_layers_and_remat(tmp_path):
    from checkpoint import Checkpoints, CheckpointError, abstract_like
    mesh = train_state.make_mesh(1, 8)
    tx = train_state.make_tx(OmegaConf.load(config.CONFIGS / "base.yaml").opt, 1e-3)
    _, state = train_state.init_state(SMALL, tx, mesh, seed=0)
    saved = dict(model=dict(SMALL.__dict__))
    ckpt = Checkpoints(tmp_path, use_async=False)
    ckpt.save(0, state, dict(step=0), saved)
    ckpt.wait()
    _, other = train_state.init_state(SMALL, tx, mesh, seed=1)
    import dataclasses
    # a run with other runtime knobs may resume this checkpoint; one with another d_model may not
    train_state.check_same_model(saved["model"], dataclasses.replace(SMALL, scan_layers=True, remat="dots",
                                                                     loss_chunk=8), tmp_path)
    restored, _ = ckpt.restore(0, abstract_like(other))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="model.d_model: checkpoint 32 vs this run 64"):
        train_state.check_same_model(saved["model"], dataclasses.replace(SMALL, d_model=64), tmp_path)
