"""Hugging Face Llama export and import: a picojax Decoder <-> a `transformers.LlamaForCausalLM` checkpoint folder
(config.json + model.safetensors).

    python export.py runs/local hf/local              # the latest checkpoint of a run (or of a checkpoint dir)
    python export.py runs/local hf/local --step 1000  # a given step

A module of its own because it is the one place that knows Hugging Face's names and layouts, and because nothing
in training needs it: the trainer never imports it, and exporting needs neither `transformers` nor `torch` (the
weights are written with `safetensors` alone; the parity tests load them with transformers).

The pico-decoder is a Llama (SPEC §1) so the conversion is a renaming plus layouts:
    picojax Linear kernel [in, out] (y = x @ W)  ->  torch Linear weight [out, in]  (transpose)
    embed [V, D]                                 ->  model.embed_tokens.weight [V, D]
    head kernel [D, V]                           ->  lm_head.weight [V, D] (untied; tied: tie_word_embeddings)
    RMSNorm scale [D]                            ->  *_layernorm.weight / model.norm.weight
RoPE needs no q / k permutation: picojax rotates halves (model.apply_rope), as Hugging Face Llama does; the
parity tests (tests/test_export.py) check it. A ReLoRA-wrapped model exports its merged weights W + scale (B A)^T.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import load_file as load_flax  # reads bfloat16 too, which numpy cannot hold
from safetensors.numpy import save_file

import data
import train_state
from checkpoint import CheckpointError
from config import ConfigError
from model import BLOCK_LINEARS, Decoder, ModelConfig

# picojax module path under blocks.<i> -> Hugging Face Llama name under model.layers.<i> (model.BLOCK_LINEARS)
LINEARS = {ours: names[0] for ours, names in BLOCK_LINEARS.items() if names[0]}
NORMS = {"attention_norm": "input_layernorm", "swiglu_norm": "post_attention_layernorm"}


# research knobs (model.py) that a Hugging Face Llama cannot represent, and the value it has
NOT_LLAMA = {"pos_encoding": "rope", "norm_placement": "pre", "norm_type": "rmsnorm", "mlp": "swiglu", "qk_norm": False}


def check_llama(cfg) -> None:
    """Refuse a model that is not a Llama: another model.kind, or a knob Llama does not have."""
    if not cfg.linears():  # no decoder blocks
        raise ConfigError(f"only model.kind=decoder exports to Hugging Face Llama; this model is model.kind={cfg.KIND}")
    bad = [f"model.{k}={getattr(cfg, k)!r}" for k, ok in NOT_LLAMA.items() if getattr(cfg, k) != ok]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: a Hugging Face Llama has RoPE, pre-norm RMSNorm, SwiGLU and no QK-norm; "
                          f"only models trained with " + ", ".join(f"model.{k}={v}" for k, v in NOT_LLAMA.items())
                          + " export (tie_embeddings and z_loss are fine)")


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of the LlamaForCausalLM equal to the pico-decoder `cfg`. rope_theta is written both at the top
    (transformers 4.x) and in rope_parameters (5.x)."""
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        hidden_size=cfg.d_model, intermediate_size=cfg.d_hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=cfg.init_std, torch_dtype="float32",
    )


def hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face Llama names and layouts, as float32 numpy arrays (no lm_head.weight
    with tied embeddings: Llama then reads the embedding)."""
    check_llama(model.cfg)
    host = lambda x: np.asarray(jax.device_get(x), np.float32)
    out = {"model.embed_tokens.weight": host(model.embed[...]),
           "model.norm.weight": host(model.norm.scale[...])}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = host(model.head.kernel[...]).T
    for i, block in enumerate(model.blocks):
        for ours, theirs in LINEARS.items():
            parent, name = ours.split(".")
            # a ReLoRA layer's merged kernel W + scale (B A)^T, by relora's own merge (the model stays as it is)
            out[f"model.layers.{i}.{theirs}.weight"] = host(getattr(getattr(block, parent), name).merged_kernel()).T
        for ours, theirs in NORMS.items():
            out[f"model.layers.{i}.{theirs}.weight"] = host(getattr(block, ours).scale[...])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_hf(model: Decoder, out_dir) -> Path:
    """Write config.json and model.safetensors, loadable with `LlamaForCausalLM.from_pretrained(out_dir)`."""
    check_llama(model.cfg)  # before anything is written
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    return out


def import_hf(path, dtype: str = "float32") -> tuple[Decoder, ModelConfig]:
    """A Hugging Face Llama checkpoint folder (config.json and one or more *.safetensors) as a picojax Decoder
    with compute dtype `dtype` (parameters are float32, as in training), and its ModelConfig."""
    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} holds no config.json; point import_hf at a Hugging Face model folder")
    hf = json.loads((path / "config.json").read_text())
    cfg = from_hf_config(hf, path, dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} holds no *.safetensors weights (PyTorch .bin files: re-save the model with "
                          f"`save_pretrained(dir)`, which writes safetensors)")
    weights = {}
    for f in files:
        weights.update(load_flax(str(f)))
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # a tied head becomes an untied copy

    def take(name, transpose=False):
        if name not in weights:
            raise ConfigError(f"{path} has no tensor {name!r}; is it a Llama checkpoint?")
        w = jnp.asarray(weights[name], jnp.float32)
        return w.T if transpose else w

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    new = {("embed",): take("model.embed_tokens.weight"), ("norm", "scale"): take("model.norm.weight"),
           ("head", "kernel"): take("lm_head.weight", transpose=True)}
    for i in range(cfg.n_layers):
        for ours, theirs in LINEARS.items():
            new[("blocks", i, *ours.split("."), "kernel")] = take(f"model.layers.{i}.{theirs}.weight", transpose=True)
        for ours, theirs in NORMS.items():
            new[("blocks", i, ours, "scale")] = take(f"model.layers.{i}.{theirs}.weight")
    flat = []
    for p, v in nnx.to_flat_state(state):
        if v.shape != new[p].shape:
            raise ConfigError(f"{path}: tensor for {'.'.join(map(str, p))} has shape {new[p].shape}, expected "
                              f"{v.shape}")
        flat.append((p, v.replace(new[p])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def from_hf_config(hf: dict, path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama config.json; refuses what the pico-decoder cannot represent."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{path}/config.json: model_type {hf['model_type']!r}; only Llama checkpoints import")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{path}/config.json: RoPE scaling {rope!r}; picojax implements plain RoPE only")
    problems = [f"{k}={hf.get(k)}" for k, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
                if hf.get(k, ok) != ok]
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, D // H) or D % H:
        problems.append(f"head_dim={hf.get('head_dim')} != hidden_size / num_attention_heads = {D / H}")
    if problems:
        raise ConfigError(f"{path}/config.json: {', '.join(problems)}; the pico-decoder has no biases, SwiGLU (silu) "
                          f"and head dim d_model / n_heads")
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], seq_len=hf.get("max_position_embeddings", 2048), d_model=D,
        n_layers=hf["num_hidden_layers"], n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H,
        d_hidden=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02), dtype=dtype)
    cfg.validate()
    return cfg


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="Export a picojax checkpoint as a Hugging Face LlamaForCausalLM folder.")
    p.add_argument("src", help="a run directory (holding checkpoints/) or a checkpoint directory")
    p.add_argument("out", help="output folder: config.json, model.safetensors and the run's tokenizer.json")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    a = p.parse_args(argv)
    model, cfg, loop = train_state.load(a.src, a.step)
    out = export_hf(model, a.out)
    # the run's tokenizer, found as the trainer finds its data (`data.py prepare` writes one beside the .bin files),
    # so that AutoTokenizer.from_pretrained(out) works too
    tok = data.data_dir(cfg.data) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.json")
    print(f"exported step {loop['step']} of {a.src} to {out} (LlamaForCausalLM.from_pretrained({str(out)!r}))")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as e:  # bad input: the message says what to fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
