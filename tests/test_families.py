"""Model families (LSTM, k-gram MLP) and the decoder's research knobs: each trains on 8 devices, has the parameter
count of its hand count, is causal, generates with its cache / state as by recomputation, checkpoints and samples."""
import json
import subprocess
import sys
from functools import partial

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoint
import export
import steps
import train
from conftest import ROOT, TINY, make_cfg
from model import ConfigError, count_params, generate
import config
import dynamics
import families
import train_state
from loss import cross_entropy, loss_fn

V, T = 64, 16
DECODER = dict(vocab_size=V, seq_len=T, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=64, dtype="float32")
# every non-default knob value at once (each is also counted on its own below), and NoPE
ALL_KNOBS = dict(pos_encoding="absolute", norm_placement="post", norm_type="layernorm", mlp="gelu",
                 tie_embeddings=True, qk_norm=True, z_loss=1e-3)
CONFIGS = {
    "decoder_knobs": {**DECODER, **ALL_KNOBS},
    "decoder_nope": {**DECODER, "pos_encoding": "none"},
    "lstm": dict(DECODER, kind="lstm", lstm=dict(d_embed=16, d_hidden=24, n_layers=2)),
    "kgram": dict(DECODER, kind="kgram_mlp", kgram=dict(k=3, d_embed=8, d_hidden=32, n_inner=1)),
    "kgram_onehot": dict(DECODER, kind="kgram_mlp", kgram=dict(k=3, embedding="onehot", d_hidden=32, n_inner=2)),
}


def build(name_or_block, seed=0):
    block = CONFIGS[name_or_block] if isinstance(name_or_block, str) else name_or_block
    return families.build_model(families.model_config(block), nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_step_on_8_devices(name):
    mcfg = families.model_config(CONFIGS[name])
    mesh = train_state.make_mesh(2, 4)
    tx = train_state.make_tx(make_cfg().opt, lambda step: 1e-2)
    graphdef, state = train_state.init_state(mcfg, tx, mesh, seed=0)
    step = jax.jit(partial(steps.train_step, graphdef), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(2), (16, T + 1), 0, V)
    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        losses = []
        for _ in range(4):
            state, m = step(state, tokens)
            losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses  # it learns the fixed batch
    # parameters as declared: the decoder FSDP-shards its [D, F] weights 4 ways; the families replicate
    model = nnx.merge(graphdef, state)[0]
    if name.startswith("decoder"):
        up = model.blocks[0].mlp.up.kernel if mcfg.mlp == "gelu" else model.blocks[0].swiglu.up.kernel
        assert up[...].addressable_shards[0].data.shape == (mcfg.d_model // 4, mcfg.d_hidden)
    else:
        for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
            assert x.addressable_shards[0].data.shape == x.shape


@pytest.mark.parametrize("name", ["kgram"])  # the loss's term, the same for every family (decoder_knobs trains with it)
def test_z_loss_adds_weight_times_mean_squared_logsumexp(name):
    model = build({**CONFIGS[name], "z_loss": 0.5})
    tokens = jax.random.randint(jax.random.key(3), (2, T + 1), 0, V)
    logits = model(tokens[:, :-1])
    ce = cross_entropy(logits, tokens[:, 1:])
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    np.testing.assert_allclose(loss_fn(model, tokens), ce + 0.5 * z, rtol=1e-6)
    assert float(z) > 1  # the term is not negligible here, so a dropped term would fail
    no_z = build({**CONFIGS[name], "z_loss": 0.0})  # the same init: weight 0 adds nothing
    np.testing.assert_allclose(loss_fn(no_z, tokens), ce, rtol=1e-6)


def _scatter_adds(jaxpr):
    """The output dtypes of every scatter-add in a closed jaxpr, nested calls, scans and custom VJPs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add":
            found += [v.aval.dtype for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _scatter_adds(sub)
    return found


@pytest.mark.parametrize("name", ["decoder", *CONFIGS])
def test_bfloat16_runs_sum_embedding_gradients_in_float32(name):
    """A lookup's gradient is a scatter-add over every position that reads a row. Casting the table to the compute
    dtype before the lookup made that sum bfloat16: a token read 32768 times got a gradient 34% off. Rows are cast
    after the lookup, so the sum is float32 as the parameter is."""
    block = dict(CONFIGS.get(name, DECODER), dtype="bfloat16")
    model = families.build_model(families.model_config(block), nnx.Rngs(0))
    tokens = jnp.zeros((2, T + 1), jnp.int32)
    adds = _scatter_adds(jax.make_jaxpr(nnx.grad(lambda m: loss_fn(m, tokens)))(model).jaxpr)
    assert adds or name == "kgram_onehot", "no lookup gradient found"
    assert all(d == jnp.float32 for d in adds), f"a lookup's gradient is summed in {adds}"


# ---------------------------------------------------------------------------------------------- parameter counts

def decoder_hand_count(c) -> int:
    D, L, H, K, F, E = c["d_model"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["d_hidden"], c["d_model"] // c["n_heads"]
    norm = 2 * D if c.get("norm_type") == "layernorm" else D  # scale (+ bias)
    attn = D * H * E + 2 * D * K * E + H * E * D + (2 * E if c.get("qk_norm") else 0)
    mlp = (2 if c.get("mlp") == "gelu" else 3) * D * F
    n = V * D + L * (attn + mlp + 2 * norm)
    n += norm if c.get("norm_placement", "pre") == "pre" else 0  # post-norm has no final norm
    n += 0 if c.get("tie_embeddings") else D * V
    n += T * D if c.get("pos_encoding") == "absolute" else 0
    return n


@pytest.mark.parametrize("knob", [{}, dict(pos_encoding="absolute"), dict(pos_encoding="none"),
                                  dict(norm_placement="post"), dict(norm_type="layernorm"), dict(mlp="gelu"),
                                  dict(tie_embeddings=True), dict(qk_norm=True), dict(z_loss=1e-4), ALL_KNOBS])
def test_decoder_knob_parameter_counts(knob):
    c = {**DECODER, **knob}
    assert count_params(nnx.eval_shape(lambda: build(c))) == decoder_hand_count(c)


def test_family_parameter_counts_and_flops():
    # LSTM: embedding V M; per layer W_in [in, 4C], W_rec [C, 4C], bias 4C; head C V
    M, C = 16, 24
    lstm = build("lstm")
    hand = V * M + (M * 4 * C + C * 4 * C + 4 * C) + (C * 4 * C + C * 4 * C + 4 * C) + C * V
    assert count_params(lstm) == hand
    assert lstm.cfg.flops_per_token() == 6 * (hand - V * M - 2 * 4 * C)  # every matrix but the lookup
    # k-gram, learned: embedding V M, W_in [3 M, C] + bias, one inner C x C + bias, head C V
    M, C = 8, 32
    kgram = build("kgram")
    hand = V * M + 3 * M * C + C + (C * C + C) + C * V
    assert count_params(kgram) == hand
    assert kgram.cfg.flops_per_token() == 6 * (hand - V * M - 2 * C)
    # one-hot: W_in [3, V, C] (a gather, no matmul) + bias, two inner layers, head
    onehot = build("kgram_onehot")
    hand = 3 * V * C + C + 2 * (C * C + C) + C * V
    assert count_params(onehot) == hand
    assert onehot.cfg.flops_per_token() == 6 * (2 * C * C + C * V)


@pytest.mark.parametrize("family,expected", [("decoder", (29.67, 6.93, 3.28)), ("lstm", (30.28, 6.91, 3.23)),
                                             ("kgram_mlp", (29.28, 6.85, 3.22))])
def test_study_presets_are_30m_7m_3m_at_vocabulary_50257(family, expected):
    for size, millions in zip(("small", "tiny", "pico"), expected):
        cfg = make_cfg(f"study={family}_{size}", "model.vocab_size=50257")
        assert cfg.model.kind == family
        mcfg = families.model_config(cfg.model)
        n = count_params(nnx.eval_shape(lambda: families.build_model(mcfg, nnx.Rngs(0))))
        assert abs(n / 1e6 - millions) < 0.005, (family, size, n)  # the count written in the preset and README
        target = {"small": 30, "tiny": 7, "pico": 3}[size]
        assert abs(n / 1e6 - target) / target < 0.1
        assert f"{millions:.2f}M" in (ROOT / "configs" / "study" / f"{family}_{size}.yaml").read_text()


# ---------------------------------------------------------------------------------------------- causality

CAUSAL = {**CONFIGS, **{f"decoder_{k}": {**DECODER, k: v} for k, v in ALL_KNOBS.items() if k != "z_loss"}}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_gradient_of_future_tokens_is_exactly_zero(name):
    model = build(CAUSAL[name])
    tokens = jnp.arange(T)[None]  # every position a distinct token: row i of the input table = position i

    @nnx.jit
    def grads(model, t):
        g = nnx.grad(lambda m: jax.lax.dynamic_index_in_dim(m(tokens)[0], t, keepdims=False).sum())(model)
        # per token, the gradient of the input table: embedding [V, M], or one-hot W_in [N, V, C] -> [V, N C]
        table = g["embed"][...] if "embed" in g else g["w_in"][...].swapaxes(0, 1).reshape(V, -1)
        return table, (g["pos_embed"][...] if "pos_embed" in g else None)

    window = CAUSAL[name].get("kgram", {}).get("k")
    for t in (0, 5, T - 2):
        table, pos = map(lambda x: None if x is None else np.asarray(x), grads(model, t))
        # row V-1 is a token the input never holds: only a tied head gives it a gradient, the same as any row's
        unused = table[V - 1]
        assert np.all(table[t + 1:] == unused), f"logits at {t} depend on later tokens"
        seen = range(max(0, t - window + 1) if window else 0, t + 1)
        assert all(np.abs(table[i] - unused).sum() > 0 for i in seen), f"logits at {t} ignore earlier tokens"
        if window:  # the k-gram model reads exactly its window
            assert np.all(table[:max(0, t - window + 1)] == unused)
        if pos is not None:
            assert np.all(pos[t + 1:] == 0) and np.all(np.abs(pos[:t + 1]).sum(-1) > 0)


# ---------------------------------------------------------------------------------------------- generation

@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_generation_with_left_padding_matches_recomputation(name):
    model = build(name, seed=1)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, V)
    # the cache / state carried over two chunks gives the logits of one pass
    @nnx.jit
    def chunked(model, tokens):
        a, cache = model(tokens[:, :7], cache=model.init_cache(3, T), pos=0)
        b, _ = model(tokens[:, 7:], cache=cache, pos=7)
        return jnp.concatenate([a, b], axis=1), model(tokens)

    two, full = chunked(model, tokens)
    np.testing.assert_allclose(two, full, atol=1e-5)
    # prompts of lengths 5, 3, 1 left-padded into one batch: each row continues as it would alone (greedy)
    lengths, new = (5, 3, 1), 6
    padded = np.zeros((3, 5), np.int32)
    for b_, n in enumerate(lengths):
        padded[b_, 5 - n:] = tokens[b_, :n]
        padded[b_, :5 - n] = 7  # padding that is not zero: it must be ignored, not merely be harmless
    out = np.asarray(generate(model, jnp.asarray(padded), new, jax.random.key(0), temperature=0.0,
                              start=jnp.asarray([5 - n for n in lengths])))
    # recomputation: each row unpadded from position 0, right-padded to one shape (causal: the right padding
    # cannot reach the logits read), the whole prefix run again for every token
    forward = nnx.jit(lambda m, x: m(x))
    seq = np.zeros((3, 5 + new), np.int32)
    for b_, n in enumerate(lengths):
        seq[b_, :n] = tokens[b_, :n]
    for i in range(new):
        logits = np.asarray(forward(model, jnp.asarray(seq)))
        for b_, n in enumerate(lengths):
            seq[b_, n + i] = logits[b_, n + i - 1].argmax()
    for b_, n in enumerate(lengths):
        np.testing.assert_array_equal(out[b_, 5:], seq[b_, n:n + new], err_msg=f"row {b_}")


# ---------------------------------------------------------------------------------------------- trainer, checkpoints

FAMILY_TINY = {"lstm": ["model.kind=lstm", "model.lstm.d_embed=16", "model.lstm.d_hidden=24"],
               "kgram_mlp": ["model.kind=kgram_mlp", "model.kgram.d_embed=16", "model.kgram.d_hidden=32"]}


@pytest.mark.parametrize("kind", ["lstm"])  # the k-gram model and a knobbed decoder: in the multirun test
def test_family_trains_checkpoints_resumes_samples_and_loads(kind, tiny_cfg, capsys):
    cfg = tiny_cfg(*FAMILY_TINY[kind], "sample.max_new_tokens=6", "sample.n_samples=3", "eval.every_steps=2",
                   "checkpoint.dynamics.layers=[attention.v]")
    trainer = train.Trainer(cfg)
    final = trainer.run()
    out = capsys.readouterr().out
    assert f"learning dynamics: off for model.kind={kind}" in out and "sample: 'The" in out
    assert not (trainer.run_dir / "learning_dynamics").exists()
    metrics = json.loads((trainer.run_dir / "metrics.json").read_text())
    assert metrics["final"]["params"] == count_params(trainer.model)
    for n in range(1, 6):
        assert 0 < final[f"distinct_{n}"] <= 1 and 0 < final[f"greedy_distinct_{n}"] <= 1
    evals = [(h["step"], h["tokens"]) for h in metrics["history"] if "val_loss" in h]
    assert evals == [(2, 2 * 16 * 32), (3, 3 * 16 * 32)]  # every evaluation, with the tokens seen
    # nothing but the directory: the same function
    model, loaded_cfg, loop = train_state.load(trainer.run_dir)
    assert loop["step"] == 3 and loaded_cfg.model.kind == kind and type(model) is type(trainer.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 4096)
    np.testing.assert_array_equal(model(tokens), trainer.model(tokens))
    # resuming: same run_dir, more steps; another width is refused by name
    again = train.Trainer(tiny_cfg(*FAMILY_TINY[kind], "train.steps=4"))
    assert again.start_step == 3
    key = "lstm.d_hidden" if kind == "lstm" else "kgram.d_hidden"
    with pytest.raises(checkpoint.CheckpointError, match=f"model.{key}: checkpoint"):
        train.Trainer(tiny_cfg(*FAMILY_TINY[kind], f"model.{key}=40"))


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("overrides,match", [
    (["model.pos_encoding=alibi"], r"model.pos_encoding='alibi'; use one of \['rope', 'absolute', 'none'\]"),
    (["model.norm_placement=sandwich"], r"model.norm_placement='sandwich'; use one of \['pre', 'post'\]"),
    (["model.norm_type=batchnorm"], r"model.norm_type='batchnorm'"),
    (["model.mlp=relu"], r"model.mlp='relu'; use one of \['swiglu', 'gelu'\]"),
    (["model.z_loss=-1"], r"model.z_loss=-1"),
    (["model.kind=gru"], r"model.kind='gru'; use one of \['decoder', 'lstm', 'kgram_mlp'\]"),
    (["model.kind=kgram_mlp", "model.kgram.embedding=hashed"], r"model.kgram.embedding='hashed'"),
    (["model.kind=lstm", "model.lstm.n_layers=0"], r"model.lstm.n_layers=0"),
])
def test_bad_knob_or_family_names_the_key(overrides, match, tiny_cfg):
    with pytest.raises(ConfigError, match=match):
        train.Trainer(tiny_cfg(*overrides))


def test_relora_and_unknown_family_keys_are_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="model.relora is set but model.kind=lstm"):
        train.Trainer(tiny_cfg("model.kind=lstm", "+model.relora.r=4"))
    with pytest.raises(ConfigError, match=r"names \['swiglu'\], which this model lacks \(model.mlp=gelu: its MLP is `mlp`\)"):
        train.Trainer(tiny_cfg("model.mlp=gelu", "+model.relora.r=4"))
    with pytest.raises(ConfigError, match="unknown config key 'model.lstm.width'"):
        config.check_keys(make_cfg("+model.lstm.width=3"))
    with pytest.raises(ConfigError, match=r"model.lstm.width"):
        families.model_config(dict(kind="lstm", lstm=dict(width=3)))


def test_relora_wraps_the_gelu_mlp_by_its_name():
    import relora
    model = relora.wrap(build({**DECODER, "mlp": "gelu"}), relora.ReLoRAConfig(target_modules=("mlp",), r=4))
    wrapped = relora.lora_layers(model)
    assert len(wrapped) == 2 * DECODER["n_layers"] and isinstance(model.blocks[0].mlp.down, relora.LoRALinear)
    assert not isinstance(model.blocks[0].attention.q, relora.LoRALinear)


def test_dynamics_layers_follow_the_mlp_and_catch_typos():
    gelu = families.model_config({**DECODER, "mlp": "gelu"})
    layers, note = dynamics.choose_layers(gelu, ("attention.v", "swiglu.down", "mlp.down"))
    assert layers == ("attention.v", "mlp.down") and "skipping ['swiglu.down']" in note
    assert dynamics.choose_layers(families.model_config(DECODER), ("swiglu.down",)) == (("swiglu.down",), None)
    with pytest.raises(ConfigError, match="'swiglu.dwon' is not a layer"):
        dynamics.choose_layers(gelu, ("swiglu.dwon",))
    # the snapshot code finds the GELU MLP's layers by their names
    model = families.build_model(gelu, nnx.Rngs(0))
    graphdef, state = nnx.split((model, model))  # dynamics_step merges a (model, optimizer) pair
    tokens = jax.random.randint(jax.random.key(0), (4, T + 1), 0, V)
    out = jax.jit(partial(dynamics.dynamics_step, graphdef, layers=layers))(state, tokens)
    assert out["activations/blocks.1.mlp.down"].shape == (4, gelu.d_model)
    np.testing.assert_array_equal(out["weights/blocks.0.mlp.down"], model.blocks[0].mlp.down.kernel[...])
    assert np.abs(out["gradients/blocks.0.mlp.down"]).sum() > 0


@pytest.mark.parametrize("knob", [k for k in ALL_KNOBS if k not in ("tie_embeddings", "z_loss")])
def test_export_refuses_knobs_llama_lacks(knob, tmp_path):
    model = nnx.eval_shape(lambda: build({**DECODER, knob: ALL_KNOBS[knob]}))
    with pytest.raises(ConfigError, match=f"model.{knob}="):
        export.export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_export_refuses_other_families(tmp_path):
    with pytest.raises(ConfigError, match="only model.kind=decoder exports"):
        export.export_hf(nnx.eval_shape(lambda: build("lstm")), tmp_path / "hf")


# ---------------------------------------------------------------------------------------------- multirun and report

def test_multirun_writes_one_run_per_job_and_report_compares_them(corpus_cache, tmp_path):
    """A k-gram MLP and a decoder with every non-default knob (the knob keys are ignored by the k-gram model):
    each trains, evaluates, samples and checkpoints into its own run directory; report.py compares them."""
    sweep = tmp_path / "sweep"
    knobs = [f"model.{k}={str(v).lower()}" for k, v in ALL_KNOBS.items()]
    cmd = [sys.executable, str(ROOT / "main.py"), "-m", "model.kind=kgram_mlp,decoder", *TINY, *knobs,
           *FAMILY_TINY["kgram_mlp"][1:], f"data.cache_dir={corpus_cache}", "sample.max_new_tokens=6",
           "sample.n_samples=2", "train.steps=2", f"hydra.sweep.dir={sweep}"]
    env = dict(__import__("os").environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for job, kind in ((0, "kgram_mlp"), (1, "decoder")):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert np.isfinite(metrics["final"]["val_loss"]) and (sweep / str(job) / "checkpoints" / "step_2").is_dir()
        assert f"kind: {kind}" in (sweep / str(job) / "config.yaml").read_text()
        assert 0 < metrics["final"]["greedy_distinct_1"] <= 1 and 0 < metrics["final"]["distinct_5"] <= 1
    assert not (tmp_path / "runs").exists()  # not every job into runs/<name>
    for job, name in ((0, "KGramMLP"), (1, "Decoder")):  # each model from its directory alone
        model, _, loop = train_state.load(sweep / str(job))
        assert type(model).__name__ == name and loop["step"] == 2
    assert (model.cfg.pos_encoding, model.cfg.norm_placement, model.cfg.mlp, model.cfg.tie_embeddings) == \
        ("absolute", "post", "gelu", True)
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (sweep / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| model.kind=")]
    assert len(rows) == 2 and "kgram_mlp" in rows[0] and "decoder" in rows[1], md
    csv = (sweep / "report.csv").read_text().splitlines()
    assert len(csv) == 3 and "val_loss" in csv[0] and "greedy_distinct_5" in csv[0] and "top_p_distinct_1" in csv[0]
    assert (sweep / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
