"""Learning-dynamics snapshots: what is stored with each checkpoint, checked against direct computations."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import train
from snapshots import load as load_dynamics
from loss import loss_fn
from model import rope_tables


def test_snapshots_hold_activations_weights_gradients_and_the_batch(tiny_cfg):
    t = train.Trainer(tiny_cfg("train.steps=4", "checkpoint.every_steps=2",
                               "checkpoint.dynamics.layers=[attention.v,attention.o,swiglu.down]"))
    t.run()
    c = t.mcfg
    for step in (0, 2, 4):
        snap = load_dynamics(t.run_dir, step)
        assert {k[0] for k in snap} == {"train", "eval"}
        assert {k[1] for k in snap} == {"activations", "weights", "gradients", "tokens", "head_entropy"}  # no ReLoRA
        for split, n in (("train", 16), ("eval", 8)):
            for i in range(c.n_layers):
                assert snap[(split, "activations", f"blocks.{i}.attention.v")].shape == (n, c.n_kv_heads * c.head_dim)
                assert snap[(split, "activations", f"blocks.{i}.swiglu.down")].shape == (n, c.d_model)
                assert snap[(split, "weights", f"blocks.{i}.attention.o")].shape == (c.d_model, c.d_model)
                assert snap[(split, "gradients", f"blocks.{i}.swiglu.down")].shape == (c.d_hidden, c.d_model)
        np.testing.assert_array_equal(snap[("train", "tokens", None)], t.train_data.rows(step))
    # two shapes (train and eval batch), compiled once each for all saves: no recompilation per step
    assert t.saver.dynamics_step._cache_size() == 2

    # the last snapshot against the final parameters, computed directly
    snap, model = load_dynamics(t.run_dir, 4), t.model
    tokens = jnp.asarray(snap[("train", "tokens", None)])
    block = model.blocks[0]
    x = model.embed[...][tokens[:, :-1]]
    v = block.attention.v(block.attention_norm(x))  # [N, T, K*E]
    np.testing.assert_allclose(snap[("train", "activations", "blocks.0.attention.v")], v[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(snap[("train", "weights", "blocks.1.swiglu.down")], model.blocks[1].swiglu.down.kernel[...])
    grads = nnx.grad(loss_fn)(model, tokens)
    np.testing.assert_allclose(snap[("train", "gradients", "blocks.1.attention.o")],
                               grads["blocks"][1]["attention"]["o"]["kernel"][...], rtol=1e-4, atol=1e-7)
    # block 0's attention entropy per head, from its probabilities written out
    rope = rope_tables(jnp.broadcast_to(jnp.arange(c.seq_len), tokens[:, :-1].shape), c.head_dim, c.rope_theta)
    q, k = block.attention.queries_keys(block.attention_norm(x), rope)
    k = np.repeat(np.asarray(k), c.n_heads // c.n_kv_heads, axis=2)
    s = np.einsum("bthe,bshe->bhts", np.asarray(q, np.float64), k) / np.sqrt(c.head_dim)
    s = np.where(np.tril(np.ones((c.seq_len, c.seq_len), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1).mean((0, 2))  # [H]
    np.testing.assert_allclose(snap[("train", "head_entropy", "blocks.0.attention")], entropy, rtol=1e-5)
    assert (entropy < np.log(c.seq_len)).all()
    # the eval batch is the same at every step, so its activations change only with the parameters
    first, last = load_dynamics(t.run_dir, 0), snap
    assert not np.allclose(first[("eval", "activations", "blocks.0.attention.v")], last[("eval", "activations", "blocks.0.attention.v")])


def test_relora_layers_store_their_effective_weight(tiny_cfg):
    relora = "+model.relora={r:4,reset_frequency:3,lora_alpha:8,lora_dropout:0.0,restart_warmup_steps:1,trainable_scaling:true}"
    t = train.Trainer(tiny_cfg("train.steps=5", "checkpoint.every_steps=0", relora,
                               "checkpoint.dynamics.layers=[attention.v]"))
    t.run()  # a merge at step 3, LR 0 for one step (jagged schedule), then a step that grows the branch
    snap, model = load_dynamics(t.run_dir, 5), t.model
    tokens = jnp.asarray(snap[("train", "tokens", None)])
    block = model.blocks[0]
    h = block.attention_norm(model.embed[...][tokens[:, :-1]])
    v = block.attention.v(h)  # the wrapped layer: x W + scale (x A^T) B^T
    assert float(jnp.abs(block.attention.v.B[...]).max()) > 0
    np.testing.assert_allclose(h @ snap[("train", "weights", "blocks.0.attention.v")], v, rtol=1e-5, atol=1e-6)
    assert np.abs(snap[("train", "gradients", "blocks.0.attention.v")]).sum() > 0
    # the two terms of the wrapped layer: the frozen W (step 3's merge included) and this cycle's scale (B A)^T
    for split in ("train", "eval"):
        for i in range(t.mcfg.n_layers):
            name, layer = f"blocks.{i}.attention.v", model.blocks[i].attention.v
            base, update = snap[(split, "weights_base", name)], snap[(split, "weights_update", name)]
            np.testing.assert_array_equal(base + update, snap[(split, "weights", name)])
            np.testing.assert_array_equal(base, layer.kernel[...])
            np.testing.assert_allclose(update, layer.update(), rtol=1e-6, atol=1e-9)
            assert np.abs(update).max() > 0
    assert {k[1] for k in snap} == {"activations", "weights", "weights_base", "weights_update", "gradients", "tokens",
                                   "head_entropy"}
