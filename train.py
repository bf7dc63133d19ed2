"""Mesh, train state, the jitted train / eval steps, the loop and its logging.

The state is functional NNX: `nnx.split((model, optimizer))` gives a static graphdef and a pytree of arrays,
FSDP-sharded from the SHARDING table in model.py. One jitted step takes the state (donated) and a global batch
and returns the new state and device-side metrics; the host only reads metrics every `train.log_every` steps.
"""
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from omegaconf import DictConfig, OmegaConf

import data
import relora
from checkpoint import Checkpoints, HubUploader, abstract_like, dynamics_step, save_dynamics
from families import LSTM, KGramConfig, KGramMLP, LSTMConfig
from generate import distinct, generate_ids
from model import BATCH_AXES, ConfigError, Decoder, ModelConfig, count_params

CONFIGS = Path(__file__).resolve().parent / "configs"
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda *xs: math.prod(xs))


# ---------------------------------------------------------------------------------------------- config

def check_keys(cfg, ref=None, prefix=""):
    """Reject keys that base.yaml does not define (a typo in an override or a config file)."""
    ref = OmegaConf.load(CONFIGS / "base.yaml") if ref is None else ref
    for k in cfg:
        name = f"{prefix}{k}"
        if k not in ref:
            raise ConfigError(f"unknown config key '{name}'; known keys here: {sorted(str(x) for x in ref if x != 'defaults')}")
        if name == "model.relora":  # its keys are checked by relora.py
            continue
        if OmegaConf.is_dict(cfg[k]) and OmegaConf.is_dict(ref[k]):
            check_keys(cfg[k], ref[k], name + ".")


# glibc malloc settings for speed on CPU: one arena, never mmap, never give freed memory back (see reuse_host_memory)
HOST_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reuse_host_memory():
    """Restart this process once with HOST_MALLOC in its environment, so that one step's memory is reused by the next.
    XLA:CPU allocates a step's temporaries afresh on every call (4 GB on benchmarks' picodo2) from its worker threads;
    glibc gives those threads arenas of their own, which serve anything over 64 MB with mmap and unmap it on free, so
    every step page-faults its whole working set back in: 1.3 M faults, a third of picodo2's step
    (benchmarks/RESULTS.md). glibc reads these settings only at process start (mallopt cannot set a size over 2 GB
    or the arenas of threads that exist), hence the restart, done by the entry points before any jax computation.
    Linux with glibc only; setting any of these variables yourself (e.g. MALLOC_ARENA_MAX=8) turns it off."""
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
            or any(k in os.environ for k in (*HOST_MALLOC, "GLIBC_TUNABLES"))):
        return
    os.environ.update(HOST_MALLOC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def init_distributed(d):
    """Start jax.distributed: explicitly from config keys, or auto-detected on SLURM and multi-host TPU pods."""
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def make_mesh(data_size: int, fsdp_size: int) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over every device; -1 on one axis takes all the devices the other leaves."""
    n = jax.device_count()
    if fsdp_size == -1 and data_size > 0 and n % data_size == 0:
        fsdp_size = n // data_size
    elif data_size == -1 and fsdp_size > 0 and n % fsdp_size == 0:
        data_size = n // fsdp_size
    if data_size * fsdp_size != n or data_size < 1:
        raise ConfigError(f"mesh.data={data_size} x mesh.fsdp={fsdp_size} does not match the {n} devices here; "
                          f"make the product {n} (or set one of them to -1)")
    return jax.make_mesh((data_size, fsdp_size), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


# ---------------------------------------------------------------------------------------------- model families

# model.kind -> (its frozen config, its module); every module has the Decoder's interface (families.py)
FAMILIES = {"decoder": (ModelConfig, Decoder), "lstm": (LSTMConfig, LSTM), "kgram_mlp": (KGramConfig, KGramMLP)}


def model_config(block) -> ModelConfig | LSTMConfig | KGramConfig:
    """The frozen config of the `model:` block's family (model.kind; absent in older checkpoints: decoder)."""
    kind = block.get("kind") or "decoder"
    if kind not in FAMILIES:
        raise ConfigError(f"model.kind={kind!r}; use one of {list(FAMILIES)}")
    return FAMILIES[kind][0].from_dict(block)


def build_model(mcfg, rngs: nnx.Rngs) -> nnx.Module:
    return FAMILIES[mcfg.KIND][1](mcfg, rngs)


def check_layout(mcfg, mesh, batch_size: int, grad_accum: int, eval_batch: int):
    fsdp, dp = mesh.shape["fsdp"], mesh.size
    if isinstance(mcfg, ModelConfig) and mcfg.d_model % fsdp:  # the other families are replicated
        raise ConfigError(f"model.d_model={mcfg.d_model} is not divisible by mesh.fsdp={fsdp}: FSDP shards every "
                          f"weight along d_model; pick a mesh.fsdp that divides it")
    if batch_size % grad_accum or (batch_size // grad_accum) % dp:
        raise ConfigError(f"data.batch_size={batch_size} / data.grad_accum={grad_accum} is not divisible by the "
                          f"data-parallel size {dp} (mesh.data x mesh.fsdp); make each micro-batch a multiple of {dp}")
    if eval_batch % dp:
        raise ConfigError(f"eval.batch_size={eval_batch} is not divisible by the data-parallel size {dp}")


# ---------------------------------------------------------------------------------------------- FLOPs and MFU

# Dense peak TFLOP/s per JAX device (a TPU v2/v3 device is one core, half a chip), bf16 then fp32.
PEAK_TFLOPS = {
    "TPU v2": (22.5, 22.5), "TPU v3": (61.5, 61.5), "TPU v4": (275, 275), "TPU v5 lite": (197, 197),
    "TPU v5e": (197, 197), "TPU v5p": (459, 459), "TPU v5": (459, 459), "TPU v6 lite": (918, 918),
    "TPU v6e": (918, 918), "A100": (312, 19.5), "H100": (989, 67), "H200": (989, 67), "L4": (121, 30.3),
    "T4": (65, 8.1),
}


def flops_per_token(c: ModelConfig | LSTMConfig | KGramConfig) -> float:
    """Training FLOPs per token: 6 x matmul params (forward 2, backward 4; embedding lookups, one-hot inputs
    included, are no matmul; a tied head is one), plus, for the decoder, attention scores and values,
    6 x L x T x D, i.e. 12 L T D halved because the mask is causal. Norms, gates and activations are left out."""
    if isinstance(c, LSTMConfig):
        M, C = c.d_embed, c.d_hidden
        return 6 * (4 * C * (M + C) + (c.n_layers - 1) * 4 * C * 2 * C + C * c.vocab_size)
    if isinstance(c, KGramConfig):
        first = c.k * c.d_embed * c.d_hidden if c.embedding == "learned" else 0
        return 6 * (first + c.n_inner * c.d_hidden ** 2 + c.d_hidden * c.vocab_size)
    attn = c.d_model * (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_hidden
    matmul_params = c.n_layers * (attn + mlp) + c.d_model * c.vocab_size
    return 6 * matmul_params + 6 * c.n_layers * c.seq_len * c.d_model


@jax.jit(static_argnums=0)
def _matmul_chain(n, a):
    for _ in range(8):
        a = a @ a * (1.0 / n)
    return a


def peak_flops(dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of all devices together and where the number comes from. On CPU, measured: the best of a few
    chains of 1024 x 1024 jnp matmuls, in float32 and in `dtype`, the faster one (as fast as 2048 or 4096 matmuls
    on a 2-core AVX-512 host; best-of, so that a busy moment does not understate the peak and inflate MFU)."""
    dev = jax.devices()[0]
    kind = dev.device_kind
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            per = bf16 if jnp.dtype(dtype).itemsize <= 2 else fp32
            return per * 1e12 * jax.device_count(), f"{kind} datasheet"
    if dev.platform != "cpu":
        return float("nan"), f"{kind}: unknown peak"
    n, best = 1024, 0.0
    for dt in dict.fromkeys([jnp.float32, jnp.dtype(dtype)]):
        a = jnp.ones((n, n), dt)
        _matmul_chain(n, a).block_until_ready()
        for _ in range(3):
            t = time.perf_counter()
            _matmul_chain(n, a).block_until_ready()
            best = max(best, 8 * 2 * n ** 3 / (time.perf_counter() - t))
    return best, "measured CPU matmul"


def throughput(tokens: int, seconds: float, mcfg: ModelConfig, peak: float) -> dict:
    """tokens/s, model FLOP/s and MFU of `tokens` trained in `seconds`: the one formula of the training log and
    benchmarks/throughput.py."""
    tps = tokens / seconds
    flops = tps * flops_per_token(mcfg)
    return dict(tokens_per_s=tps, flops_per_s=flops, mfu=flops / peak)


# ---------------------------------------------------------------------------------------------- state and steps

def lr_schedule(o, steps: int):
    """Linear warmup to opt.peak_lr, then cosine or linear decay to opt.min_lr_ratio x peak at `steps`."""
    warm = optax.linear_schedule(0.0, o.peak_lr, max(o.warmup_steps, 1))
    rest = max(steps - o.warmup_steps, 1)
    if o.decay == "cosine":
        decay = optax.cosine_decay_schedule(o.peak_lr, rest, alpha=o.min_lr_ratio)
    elif o.decay == "linear":
        decay = optax.linear_schedule(o.peak_lr, o.peak_lr * o.min_lr_ratio, rest)
    elif o.decay == "constant":
        decay = optax.constant_schedule(o.peak_lr)
    else:
        raise ConfigError(f"opt.decay={o.decay!r}; use cosine, linear or constant")
    return optax.join_schedules([warm, decay], [o.warmup_steps])


def make_tx(o, schedule):
    """AdamW with global-norm clipping; weight decay on matrices only (not norm scales)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
        optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=decay_mask))


def init_state(mcfg, tx, mesh, seed: int, lora: relora.ReLoRAConfig | None = None):
    """Build model and optimizer directly sharded (no full copy on one device): graphdef, state. With `lora`, the
    model's targeted layers are ReLoRA-wrapped before the optimizer is built, so it holds moments for A and B only."""
    def build():
        model = build_model(mcfg, nnx.Rngs(seed))
        if lora is not None:
            relora.wrap(model, lora)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
        shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), nnx.get_partition_spec(abstract_state))
        state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    return graphdef, state


def cross_entropy(logits, labels):
    """Mean next-token loss; logits [B, T, V] float32, labels [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model, tokens):  # tokens [B, T + 1]
    """Mean next-token cross-entropy, plus model.z_loss x mean(logsumexp(logits)^2) (PaLM, Chowdhery et al.
    2022: keeps the softmax normalizer near 1, so logits do not drift; the weight is static, 0 adds nothing).
    With model.loss_chunk, the same loss fused with the head, never holding all of [B, T, V]."""
    c = model.cfg
    if c.loss_chunk:
        return fused_cross_entropy(model.features(tokens[:, :-1])[0], model.head_kernel(), tokens[:, 1:],
                                   c.loss_chunk, c.z_loss)
    logits = model(tokens[:, :-1])
    loss = cross_entropy(logits, tokens[:, 1:])
    if c.z_loss:
        loss = loss + c.z_loss * jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return loss


def _fused_ce(h, w, labels, chunk: int, z_loss: float, grads: bool):
    """Sum of the losses lse - logit_label + z_loss lse^2 over the N rows of h [N, D] (head kernel w [D, V], labels
    [N]) and, with `grads`, d/dh [N, D] and d/dw [D, V] of that sum, computed `chunk` rows at a time: each chunk's
    logits are made, turned into d loss / d logits = softmax (1 + 2 z_loss lse) - onehot and used at once
    (the two matmuls that need them), so no more than one chunk's [chunk, V] logits exist at a time."""
    n, d = h.shape
    pad = -n % chunk  # padded rows get weight 0
    weight = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad)).reshape(-1, chunk)
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    ls = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
    wc = w.astype(h.dtype)

    def body(dw, xs):
        hc, hct, lc, wt = xs  # [C, D], [D, C], [C], [C]
        logits = jnp.dot(hc, wc, preferred_element_type=jnp.float32)  # [C, V], float32 whatever the compute dtype
        m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
        e = jnp.exp(logits - m)
        total = e.sum(axis=-1, keepdims=True)
        lse = (jnp.log(total) + m)[:, 0]
        loss = jnp.sum(wt * (lse - jnp.take_along_axis(logits, lc[:, None], axis=-1)[:, 0] + z_loss * lse ** 2))
        if not grads:
            return dw, (loss, None)
        p = e / total if not z_loss else e / total * (1 + 2 * z_loss * lse)[:, None]
        g = ((p - jax.nn.one_hot(lc, e.shape[-1], dtype=e.dtype)) * wt[:, None]).astype(h.dtype)  # [C, V]
        return dw + jnp.dot(hct, g, preferred_element_type=jnp.float32), (loss, g @ wc.T)

    # hct: each chunk's h^T laid out contiguously beforehand; XLA:CPU's d/dw matmul then runs at ~410 GFLOP/s
    # instead of ~300 when it reads the transpose in place (picodo1's head: [256, 512] @ [512, 50257], RESULTS.md)
    xs = (hs, hs.swapaxes(1, 2) if grads else None, ls, weight)
    dw, (loss, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32) if grads else None, xs)
    if not grads:
        return loss.sum()
    return loss.sum(), dh.reshape(-1, d)[:n], dw


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_cross_entropy(h, w, labels, chunk: int, z_loss: float = 0.0):
    """loss_fn's loss of the logits h @ w (cross-entropy, plus z_loss x mean(lse^2)) for h [B, T, D], head kernel
    w [D, V], labels [B, T], computed `chunk` tokens at a time with its gradients made in the same pass
    (model.loss_chunk): the [B, T, V] float32 logits and their gradient are never held whole (823 MB each at 4096
    tokens x 50257), which on CPU is also faster (RESULTS.md)."""
    return _fused_ce(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), chunk, z_loss, grads=False) / labels.size


def _fused_ce_fwd(h, w, labels, chunk, z_loss):
    loss, dh, dw = _fused_ce(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), chunk, z_loss, grads=True)
    return loss / labels.size, (dh.reshape(h.shape), dw, labels)


def _fused_ce_bwd(chunk, z_loss, res, g):
    dh, dw, labels = res
    scale = g / labels.size
    return (scale * dh).astype(dh.dtype), (scale * dw).astype(dw.dtype), np.zeros(labels.shape, jax.dtypes.float0)


fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def train_step(graphdef, state, tokens, grad_accum: int = 1, skip_nonfinite: bool = False):
    """One optimizer step on the global batch tokens [B, T + 1], split into `grad_accum` micro-batches.
    With skip_nonfinite, a step whose loss or gradient is NaN / inf leaves the state as it was."""
    old = jax.tree.map(lambda x: x, state)  # own containers: the update below mutates the merged Variables
    model, opt = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)  # gradients for nnx.Param only
    grad = jax.value_and_grad(lambda params, tokens: loss_fn(nnx.merge(model_def, params, rest), tokens))
    if grad_accum == 1:
        loss, grads = grad(params, tokens)
    else:
        B = tokens.shape[0]
        # micro-batch a takes rows a, a + A, a + 2A, ...: every device keeps an equal share of each one
        micro = tokens.reshape(B // grad_accum, grad_accum, -1).swapaxes(0, 1)
        micro = jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES, None))

        def acc(carry, mb):
            return jax.tree.map(jnp.add, carry, grad(params, mb)), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(acc, zeros, micro)
        loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    opt.update(model, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = nnx.state((model, opt))
    if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return new, dict(loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))


def eval_step(graphdef, state, tokens):
    """Summed loss and token count of one validation batch."""
    model, _ = nnx.merge(graphdef, state)
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)


GREEDY_PROMPT = 8  # tokens of each validation prompt for the greedy distinct-n

BLOCK_LAYERS = ("attention.q", "attention.k", "attention.v", "attention.o", "swiglu.gate", "swiglu.up", "swiglu.down",
                "mlp.up", "mlp.down")  # mlp.*: the GELU MLP (model.mlp=gelu)


def dynamics_layers(mcfg, layers) -> tuple[tuple[str, ...], str | None]:
    """The checkpoint.dynamics.layers this model has, and a note on those it lacks. A name no block ever has is
    an error (a typo); one another decoder config has (swiglu.* with mlp=gelu, every name for the LSTM and k-gram
    families, which have no attention blocks) is skipped with the note."""
    for layer in layers:
        if layer not in BLOCK_LAYERS:
            raise ConfigError(f"checkpoint.dynamics.layers: {layer!r} is not a layer of a block; choose from {BLOCK_LAYERS}")
    if not isinstance(mcfg, ModelConfig):
        return (), f"learning dynamics: off for model.kind={mcfg.KIND} (snapshots are of decoder blocks)" if layers else None
    mlp = "swiglu." if mcfg.mlp == "swiglu" else "mlp."
    have = tuple(x for x in layers if x.startswith(("attention.", mlp)))
    missing = [x for x in layers if x not in have]
    return have, f"learning dynamics: skipping {missing} (no such layer with model.mlp={mcfg.mlp})" if missing else None


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or inf loss); the message says where the last good checkpoint is."""


class Meter:
    """Sums the per-step metrics on device (no host sync per step); the host reads them at log or save time."""

    def __init__(self):
        self.sum, self.n, self.t = None, 0, time.perf_counter()
        self.bad = jnp.zeros(())  # non-finite steps since the last check

    def add(self, m):
        self.sum = m if self.sum is None else jax.tree.map(jnp.add, self.sum, m)
        self.n, self.bad = self.n + 1, self.bad + m["nonfinite"]

    def read(self) -> tuple[dict, int, float]:
        """Means since the last read, the number of steps and the seconds they took."""
        means = {k: float(v) / self.n for k, v in jax.device_get(self.sum).items()}
        out = (means, self.n, time.perf_counter() - self.t)
        self.sum, self.n, self.t = None, 0, time.perf_counter()
        return out


class StopSignal:
    """SIGTERM / SIGINT ask the loop to save at the current step and exit cleanly; a second SIGINT aborts."""

    def __enter__(self):
        self.requested, self.prev = None, {}
        if threading.current_thread() is threading.main_thread():
            self.prev = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def agreed(self, sync: bool) -> bool:
        """Whether to stop now. Several processes agree (at log steps only, where the host syncs anyway)."""
        if jax.process_count() == 1:
            return bool(self.requested)
        if not sync:
            return False
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(bool(self.requested))).any())

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)


class Trainer:
    """Everything a run needs, built from the config; `run()` is the loop."""

    def __init__(self, cfg: DictConfig, build_data: bool = True, resume: bool = True):
        check_keys(cfg)
        self.cfg = cfg
        self.mcfg = model_config(cfg.model)
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        self.run_dir = Path(cfg.run_dir)
        self.is_main = jax.process_index() == 0
        if build_data:
            check_layout(self.mcfg, self.mesh, cfg.data.batch_size, cfg.data.grad_accum, cfg.eval.batch_size)
            self.data_dir = Path(cfg.data.dir) if cfg.data.dir else data.builtin_corpus(cfg.data.cache_dir)
            T, V = self.mcfg.seq_len, self.mcfg.vocab_size
            self.train_tokens = data.open_tokens(self.data_dir / "train.bin", cfg.data.token_dtype, V, T)
            self.valid_tokens = data.open_tokens(self.data_dir / "valid.bin", cfg.data.token_dtype, V, T)
            data.n_valid_batches(len(self.valid_tokens), cfg.eval.batch_size, T, cfg.eval.max_tokens,
                                 self.data_dir / "valid.bin")  # fail now, not at the first evaluation
            self.train_data = data.TrainData(self.train_tokens, cfg.seed, cfg.data.batch_size, T, V,
                                             self.data_dir / "train.bin")
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES, None))
        self.relora = relora.ReLoRAConfig.from_dict(cfg.model.get("relora"), cfg.seed)  # None: full-rank training
        if self.relora and not isinstance(self.mcfg, ModelConfig):
            raise ConfigError(f"model.relora is set but model.kind={cfg.model.kind}: ReLoRA wraps the decoder's "
                              f"attention and MLP projections; set model.relora=null or model.kind=decoder")
        if self.relora and self.mcfg.mlp == "gelu" and {"swiglu", "gate"} & set(self.relora.target_modules):
            raise ConfigError(f"model.relora.target_modules={list(self.relora.target_modules)} names SwiGLU layers but "
                              f"model.mlp=gelu; target `mlp` (the GELU MLP's up and down projections) instead")
        self.schedule = lr_schedule(cfg.opt, cfg.train.steps)
        if self.relora:
            self.schedule = relora.jagged_schedule(self.schedule, self.relora)
        wrap_now = self.relora if self.relora and not self.relora.warm_start_steps else None
        self.graphdef, self.state = init_state(self.mcfg, make_tx(cfg.opt, self.schedule), self.mesh, cfg.seed, wrap_now)
        layers = tuple(cfg.checkpoint.dynamics.layers) if build_data else ()
        self.dynamics_layers, self.dynamics_note = dynamics_layers(self.mcfg, layers)
        self.jit_steps()
        self.start_step = self.saved_step = 0
        self.ckpt = self.hub = None
        if resume:
            self.resume()

    def resume(self):
        """Open checkpoint.dir and continue from its latest checkpoint (checkpoint.auto_resume)."""
        c = self.cfg.checkpoint
        self.ckpt = Checkpoints(c.dir, c.keep, c["async"])
        self.hub = HubUploader(c.hf_repo_id, self.cfg.name, c.hf_endpoint) if c.hf_repo_id and self.is_main else None
        latest = self.ckpt.latest_step()
        if latest is None:
            return
        if not c.auto_resume:
            raise ConfigError(f"{self.ckpt.dir} already holds checkpoints (steps {self.ckpt.all_steps()}) and "
                              f"checkpoint.auto_resume=false; use a new run_dir, or auto_resume=true to continue")
        self.wrap_for(latest)
        self.state, loop = self.ckpt.restore(latest, abstract_like(self.state), self.cfg.model)
        self.start_step = self.saved_step = loop["step"]
        if self.is_main:
            print(f"resumed from {self.ckpt.dir / str(latest)} (step {latest})")

    def wrap_for(self, step: int):
        """Give the state the layout a checkpoint of `step` has: ReLoRA-wrapped once the warm start is over."""
        r = self.relora
        if r and r.warm_start_steps and step >= r.warm_start_steps and not relora.lora_layers(self.model):
            with jax.set_mesh(self.mesh):
                self.graphdef, self.state = relora.wrap_state(self.graphdef, self.state, r)
            self.jit_steps()

    def jit_steps(self):
        """Compile the train and eval steps for self.graphdef (again when ReLoRA wraps the model mid-run)."""
        step = relora.training_step(train_step, self.relora) if self.relora else train_step
        # the state keeps the shardings it was created with (XLA would otherwise pick its own for some outputs,
        # e.g. shard the norm scales, and every step after the first would recompile)
        shardings = (jax.tree.map(lambda x: x.sharding, self.state), NamedSharding(self.mesh, P()))
        self.train_step = jax.jit(partial(step, self.graphdef, grad_accum=self.cfg.data.grad_accum,
                                          skip_nonfinite=self.cfg.train.nan_policy == "skip"),
                                  donate_argnums=0, out_shardings=shardings)
        self.eval_step = jax.jit(partial(eval_step, self.graphdef))
        self.dynamics_step = jax.jit(partial(dynamics_step, self.graphdef, layers=self.dynamics_layers))

    def relora_update(self, done: int, bar=None):
        """Between steps (SPEC §4): wrap the model when the warm start ends; merge-and-reset every reset_frequency."""
        r = self.relora
        if done == r.warm_start_steps:
            self.graphdef, self.state = relora.wrap_state(self.graphdef, self.state, r)
            self.jit_steps()
            self.log(dict(relora="wrapped", **relora.sizes(self.graphdef, self.state)), done, bar)
        elif (k := r.reset_index(done)) is not None:
            self.state, zeroed = relora.merge_and_reset(self.graphdef, self.state, k, r)
            self.log(dict(relora_reset=k, optimizer_zeroed=float(zeroed)), done, bar)

    @property
    def model(self) -> Decoder | LSTM | KGramMLP:
        return nnx.merge(self.graphdef, self.state)[0]

    def evaluate(self) -> dict:
        total, count = 0.0, 0.0
        with jax.set_mesh(self.mesh):
            for tokens in data.valid_batches(self.valid_tokens, self.cfg.eval.batch_size, self.mcfg.seq_len,
                                             self.cfg.eval.max_tokens, self.batch_sharding):
                s, n = self.eval_step(self.state, tokens)
                total, count = total + s, count + n
        loss = float(total / count)
        return dict(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))

    def prompt_ids(self):
        """sample.prompt as token ids through the run's tokenizer, and the tokenizer (None without one: token 0)."""
        tok_path = self.data_dir / "tokenizer.json"
        tok = data.load_tokenizer(tok_path) if tok_path.exists() else None
        return (tok.encode(self.cfg.sample.prompt).ids if tok else []) or [0], tok

    def sample(self) -> str:
        """sample.prompt and one continuation of it, as text."""
        s = self.cfg.sample
        ids, tok = self.prompt_ids()
        with jax.set_mesh(self.mesh):
            new = generate_ids(self.model, [ids], s.max_new_tokens, jax.random.key(self.cfg.seed),
                               s.temperature, s.top_k, s.top_p)[0]
        ids = ids[-max(self.mcfg.seq_len - s.max_new_tokens, 1):] + new  # the prompt as generate_ids kept it
        return tok.decode(ids) if tok else " ".join(map(str, ids))

    def diversity(self) -> dict:
        """distinct-1..5 over token ids (0 samples: {}): `distinct_n` of sample.n_samples sampled continuations of
        sample.prompt (sample.temperature, top_k, top_p), and `greedy_distinct_n` of greedy continuations of
        sample.n_samples different prompts, the first GREEDY_PROMPT tokens of evenly spaced validation sequences
        (greedy decoding of one prompt n times would give n copies of one text)."""
        s = self.cfg.sample
        if not (s.n_samples and s.max_new_tokens):
            return {}
        ids, _ = self.prompt_ids()
        T = self.mcfg.seq_len
        n_seqs = len(self.valid_tokens) // T
        starts = [(i * n_seqs // s.n_samples) * T for i in range(s.n_samples)]
        prompts = [self.valid_tokens[i:i + GREEDY_PROMPT].astype(np.int64).tolist() for i in starts]
        key = jax.random.key(self.cfg.seed)
        with jax.set_mesh(self.mesh):
            sampled = generate_ids(self.model, [ids] * s.n_samples, s.max_new_tokens, key, s.temperature, s.top_k, s.top_p)
            greedy = generate_ids(self.model, prompts, s.max_new_tokens, key, 0.0)
        return dict(**distinct(sampled), **{f"greedy_{k}": v for k, v in distinct(greedy).items()})

    def log(self, metrics: dict, step: int, bar=None):
        if not self.is_main:
            return
        if self.wandb:
            self.wandb.log(metrics, step=step)
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        (bar.write if bar is not None else print)(f"step {step}: {line}")

    def check_finite(self, step: int):
        """Stop on a NaN / inf loss (train.nan_policy=stop) before anything is saved from the bad state."""
        bad = int(self.meter.bad)
        self.meter.bad = jnp.zeros(())
        if bad and self.cfg.train.nan_policy == "stop":
            if self.ckpt:
                self.ckpt.wait()
            where = f"step {self.saved_step} in {self.ckpt.dir}" if self.ckpt else "none (checkpointing is off)"
            raise TrainingError(f"the loss became NaN or inf in {bad} step(s) up to step {step}; the last good "
                                f"checkpoint is {where}; lower opt.peak_lr, check the data, or set train.nan_policy=skip")

    def save(self, step: int):
        self.check_finite(step)
        if self.ckpt is None or step == self.saved_step and self.ckpt.latest_step() == step:
            return
        loop = dict(step=step, seed=self.cfg.seed, tokens_seen=self.tokens_seen(step),
                    eval=self.last_eval)  # the latest evaluation (val_loss, val_ppl and its step), if any
        self.ckpt.save(step, self.state, loop, OmegaConf.to_container(self.cfg, resolve=True))
        self.saved_step = step
        if self.dynamics_layers:  # computed with this step's parameters on its train batch and the fixed eval batch
            out = self.run_dir / "learning_dynamics" / str(step)
            with jax.set_mesh(self.mesh):  # the same context at every save, or the jitted step would recompile
                tokens = self.train_data.batch(step, self.batch_sharding)
                save_dynamics(out, "train", self.dynamics_step(self.state, tokens), tokens)
                eval_tokens = next(data.valid_batches(self.valid_tokens, self.cfg.eval.batch_size, self.mcfg.seq_len,
                                                      None, self.batch_sharding))
                save_dynamics(out, "eval", self.dynamics_step(self.state, eval_tokens))
        if self.cfg.checkpoint.hf_repo_id:  # complete on disk before upload; every process waits (orbax syncs them)
            self.ckpt.wait()
        if self.hub:
            self.hub.upload(step, self.ckpt.dir / str(step), self.run_dir / "learning_dynamics" / str(step))

    def log_train(self, step: int, bar):
        m, n, dt = self.meter.read()
        tp = throughput(self.tokens_seen(n), dt, self.mcfg, self.peak_flops)  # the tokens of these n steps
        m.update(ppl=math.exp(min(m["loss"], 50.0)), lr=float(self.schedule(step - 1)), tokens_per_s=tp["tokens_per_s"],
                 mfu=tp["mfu"], tokens=self.tokens_seen(step))
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tp['tokens_per_s']:,.0f}", mfu=f"{m['mfu']:.1%}")
        self.log(m, step, bar)
        self.history.append(dict(step=step, **m))
        self.check_finite(step)

    def tokens_seen(self, step: int) -> int:
        return step * self.cfg.data.batch_size * self.mcfg.seq_len

    def record_eval(self, step: int, ev: dict):
        """Put an evaluation into the history (into the entry of its step when that step was logged), with the
        tokens seen, so that validation loss can be plotted against tokens."""
        if not (self.history and self.history[-1]["step"] == step):
            self.history.append(dict(step=step, tokens=self.tokens_seen(step)))
        self.history[-1].update({k: v for k, v in ev.items() if k != "step"})

    def start(self):
        """Run directory, banner, W&B; the metrics history of earlier runs of this run_dir up to the resume step."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.peak_flops, self.peak_source = peak_flops(self.mcfg.dtype)
        self.meter, self.wandb, self.history, self.last_eval = Meter(), None, [], None
        metrics = self.run_dir / "metrics.json"
        if self.start_step and metrics.exists():
            self.history = [h for h in json.loads(metrics.read_text())["history"] if h["step"] <= self.start_step]
        n_params = self.n_params = count_params(self.model, (nnx.Param, relora.Frozen))
        if not self.is_main:
            return
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        print(f"model: {n_params / 1e6:.2f}M params | mesh {dict(self.mesh.shape)} on {jax.device_count()} "
              f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es) | data {self.data_dir} "
              f"({len(self.train_tokens):,} train tokens) | peak {self.peak_flops / 1e12:.3g} TFLOP/s ({self.peak_source})")
        if self.dynamics_note:
            print(self.dynamics_note)
        if self.relora:
            print("relora: " + " ".join(f"{k}={v:,}" for k, v in relora.sizes(self.graphdef, self.state).items()))
        if cfg.wandb.mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name,
                                    mode=cfg.wandb.mode, dir=str(self.run_dir), resume="allow",
                                    config=OmegaConf.to_container(cfg, resolve=True),
                                    settings=wandb.Settings(silent=True, console="off"))
            print(f"W&B ({cfg.wandb.mode}): {self.wandb.dir}" + ("  (upload later with `wandb sync`)" if cfg.wandb.mode == "offline" else ""))
            self.wandb.summary["params"] = n_params

    def run(self) -> dict:
        from tqdm import tqdm
        cfg, steps = self.cfg, self.cfg.train.steps
        self.start()
        bar = tqdm(total=steps, initial=self.start_step, disable=not self.is_main, dynamic_ncols=True, mininterval=1.0)
        stopping = False
        with jax.set_mesh(self.mesh), StopSignal() as stop:
            self.save(self.start_step)  # step 0 of a new run
            batches = data.prefetch(lambda s: self.train_data.batch(s, self.batch_sharding), range(self.start_step, steps))
            for step, tokens in batches:
                self.state, m = self.train_step(self.state, tokens)
                self.meter.add(m)
                bar.update(1)
                done = step + 1
                if self.relora:
                    self.relora_update(done, bar)
                is_log = done % cfg.train.log_every == 0 or done == steps
                if is_log:
                    self.log_train(done, bar)
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done != steps:
                    self.last_eval = dict(step=done, **self.evaluate())  # stored with the next checkpoint
                    self.log(self.last_eval, done, bar)
                    self.record_eval(done, self.last_eval)
                stopping = stop.agreed(sync=is_log)  # every process stops at the same step
                if stopping or (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done != steps):
                    self.save(done)
                if stopping:
                    break
        bar.close()
        if stopping:
            return self.finish(dict(step=self.saved_step, interrupted=stop.requested or "stop (another process)"))
        final = dict(step=steps, train_loss=self.history[-1]["loss"], **self.evaluate())
        self.last_eval = dict(step=steps, val_loss=final["val_loss"], val_ppl=final["val_ppl"])
        self.record_eval(steps, self.last_eval)
        self.save(steps)  # after the final evaluation, which it stores
        final["unigram_entropy"] = data.unigram_entropy(self.train_tokens[:data.SCAN_LIMIT], self.mcfg.vocab_size)
        final.update(self.diversity(), params=self.n_params, tokens=self.tokens_seen(steps))
        self.log(final, steps)
        sample = self.sample() if cfg.sample.max_new_tokens else None
        if self.is_main:
            print(f"validation loss {final['val_loss']:.3f} nats (perplexity {final['val_ppl']:.1f}) vs "
                  f"unigram entropy {final['unigram_entropy']:.3f} nats of the training tokens")
            if sample is not None:
                print(f"sample: {sample!r}")
        return self.finish(final)

    def finish(self, final: dict) -> dict:
        if self.ckpt:
            self.ckpt.wait()
        if self.hub:
            self.hub.wait()
        if self.is_main:
            if final.get("interrupted"):
                print(f"{final['interrupted']}: saved step {final['step']} to {self.ckpt.dir}; run again to resume")
            (self.run_dir / "metrics.json").write_text(json.dumps(dict(final=final, history=self.history), indent=1))
            if self.wandb:
                self.wandb.summary.update(final)
                self.wandb.finish()
        return final


def run(cfg: DictConfig) -> dict:
    return Trainer(cfg).run()
