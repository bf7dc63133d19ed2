"""Properties of the pico-decoder: causality, sizes, KV-cache decoding, sharded == unsharded."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import relora
import steps
from conftest import make_cfg
from model import Decoder, ModelConfig, blockwise_attention, count_params, generate
import config
import train_state
from loss import loss_fn

SMALL = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=64,
                    dtype="float32")


def test_causal_gradient_of_future_tokens_is_exactly_zero():
    model = Decoder(SMALL, nnx.Rngs(0))
    tokens = jnp.arange(SMALL.seq_len)[None]  # every position a distinct token: embedding row i = position i
    for t in (0, 5, SMALL.seq_len - 2):
        grads = nnx.grad(lambda m: m(tokens)[0, t].sum())(model)
        g_embed = np.asarray(grads["embed"][...])  # [V, D]
        assert np.all(g_embed[t + 1:SMALL.seq_len] == 0), f"logits at {t} depend on later tokens"
        assert np.all(np.abs(g_embed[:t + 1]).sum(-1) > 0), f"logits at {t} ignore earlier tokens"


@pytest.mark.parametrize("T, min_block, dtype", [(16, 64, "float32"), (37, 8, "float32"), (64, 4, "bfloat16")])
def test_blockwise_attention_equals_jax_attention_in_values_and_gradients(T, min_block, dtype):
    """One block (T < min_block), uneven blocks (37 = 10+10+10+7), 64 in max_blocks=8 of 8; GQA (4 heads, 2 kv)."""
    q, k, v, g = (jax.random.normal(jax.random.key(i), (2, T, n, 8), dtype) for i, n in enumerate((4, 2, 2, 4)))
    ref = partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
    ours = partial(blockwise_attention, min_block=min_block)
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g), argnums=(0, 1, 2)))(q, k, v)
    tol = 1e-5 if dtype == "float32" else 2e-2
    out = jax.jit(ours)(q, k, v)
    assert out.dtype == q.dtype
    np.testing.assert_allclose(np.float32(out), np.float32(jax.jit(ref)(q, k, v)), atol=tol, rtol=tol)
    for a, b in zip(grads(ours), grads(ref)):
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 4, rtol=tol)
    t = T // 2 + 1  # a query in a later block: no gradient reaches the keys after it, some reaches every key up to it
    seen = jax.jit(jax.grad(lambda k: ours(q, k, v)[:, t].astype(jnp.float32).sum()))(k)
    assert np.all(np.float32(seen[:, t + 1:]) == 0) and np.all(np.abs(np.float32(seen[:, :t + 1])).sum(-1) > 0)


@pytest.mark.parametrize("size,expected", [("tiny", 11.3e6), ("small", 64.6e6), ("medium", 181e6), ("large", 570e6)])
def test_pico_sizes_match_spec_within_one_percent(size, expected):
    cfg = make_cfg(f"size={size}", config="tpu")
    mcfg = ModelConfig.from_dict(cfg.model)
    assert (mcfg.vocab_size, mcfg.n_layers, mcfg.n_heads, mcfg.n_kv_heads) == (50304, 12, 12, 4)
    assert mcfg.d_hidden == 4 * mcfg.d_model
    n = count_params(nnx.eval_shape(lambda: Decoder(mcfg, nnx.Rngs(0))))
    assert abs(n - expected) / expected < 0.01, (size, n)


def test_tpu_composition_with_override():
    cfg = make_cfg("opt.peak_lr=0.004", config="tpu")
    assert cfg.opt.peak_lr == 0.004 and cfg.name == "tpu"
    assert cfg.model.d_model == 768 and cfg.model.d_hidden == 3072 and cfg.model.dtype == "bfloat16"
    config.check_keys(cfg)  # every key is one base.yaml knows
    for name in ("local", "colab", "gpu", "tpu"):
        ModelConfig.from_dict(make_cfg(config=name).model)


def test_kv_cache_matches_full_recomputation():
    model = Decoder(SMALL, nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t))  # jitted: eager NNX dispatch on 8 devices took ~25 s here
    extend = nnx.jit(lambda m, t, c, pos: m(t, cache=c, pos=pos), static_argnums=3)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, SMALL.vocab_size)
    full = forward(model, tokens)
    cache = model.init_cache(3, 16)
    a, cache = extend(model, tokens[:, :7], cache, 0)
    b, cache = extend(model, tokens[:, 7:], cache, 7)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, atol=1e-5)
    # greedy decoding with the cache == greedy decoding by recomputing the whole prefix each token, in a buffer of
    # the final length: the decoder is causal (test_causal_gradient_of_future_tokens_is_exactly_zero), so the
    # positions after the prefix change nothing
    out = generate(model, tokens[:, :4], 6, jax.random.key(0), temperature=0.0)
    seq = jnp.zeros((3, 10), tokens.dtype).at[:, :4].set(tokens[:, :4])
    for i in range(4, 10):
        seq = seq.at[:, i].set(jnp.argmax(forward(model, seq)[:, i - 1], -1))
    np.testing.assert_array_equal(out, seq)


def _steps(mesh, n_steps=2, grad_accum=1):
    tx = train_state.make_tx(make_cfg().opt, lambda step: 1e-2)
    graphdef, state = train_state.init_state(SMALL, tx, mesh, seed=0)
    step = steps.jit_train_step(graphdef, state, mesh, relora.Plan(None), grad_accum)
    tokens = jax.random.randint(jax.random.key(2), (16, SMALL.seq_len + 1), 0, SMALL.vocab_size)
    losses = []
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None))
        for _ in range(n_steps):
            state, m = step(state, jax.device_put(tokens, sharding))
            losses.append(float(m["loss"]))
    return losses, state


def test_sharded_step_matches_single_device_and_shards_one_eighth():
    one = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                        devices=jax.devices()[:1])
    ref_losses, ref_state = _steps(one)
    for data_size, fsdp_size in ((1, 8), (2, 4)):
        losses, state = _steps(train_state.make_mesh(data_size, fsdp_size))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        # Adam divides by sqrt(v): reduction-order noise in near-zero gradients moves a parameter by up to
        # ~1e-4 x lr; a wrong sharding moves it by ~lr (1e-2).
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # with 8-way FSDP, each device holds 1/8 of a weight and of its Adam moments
    _, state = _steps(train_state.make_mesh(1, 8), n_steps=1)
    up_like = [x for x in jax.tree.leaves(state) if x.shape == (SMALL.d_model, SMALL.d_hidden)]
    # gate and up kernels of each layer, and the head (V = F here): param, Adam mu, Adam nu
    assert len(up_like) == 3 * (2 * SMALL.n_layers + 1)
    for x in up_like:
        assert x.addressable_shards[0].data.shape == (SMALL.d_model // 8, SMALL.d_hidden)


def test_grad_accumulation_matches_one_big_batch():
    mesh = train_state.make_mesh(1, 8)
    one, _ = _steps(mesh, n_steps=2)
    acc, _ = _steps(mesh, n_steps=2, grad_accum=2)
    np.testing.assert_allclose(acc, one, rtol=1e-5)


def test_remat_matches_no_remat():
    model = Decoder(SMALL, nnx.Rngs(0))
    remat = Decoder(ModelConfig(**{**SMALL.__dict__, "remat": "block"}), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, SMALL.vocab_size)
    g1 = nnx.grad(loss_fn)(model, tokens)
    g2 = nnx.grad(loss_fn)(remat, tokens)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
