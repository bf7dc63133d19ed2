"""pico-train's PicoDecoderHF folders, both ways: import and export against a reference forward written from SPEC §5
(interleaved-pair RoPE, grouped-query attention, SwiGLU w_0 / w_1 / w_2), logits to 1e-4 in float32."""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import export
from model import ConfigError, Decoder, ModelConfig

CFG = dict(d_model=64, n_layers=2, vocab_size=96, max_seq_len=32, attention_n_heads=4, attention_n_kv_heads=2,
           activation_hidden_dim=96, norm_eps=1e-6, position_emb_theta=10000.0, batch_size=8)
TOKENS = np.random.RandomState(0).randint(0, CFG["vocab_size"], (2, 24))


def pico_tensors(c=CFG, seed=0) -> dict:
    """Random weights under PicoDecoderHF's names and [out, in] shapes (std 0.2, norms away from 1)."""
    rng = np.random.default_rng(seed)
    D, V, F, H, K = c["d_model"], c["vocab_size"], c["activation_hidden_dim"], c["attention_n_heads"], \
        c["attention_n_kv_heads"]
    E = D // H
    w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    norm = lambda: (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    out = {"pico_decoder.embedding_proj.weight": w(V, D), "pico_decoder.output_norm.weight": norm(),
           "pico_decoder.de_embedding_proj.weight": w(V, D)}
    for i in range(c["n_layers"]):
        p = f"pico_decoder.layers.{i}."
        out |= {p + "attention_norm.weight": norm(), p + "swiglu_norm.weight": norm(),
                p + "attention.q_proj.weight": w(H * E, D), p + "attention.k_proj.weight": w(K * E, D),
                p + "attention.v_proj.weight": w(K * E, D), p + "attention.o_proj.weight": w(D, H * E),
                p + "swiglu.w_0.weight": w(F, D), p + "swiglu.w_1.weight": w(F, D), p + "swiglu.w_2.weight": w(D, F)}
    return out


def reference_logits(t: dict, c: dict, tokens) -> np.ndarray:
    """PicoDecoderHF's forward as SPEC §5 describes it, in float64 numpy."""
    D, H, K, eps = c["d_model"], c["attention_n_heads"], c["attention_n_kv_heads"], c["norm_eps"]
    E, (B, T) = D // H, tokens.shape
    g = lambda name: t[f"pico_decoder.{name}"].astype(np.float64)
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    freqs = 1.0 / c["position_emb_theta"] ** (np.arange(0, E, 2) / E)  # [E/2]
    rot = np.exp(1j * np.arange(T)[:, None] * freqs)  # [T, E/2]

    def rope(x):  # [B, T, N, E]: pairs (x0, x1), (x2, x3), ... as complex numbers
        z = x.reshape(*x.shape[:-1], E // 2, 2)
        z = (z[..., 0] + 1j * z[..., 1]) * rot[None, :, None, :]
        return np.stack([z.real, z.imag], -1).reshape(x.shape)

    x = g("embedding_proj.weight")[tokens]
    for i in range(c["n_layers"]):
        L = lambda name: g(f"layers.{i}.{name}.weight")
        h = rms(x, L("attention_norm"))
        q = rope((h @ L("attention.q_proj").T).reshape(B, T, H, E))
        k = rope((h @ L("attention.k_proj").T).reshape(B, T, K, E)).repeat(H // K, axis=2)
        v = (h @ L("attention.v_proj").T).reshape(B, T, K, E).repeat(H // K, axis=2)
        s = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(E) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v).reshape(B, T, D)
        x = x + a @ L("attention.o_proj").T
        h = rms(x, L("swiglu_norm"))
        gate = h @ L("swiglu.w_0").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ L("swiglu.w_1").T)) @ L("swiglu.w_2").T
    return rms(x, g("output_norm.weight")) @ g("de_embedding_proj.weight").T


def write_pico(folder, tensors, c=CFG):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(model_type="pico_decoder", architectures=["PicoDecoderHF"],
                                                        **c)))
    return folder


def test_a_pico_decoder_imports_with_its_logits(tmp_path):
    tensors = pico_tensors()
    model, cfg = export.import_hf(write_pico(tmp_path / "pico", tensors))
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_hidden, cfg.seq_len) == (64, 4, 2, 96, 32)
    ref = reference_logits(tensors, CFG, TOKENS)
    assert np.abs(ref).max() > 1  # large enough for 1e-4 to mean something
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), ref, rtol=0, atol=1e-4)
    # the rotation convention matters: without the row permutation the logits are far off
    plain = {k: v for k, v in tensors.items()}
    for k in [k for k in plain if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        plain[k] = plain[k].reshape(-1, 16, 64)[:, export.rope_rows(1, 16)].reshape(plain[k].shape)
    assert np.abs(reference_logits(plain, CFG, TOKENS) - ref).max() > 0.1


def test_pico_export_is_what_pico_train_reads_and_imports_back(tmp_path):
    cfg = ModelConfig(vocab_size=96, seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=96,
                      init_std=0.2, dtype="float32")
    model = Decoder(cfg, nnx.Rngs(0))
    out = export.export(model, tmp_path / "out", "pico", batch_size=8)
    config = json.loads((out / "config.json").read_text())
    assert config == dict(architectures=["PicoDecoderHF"], model_type="pico_decoder", **CFG)
    tensors = load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in pico_tensors().items()}
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(ours, reference_logits(tensors, CFG, TOKENS), rtol=0, atol=1e-4)
    back, _ = export.import_pico(out)
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(TOKENS))), ours)


def test_pico_import_refuses_a_folder_that_is_not_a_pico_decoder(tmp_path):
    with pytest.raises(ConfigError, match="holds no config.json"):
        export.import_hf(tmp_path)
    broken = {k: v for k, v in pico_tensors().items() if "layers.1.swiglu.w_2" not in k}
    with pytest.raises(ConfigError, match=r"no tensor 'pico_decoder.layers.1.swiglu.w_2.weight'.*pico-decoder"):
        export.import_hf(write_pico(tmp_path / "a", broken))
    with pytest.raises(ConfigError, match=r"model_type pico_decoder but no \['d_model'\]"):
        export.import_hf(write_pico(tmp_path / "b", pico_tensors(), {k: v for k, v in CFG.items() if k != "d_model"}))


def test_pico_format_learning_dynamics_are_what_pico_analyze_reads(tiny_cfg, tmp_path, monkeypatch):
    """checkpoint.dynamics.format=pico: checkpoints/step_<k>/learning_dynamics/{train,val}_{kind}.pt in pico-train's
    names and PyTorch layout (SPEC §5), holding the same numbers as picojax's own snapshot of that step; and
    analyze.py reads such a pico-train run directory back."""
    import torch
    import snapshots
    import train
    layers = ("attention.v", "attention.o", "swiglu.down")
    cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=1", "checkpoint.dynamics.format=pico",
                   f"checkpoint.dynamics.layers=[{','.join(layers)}]")
    train.Trainer(cfg).run()
    names = {"attention.v": "attention.v_proj", "attention.o": "attention.o_proj", "swiglu.down": "swiglu.w_2"}
    D, K, E, N = cfg.model.d_model, cfg.model.n_kv_heads, cfg.model.d_model // cfg.model.n_heads, cfg.eval.batch_size
    out_in = {"attention.v": (K * E, D), "attention.o": (D, D), "swiglu.down": (D, cfg.model.d_hidden)}
    for step in (0, 1, 2):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step}" / "learning_dynamics"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{s}_{k}.pt" for s in ("train", "val") for k in ("activations", "weights", "gradients"))
        ours = snapshots.load(tmp_path / "run", step)
        for split, theirs in (("train", "train"), ("eval", "val")):
            for kind in ("activations", "weights", "gradients"):
                d = torch.load(folder / f"{theirs}_{kind}.pt")
                assert set(d) == {f"layers.{i}.{names[x]}" for i in range(cfg.model.n_layers) for x in layers}
                for i in range(cfg.model.n_layers):
                    for x in layers:
                        t = d[f"layers.{i}.{names[x]}"].numpy()
                        rows = cfg.data.batch_size if split == "train" else N
                        assert t.shape == ((rows, out_in[x][0]) if kind == "activations" else out_in[x])
                        mine = ours[(split, kind, f"blocks.{i}.{x}")]
                        np.testing.assert_array_equal(t, mine if kind == "activations" else mine.T)

    # a pico-train run directory (only its .pt files, keys under pico-train's `_forward_module.` prefix, and
    # training_config.yaml): analyze.py reads it in picojax's names and gets the same numbers as from our own files
    import analyze
    pico_run = tmp_path / "pico-run"
    for step in (0, 1, 2):
        (pico_run / "checkpoints" / f"step_{step}" / "learning_dynamics").mkdir(parents=True)
        for f in (tmp_path / "run" / "checkpoints" / f"step_{step}" / "learning_dynamics").iterdir():
            d = {f"_forward_module.{k}": v for k, v in torch.load(f).items()}
            torch.save(d, pico_run / "checkpoints" / f"step_{step}" / "learning_dynamics" / f.name)
    (pico_run / "training_config.yaml").write_text((tmp_path / "run" / "training_config.yaml").read_text())
    assert snapshots.stored_steps(pico_run) == [0, 1, 2]
    ours, theirs = (analyze.analyze(r, ["per", "cka"], split=split) for r, split in
                    ((tmp_path / "run", "eval"), (pico_run, "eval")))
    assert "blocks.1.attention.ov_all" in theirs["per"][2]["gradients"]
    for m in ("per", "cka"):
        for step in (0, 1, 2):
            for kind, vals in ours[m][step].items():
                assert vals.keys() == theirs[m][step][kind].keys()
                np.testing.assert_allclose([theirs[m][step][kind][c] for c in vals], list(vals.values()), rtol=1e-6)
    assert analyze.compare([tmp_path / "run", pico_run], "per", "eval", tmp_path / "side-by-side.png").exists()
    monkeypatch.setitem(sys.modules, "torch", None)  # torch absent: a clear error, not a traceback
    with pytest.raises(snapshots.SnapshotError, match="pico-train's .pt files: reading them needs torch"):
        snapshots.load(pico_run, 2)


def test_pico_format_needs_torch_pico_layers_and_a_known_format(tiny_cfg, monkeypatch):
    import importlib.util
    import train
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"format=pico writes pico-train's .pt files, which needs torch: pip install"):
        train.Trainer(tiny_cfg("checkpoint.dynamics.format=pico", "checkpoint.dynamics.layers=[attention.v]"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"pico-train has no layer \['mlp.down'\]"):
        train.Trainer(tiny_cfg("model.mlp=gelu", "checkpoint.dynamics.format=pico",
                               "checkpoint.dynamics.layers=[mlp.down]"))
    with pytest.raises(ConfigError, match=r"checkpoint.dynamics.format='pt'; use one of \['picojax', 'pico'\]"):
        train.Trainer(tiny_cfg("checkpoint.dynamics.format=pt"))
