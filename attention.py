"""Causal self-attention, by whichever kernel the model runs on: cuDNN flash attention on GPUs, jax's Pallas splash
attention on TPUs, flash attention in plain JAX elsewhere (ModelConfig.attention_impl chooses), all in memory that
grows with T, not T^2; blockwise_attention, the earlier XLA path, is the reference the tests hold them to.

A module of its own, apart from model.py's blocks, because the kernels and their sharding rules (a fused kernel has
no SPMD partitioner of its own, or a picky one) are a concern of their own, checked by compiling for the chips
(aot.py); of the project it imports only config.py's `brief`; `cfg` is anything with `attention` and `attention_impl()`.
Dimensions: model.py's legend (B, T, S, H, K, E).
"""
import math
import warnings

import jax
import jax.numpy as jnp

from config import brief

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch is split over (model.SHARDING's mesh)


def causal_attention(q, k, v, cfg):
    """Causal self-attention; q [B, T, H, E], k, v [B, T, K, E]; GQA: query head h reads kv head
    h // (H / K). A fused kernel where ModelConfig.attention_impl says so: cuDNN flash attention
    (jax.nn.dot_product_attention; in jax 0.10 its default, implementation=None, always takes XLA)
    or splash attention on TPUs; else flash_attention in plain JAX. With model.attention=auto,
    shapes the kernel still refuses at trace time (a sequence length, a cuDNN version) fall back
    to flash_attention with a warning that says so."""
    impl, _ = cfg.attention_impl()
    kernel, name = KERNELS.get(impl, (None, None))
    if kernel is not None and cfg.attention == "auto":
        try:
            return kernel(q, k, v)
        except Exception as e:  # jax raises several types for a refused shape; the reason is kept
            warnings.warn(f"model.attention=auto: {name} refused q {q.shape} {q.dtype} "
                          f"({brief(e)}); attention runs "
                          "on XLA (attention.flash_attention)", stacklevel=2)
    elif kernel is not None:
        return kernel(q, k, v)
    return flash_attention(q, k, v)


def batch_shards() -> int:
    """How many ways the current mesh splits the batch (its devices over BATCH_AXES); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def batch_sharded(*xs):
    """xs [B, ...] laid out split over the batch axes, replicated otherwise, under a mesh (as is, without one or
    when B does not split evenly: a one-prompt generation on 8 devices). The blocks hold their residual stream so
    too: without it XLA:GPU gathered the whole batch onto every GPU and split the matmuls over D instead."""
    n = batch_shards()
    if n == 1 or xs[0].shape[0] % n:
        return xs
    return tuple(jax.lax.with_sharding_constraint(x, jax.P(BATCH_AXES)) for x in xs)


def cudnn_attention(q, k, v):
    """cuDNN flash attention. q, k and v are first put in one batch-split layout: its partitioner
    refuses operands sharded unlike each other ("Query, key and value should have same sharding"),
    which FSDP's weight sharding otherwise leaves q and k / v in on 2 or more GPUs."""
    q, k, v = batch_sharded(q, k, v)
    return batch_sharded(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))[0]


SPLASH_BLOCKS = (512, 256, 128)  # block sizes the TPU kernel takes (multiples of its 128 lanes), largest first


def splash_attention(q, k, v, interpret: bool = False):
    """Causal GQA attention by jax's Pallas splash attention kernel (TPU; `interpret` runs it on any
    backend, for tests): each kv head with its H / K query heads as one multi-query kernel, vmapped
    over batch and kv heads; blocks of the largest SPLASH_BLOCKS size dividing T, so the scores of
    a fully masked block are never computed and no [T, S] array exists. A Pallas call has no SPMD
    partitioner, so under a mesh it runs per device on its rows of the batch (shard_map)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    B, T, H, E = q.shape
    K = k.shape[2]
    block = next((b for b in SPLASH_BLOCKS if T % b == 0), T if interpret else None)
    if block is None:
        raise ValueError(f"splash attention needs a sequence length divisible by 128, not {T}")
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * (H // K))
    kernel = jax.vmap(jax.vmap(sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)))

    def attend(q, k, v):  # [b, T, H, E], [b, T, K, E] -> [b, T, H, E]; the kernel does not scale q
        b = q.shape[0]
        qh = (q / math.sqrt(E)).astype(q.dtype).reshape(b, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
        out = kernel(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [b, K, H/K, T, E]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, T, H, E)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or B % mesh.size:
        return attend(q, k, v)
    spec = jax.P(BATCH_AXES)
    return jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def blockwise_attention(q, k, v, min_block=128, max_blocks=8):
    """Causal attention in plain XLA ops (the path before flash_attention, kept as the tests' reference; it keeps
    each query block's float32 scores and probabilities for the backward pass), one block of queries at a time:
    the block ending at query t reads keys 0..t only, so the masked upper triangle of the T x T scores (half the
    attention FLOPs) is mostly never computed. Softmax in float32. Blocks of >= min_block queries, at most
    max_blocks of them, since each is unrolled into the graph (timings: benchmarks/RESULTS.md)."""
    B, T, H, E = q.shape
    K = k.shape[2]
    n = max(1, min(max_blocks, T // min_block))
    size = -(-T // n)
    q = q.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)  # [B, K, H/K, T, E]: a kv head's
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, E]
    out = []
    for lo in range(0, T, size):
        hi = min(T, lo + size)
        s = jnp.einsum("bkhte,bkse->bkhts", q[:, :, :, lo:hi], k[:, :, :hi],
                       preferred_element_type=jnp.float32)
        causal = jnp.arange(hi) <= jnp.arange(lo, hi)[:, None]  # [t, s]: query lo + t sees <= itself
        p = jax.nn.softmax(jnp.where(causal, s / math.sqrt(E), -jnp.inf), axis=-1)
        out.append(jnp.einsum("bkhts,bkse->bkhte", p.astype(v.dtype), v[:, :, :hi]))
    return jnp.concatenate(out, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


KERNELS = {"cudnn": (cudnn_attention, "cuDNN"), "splash": (splash_attention, "splash attention")}


def flash_attention(q, k, v, block: int = 128):
    """Causal GQA attention in plain JAX whose memory grows with T, not T^2 (FlashAttention-2, Dao 2023; Rabe and
    Staats 2021): per block of `block` queries, an online softmax over the key blocks up to its own, and a custom
    VJP that keeps only the output and the log-sum-exp and recomputes each block's scores in the backward pass.
    Softmax in float32. T need not be a multiple of the block: padded keys sit after every query, so causality
    masks them, and padded queries are cut off. Under a mesh, q, k, v and the output are held split over the batch:
    left to itself, XLA:TPU's partitioner ran the blocks on the whole batch on every chip (-cn tpu with
    model.attention=xla planned 17.3 GiB per v5e chip, 6.8 GiB with the constraint)."""
    q, k, v = batch_sharded(q, k, v)
    B, T, H, E = q.shape
    K = k.shape[2]
    size = min(block, T)
    pad = -T % size
    qb, kb, vb = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    q5 = qb.reshape(B, -1, size, K, H // K, E).transpose(1, 0, 3, 4, 2, 5)  # [n, B, K, G, b, E]
    k5, v5 = (x.reshape(B, -1, size, K, E).transpose(1, 0, 3, 2, 4) for x in (kb, vb))  # [n, B, K, b, E]
    out = _flash(q5, k5, v5)  # [n, B, K, G, b, E]
    return batch_sharded(out.transpose(1, 0, 4, 2, 3, 5).reshape(B, T + pad, H, E)[:, :T])[0]


def _scores(qi, kj, i, j):
    """Scaled, causally masked scores of query block i against key block j: [B, K, G, b, b] float32."""
    b, e = qi.shape[-2], qi.shape[-1]
    s = jnp.einsum("bkgte,bkse->bkgts", qi, kj, preferred_element_type=jnp.float32) / math.sqrt(e)
    visible = (i * b + jnp.arange(b))[:, None] >= (j * b + jnp.arange(b))[None, :]
    return jnp.where(visible, s, -jnp.inf)


def _flash_forward(q5, k5, v5):
    """Outputs [n, B, K, G, b, E] and log-sum-exp [n, B, K, G, b] of every query block."""
    def query_block(_, xs):
        i, qi = xs

        def key_block(j, carry):
            m, l, acc = carry
            s = _scores(qi, k5[j], i, j)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            c = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bkse->bkgte", p.astype(v5.dtype), v5[j], preferred_element_type=jnp.float32)
            return m_new, l * c + p.sum(-1), acc * c[..., None] + pv

        shape = qi.shape[:-1]
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(qi.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # key block 0 is seen by all: m finite
        return None, ((acc / l[..., None]).astype(qi.dtype), m + jnp.log(l))

    return jax.lax.scan(query_block, None, (jnp.arange(q5.shape[0]), q5))[1]


@jax.custom_vjp
def _flash(q5, k5, v5):
    return _flash_forward(q5, k5, v5)[0]


def _flash_fwd(q5, k5, v5):
    out, lse = _flash_forward(q5, k5, v5)
    return out, (q5, k5, v5, out, lse)


def _flash_bwd(res, dout):
    """FlashAttention-2's backward: dq by query block over the key blocks up to it, dk and dv by key block over the
    query blocks from it on, each block's probabilities recomputed from the saved log-sum-exp."""
    q5, k5, v5, out, lse = res
    n, scale = q5.shape[0], 1 / math.sqrt(q5.shape[-1])
    delta = jnp.einsum("nbkgte,nbkgte->nbkgt", dout.astype(jnp.float32), out.astype(jnp.float32))

    def probs(i, j):  # p and dS of query block i against key block j
        p = jnp.exp(_scores(q5[i], k5[j], i, j) - lse[i][..., None])
        dp = jnp.einsum("bkgte,bkse->bkgts", dout[i], v5[j], preferred_element_type=jnp.float32)
        return p, p * (dp - delta[i][..., None])

    def dq_block(_, i):
        def key_block(j, dq):
            _, ds = probs(i, j)
            return dq + jnp.einsum("bkgts,bkse->bkgte", ds.astype(k5.dtype), k5[j],
                                   preferred_element_type=jnp.float32)
        return None, jax.lax.fori_loop(0, i + 1, key_block, jnp.zeros(q5.shape[1:], jnp.float32)) * scale

    def dkv_block(_, j):
        def query_block(i, carry):
            dk, dv = carry
            p, ds = probs(i, j)
            dv = dv + jnp.einsum("bkgts,bkgte->bkse", p.astype(dout.dtype), dout[i],
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgts,bkgte->bkse", ds.astype(q5.dtype), q5[i],
                                 preferred_element_type=jnp.float32)
            return dk, dv
        zeros = jnp.zeros(k5.shape[1:], jnp.float32)
        dk, dv = jax.lax.fori_loop(j, n, query_block, (zeros, zeros))
        return None, (dk * scale, dv)

    dq = jax.lax.scan(dq_block, None, jnp.arange(n))[1]
    dk, dv = jax.lax.scan(dkv_block, None, jnp.arange(n))[1]
    return dq.astype(q5.dtype), dk.astype(k5.dtype), dv.astype(v5.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)
