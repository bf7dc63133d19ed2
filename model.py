"""The pico-decoder (SPEC §1) in Flax NNX, with KV-cache decoding.

    h      = x + Attn(RMSNorm(x))
    out    = h + SwiGLU(RMSNorm(h))
    logits = Linear_untied(RMSNorm(out))

Research knobs (ModelConfig; the defaults above are the pico-decoder): positions `pos_encoding` rope | absolute |
none, `norm_placement` pre | post (post: h = Norm(x + Attn(x)), out = Norm(h + MLP(h)), the original Transformer),
`norm_type` rmsnorm | layernorm, `mlp` swiglu | gelu, `tie_embeddings` (logits = x @ embed^T), `qk_norm`
(RMSNorm of each query and key head before RoPE) and `z_loss` (a loss term, loss.py).

Dimensions, used in every shape comment and einsum string:
    B batch, T time (queries), S time (keys / cache), D d_model, H query heads, K kv heads,
    E head dim, F hidden, V vocab, L layers, R lora rank;
    for the other model families (families.py): M embedding size, C hidden (cell) size, G = 4 C LSTM gates,
    N the k-gram model's context length k.
"""
import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from attention import BATCH_AXES, blockwise_attention, causal_attention, flash_attention  # noqa: F401 (re-exported)
from attention import batch_sharded
from config import BLOCK_LINEARS, ConfigError, reject_unknown

# One sharding table. FSDP shards every weight along its D dimension over the `fsdp` mesh axis
# (names carry the dims); everything is replicated over `data`. The batch is split over both axes
# (BATCH_AXES, which attention.py's kernels and loss.py read too), and so is the residual stream in every block.
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
    # ReLoRA factors (relora.py) follow their layer's kernel: A [R, in] is sharded where the input
    # is D, B [out, R] where the output is D; those of the non-D side (X = H*E or K*E, F) are small
    # and replicated.
    "lora_a_RD": (None, "fsdp"),     # q, k, v, gate, up
    "lora_a_RX": (None, None),       # o (X in), down (F in)
    "lora_b_XR": (None, None),       # q, k, v (X out), gate, up (F out)
    "lora_b_DR": ("fsdp", None),     # o, down
    "lora_s": (),                    # trainable scale
    # The meta-learning head (maml.py): FSDP along D in, along its hidden width H out.
    "maml_in_DH": ("fsdp", None),
    "maml_in_DV": ("fsdp", None),    # a head of one layer
    "maml_hidden_HH": (None, None),
    "maml_out_HV": ("fsdp", None),
    "maml_bias": (None,),
    # The LSTM and k-gram families (families.py) are data-parallel only: their parameters are
    # replicated (a few million; their widths need not divide the device count).
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

NO_REMAT = object()
# model.remat: what a block keeps for the backward pass. block: nothing (all recomputed, least
# memory, ~1/3 more FLOPs); dots: the outputs of its weight matmuls (the rest is recomputed).
REMAT_POLICIES = {"none": NO_REMAT, "block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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
    attention: str = "auto"  # auto (cuDNN on GPUs, splash on TPUs, else xla) | xla (flash, plain JAX) | cudnn | splash
    remat: str = "none"  # activation rematerialisation per block: none | block | dots
    scan_layers: bool = False  # lax.scan over the blocks (compile time independent of depth)
    loss_chunk: int = 0  # tokens per chunk of the loss fused with the head (loss.py); 0 = off
    # research knobs; the defaults are the pico-decoder
    pos_encoding: str = "rope"      # rope | absolute (learned [seq_len, D]) | none
    norm_placement: str = "pre"     # pre | post
    norm_type: str = "rmsnorm"      # rmsnorm | layernorm
    mlp: str = "swiglu"             # swiglu | gelu
    tie_embeddings: bool = False    # logits = x @ embed^T, no head
    qk_norm: bool = False           # RMSNorm of queries and keys per head, before RoPE
    z_loss: float = 0.0             # weight of mean(logsumexp(logits)^2) in the loss (PaLM); 0 = off
    # where the model runs (tpu | gpu | cpu) and a GPU's compute capability, not config keys: "" = this process's
    # devices'; a compile-only target's when aot.py compiles for one
    platform: str = ""
    compute_capability: str = ""

    # `kind` picks the family (families.py), `lstm` / `kgram` configure the others, `relora` is
    # read by relora.py, `maml` by maml.py, `init_from` by export.py: none of them is a decoder field
    NOT_DECODER: ClassVar[tuple] = ("kind", "lstm", "kgram", "relora", "maml", "init_from")
    # fields that change how the model runs, not its parameters: a checkpoint loads under others
    RUNTIME: ClassVar[tuple] = ("dtype", "attention", "remat", "scan_layers", "loss_chunk", "platform",
                                "compute_capability")

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """Build from the `model:` config block, rejecting unknown keys."""
        d = {k: v for k, v in dict(d).items() if k not in cls.NOT_DECODER}
        reject_unknown(d, [f.name for f in dataclasses.fields(cls)], "model.")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_block(self) -> str:
        """The block's MLP attribute: `swiglu` (gate, up, down) or `mlp` (the GELU MLP: up, down)."""
        return "swiglu" if self.mlp == "swiglu" else "mlp"

    def linears(self) -> tuple[str, ...]:
        """This decoder's block layers (BLOCK_LINEARS names): attention's and its MLP's."""
        return tuple(k for k in BLOCK_LINEARS if k.split(".")[0] in ("attention", self.mlp_block))

    def param_fields(self) -> dict:
        """The fields that define the parameters (config key -> value), with `kind`."""
        fields = dataclasses.asdict(self)
        return dict(kind=self.KIND, **{k: v for k, v in fields.items() if k not in self.RUNTIME})

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x matmul params (forward 2, backward 4; the embedding lookup
        is no matmul, a tied head is one), plus attention scores and values, 6 L T D (12 L T D
        halved by the causal mask). Norms and activations are left out."""
        attn = self.d_model * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        mlp = (3 if self.mlp == "swiglu" else 2) * self.d_model * self.d_hidden
        matmul_params = self.n_layers * (attn + mlp) + self.d_model * self.vocab_size
        return 6 * matmul_params + 6 * self.n_layers * self.seq_len * self.d_model

    def runs_on(self) -> str:
        """The platform the model is compiled for: `platform`, or this process's devices'."""
        return self.platform or platform()

    def attention_impl(self) -> tuple[str, str]:
        """Which attention runs, cudnn, splash or xla, and why: model.attention, or with auto the platform (a TPU:
        splash attention, Pallas) and on a GPU the dtype and head dim against cuDNN flash attention's limits."""
        if self.attention != "auto":
            return self.attention, f"model.attention={self.attention}"
        on, dtype, e = self.runs_on(), self.dtype, self.head_dim
        if on == "tpu":
            if self.seq_len % 128:
                return "xla", f"auto: splash attention needs model.seq_len divisible by 128, not {self.seq_len}"
            return "splash", "auto: a TPU (jax's Pallas splash attention)"
        cc = self.compute_capability or (getattr(jax.devices()[0], "compute_capability", "") if on == "gpu" else "")
        why = (f"cuDNN flash attention needs an NVIDIA GPU, this is {on}" if on != "gpu" else
               f"cuDNN flash attention needs compute capability 8.0 or newer (A100, L4, H100), this GPU has {cc}"
               if cc and float(cc) < 8 else
               f"cuDNN flash attention needs bf16 / fp16, model.dtype={dtype}" if dtype not in ("bfloat16", "float16")
               else f"cuDNN needs a head dim <= 256 and a multiple of 8, not {e}" if e % 8 or e > 256 else None)
        return ("xla", f"auto: {why}") if why else ("cudnn", "auto: a GPU, bf16 / fp16 and a head dim cuDNN takes")

    def notes(self) -> list[str]:
        """What the start-up log says about how this model runs."""
        return ["attention: %s (%s)" % self.attention_impl()]

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
        if self.attention == "cudnn" and (self.runs_on() != "gpu" or self.dtype not in ("bfloat16", "float16")):
            raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU and model.dtype bfloat16 or float16 (cuDNN "
                              f"flash attention); here: {self.runs_on()}, {self.dtype}. Use model.attention=auto "
                              f"(cuDNN where it can, else XLA) or xla")
        if self.attention == "splash" and self.runs_on() != "tpu":
            raise ConfigError(f"model.attention=splash is a TPU kernel (Pallas); here: {self.runs_on()}. Use "
                              f"model.attention=auto (splash on TPUs, cuDNN on GPUs, else XLA) or xla")
        if not isinstance(self.remat, str) or self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}; use one of {list(REMAT_POLICIES)} (an old true / false "
                              "is block / none)")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk={self.loss_chunk}; use 0 (off) or a number of tokens, e.g. 1024")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name


KNOBS = {"attention": ("auto", "xla", "cudnn", "splash"), "pos_encoding": ("rope", "absolute", "none"),
         "norm_placement": ("pre", "post"), "norm_type": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"),
         "tie_embeddings": (False, True), "qk_norm": (False, True)}


def normal(std):
    return jax.nn.initializers.normal(std)


def param(value, sharding: str, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A float32 parameter carrying its SHARDING entry; placed sharded at once when a mesh is set."""
    return kind(value, out_sharding=SHARDING[sharding], eager_sharding=not jax.sharding.get_abstract_mesh().empty)


def platform() -> str:
    return jax.devices()[0].platform


class Linear(nnx.Module):
    """y = x @ W, no bias; W [in, out] kept in float32 and cast to the compute dtype."""

    def __init__(self, d_in: int, d_out: int, sharding: str, cfg: ModelConfig, rngs: nnx.Rngs, std=None):
        init = normal(cfg.init_std if std is None else std)
        self.kernel = param(init(rngs.params(), (d_in, d_out), jnp.float32), sharding)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):  # [..., in] -> [..., out]
        return dense(x.astype(self.dtype), self.kernel[...], self.dtype)

    def merged_kernel(self):
        """The kernel [in, out] this layer computes with (relora.LoRALinear answers the same)."""
        return self.kernel[...]


def dense(x, w, dtype=None):
    """x [..., in] @ w [in, out] as one 2-D matmul [N, in] @ [in, out]: with a 3-D x, XLA:CPU forms
    the weight gradient through a slow transposing copy of the output gradient (benchmarks/
    RESULTS.md). Free elsewhere. With `dtype`, w is a float32 parameter computed with in `dtype`,
    and its gradient is made in float32 (_cast_matmul)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w if dtype is None else _cast_matmul(x2, w, jnp.dtype(dtype).name)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cast_matmul(x, w, dtype: str):
    """x [N, in] @ w.astype(dtype), w [in, out] float32, whose gradient x^T g is a float32 matmul output: the
    partial sums that a batch split over devices reduces are float32. Autodiff of the cast made it in `dtype`,
    and XLA:GPU reduce-scattered the block weights' gradients in bfloat16 before casting them (issue #36)."""
    return x @ w.astype(dtype)


def _cast_matmul_fwd(x, w, dtype):
    return x @ w.astype(dtype), (x, w)  # the float32 shard, cast again (and gathered again) for the backward


def _cast_matmul_bwd(dtype, res, g):
    x, w = res
    return (g @ w.astype(dtype).T).astype(x.dtype), jnp.dot(x.T, g, preferred_element_type=jnp.float32)


_cast_matmul.defvjp(_cast_matmul_fwd, _cast_matmul_bwd)


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


def apply_rope(x, rope):
    """Rotate halves (x[:E/2], x[E/2:]), the Hugging Face Llama convention, so export needs no
    permutation. x [B, T, N, E]; rope = (sin, cos), each [B, T, E/2]."""
    sin, cos = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections by depth
        self.q = Linear(D, H * E, "q_DX", cfg, rngs)
        self.k = Linear(D, K * E, "kv_DX", cfg, rngs)
        self.v = Linear(D, K * E, "kv_DX", cfg, rngs)
        self.o = Linear(H * E, D, "o_XD", cfg, rngs, std=out_std)
        if cfg.qk_norm:  # Dehghani et al. 2023 (ViT-22B), OLMo 2, Qwen3: bounds the attention logits
            self.q_norm = RMSNorm(cfg, E, "norm_E")
            self.k_norm = RMSNorm(cfg, E, "norm_E")
        self.cfg = cfg

    def queries_keys(self, x, rope):
        """q [B, T, H, E] and k [B, T, K, E] of x [B, T, D], normed and rotated as attention uses them (the
        learning-dynamics capture reads this method's output: dynamics.head_entropy)."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = self.k(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k

    def __call__(self, x, rope, cache=None, pos=None, start=None):
        """x [B, T, D]; rope: (sin, cos) or None. Without a cache: causal self-attention. With a
        cache (k, v each [B, S, K, E]), the T new tokens sit at positions pos..pos+T-1 and attend
        to every cached position up to their own, from start [B] on when given (row b left-padded
        up to start[b])."""
        cfg = self.cfg
        B, T, _ = x.shape
        q, k = self.queries_keys(x, rope)  # [B, T, H, E], [B, T, K, E]
        v = self.v(x).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)  # [B, T, K, E]
        if cache is None:
            out = causal_attention(q, k, v, cfg)
        else:
            k_cache = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, pos, 0, 0))
            S = k_cache.shape[1]
            q_pos, k_pos = pos + jnp.arange(T), jnp.arange(S)
            mask = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, T, S]
            if start is not None:  # a pad sees only itself: no softmax row is empty, so no NaN
                mask = mask & ((k_pos >= start[:, None, None]) | (k_pos == q_pos[:, None]))  # [B, T, S]
            out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                                               mask=mask[:, None], implementation="xla")
            cache = (k_cache, v_cache)
        return self.o(out.reshape(B, T, -1)), cache


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
    The MLP and its norm sit at `<cfg.mlp_block>` and `<cfg.mlp_block>_norm`: swiglu (the pico
    names, which checkpoints, export and ReLoRA know) or mlp (the GELU MLP)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = Norm(cfg)
        self.attention = Attention(cfg, rngs)
        setattr(self, f"{cfg.mlp_block}_norm", Norm(cfg))
        setattr(self, cfg.mlp_block, SwiGLU(cfg, rngs) if cfg.mlp == "swiglu" else GeluMLP(cfg, rngs))

    def __call__(self, x, rope, cache=None, pos=None, start=None):
        mlp, mlp_norm = getattr(self, self.cfg.mlp_block), getattr(self, f"{self.cfg.mlp_block}_norm")
        x, = batch_sharded(x)  # the residual stream split over the batch under a mesh (see `batch_sharded`)
        if self.cfg.norm_placement == "post":
            a, cache = self.attention(x, rope, cache, pos, start)
            h, = batch_sharded(self.attention_norm(x + a))
            out = mlp_norm(h + mlp(h))
        else:
            a, cache = self.attention(self.attention_norm(x), rope, cache, pos, start)
            h, = batch_sharded(x + a)
            out = h + mlp(mlp_norm(h))
        return out, cache


class LanguageModel(nnx.Module):
    """What every model family shares: logits = features(tokens) @ head_kernel(). A family gives
    `features` (what the head reads, [B, T, X] in the compute dtype, and the new cache or state),
    `head_kernel` ([X, V]) and `init_cache(batch, length)`; loss.py can then also fuse the head
    with the loss (model.loss_chunk)."""

    def __call__(self, tokens, cache=None, pos=0, start=None):
        """tokens [B, T] int -> logits [B, T, V] float32. With `cache` (see `init_cache`), the
        tokens sit at positions pos..pos+T-1 and the updated cache is returned too; with start [B]
        as well, row b is left-padded up to start[b] and the padding does not count."""
        h, new_cache = self.features(tokens, cache, pos, start)
        logits = dense(h, self.head_kernel().astype(h.dtype)).astype(jnp.float32)  # [B, T, V]
        return logits if cache is None else (logits, new_cache)


class Decoder(LanguageModel):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = normal(cfg.init_std)
        self.embed = param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32), "embed_VD")
        if cfg.pos_encoding == "absolute":  # learned, GPT-2 style
            self.pos_embed = param(init(rngs.params(), (cfg.seq_len, cfg.d_model), jnp.float32), "pos_TD")
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        if cfg.norm_placement == "pre":
            # post-norm has none: every block already ends in a norm, so a final one would only
            # add a second, redundant scale (the original Transformer has none either)
            self.norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = Linear(cfg.d_model, cfg.vocab_size, "head_DV", cfg, rngs)

    def head_kernel(self):
        """The output projection [D, V]: the head's kernel, or the embedding's transpose when tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.head.kernel[...]

    def features(self, tokens, cache=None, pos=0, start=None):
        """What the head reads, [B, T, D] in the compute dtype (the final norm's output; post-norm:
        the last block's), and the new KV cache (None without one). Left padding (start) is masked
        out and the positions of a row count from its start."""
        B, T = tokens.shape
        c = self.cfg
        x = self.embed[...][tokens].astype(c.dtype)  # [B, T, D]
        positions = jnp.broadcast_to(pos + jnp.arange(T), (B, T))
        if start is not None:
            positions = positions - start[:, None]
        if c.pos_encoding == "absolute":  # pads (negative positions) read row 0; attention masks them
            x = x + self.pos_embed[...][jnp.clip(positions, 0, c.seq_len - 1)].astype(c.dtype)
        rope = rope_tables(positions, c.head_dim, c.rope_theta) if c.pos_encoding == "rope" else None
        if cache is None:
            x, new_cache = self.run_blocks(x, rope), None
        else:
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, cache_i = block(x, rope, cache[i], pos, start)
                new_cache.append(cache_i)
        return (self.norm(x) if c.norm_placement == "pre" else x), new_cache

    def run_blocks(self, x, rope):
        """The blocks without a cache (training, evaluation), with the model.remat policy. With
        model.scan_layers, one lax.scan over the blocks' stacked states, so the step compiles one
        block instead of L; the parameters keep their per-block layout, and stacking copies them
        once per step. Blocks that differ (ReLoRA layers carry their index) use the Python loop,
        and so does the learning-dynamics capture (dynamics.py runs a view with scan_layers off)."""
        policy = REMAT_POLICIES[self.cfg.remat]
        apply = lambda block, x: block(x, rope)[0]
        if self.cfg.scan_layers:
            splits = [nnx.split(block) for block in self.blocks]
            graphdef = splits[0][0]
            if all(g == graphdef for g, _ in splits):
                def body(x, state):
                    return apply(nnx.merge(graphdef, state), x), None
                if policy is not NO_REMAT:
                    body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # scan blocks CSE
                stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(s for _, s in splits))  # [L, ...]
                return jax.lax.scan(body, x, stacked)[0]
        if policy is not NO_REMAT:
            # graph_updates=False: a block changes no state, and write-backs would fail on
            # variables that are not differentiated (ReLoRA's frozen W)
            apply = nnx.remat(apply, policy=policy, graph_updates=False)
        for block in self.blocks:
            x = apply(block, x)
        return x

    def init_cache(self, batch: int, length: int):
        """A zero KV cache of `length` positions: per layer (k, v), each [B, S, K, E]."""
        shape = (batch, length, self.cfg.n_kv_heads, self.cfg.head_dim)
        return [(jnp.zeros(shape, self.cfg.dtype), jnp.zeros(shape, self.cfg.dtype)) for _ in self.blocks]


def count_params(model: nnx.Module, wrt=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


# ---------------------------------------------------------------------------------------------- decoding

def sample_logits(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row of logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
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


def generate(model: LanguageModel, prompt, max_new_tokens: int, key, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, start=None):
    """Decode with a fixed-size cache: one prefill of the prompt [B, P], then one jitted loop step
    per token (a lax.scan, so nothing recompiles per token). Returns [B, P + max_new_tokens].
    Prompts of different lengths are left-padded to P: row b's prompt is prompt[b, start[b]:]
    (start [B]; None = no padding)."""
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


def pad_left(prompts, pad_id: int = 0):
    """Token-id lists of different lengths -> tokens [B, P] int32 left-padded with pad_id, and
    start [B]: where each row's prompt begins (generate masks what comes before it)."""
    P = max(map(len, prompts))
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids):] = ids
    return tokens, np.asarray([P - len(ids) for ids in prompts], np.int32)


def generate_ids(model, prompts, max_new_tokens: int, key, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[list[int]]:
    """The continuations (max_new_tokens ids each) of several prompts (non-empty lists of token
    ids), all in one jitted call. A prompt keeps its last seq_len - max_new_tokens tokens (at least
    one), so prompt and continuation fit in the context the model was trained on."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    keep = max(model.cfg.seq_len - max_new_tokens, 1)
    tokens, start = pad_left([list(p)[-keep:] for p in prompts])
    out = generate(model, tokens, max_new_tokens, key, temperature, top_k, top_p, start=start)
    if not out.is_fully_addressable:  # several processes: each holds only its devices' part
        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(jax.device_get(out))[:, tokens.shape[1]:].tolist()


def distinct_n(samples, n: int) -> float:
    """Distinct-n (Li et al. 2016, arXiv:1510.03055): unique n-grams over n-grams, counted across
    all samples together (sequences of token ids or words). 0.0 when no sample has n items."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct(samples, max_n: int = 5) -> dict:
    """{"distinct_1": ..., ..., "distinct_<max_n>": ...} of the samples."""
    return {f"distinct_{n}": distinct_n(samples, n) for n in range(1, max_n + 1)}
