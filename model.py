"""The pico-decoder (SPEC §1) in Flax NNX, with KV-cache decoding.

    h      = x + Attn(RMSNorm(x))
    out    = h + SwiGLU(RMSNorm(h))
    logits = Linear_untied(RMSNorm(out))

Research knobs (ModelConfig; the defaults above are the pico-decoder): positions `pos_encoding` rope | absolute |
none, `norm_placement` pre | post (post: h = Norm(x + Attn(x)), out = Norm(h + MLP(h)), the original Transformer),
`norm_type` rmsnorm | layernorm, `mlp` swiglu | gelu, `tie_embeddings` (logits = x @ embed^T), `qk_norm`
(RMSNorm of each query and key head before RoPE) and `z_loss` (a loss term, train.loss_fn).

Dimensions, used in every shape comment and einsum string:
    B batch, T time (queries), S time (keys / cache), D d_model, H query heads, K kv heads,
    E head dim, F hidden, V vocab, L layers, R lora rank;
    for the other model families (families.py): M embedding size, C hidden (cell) size, G = 4 C LSTM gates,
    N the k-gram model's context length k.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

# One sharding table. FSDP shards every weight along its D dimension over the `fsdp` mesh axis
# (names carry the dims); everything is replicated over `data`. The batch is split over both axes.
SHARDING = {
    "embed_VD": (None, "fsdp"),
    "q_DX": ("fsdp", None),      # X = H*E
    "kv_DX": ("fsdp", None),     # X = K*E
    "o_XD": (None, "fsdp"),
    "mlp_in_DF": ("fsdp", None),
    "mlp_out_FD": (None, "fsdp"),
    "head_DV": ("fsdp", None),
    "norm_D": (None,),
    "norm_E": (None,),           # QK-norm scales, shared by the heads
    "pos_TD": (None, "fsdp"),    # learned absolute positions
    # ReLoRA factors (relora.py) follow their layer's kernel: A [R, in] is sharded where the input is D, B [out, R]
    # where the output is D; the factors of the non-D side (X = H*E or K*E, F) are small and replicated.
    "lora_a_RD": (None, "fsdp"),     # q, k, v, gate, up
    "lora_a_RX": (None, None),       # o (X in), down (F in)
    "lora_b_XR": (None, None),       # q, k, v (X out), gate, up (F out)
    "lora_b_DR": ("fsdp", None),     # o, down
    "lora_s": (),                    # trainable scale
    # The LSTM and k-gram families (families.py) are data-parallel only: their parameters are replicated (a few
    # million parameters; their widths need not divide the device count). The batch is still split over both axes.
    "lstm_embed_VM": (None, None),
    "lstm_in_MG": (None, None),      # first layer; later layers read C: "lstm_in_CG"
    "lstm_in_CG": (None, None),
    "lstm_rec_CG": (None, None),
    "lstm_bias_G": (None,),
    "lstm_head_CV": (None, None),
    "kgram_embed_VM": (None, None),
    "kgram_in_XC": (None, None),     # X = N*M (learned embeddings)
    "kgram_onehot_NVC": (None, None, None),  # one-hot input: one [V, C] block per context slot
    "kgram_hidden_CC": (None, None),
    "kgram_bias_C": (None,),
    "kgram_head_CV": (None, None),
}
BATCH_AXES = ("data", "fsdp")


NO_REMAT = object()
# model.remat: what a block keeps for the backward pass. block: nothing (all recomputed, least memory, ~1/3 more
# FLOPs); dots: the outputs of its weight matmuls (the elementwise ops and attention are recomputed).
REMAT_POLICIES = {"none": NO_REMAT, "block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    KIND: ClassVar[str] = "decoder"  # its model.kind (families.py has the others)
    vocab_size: int = 50304
    seq_len: int = 2048
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4
    d_hidden: int = 3072
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype; params stay float32
    attention: str = "auto"  # auto (cuDNN on GPUs, else xla) | xla (blockwise_attention) | cudnn
    remat: str = "none"  # activation rematerialisation per block: none | block | dots (REMAT_POLICIES)
    scan_layers: bool = False  # lax.scan over the blocks (compile time independent of depth)
    loss_chunk: int = 0  # tokens per chunk of the cross-entropy fused with the head (train.fused_cross_entropy); 0 = off
    # research knobs; the defaults are the pico-decoder
    pos_encoding: str = "rope"      # rope | absolute (learned [seq_len, D]) | none
    norm_placement: str = "pre"     # pre | post
    norm_type: str = "rmsnorm"      # rmsnorm | layernorm
    mlp: str = "swiglu"             # swiglu | gelu
    tie_embeddings: bool = False    # logits = x @ embed^T, no head
    qk_norm: bool = False           # RMSNorm of queries and keys per head, before RoPE
    z_loss: float = 0.0             # weight of mean(logsumexp(logits)^2) in the training loss (PaLM); 0 = off

    # `kind` picks the family (train.build_model), `lstm` / `kgram` configure the others, `relora` is read by
    # relora.py: none of them is a decoder field
    NOT_DECODER = ("kind", "lstm", "kgram", "relora")

    def __post_init__(self):
        if isinstance(self.remat, bool):  # configs and checkpoints from before the policies: false / true
            object.__setattr__(self, "remat", "block" if self.remat else "none")

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """Build from the `model:` config block, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in dict(d).items() if k not in cls.NOT_DECODER}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {['model.' + k for k in unknown]}; known model keys: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                              "choose n_heads that divides d_model")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                              "grouped-query attention needs n_kv_heads to divide n_heads")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head dim d_model/n_heads = {self.head_dim} is odd; RoPE needs an even head dim")
        for key, allowed in KNOBS.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}; use one of {list(allowed)}")
        if self.z_loss < 0:
            raise ConfigError(f"model.z_loss={self.z_loss}; use a weight >= 0 (0 = off, PaLM uses 1e-4)")
        if self.attention == "cudnn" and (platform() != "gpu" or self.dtype not in ("bfloat16", "float16")):
            raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU and model.dtype bfloat16 or float16 (cuDNN "
                              f"flash attention); here: {platform()}, {self.dtype}. Use model.attention=auto (cuDNN "
                              f"where it can, else XLA) or xla")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}; use one of {list(REMAT_POLICIES)} (true / false mean "
                              "block / none)")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk={self.loss_chunk}; use 0 (off) or a number of tokens, e.g. 1024")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name


KNOBS = {"attention": ("auto", "xla", "cudnn"), "pos_encoding": ("rope", "absolute", "none"),
         "norm_placement": ("pre", "post"), "norm_type": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"),
         "tie_embeddings": (False, True), "qk_norm": (False, True)}


def normal(std):
    return jax.nn.initializers.normal(std)


def param(value, sharding: str, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A float32 parameter carrying its SHARDING entry; placed sharded at once when a mesh is set."""
    return kind(value, out_sharding=SHARDING[sharding], eager_sharding=not jax.sharding.get_abstract_mesh().empty)


class Linear(nnx.Module):
    """y = x @ W, no bias; W [in, out] kept in float32 and cast to the compute dtype."""

    def __init__(self, d_in: int, d_out: int, sharding: str, cfg: ModelConfig, rngs: nnx.Rngs, std: float | None = None):
        init = normal(cfg.init_std if std is None else std)
        self.kernel = param(init(rngs.params(), (d_in, d_out), jnp.float32), sharding)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):  # [..., in] -> [..., out]
        return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


def dense(x, w):
    """x [..., in] @ w [in, out] as one 2-D matmul [N, in] @ [in, out]: with a 3-D x, XLA:CPU forms the weight
    gradient through a slow transposing copy of the output gradient (the SwiGLU step ran 2x slower;
    benchmarks/RESULTS.md). Free elsewhere."""
    y = x.reshape(-1, x.shape[-1]) @ w
    return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dim: int | None = None, sharding: str = "norm_D"):
        self.scale = param(jnp.ones((dim or cfg.d_model,), jnp.float32), sharding)
        self.eps = cfg.norm_eps

    def __call__(self, x):  # [..., D]
        x32 = x.astype(jnp.float32)  # SPEC §1: computed in float32, cast back
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, in float32 (Ba et al. 2016; GPT-2's norm)."""

    def __init__(self, cfg: ModelConfig):
        self.scale = param(jnp.ones((cfg.d_model,), jnp.float32), "norm_D")
        self.bias = param(jnp.zeros((cfg.d_model,), jnp.float32), "norm_D")
        self.eps = cfg.norm_eps

    def __call__(self, x):  # [B, T, D]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def Norm(cfg: ModelConfig):
    return LayerNorm(cfg) if cfg.norm_type == "layernorm" else RMSNorm(cfg)


def rope_tables(positions, head_dim: int, theta: float):
    """sin, cos of shape [..., T, E/2] for integer positions [..., T]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, sin, cos):
    """Rotate halves (x[:E/2], x[E/2:]), the Hugging Face Llama convention, so export needs no permutation.
    x [B, T, N, E]; sin, cos [B, T, E/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by depth
        self.q = Linear(D, H * E, "q_DX", cfg, rngs)
        self.k = Linear(D, K * E, "kv_DX", cfg, rngs)
        self.v = Linear(D, K * E, "kv_DX", cfg, rngs)
        self.o = Linear(H * E, D, "o_XD", cfg, rngs, std=out_std)
        if cfg.qk_norm:  # Dehghani et al. 2023 (ViT-22B), OLMo 2, Qwen3: bounds the attention logits
            self.q_norm = RMSNorm(cfg, E, "norm_E")
            self.k_norm = RMSNorm(cfg, E, "norm_E")
        self.cfg = cfg

    def __call__(self, x, sin, cos, cache=None, pos=None, start=None):
        """x [B, T, D]. Without a cache: causal self-attention. With a cache (k, v each [B, S, K, E]),
        the T new tokens sit at positions pos..pos+T-1 and attend to every cached position up to their own,
        from start [B] on when given (row b left-padded up to start[b])."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, cfg.n_heads, cfg.head_dim)  # [B, T, H, E]
        k = self.k(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)  # [B, T, K, E]
        v = self.v(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)  # [B, T, K, E]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.pos_encoding == "rope":
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if cache is None:
            out = causal_attention(q, k, v, cfg.attention)
        else:
            k_cache = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, pos, 0, 0))
            S = k_cache.shape[1]
            q_pos, k_pos = pos + jnp.arange(T), jnp.arange(S)
            mask = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, T, S]
            if start is not None:  # a pad sees only itself: no softmax row is empty, so no NaN reaches the cache
                mask = mask & ((k_pos >= start[:, None, None]) | (k_pos == q_pos[:, None]))  # [B, T, S]
            out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                                               mask=mask[:, None], implementation="xla")
            cache = (k_cache, v_cache)
        return self.o(out.reshape(B, T, -1)), cache


def platform() -> str:
    return jax.devices()[0].platform


def causal_attention(q, k, v, attention: str):
    """Causal self-attention; q [B, T, H, E], k, v [B, T, K, E]; GQA: query head h reads kv head h // (H / K).
    model.attention=auto takes cuDNN flash attention on GPUs for bf16 / fp16 (jax.nn.dot_product_attention; in jax
    0.10 its own default, implementation=None, always takes the XLA path) and falls back to blockwise_attention when
    cuDNN refuses the shapes, dtype or version at trace time; cudnn insists (ModelConfig.validate checks the
    platform); xla never tries cuDNN."""
    if attention == "auto" and platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except Exception:  # unsupported head dim, sequence length, cuDNN version...: the XLA path below
            pass
    if attention == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return blockwise_attention(q, k, v)


def blockwise_attention(q, k, v, min_block=128, max_blocks=8):
    """Causal attention in plain XLA ops, one block of queries at a time: the block ending at query t reads keys
    0..t only, so the masked upper triangle of the T x T scores (half the attention FLOPs) is mostly never computed.
    Softmax in float32. On XLA:CPU, forward and backward, it is 1.4-1.6x (seq 256, 512) to 2.3x (seq 2048) faster
    than jax.nn.dot_product_attention's XLA path, which computes and masks every score (benchmarks/RESULTS.md).
    Blocks of >= min_block queries, at most max_blocks of them: each is unrolled into the graph, and smaller ones
    did not pay for their compile time (picodo2: 4 blocks as fast as 8, compiled in 4.5 s instead of 7.5 s)."""
    B, T, H, E = q.shape
    K = k.shape[2]
    n = max(1, min(max_blocks, T // min_block))
    size = -(-T // n)
    q = q.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)  # [B, K, H/K, T, E]: the heads that share a kv head
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, E]
    out = []
    for lo in range(0, T, size):
        hi = min(T, lo + size)
        s = jnp.einsum("bkhte,bkse->bkhts", q[:, :, :, lo:hi], k[:, :, :hi], preferred_element_type=jnp.float32)
        causal = jnp.arange(hi) <= jnp.arange(lo, hi)[:, None]  # [t, s]: query lo + t sees keys up to itself
        p = jax.nn.softmax(jnp.where(causal, s / math.sqrt(E), -jnp.inf), axis=-1)
        out.append(jnp.einsum("bkhts,bkse->bkhte", p.astype(v.dtype), v[:, :, :hi]))
    return jnp.concatenate(out, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_hidden
        self.gate = Linear(D, F, "mlp_in_DF", cfg, rngs)
        self.up = Linear(D, F, "mlp_in_DF", cfg, rngs)
        self.down = Linear(F, D, "mlp_out_FD", cfg, rngs, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x):  # [B, T, D]
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class GeluMLP(nnx.Module):
    """down(gelu(up x)), the GPT-2 / original Transformer MLP (tanh-approximate GELU, as GPT-2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_hidden
        self.up = Linear(D, F, "mlp_in_DF", cfg, rngs)
        self.down = Linear(F, D, "mlp_out_FD", cfg, rngs, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x):  # [B, T, D]
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm (default): h = x + Attn(Norm(x)), out = h + MLP(Norm(h)).
    Post-norm (Vaswani et al. 2017): h = Norm(x + Attn(x)), out = Norm(h + MLP(h)).
    The SwiGLU MLP and its norm are `swiglu` / `swiglu_norm` (the pico names, which checkpoints, export and ReLoRA
    know); the GELU MLP and its norm are `mlp` / `mlp_norm`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.post = cfg.norm_placement == "post"
        self.attention_norm = Norm(cfg)
        self.attention = Attention(cfg, rngs)
        self.gelu = cfg.mlp == "gelu"
        if self.gelu:
            self.mlp_norm, self.mlp = Norm(cfg), GeluMLP(cfg, rngs)
        else:
            self.swiglu_norm, self.swiglu = Norm(cfg), SwiGLU(cfg, rngs)

    def __call__(self, x, sin, cos, cache=None, pos=None, start=None):
        mlp, mlp_norm = (self.mlp, self.mlp_norm) if self.gelu else (self.swiglu, self.swiglu_norm)
        if self.post:
            a, cache = self.attention(x, sin, cos, cache, pos, start)
            h = self.attention_norm(x + a)
            return mlp_norm(h + mlp(h)), cache
        a, cache = self.attention(self.attention_norm(x), sin, cos, cache, pos, start)
        h = x + a
        return h + mlp(mlp_norm(h)), cache


class LanguageModel(nnx.Module):
    """What every model family shares: logits = features(tokens) @ head_kernel(). A family gives `features` (what
    the head reads, [B, T, X] in the compute dtype, and the new cache or state), `head_kernel` ([X, V]) and
    `init_cache`; train.loss_fn can then also fuse the head with the loss (model.loss_chunk)."""

    def __call__(self, tokens, cache=None, pos=0, start=None):
        """tokens [B, T] int -> logits [B, T, V] float32. With `cache` (see `init_cache`), the tokens sit at
        positions pos..pos+T-1 and the updated cache is returned too; with start [B] as well, row b is left-padded
        up to start[b] and the padding does not count (see `features`)."""
        h, new_cache = self.features(tokens, cache, pos, start)
        logits = dense(h, self.head_kernel().astype(h.dtype)).astype(jnp.float32)  # [B, T, V]
        return logits if cache is None else (logits, new_cache)


class Decoder(LanguageModel):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32),
                           "embed_VD")
        if cfg.pos_encoding == "absolute":  # learned, GPT-2 style
            self.pos_embed = param(normal(cfg.init_std)(rngs.params(), (cfg.seq_len, cfg.d_model), jnp.float32),
                                   "pos_TD")
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        if cfg.norm_placement == "pre":
            # post-norm has none: every block already ends in a norm, so a final one would only add a second,
            # redundant scale (the original Transformer has none either)
            self.norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = Linear(cfg.d_model, cfg.vocab_size, "head_DV", cfg, rngs)  # untied from the embedding

    def head_kernel(self):
        """The output projection [D, V]: the head's kernel, or the embedding's transpose when tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.head.kernel[...]

    def features(self, tokens, cache=None, pos=0, start=None):
        """What the head reads, [B, T, D] in the compute dtype (the final norm's output; post-norm: the last block's),
        and the new KV cache (None without one). Left padding (start) is masked out and the positions of a row
        count from its start."""
        B, T = tokens.shape
        c = self.cfg
        x = self.embed[...].astype(c.dtype)[tokens]  # [B, T, D]
        positions = jnp.broadcast_to(pos + jnp.arange(T), (B, T))
        if start is not None:
            positions = positions - start[:, None]
        if c.pos_encoding == "absolute":  # pads (negative positions) read row 0; attention masks them anyway
            x = x + self.pos_embed[...].astype(c.dtype)[jnp.clip(positions, 0, c.seq_len - 1)]
        sin, cos = rope_tables(positions, c.head_dim, c.rope_theta)  # unused unless pos_encoding=rope
        if cache is None:
            x, new_cache = self.run_blocks(x, sin, cos), None
        else:
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, cache_i = block(x, sin, cos, cache[i], pos, start)
                new_cache.append(cache_i)
        return (self.norm(x) if c.norm_placement == "pre" else x), new_cache

    def run_blocks(self, x, sin, cos):
        """The blocks without a cache (training, evaluation), with the model.remat policy; with model.scan_layers, one
        lax.scan over the blocks' stacked states, so the step compiles one block instead of L. The parameters keep
        their per-block layout (checkpoints, export, ReLoRA and learning-dynamics paths are unchanged); stacking
        them copies them once per step. Learning-dynamics capture (nnx.capture) and blocks that differ (ReLoRA
        layers carry their index) use the Python loop."""
        policy = REMAT_POLICIES[self.cfg.remat]
        apply = lambda block, x: block(x, sin, cos)[0]
        if self.cfg.scan_layers and not hasattr(self, "__captures__"):
            splits = [nnx.split(block) for block in self.blocks]
            graphdef = splits[0][0]
            if all(g == graphdef for g, _ in splits):
                def body(x, state):
                    return apply(nnx.merge(graphdef, state), x), None
                if policy is not NO_REMAT:
                    body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # scan already blocks CSE
                stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits))  # [L, ...]
                return jax.lax.scan(body, x, stacked)[0]
        if policy is not NO_REMAT:
            # graph_updates=False: a block changes no state, and write-backs would fail on variables that are
            # not differentiated (ReLoRA's frozen W) since they come from outside the gradient's trace
            apply = nnx.remat(apply, policy=policy, graph_updates=False)
        for block in self.blocks:
            x = apply(block, x)
        return x

    def init_cache(self, batch: int, length: int, dtype=None):
        """A zero KV cache of fixed size: per layer (k, v), each [B, S, K, E]."""
        c = self.cfg
        shape = (batch, length, c.n_kv_heads, c.head_dim)
        return [(jnp.zeros(shape, dtype or c.dtype), jnp.zeros(shape, dtype or c.dtype)) for _ in range(c.n_layers)]


def count_params(model: nnx.Module, wrt=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


def sample_logits(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Pick one token per row from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the most likely token)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: Decoder, prompt, max_new_tokens: int, key, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, start=None):
    """Decode with a fixed-size KV cache: one prefill of the prompt [B, P], then one jitted loop step per token
    (a lax.scan, so nothing recompiles per token). Returns [B, P + max_new_tokens]. Prompts of different lengths
    are left-padded to P: row b's prompt is prompt[b, start[b]:] (start [B]; None = no padding)."""
    graphdef, state = nnx.split(model)
    start = jnp.zeros(prompt.shape[0], jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return _generate(graphdef, state, prompt, start, key, max_new_tokens, temperature, top_k, top_p)


@jax.jit(static_argnums=(0, 5, 6, 7, 8))
def _generate(graphdef, state, prompt, start, key, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    cache = model.init_cache(B, P + max_new_tokens)
    logits, cache = model(prompt, cache=cache, pos=0, start=start)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)

    def step(carry, key_i):
        tok, cache, pos = carry
        logits, cache = model(tok[:, None], cache=cache, pos=pos, start=start)
        nxt = sample_logits(logits[:, -1], key_i, temperature, top_k, top_p)
        return (nxt, cache, pos + 1), tok

    (last, _, _), toks = jax.lax.scan(step, (first, cache, P), keys[1:])
    new = jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else last[:, None]
    return jnp.concatenate([prompt, new], axis=1)
