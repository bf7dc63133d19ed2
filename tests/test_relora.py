"""ReLoRA (SPEC §4): wrapping, merge-and-reset, optimizer reset, jagged schedule, rank growth, FSDP, the trainer."""
import dataclasses
import functools
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

import relora
import steps
import train
from conftest import make_cfg
from model import ConfigError, Decoder, Linear, ModelConfig, count_params
import config
import train_state
from loss import loss_fn

SMALL = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_hidden=64,
                    dtype="float32")
TOKENS = jax.random.randint(jax.random.key(2), (16, SMALL.seq_len + 1), 0, SMALL.vocab_size)


def rcfg(**kw) -> relora.ReLoRAConfig:
    kw = dict(r=4, lora_alpha=32, lora_dropout=0.0, reset_frequency=3, restart_warmup_steps=1) | kw
    return relora.ReLoRAConfig.from_dict(kw, seed=0)


def mesh_of(data_size, fsdp_size):
    if data_size * fsdp_size == 1:
        return jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                             devices=jax.devices()[:1])
    return train_state.make_mesh(data_size, fsdp_size)


@functools.cache
def adamw():
    return train_state.make_tx(make_cfg().opt, 1e-2)


@functools.cache
def jitted_step(rc):  # one compilation per config and sharding, shared by the tests
    return jax.jit(relora.training_step(steps.train_step, rc), static_argnums=0, donate_argnums=1)


def run_steps(rc, mesh, n_steps, merge=True, start=None, mcfg=SMALL):
    """n_steps ReLoRA steps (merge-and-reset every rc.reset_frequency if `merge`) from a new model or from
    start = (graphdef, state): graphdef, state, losses."""
    graphdef, state = start or train_state.init_state(mcfg, adamw(), mesh, 0, rc)
    losses = []
    with jax.set_mesh(mesh):
        tokens = jax.device_put(TOKENS, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        for done in range(1, n_steps + 1):
            state, m = jitted_step(rc)(graphdef, state, tokens)
            losses.append(float(m["loss"]))
            if merge and rc.reset_index(done) is not None:
                state, _ = relora.merge_and_reset(graphdef, state, rc.reset_index(done), rc)
    return graphdef, state, losses


@partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens):  # of a model's graphdef and state
    return nnx.merge(graphdef, state)(tokens)


@partial(jax.jit, static_argnums=0)
def grads(graphdef, state, tokens):
    return nnx.grad(loss_fn)(nnx.merge(graphdef, state), tokens)


def logits(graphdef, state):  # of a (model, optimizer) state
    return np.asarray(forward(*nnx.split(nnx.merge(graphdef, state)[0]), TOKENS[:, :-1]))


def effective_weight(layer: relora.LoRALinear):
    """W + scale (B A)^T [in, out]: what the layer computes."""
    return np.asarray(layer.kernel[...] + layer.scale() * (layer.B[...] @ layer.A[...]).T)


# ---------------------------------------------------------------------------------------------- config

def test_config_keys_are_validated_and_the_example_config_composes():
    assert relora.ReLoRAConfig.from_dict(None) is None
    with pytest.raises(ConfigError, match=r"model\.relora\.rank"):
        relora.ReLoRAConfig.from_dict({"rank": 8})
    with pytest.raises(ConfigError, match="head"):
        relora.ReLoRAConfig.from_dict({"target_modules": ["head"]})
    with pytest.raises(ConfigError, match="optimizer_reset"):
        relora.ReLoRAConfig.from_dict({"optimizer_reset": "magnitued"})
    with pytest.raises(ConfigError, match="restart_warmup_steps"):
        relora.ReLoRAConfig.from_dict({"reset_frequency": 10, "restart_warmup_steps": 50})
    cfg = make_cfg(config="relora")
    config.check_keys(cfg)
    rc = relora.ReLoRAConfig.from_dict(cfg.model.relora, cfg.seed)
    assert rc.target_modules == ("swiglu", "attention") and rc.warm_start_steps > 0
    assert set(OmegaConf.to_container(cfg.model.relora)) == {f for f in relora.ReLoRAConfig.__dataclass_fields__} - {"seed"}


# ---------------------------------------------------------------------------------------------- the layer

def test_wrapping_targets_exact_function_frozen_w_and_init():
    plain = nnx.split(Decoder(SMALL, nnx.Rngs(0)))
    wrapped = relora.wrap(nnx.merge(*plain), rcfg(target_modules=["attention", "down"]))
    att, mlp = wrapped.blocks[0].attention, wrapped.blocks[0].swiglu
    assert all(isinstance(getattr(att, n), relora.LoRALinear) for n in "qkvo")
    assert isinstance(mlp.down, relora.LoRALinear) and isinstance(mlp.up, Linear) and isinstance(wrapped.head, Linear)
    # B = 0: a freshly wrapped model computes exactly what the unwrapped one did
    np.testing.assert_array_equal(forward(*nnx.split(wrapped), TOKENS[:, :-1]), forward(*plain, TOKENS[:, :-1]))
    for layer in relora.lora_layers(wrapped):
        d_in = layer.kernel.shape[0]
        a = np.asarray(layer.A[...])
        assert a.shape == (4, d_in) and np.abs(a).max() <= 1 / np.sqrt(d_in) and np.abs(a).min() > 0
        assert not np.any(layer.B[...]) and layer.B.shape == (layer.kernel.shape[1], 4)
    # W is no nnx.Param: no gradient, no optimizer state; A and B (and the full-rank rest) are
    params = nnx.state(wrapped, nnx.Param)
    assert "kernel" not in params["blocks"][0]["attention"]["q"] and "kernel" in params["blocks"][0]["swiglu"]["up"]
    # bug 1 of SPEC §4 (A and B both zeroed at wrap): then no gradient would reach either factor
    g = grads(*nnx.split(wrapped), TOKENS)
    for name in "qkvo":
        assert np.abs(g["blocks"][0]["attention"][name]["B"][...]).sum() > 0, name
    zero_w = relora.wrap(nnx.merge(*plain), rcfg(keep_original_weights=False))
    assert not np.any(zero_w.blocks[0].swiglu.up.kernel[...])


def test_lora_dropout_only_in_training():
    rc = rcfg(lora_dropout=0.5)
    model = relora.wrap(Decoder(SMALL, nnx.Rngs(0)), rc)
    for layer in relora.lora_layers(model):
        layer.B[...] = jnp.full(layer.B.shape, 0.1)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, train_state.make_tx(make_cfg().opt, 1e-2), wrt=nnx.Param)))
    forward = lambda g, s, t, dropout_key: (s, dict(logits=relora.in_training(nnx.merge(g, s)[0], dropout_key)(t)))
    in_training = lambda rc: np.asarray(jax.jit(relora.training_step(forward, rc), static_argnums=0)(
        graphdef, state, TOKENS[:, :-1])[1]["logits"])
    plain = logits(graphdef, state)  # evaluation, sampling: the model called outside training_step
    np.testing.assert_array_equal(logits(graphdef, state), plain)
    assert np.abs(in_training(rc) - plain).mean() > 0.1 * np.abs(plain).mean()


# ---------------------------------------------------------------------------------------------- merge and reset

@pytest.fixture(scope="module")
def fresh():
    """A new rank-8 model with trainable scaling, resets every 3 steps, on one device (tests copy it)."""
    rc = rcfg(r=8, reset_frequency=3, trainable_scaling=True)
    return (rc, *train_state.init_state(SMALL, adamw(), mesh_of(1, 1), 0, rc))


copy = jax.jit(lambda state: jax.tree.map(jnp.copy, state))  # merge_and_reset and the step donate their input


@pytest.fixture(scope="module")
def trained(fresh):
    """`fresh` after 3 steps, not merged yet: graphdef, state, losses."""
    rc, graphdef, state = fresh
    return rc, *run_steps(rc, mesh_of(1, 1), 3, merge=False, start=(graphdef, copy(state)))


def test_merge_keeps_function_and_shardings_fsdp8_matches_one_device_trainable_scaling(trained):
    rc, _, _, ref_losses = trained
    mesh = mesh_of(1, 8)
    graphdef, state, losses = run_steps(rc, mesh, 3, merge=False)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)  # 8-way FSDP == one device
    model = nnx.merge(graphdef, state)[0]
    old_a = [np.asarray(layer.A[...]) for layer in relora.lora_layers(model)]
    before, scales = logits(graphdef, state), [float(layer.scale()) for layer in relora.lora_layers(model)]
    assert all(0 < s < 0.99 for s in scales)  # tanh(s) != 1: a merge without the scale would show (bug 3)
    with jax.set_mesh(mesh):
        state, _ = relora.merge_and_reset(graphdef, state, 1, rc)
    np.testing.assert_allclose(logits(graphdef, state), before, rtol=1e-4, atol=1e-5)
    model = nnx.merge(graphdef, state)[0]
    layers = relora.lora_layers(model)
    for layer, a, new_a in zip(layers, old_a, relora.draw_a(rc, 1, [layer.A.shape for layer in layers])):
        assert not np.any(layer.B[...]) and not np.allclose(layer.A[...], a)
        np.testing.assert_array_equal(layer.A[...], new_a)  # from (seed, reset index): the same on every host
        assert float(layer.s[...]) == 1.0  # bug 2 of SPEC §4: s reset to 0 would switch the branch off for good
    # shardings are the declared ones; W, A and B keep 1/8 of their D dimension per device
    specs = jax.tree.leaves(nnx.get_partition_spec(state))
    for x, spec in zip(jax.tree.leaves(state), specs):
        assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim), spec
    up = model.blocks[0].swiglu.up
    assert up.kernel[...].addressable_shards[0].data.shape == (SMALL.d_model // 8, SMALL.d_hidden)
    assert up.A[...].addressable_shards[0].data.shape == (8, SMALL.d_model // 8)
    assert model.blocks[0].swiglu.down.B[...].addressable_shards[0].data.shape == (SMALL.d_model // 8, 8)
    # the branch is alive after the reset: the next step moves B again
    _, state, _ = run_steps(rc, mesh, 1, merge=False, start=(graphdef, state))
    assert all(np.any(layer.B[...]) for layer in relora.lora_layers(nnx.merge(graphdef, state)[0]))


def test_remat_trains_a_wrapped_model_like_no_remat(trained):
    rc, _, _, ref_losses = trained  # the frozen W comes from outside the gradient's trace: remat must not write it
    _, _, losses = run_steps(rc, mesh_of(1, 1), 1, mcfg=dataclasses.replace(SMALL, remat="block"))
    np.testing.assert_allclose(losses, ref_losses[:1], rtol=1e-6)


def test_merge_with_fixed_scale_keeps_the_layer_function():
    rc = rcfg()  # scale lora_alpha / r = 8: bug 3 of SPEC §4 (W += B A) would show
    layer = relora.LoRALinear(Linear(32, 64, "mlp_in_DF", SMALL, nnx.Rngs(0)), rc, 0, relora.draw_a(rc, 0, [(4, 32)])[0])
    layer.B[...] = 0.1 * jax.random.normal(jax.random.key(0), layer.B.shape)
    x = jax.random.normal(jax.random.key(1), (5, 32))
    before = np.asarray(layer(x))
    layer.merge_and_reset(relora.draw_a(rc, 1, [(4, 32)])[0])
    np.testing.assert_allclose(layer(x), before, rtol=1e-5, atol=1e-6)


def lora_moments(opt_state_flat, model):
    lora = {p for p, _ in nnx.to_flat_state(nnx.state(model, relora.LoRAParam))}
    return {p: np.asarray(v[...]) for p, v in opt_state_flat if any(p[i:] in lora for i in range(len(p)))}


@pytest.mark.parametrize("mode,ratio,expected", [("random", 0.999, 0.999), ("magnitude", 0.9, 0.9), ("full", 0.999, 1.0)])
def test_optimizer_reset_prunes_lora_moments_only_and_keeps_count(trained, mode, ratio, expected):
    rc, graphdef, state, _ = trained
    rc = dataclasses.replace(rc, optimizer_reset=mode, prune_ratio=ratio)
    state = copy(state)
    model, opt = nnx.merge(graphdef, state)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(opt))}
    moments = lora_moments(nnx.to_flat_state(nnx.state(opt)), model)
    assert len(moments) == 2 * 3 * 7 and np.mean([np.mean(m == 0) for m in moments.values()]) < 0.2  # A, B, s
    state, zeroed = relora.merge_and_reset(graphdef, state, 1, rc)
    model, opt = nnx.merge(graphdef, state)
    after = dict(nnx.to_flat_state(nnx.state(opt)))
    moments = lora_moments(after.items(), model)
    # bug 4 of SPEC §4 (an optimizer reset that prunes nothing): count the zeros in the state itself
    in_state = sum((m == 0).sum() for m in moments.values()) / sum(m.size for m in moments.values())
    np.testing.assert_allclose(float(zeroed), in_state, rtol=1e-6)
    assert abs(in_state - expected) < (0.01 if mode != "full" else 1e-9), in_state
    for p, v in after.items():
        if p not in moments:  # Adam's count, the schedule's count, the step, the full-rank moments: untouched
            np.testing.assert_array_equal(v[...], before[p], err_msg=str(p))
    assert int(opt.step[...]) == 3
    if mode == "magnitude":  # what survives is the largest
        b = next(p for p in moments if p[-1] == "B" and "mu" in p)
        kept, old = moments[b] != 0, np.abs(before[b])
        assert old[kept].min() >= old[~kept].max()


def test_adam_state_covers_only_trainable_params(fresh):
    _, graphdef, state = fresh
    s = relora.sizes(graphdef, state)
    full = count_params(nnx.eval_shape(lambda: Decoder(SMALL, nnx.Rngs(0))))  # all trainable without ReLoRA
    model, opt = nnx.merge(graphdef, state)
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, relora.LoRAParam)))
    assert s["lora_layers"] == 7 and s["trainable_params"] + s["frozen_params"] == full + lora  # every W once
    mu, nu = (nnx.state(opt)["opt_state"][1][0][k] for k in ("mu", "nu"))
    assert sum(x.size for x in jax.tree.leaves(mu)) == sum(x.size for x in jax.tree.leaves(nu)) == s["trainable_params"]
    # two float32 moments per trainable parameter, plus Adam's count, the schedule's count and the step
    assert 0 <= s["opt_state_bytes"] - 2 * 4 * s["trainable_params"] <= 3 * 4
    assert s["opt_state_bytes"] < 0.7 * 2 * 4 * full  # r = 8 of d_model = 32: most of what is left is embedding, head


# ---------------------------------------------------------------------------------------------- schedule, rank

def test_jagged_schedule_matches_hand_computed_table():
    # envelope: warmup 0 -> 1 over 2 steps, then 0.1 + 0.45 (1 + cos(pi (t - 2) / 20)) down to 0.1 at t = 22
    o = OmegaConf.create(dict(peak_lr=1.0, warmup_steps=2, decay="cosine", min_lr_ratio=0.1))
    env = train_state.lr_schedule(o, 22)
    # resets after steps 5, 10, 15, 20: lr 0 there, then (t - t_k) / 2 x envelope(t_k + 2)
    table = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.977975, 5: 0.0, 6: 0.434099, 7: 0.868198, 9: 0.754296, 10: 0.0,
             11: 0.275, 12: 0.55, 15: 0.0, 16: 0.115901, 17: 0.231802, 20: 0.0, 21: 0.05, 22: 0.1}
    jagged = relora.jagged_schedule(env, rcfg(reset_frequency=5, restart_warmup_steps=2))
    for t, lr in table.items():
        np.testing.assert_allclose(float(jagged(t)), lr, atol=1e-6, err_msg=f"step {t}")
    # warm start 5, resets every 10: the switch to ReLoRA at 5 restarts too, then 15; nothing at 10 or 20
    table = {4: 0.977975, 5: 0.0, 6: 0.434099, 7: 0.868198, 10: 0.689058, 15: 0.0, 16: 0.115901, 17: 0.231802,
             20: 0.122025}
    jagged = relora.jagged_schedule(env, rcfg(reset_frequency=10, restart_warmup_steps=2, warm_start_steps=5))
    for t, lr in table.items():
        np.testing.assert_allclose(float(jagged(t)), lr, atol=1e-6, err_msg=f"warm start, step {t}")


def test_cumulative_update_rank_grows_with_resets_but_not_with_plain_lora(fresh):
    rc, graphdef, state = fresh  # r = 8, up: [32, 64]
    start = effective_weight(nnx.merge(graphdef, state)[0].blocks[0].swiglu.up)

    def rank(merge):
        _, new, _ = run_steps(rc, mesh_of(1, 1), 15, merge=merge, start=(graphdef, copy(state)))
        delta = effective_weight(nnx.merge(graphdef, new)[0].blocks[0].swiglu.up) - start
        sv = np.linalg.svd(delta, compute_uv=False)
        return int((sv > 1e-3 * sv[0]).sum())

    relora_rank, lora_rank = rank(True), rank(False)
    assert lora_rank <= rc.r, lora_rank
    assert rc.r < relora_rank, relora_rank  # 5 merges of rank-r updates: up to 32 here


# ---------------------------------------------------------------------------------------------- the trainer

def test_trainer_warm_start_then_resets_loss_falls(tiny_cfg, capsys):
    cfg = tiny_cfg("train.steps=24", "train.log_every=6", "opt.peak_lr=1e-2", "opt.warmup_steps=2", "model.n_layers=1",
                   "model.relora.warm_start_steps=6", "model.relora.reset_frequency=6", "model.relora.r=4",
                   "model.relora.restart_warmup_steps=2", "model.relora.trainable_scaling=true",
                   "model.relora.lora_dropout=0.0", config="relora")  # dropout: its own test, compiles slowly
    trainer = train.Trainer(cfg)
    assert relora.sizes(trainer.graphdef, trainer.state)["lora_layers"] == 0  # full-rank during the warm start
    final = trainer.run()
    out = capsys.readouterr().out
    assert "relora=wrapped" in out and "trainable_params=" in out and "opt_state_bytes=" in out
    for k in (1, 2, 3):
        assert f"relora_reset={k} optimizer_zeroed=0.99" in out, out
    assert relora.sizes(trainer.graphdef, trainer.state)["lora_layers"] == 7
    history = json.loads((trainer.run_dir / "metrics.json").read_text())["history"]
    assert "lora_s_mean" in history[-1] and "lora_s_std" in history[-1] and "lora_s_mean" not in history[0]
    assert history[2]["lr"] == pytest.approx(float(trainer.schedule(17)))
    assert float(trainer.schedule(12)) == 0.0 and float(trainer.schedule(6)) == 0.0
    assert history[-1]["loss"] < history[0]["loss"] - 0.5 and final["val_loss"] < history[0]["loss"] - 0.5, history
