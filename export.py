"""Hugging Face Llama and pico-train's PicoDecoderHF, export and import: a picojax Decoder <-> a checkpoint folder
(config.json + model.safetensors) that `transformers.LlamaForCausalLM` or pico's own code loads.

    python export.py runs/local hf/local                  # the latest checkpoint of a run, as a Llama
    python export.py runs/local hf/local --step 1000      # a given step
    python export.py runs/local pico/local --format pico  # as pico-train writes its models (PicoDecoderHF)

A module of its own because it is the one place that knows other libraries' names and layouts, and because
nothing in training needs it: exporting needs neither `transformers` nor `torch` (the weights are written with
`safetensors` alone; the parity tests load them with transformers). The pico-decoder is a Llama (SPEC §1), so the
conversion is a renaming plus layouts:
    picojax Linear kernel [in, out] (y = x @ W)  ->  torch Linear weight [out, in]  (transpose)
    embed [V, D]                                 ->  model.embed_tokens.weight / pico_decoder.embedding_proj.weight
    head kernel [D, V]                           ->  lm_head.weight / pico_decoder.de_embedding_proj.weight [V, D]
    RMSNorm scale [D]                            ->  *_layernorm.weight / model.norm.weight (pico: *_norm.weight)
Llama rotates halves in RoPE, as picojax does (model.apply_rope), so q and k need no permutation; pico-train
rotates interleaved pairs, so the rows of q_proj and k_proj are permuted within each head (SPEC §5, `rope_rows`).
A ReLoRA-wrapped model exports its merged weights W + scale (B A)^T. The tokenizer goes with the weights, with its
special tokens declared (tokenizer_config.json, generation_config.json), so AutoTokenizer and lm-eval's `hf` model
load the folder as it is.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.flax import load_file as load_flax  # reads bfloat16 too, which numpy cannot hold
from safetensors.numpy import save_file

import host
import prepare
import tokenizer
import train_state
from checkpoint import Background, CheckpointError, into_step_dir
from config import BLOCK_LINEARS, ConfigError, DataError
from families import model_config
from model import Decoder, ModelConfig

# Each format's names: the model's own tensors, then per block (under <layers>.<i>) its norms and linear layers
# (config.BLOCK_LINEARS); (q, k) rows permuted for pico-train's interleaved RoPE.
FORMATS = {
    "hf": dict(embed="model.embed_tokens.weight", norm="model.norm.weight", head="lm_head.weight",
               layers="model.layers", norms={"attention_norm": "input_layernorm",
                                             "swiglu_norm": "post_attention_layernorm"},
               linears={ours: names[0] for ours, names in BLOCK_LINEARS.items() if names[0]}, interleaved=False),
    "pico": dict(embed="pico_decoder.embedding_proj.weight", norm="pico_decoder.output_norm.weight",
                 head="pico_decoder.de_embedding_proj.weight", layers="pico_decoder.layers",
                 norms={"attention_norm": "attention_norm", "swiglu_norm": "swiglu_norm"},
                 linears={ours: names[1] for ours, names in BLOCK_LINEARS.items() if names[1]}, interleaved=True),
}


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


def rope_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """ours[j] = pico[rope_rows[j]] for the output rows of q_proj / k_proj: within each head, pico-train's even rows
    (the first of each interleaved pair) then its odd rows, the halves picojax rotates (SPEC §5)."""
    per_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(n_heads)[:, None] * head_dim + per_head).reshape(-1)


def tensors(model: Decoder, fmt: str = "hf") -> dict[str, jax.Array]:
    """The model's weights under a format's names and layouts, as float32 arrays [out, in] where they are (no head
    with tied embeddings in `hf`, where Llama then reads the embedding; pico-train's head is always untied)."""
    check_llama(model.cfg)
    f, c = FORMATS[fmt], model.cfg
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = {f["embed"]: f32(model.embed[...]), f["norm"]: f32(model.norm.scale[...])}
    if not c.tie_embeddings or fmt == "pico":
        out[f["head"]] = f32(model.head_kernel()).T
    back = np.argsort(rope_rows(1, c.head_dim))  # pico[i] = ours[back[i]] within a head
    for i, block in enumerate(model.blocks):
        for ours, theirs in f["linears"].items():
            parent, name = ours.split(".")
            # a ReLoRA layer's merged kernel W + scale (B A)^T, by relora's own merge (the model stays as it is)
            w = f32(getattr(getattr(block, parent), name).merged_kernel()).T  # [out, in]
            if f["interleaved"] and name in ("q", "k"):
                w = w.reshape(-1, c.head_dim, w.shape[1])[:, back].reshape(w.shape)
            out[f"{f['layers']}.{i}.{theirs}.weight"] = w
        for ours, theirs in f["norms"].items():
            out[f"{f['layers']}.{i}.{theirs}.weight"] = f32(getattr(block, ours).scale[...])
    return out


def state_dict(model: Decoder, fmt: str = "hf") -> dict[str, np.ndarray]:
    """`tensors` as contiguous numpy arrays on the host."""
    return {k: np.ascontiguousarray(v) for k, v in jax.device_get(tensors(model, fmt)).items()}


@partial(jax.jit, static_argnums=0)
def _checkpoint_tensors(graphdef, state):
    return tensors(nnx.merge(graphdef, state)[0], "hf")


class CheckpointModels(Background):
    """Every checkpoint also a Hugging Face Llama folder: config.json, model.safetensors and the tokenizer files
    beside Orbax's items in checkpoints/step_<k>/ (`AutoModelForCausalLM.from_pretrained(step_dir)`). The step loop
    only dispatches one jitted copy of the weights in Llama's layout (merged for ReLoRA); a background thread takes
    it to the host, waits until Orbax has put the step folder in place, and moves the files in from a temporary
    folder, so a failed write (logged, retried never) leaves the Orbax checkpoint as it was."""

    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer

    def write(self, step: int, step_dir: Path, graphdef, state):
        """Start writing `step`'s files (call on every process: several gather the weights first); the job's
        future on process 0."""
        arrays = _checkpoint_tensors(graphdef, state)
        if not all(a.is_fully_addressable for a in arrays.values()):
            arrays = multihost_utils.process_allgather(arrays, tiled=True)
        if jax.process_index() == 0:
            return self.submit(self._write, step, Path(step_dir), arrays)
        return None

    def _write(self, step, step_dir, arrays):
        def files(tmp):
            host = {k: np.ascontiguousarray(v) for k, v in jax.device_get(arrays).items()}
            write_model(tmp, host, hf_config(self.cfg), self.tokenizer, self.cfg.seq_len)
        return into_step_dir(step_dir, "", files, f"the Hugging Face files of checkpoint step {step}")


def write_model(out: Path, tensors: dict, config: dict, tokenizer, seq_len: int):
    """model.safetensors, the tokenizer files (given a tokenizer.json) and config.json, last, into folder `out`."""
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        config = config | tokenizer_files(tokenizer, out, seq_len)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def pico_config(cfg: ModelConfig, batch_size: int | None = None) -> dict:
    """config.json of the PicoDecoderHF equal to `cfg` (pico-train's model fields, SPEC §5)."""
    out = dict(architectures=["PicoDecoderHF"], model_type="pico_decoder", d_model=cfg.d_model,
               n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len,
               attention_n_heads=cfg.n_heads, attention_n_kv_heads=cfg.n_kv_heads, activation_hidden_dim=cfg.d_hidden,
               norm_eps=cfg.norm_eps, position_emb_theta=cfg.rope_theta)
    return out | ({"batch_size": batch_size} if batch_size else {})


def export(model: Decoder, out_dir, fmt: str = "hf", tokenizer=None, batch_size: int | None = None) -> Path:
    """Write config.json and model.safetensors (and, given a tokenizer.json, the tokenizer files): loadable with
    `LlamaForCausalLM.from_pretrained(out_dir)` (fmt hf) or pico's PicoDecoderHF (fmt pico). Nothing is written
    for a model the format cannot hold."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}; use one of {list(FORMATS)}")
    tensors = state_dict(model, fmt)  # refuses before anything is written
    config = hf_config(model.cfg) if fmt == "hf" else pico_config(model.cfg, batch_size)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_model(out, tensors, config, tokenizer, model.cfg.seq_len)
    return out


def export_hf(model: Decoder, out_dir, tokenizer=None) -> Path:
    return export(model, out_dir, "hf", tokenizer)


def tokenizer_files(tokenizer_json, out: Path, seq_len: int) -> dict:
    """The run's tokenizer files; returns the special token ids for config.json. A tokenizer that comes with its
    own tokenizer_config.json (a Hub tokenizer: pico-train's OLMo one) is copied as it is, with its
    special_tokens_map.json, as pico-train's save_pretrained writes them. A bare tokenizer.json (prepare.py's) gets
    a tokenizer_config.json declaring its special token (prepare.EOT, GPT-2 style: it begins and ends documents)
    so that AutoTokenizer gives eos / bos ids; one without prepare.EOT declares none."""
    tokenizer_json = Path(tokenizer_json)
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    own = (tokenizer_json.parent / "tokenizer_config.json").exists()
    ids = _copy_tokenizer_config(tokenizer_json, out) if own else _declare_eot(tokenizer_json, out, seq_len)
    (out / "generation_config.json").write_text(json.dumps(dict(_from_model_config=True, **ids), indent=2) + "\n")
    return ids


def _declare_eot(tokenizer_json: Path, out: Path, seq_len: int) -> dict:
    """tokenizer_config.json and special_tokens_map.json declaring prepare.EOT; returns its ids as bos / eos."""
    eot = prepare.load_tokenizer(tokenizer_json).token_to_id(prepare.EOT)
    special = {} if eot is None else dict(bos_token=prepare.EOT, eos_token=prepare.EOT, unk_token=prepare.EOT)
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=seq_len, add_bos_token=False,
        add_eos_token=False, clean_up_tokenization_spaces=False, **special), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return {} if eot is None else dict(bos_token_id=eot, eos_token_id=eot)


def _copy_tokenizer_config(tokenizer_json: Path, out: Path) -> dict:
    """A tokenizer's own tokenizer_config.json and special_tokens_map.json into `out`; returns the ids of its
    bos / eos / pad tokens."""
    for name in tokenizer.FILES[1:]:
        if (tokenizer_json.parent / name).exists():
            shutil.copy(tokenizer_json.parent / name, out / name)
    conf, tok = json.loads((out / "tokenizer_config.json").read_text()), prepare.load_tokenizer(tokenizer_json)
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = conf.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and (i := tok.token_to_id(token)) is not None:
            ids[f"{kind}_token_id"] = i
    return ids


def read_weights(path, dtype: str = "float32") -> tuple[ModelConfig, dict, dict]:
    """A checkpoint folder (config.json and one or more *.safetensors) of a Hugging Face Llama, or of pico-train /
    pico-lm's PicoDecoderHF (config.json model_type pico_decoder): its ModelConfig (compute dtype `dtype`), its
    weights as {Decoder parameter path: float32 array} in picojax's layout (a tied head as an untied copy), and
    its config.json."""
    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} holds no config.json; point it at a Hugging Face Llama or pico-decoder folder")
    hf = json.loads((path / "config.json").read_text())
    fmt = "pico" if hf.get("model_type") == "pico_decoder" else "hf"
    cfg = from_pico_config(hf, path, dtype) if fmt == "pico" else from_hf_config(hf, path, dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} holds no *.safetensors weights (PyTorch .bin files: re-save the model with "
                          f"`save_pretrained(dir)`, which writes safetensors)")
    weights = {}
    for f in files:
        weights.update(load_flax(str(f)))
    f = FORMATS[fmt]
    if fmt == "pico" and f["embed"] not in weights:  # saved from the inner module: no `pico_decoder.` prefix
        weights = {f"pico_decoder.{k}": v for k, v in weights.items()}
    if hf.get("tie_word_embeddings") and f["head"] not in weights:
        weights[f["head"]] = weights[f["embed"]]  # a tied head becomes an untied copy

    def take(name, transpose=False):
        if name not in weights:
            raise ConfigError(f"{path} has no tensor {name!r}; is it a {'pico-decoder' if fmt == 'pico' else 'Llama'} "
                              f"checkpoint?")
        w = jnp.asarray(weights[name], jnp.float32)
        return w.T if transpose else w

    rows = rope_rows(1, cfg.head_dim)
    new = {("embed",): take(f["embed"]), ("norm", "scale"): take(f["norm"]), ("head", "kernel"): take(f["head"], True)}
    for i in range(cfg.n_layers):
        for ours, theirs in f["linears"].items():
            w = take(f"{f['layers']}.{i}.{theirs}.weight")  # [out, in]
            if f["interleaved"] and ours in ("attention.q", "attention.k"):
                w = w.reshape(-1, cfg.head_dim, w.shape[1])[:, rows].reshape(w.shape)
            new[("blocks", i, *ours.split("."), "kernel")] = w.T
        for ours, theirs in f["norms"].items():
            new[("blocks", i, ours, "scale")] = take(f"{f['layers']}.{i}.{theirs}.weight")
    return cfg, new, hf


def _fill(cfg: ModelConfig, new: dict, path) -> nnx.State:
    """Decoder(cfg)'s parameter state holding `new` (every parameter, of the right shape)."""
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))), nnx.Param)
    flat = []
    for p, v in nnx.to_flat_state(state):
        if p not in new or v.shape != new[p].shape:
            got = "none" if p not in new else f"shape {new[p].shape}"
            raise ConfigError(f"{path}: the tensor for {'.'.join(map(str, p))} has {got}, expected {v.shape}")
        flat.append((p, v.replace(new[p])))
    return nnx.from_flat_state(flat)


def import_hf(path, dtype: str = "float32") -> tuple[Decoder, ModelConfig]:
    """A Hugging Face Llama or PicoDecoderHF folder (`read_weights`) as a picojax Decoder with compute dtype
    `dtype` (parameters are float32, as in training), and its ModelConfig."""
    cfg, new, _ = read_weights(path, dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, _fill(cfg, new, path)), cfg


# what a run's model config must agree on with the folder it starts from (model.init_from): the architecture;
# seq_len (RoPE has no length), init_std (replaced by the weights) and the loss's z_loss may differ
INIT_FREE = ("seq_len", "init_std", "z_loss")


def init_weights(path, mcfg) -> nnx.State:
    """The parameters a run starts from with model.init_from=PATH (a Hugging Face Llama or pico-decoder folder),
    for a Decoder of the run's config `mcfg`, after checking that the folder's architecture is the run's."""
    path = Path(path).expanduser()
    if not isinstance(mcfg, ModelConfig):
        raise ConfigError(f"model.init_from={path} loads a decoder (Llama / pico-decoder weights); "
                          f"model.kind={mcfg.KIND} cannot start from it")
    cfg, new, hf = read_weights(path, mcfg.dtype)
    tied = bool(hf.get("tie_word_embeddings"))
    folder = dataclasses.replace(cfg, tie_embeddings=tied and mcfg.tie_embeddings,  # untied run: the head a copy
                                 **{k: getattr(mcfg, k) for k in INIT_FREE})
    have, want = folder.param_fields(), mcfg.param_fields()
    diff = sorted(k for k in have if have[k] != want[k])
    if diff:
        raise ConfigError(f"model.init_from={path}: its config.json has {', '.join(f'{k}={have[k]}' for k in diff)}, "
                          f"this run {', '.join(f'model.{k}={want[k]}' for k in diff)}; set "
                          f"`{' '.join(f'model.{k}={have[k]}' for k in diff)}` to start from it")
    if mcfg.tie_embeddings:
        del new[("head", "kernel")]
    return _fill(mcfg, new, path)


def run_weights(cfg, resuming: bool):
    """A run's model.init_from weights (a Llama or pico-decoder folder) and the start-up note on them; (None, None)
    without it, and None when the run resumes (its checkpoint holds the weights). The folder's tokenizer must be the
    run's data's."""
    path = cfg.model.get("init_from")
    if not path:
        return None, None
    if resuming:
        return None, f"model.init_from={path} not read: the run resumes from its checkpoint in {cfg.checkpoint.dir}"
    weights = init_weights(path, model_config(cfg.model))
    theirs, ours = Path(path).expanduser() / "tokenizer.json", tokenizer.path(cfg.data)
    if theirs.exists() and ours is not None and \
            prepare.load_tokenizer(theirs).get_vocab() != prepare.load_tokenizer(ours).get_vocab():
        raise ConfigError(f"model.init_from={path} has another tokenizer than the run's data ({ours}); "
                          f"tokenize the text with it: `python data.py prepare FILES --out DIR --tokenizer "
                          f"{theirs}`, then data.dir=DIR")
    return weights, f"weights from model.init_from={path}"


import_pico = import_hf  # the same reader: it tells the two formats apart by config.json's model_type


def from_pico_config(pc: dict, path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a PicoDecoderHF config.json (pico-train's field names, SPEC §5)."""
    missing = [k for k in ("d_model", "n_layers", "vocab_size", "attention_n_heads") if k not in pc]
    if missing:
        raise ConfigError(f"{path}/config.json: model_type pico_decoder but no {missing}; is it a pico-train model?")
    cfg = ModelConfig(
        vocab_size=pc["vocab_size"], seq_len=pc.get("max_seq_len", 2048), d_model=pc["d_model"],
        n_layers=pc["n_layers"], n_heads=pc["attention_n_heads"],
        n_kv_heads=pc.get("attention_n_kv_heads") or pc["attention_n_heads"],
        d_hidden=pc.get("activation_hidden_dim", 4 * pc["d_model"]), rope_theta=float(pc.get("position_emb_theta",
                                                                                                 10000.0)),
        norm_eps=pc.get("norm_eps", 1e-6), dtype=dtype)
    cfg.validate()
    return cfg


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
    p = argparse.ArgumentParser(description="Export a picojax checkpoint as a Hugging Face LlamaForCausalLM or a "
                                            "pico-train PicoDecoderHF folder.")
    p.add_argument("src", help="a run directory (holding checkpoints/) or a checkpoint directory")
    p.add_argument("out", help="output folder: config.json, model.safetensors and the run's tokenizer files")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--format", choices=list(FORMATS), default="hf", help="hf: LlamaForCausalLM; pico: PicoDecoderHF")
    a = p.parse_args(argv)
    model, cfg, loop = train_state.load(a.src, a.step)
    # the run's tokenizer, found as the trainer finds it (data.tokenizer, else the data folder's tokenizer.json)
    out = export(model, a.out, a.format, tokenizer.path(cfg.data), cfg.data.batch_size)
    loader = "LlamaForCausalLM" if a.format == "hf" else "PicoDecoderHF"
    print(f"exported step {loop['step']} of {a.src} to {out} ({loader}.from_pretrained({str(out)!r}))")
    return out


if __name__ == "__main__":
    host.cpu_unless_accelerator()
    try:
        main()
    except (ConfigError, CheckpointError, DataError) as e:  # bad input: the message says what to fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
