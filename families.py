"""The other model families of the picoLM comparison study: an LSTM and a k-gram MLP language model, in Flax NNX.

    LSTM (Hochreiter & Schmidhuber 1997), per layer l and time t:
        i, f, g, o = split(x_t W_in + h_{t-1} W_rec + b)          gates [B, G], G = 4 C
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),   h_t = sigmoid(o) * tanh(c_t)
        logits_t = h_t^(L) W_head
    k-gram MLP (Bengio et al. 2003), a window of the last N = k tokens (slots before the sequence start are
    "no token", a zero vector):
        x_t = concat(e(tok_{t-N+1}), ..., e(tok_t))                e = learned embedding [V, M], or one-hot
        h = silu(x_t W_in + b_in), then n_inner times h = silu(h W + b),   logits_t = h W_head

A module of its own, apart from model.py (the pico-decoder that checkpoints, export, ReLoRA and the
learning-dynamics snapshots are built around), holding these baselines and the registry of every family,
model.kind -> (frozen config, module): `model_config(block)` and `build_model(cfg, rngs)`. The families share
model.LanguageModel's interface: `__call__(tokens, cache=None, pos=0, start=None)` -> logits [B, T, V] float32
from their own `features(...)` and `head_kernel()` ([C, V]), `init_cache(batch, length)`, and `.cfg`; their
configs answer what the decoder's does (`flops_per_token()`, `linears()`, `param_fields()`, `notes()`). So the
trainer's step (the loss fused with the head too), `model.generate` and the diversity metrics use them unchanged.
The LSTM's cache is its (h, c) per layer, left as it is over left-padded positions before `start`; the k-gram
model's cache is the window of its last N - 1 tokens (-1 = no token). Parameters are replicated: both are
data-parallel only (model.py's SHARDING table). Dimensions: model.py's legend (M, C, G = 4 C, N = k).

Initialization is PyTorch-like, not model.init_std: embeddings N(0, 1), kernels N(0, 1 / fan_in). Neither family
has a norm to rescale its activations, so with the decoder's std 0.02 the LSTM's state and the MLP's hidden units
start near zero and the first hundreds of steps are lost (measured on the built-in corpus).
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from config import ConfigError, reject_unknown
from model import Decoder, LanguageModel, ModelConfig, dense, normal, param


@dataclass(frozen=True)
class FamilyConfig:
    """The keys of the `model:` block every family reads; a family's own keys are in its `model.<SUB>` sub-block."""
    KIND: ClassVar[str]  # its model.kind
    SUB: ClassVar[str]   # its sub-block's name
    vocab_size: int = 50304
    seq_len: int = 2048
    dtype: str = "bfloat16"
    z_loss: float = 0.0
    loss_chunk: int = 0

    @classmethod
    def from_dict(cls, d):
        """The config from the `model:` block: the shared keys plus the `model.<SUB>` sub-block (unknown keys in
        the sub-block are rejected; the decoder's own keys are ignored)."""
        d = dict(d)
        block = dict(d.get(cls.SUB) or {})
        reject_unknown(block, [f.name for f in dataclasses.fields(cls) if f.name not in SHARED],
                       f"model.{cls.SUB}.")
        cfg = cls(**{k: d[k] for k in SHARED if k in d}, **block)
        cfg.validate()
        return cfg

    def linears(self) -> tuple[str, ...]:
        """Decoder block layers (config.BLOCK_LINEARS) this family has: none."""
        return ()

    def param_fields(self) -> dict:
        """The fields that define the parameters, by config key (`lstm.d_hidden`), with `kind`."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dtype", "loss_chunk")}
        return dict(kind=self.KIND, **{(k if k in SHARED else f"{self.SUB}.{k}"): v
                                       for k, v in fields.items()})

    def notes(self) -> list[str]:
        return []

    def check_positive(self, keys):
        for key in keys:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{self.SUB}.{key}={getattr(self, key)}; it must be at least 1")
        for key in ("z_loss", "loss_chunk"):  # the shared keys, as ModelConfig.validate checks them
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)}; use 0 (off) or more")
        jnp.dtype(self.dtype)


SHARED = tuple(f.name for f in dataclasses.fields(FamilyConfig))


@dataclass(frozen=True)
class LSTMConfig(FamilyConfig):
    KIND, SUB = "lstm", "lstm"
    d_embed: int = 288      # M
    d_hidden: int = 288     # C
    n_layers: int = 2

    def validate(self):
        self.check_positive(("d_embed", "d_hidden", "n_layers"))

    def flops_per_token(self) -> float:
        """6 x matmul params: the gates' input and recurrent kernels and the head (the embedding is
        a lookup)."""
        M, C = self.d_embed, self.d_hidden
        return 6 * (4 * C * (M + C) + (self.n_layers - 1) * 4 * C * 2 * C + C * self.vocab_size)


@dataclass(frozen=True)
class KGramConfig(FamilyConfig):
    KIND, SUB = "kgram_mlp", "kgram"
    k: int = 3                  # N: context tokens, the current one included
    embedding: str = "learned"  # learned (an embedding [V, M]) | onehot (the first layer reads N one-hot vectors)
    d_embed: int = 288          # M (learned only)
    d_hidden: int = 288         # C
    n_inner: int = 1            # hidden C x C layers after the first

    def validate(self):
        self.check_positive(("k", "d_embed", "d_hidden"))
        if self.n_inner < 0:
            raise ConfigError(f"model.kgram.n_inner={self.n_inner}; use 0 or more")
        if self.embedding not in ("learned", "onehot"):
            raise ConfigError(f"model.kgram.embedding={self.embedding!r}; use one of ['learned', 'onehot']")

    def flops_per_token(self) -> float:
        """6 x matmul params: the first layer (a sum of rows for one-hot input: no matmul), the
        inner layers and the head."""
        first = self.k * self.d_embed * self.d_hidden if self.embedding == "learned" else 0
        return 6 * (first + self.n_inner * self.d_hidden ** 2 + self.d_hidden * self.vocab_size)


def init_kernel(rngs, shape, sharding, fan_in: int):
    """N(0, 1 / fan_in): unit-variance outputs for unit-variance inputs (fan_in 1: an embedding, N(0, 1))."""
    return param(normal(1 / math.sqrt(fan_in))(rngs.params(), shape, jnp.float32), sharding)


def _zeros(shape, sharding):
    return param(jnp.zeros(shape, jnp.float32), sharding)


class LSTMLayer(nnx.Module):
    def __init__(self, d_in: int, cfg: LSTMConfig, rngs: nnx.Rngs, in_sharding: str):
        C = cfg.d_hidden
        self.w_in = init_kernel(rngs, (d_in, 4 * C), in_sharding, d_in)   # [M or C, G]
        self.w_rec = init_kernel(rngs, (C, 4 * C), "lstm_rec_CG", C)      # [C, G]
        # forget-gate bias 1 (Jozefowicz et al. 2015): remember by default at the start of training
        self.bias = param(jnp.zeros((4 * C,), jnp.float32).at[C:2 * C].set(1.0), "lstm_bias_G")
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x, state, valid):
        """x [B, T, M or C], state (h, c) each [B, C] float32, valid [B, T] bool (False: keep the state as it
        is, a left-padded position). Returns the outputs [B, T, C] and the last state."""
        gates_x = dense(x.astype(self.dtype), self.w_in[...].astype(self.dtype))  # [B, T, G], all steps at once
        w_rec, bias = self.w_rec[...].astype(self.dtype), self.bias[...]

        def step(state, inp):
            gx, ok = inp  # [B, G], [B]
            h, c = state
            gates = (gx + h.astype(self.dtype) @ w_rec).astype(jnp.float32) + bias
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            h, c = jnp.where(ok[:, None], h_new, h), jnp.where(ok[:, None], c_new, c)
            return (h, c), h

        state, hs = jax.lax.scan(step, state, (gates_x.swapaxes(0, 1), valid.swapaxes(0, 1)))
        return hs.swapaxes(0, 1).astype(self.dtype), state


class LSTM(LanguageModel):
    def __init__(self, cfg: LSTMConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = init_kernel(rngs, (cfg.vocab_size, cfg.d_embed), "lstm_embed_VM", 1)
        self.layers = nnx.List([LSTMLayer(cfg.d_embed if i == 0 else cfg.d_hidden, cfg, rngs,
                                          "lstm_in_MG" if i == 0 else "lstm_in_CG") for i in range(cfg.n_layers)])
        self.head = init_kernel(rngs, (cfg.d_hidden, cfg.vocab_size), "lstm_head_CV", cfg.d_hidden)

    def head_kernel(self):  # [C, V]
        return self.head[...]

    def features(self, tokens, cache=None, pos=0, start=None):
        """The last layer's outputs [B, T, C], which the head reads, and with `cache` (the state after position
        pos - 1) the state after the last token (None without a cache). Positions before start [B] leave the state
        unchanged."""
        B, T = tokens.shape
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.embed[...][tokens].astype(dtype)  # [B, T, M]
        valid = jnp.ones((B, T), bool) if start is None else (pos + jnp.arange(T))[None, :] >= start[:, None]
        states = self.init_cache(B, 0) if cache is None else cache
        new = []
        for layer, state in zip(self.layers, states):
            x, state = layer(x, state, valid)
            new.append(state)
        return x, None if cache is None else new

    def init_cache(self, batch: int, length: int):
        """The zero state, (h, c) per layer, each [B, C] float32 whatever the compute dtype. A state
        holds no positions: `length` (the positions a decoder's KV cache holds) changes nothing."""
        zeros = jnp.zeros((batch, self.cfg.d_hidden), jnp.float32)
        return [(zeros, zeros) for _ in range(self.cfg.n_layers)]


class KGramMLP(LanguageModel):
    def __init__(self, cfg: KGramConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        N, M, C, V = cfg.k, cfg.d_embed, cfg.d_hidden, cfg.vocab_size
        if cfg.embedding == "learned":
            self.embed = init_kernel(rngs, (V, M), "kgram_embed_VM", 1)
            self.w_in = init_kernel(rngs, (N * M, C), "kgram_in_XC", N * M)
        else:  # one-hot: x_t W_in with x_t = concat of N one-hot vectors is a sum of N rows of W_in [N, V, C]
            self.w_in = init_kernel(rngs, (N, V, C), "kgram_onehot_NVC", N)  # N ones in the input
        self.b_in = _zeros((C,), "kgram_bias_C")
        self.hidden = nnx.List([init_kernel(rngs, (C, C), "kgram_hidden_CC", C) for _ in range(cfg.n_inner)])
        self.hidden_bias = nnx.List([_zeros((C,), "kgram_bias_C") for _ in range(cfg.n_inner)])
        self.head = init_kernel(rngs, (C, V), "kgram_head_CV", C)

    def head_kernel(self):  # [C, V]
        return self.head[...]

    def features(self, tokens, cache=None, pos=0, start=None):
        """The last hidden layer [B, T, C], which the head reads, and with `cache` (the N - 1 tokens before position
        pos, -1 = none) the window after the last token (None without a cache). Tokens before start [B] count as
        no token."""
        c = self.cfg
        B, T = tokens.shape
        dtype = jnp.dtype(c.dtype)
        before = self.init_cache(B, 0) if cache is None else cache  # [B, N - 1]
        if start is not None:
            tokens = jnp.where((pos + jnp.arange(T))[None, :] >= start[:, None], tokens, -1)
        ext = jnp.concatenate([before, tokens.astype(jnp.int32)], axis=1)  # [B, N - 1 + T]
        windows = jnp.stack([ext[:, j:j + T] for j in range(c.k)], axis=2)  # [B, T, N], oldest first
        present = (windows >= 0)[..., None]  # [B, T, N, 1]
        ids = jnp.maximum(windows, 0)
        if c.embedding == "learned":
            e = jnp.where(present, self.embed[...][ids].astype(dtype), 0)  # [B, T, N, M]
            h = dense(e.reshape(B, T, -1), self.w_in[...].astype(dtype))  # [B, T, C]
        else:
            rows = self.w_in[...][jnp.arange(c.k), ids].astype(dtype)  # [B, T, N, C]
            h = jnp.where(present, rows, 0).sum(axis=2)
        h = jax.nn.silu(h + self.b_in[...].astype(dtype))
        for w, b in zip(self.hidden, self.hidden_bias):
            h = jax.nn.silu(dense(h, w[...].astype(dtype)) + b[...].astype(dtype))
        return h, None if cache is None else ext[:, ext.shape[1] - (c.k - 1):]

    def init_cache(self, batch: int, length: int):
        """An empty window: N - 1 slots of no token (-1), [B, N - 1] int32, whatever `length`."""
        return jnp.full((batch, self.cfg.k - 1), -1, jnp.int32)


# ---------------------------------------------------------------------------------------------- the registry

# model.kind -> (its frozen config, its module); every module has model.LanguageModel's interface
FAMILIES = {"decoder": (ModelConfig, Decoder), "lstm": (LSTMConfig, LSTM), "kgram_mlp": (KGramConfig, KGramMLP)}


def model_config(block, platform: str = "", compute_capability: str = "") -> ModelConfig | LSTMConfig | KGramConfig:
    """The frozen config of a `model:` block's family (model.kind; absent in old checkpoints: decoder). `platform`
    (and a GPU's compute capability): where the decoder will run when that is not here (a compile target)."""
    kind = block.get("kind") or "decoder"
    if kind not in FAMILIES:
        raise ConfigError(f"model.kind={kind!r}; use one of {list(FAMILIES)}")
    if kind == "decoder" and platform:
        block = dict(block, platform=platform, compute_capability=compute_capability)
    return FAMILIES[kind][0].from_dict(block)


def build_model(cfg, rngs: nnx.Rngs) -> LanguageModel:
    return FAMILIES[cfg.KIND][1](cfg, rngs)
