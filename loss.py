"""The training loss: next-token cross-entropy plus the z-loss, and the same fused with the head.

A module of its own because three callers need the one cross-entropy (the train step, evaluation and the
learning-dynamics gradients) and the fused version is a custom VJP that reads best on its own. Of the project
it imports only attention.py's BATCH_AXES and batch_shards (how the batch is split over the mesh): a model here is
anything with `.cfg`, `__call__(tokens)`, `features(tokens)` and `head_kernel()` (model.LanguageModel).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attention import BATCH_AXES, batch_shards


def token_losses(logits, labels):
    """-log p(label) per position: logits [B, T, V] float32, labels [B, T] -> [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits, labels):
    """Mean next-token loss; logits [B, T, V] float32, labels [B, T]."""
    return token_losses(logits, labels).mean()


def loss_fn(model, tokens):  # tokens [B, T + 1]
    """Mean next-token cross-entropy, plus model.z_loss x mean(logsumexp(logits)^2) (PaLM, Chowdhery
    et al. 2022: keeps the softmax normalizer near 1, so logits do not drift; 0 adds nothing). With
    model.loss_chunk, the same loss fused with the head, never holding all of [B, T, V]."""
    c = model.cfg
    if c.loss_chunk:
        return fused_cross_entropy(model.features(tokens[:, :-1])[0], model.head_kernel(),
                                   tokens[:, 1:], c.loss_chunk, c.z_loss)
    logits = model(tokens[:, :-1])
    loss = cross_entropy(logits, tokens[:, 1:])
    if c.z_loss:
        loss = loss + c.z_loss * jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return loss


def _fused_ce(h, w, labels, chunk: int, z_loss: float, grads: bool):
    """Sum of lse - logit_label + z_loss lse^2 over the N rows of h [N, D] (head kernel w [D, V],
    labels [N]) and, with `grads`, its d/dh [N, D] and d/dw [D, V], `chunk` rows at a time: each
    chunk's logits are turned into d loss / d logits = softmax (1 + 2 z_loss lse) - onehot and used
    at once by the two matmuls that need them, so one chunk's [chunk, V] logits exist at a time."""
    n, d = h.shape
    pad = -n % chunk  # padded rows get weight 0
    weight = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad)).reshape(-1, chunk)
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    ls = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
    wc = w.astype(h.dtype)

    def body(dw, xs):
        hc, hct, lc, wt = xs  # [C, D], [D, C], [C], [C]
        logits = jnp.dot(hc, wc, preferred_element_type=jnp.float32)  # [C, V], float32 always
        m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
        e = jnp.exp(logits - m)
        total = e.sum(axis=-1, keepdims=True)
        lse = (jnp.log(total) + m)[:, 0]
        label_logit = jnp.take_along_axis(logits, lc[:, None], axis=-1)[:, 0]
        loss = jnp.sum(wt * (lse - label_logit + z_loss * lse ** 2))
        if not grads:
            return dw, (loss, None)
        p = e / total if not z_loss else e / total * (1 + 2 * z_loss * lse)[:, None]
        g = ((p - jax.nn.one_hot(lc, e.shape[-1], dtype=e.dtype)) * wt[:, None]).astype(h.dtype)
        return dw + jnp.dot(hct, g, preferred_element_type=jnp.float32), (loss, g @ wc.T)

    # hct: each chunk's h^T laid out contiguously beforehand, which XLA:CPU's d/dw matmul reads
    # faster than the transpose in place (benchmarks/RESULTS.md)
    xs = (hs, hs.swapaxes(1, 2) if grads else None, ls, weight)
    dw, (loss, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32) if grads else None, xs)
    if not grads:
        return loss.sum()
    return loss.sum(), dh.reshape(-1, d)[:n], dw


def _per_device(h, w, labels, chunk: int, z_loss: float, grads: bool):
    """_fused_ce of h [B, T, D], labels [B, T]: under a mesh that splits the batch, each device on its own rows
    with the whole head kernel (gathered in h's dtype, as FSDP gathers every weight), the loss and d/dw summed
    over the devices. Left to the SPMD partitioner, the scan over chunks of the flattened rows got the head's
    matmul split over D instead: every device ran every chunk of the batch and all-reduced its float32 [chunk, V]
    logits (pico medium on a v5e-8: 512 chunks of 196 MiB per micro-batch)."""
    fn = partial(_fused_ce, chunk=chunk, z_loss=z_loss, grads=grads)
    n = batch_shards()
    if n == 1 or h.shape[0] % n:
        out = fn(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1))
        return out if not grads else (out[0], out[1].reshape(h.shape), out[2])
    split = w.shape[0] % n == 0  # d/dw reduce-scattered along D, as FSDP keeps it; else summed whole

    def local(h, w, labels):
        out = fn(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1))
        if not grads:
            return jax.lax.psum(out, BATCH_AXES)
        loss, dh, dw = out
        dw = (jax.lax.psum_scatter(dw, BATCH_AXES, scatter_dimension=0, tiled=True) if split
              else jax.lax.psum(dw, BATCH_AXES))
        return jax.lax.psum(loss, BATCH_AXES), dh.reshape(h.shape), dw
    rows, whole = jax.P(BATCH_AXES), jax.P()
    out_specs = whole if not grads else (whole, rows, rows if split else whole)
    return jax.shard_map(local, in_specs=(rows, whole, rows), out_specs=out_specs,
                         check_vma=False)(h, w.astype(h.dtype), labels)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_cross_entropy(h, w, labels, chunk: int, z_loss: float = 0.0):
    """loss_fn's loss of the logits h @ w for h [B, T, D], head kernel w [D, V], labels [B, T],
    `chunk` tokens (of a device's rows) at a time with its gradients made in the same pass
    (model.loss_chunk): the [B, T, V] float32 logits and their gradient are never held whole (823 MB
    each at 4096 tokens x 50257), which on CPU is also faster (benchmarks/RESULTS.md)."""
    return _per_device(h, w, labels, chunk, z_loss, grads=False) / labels.size


def _fused_ce_fwd(h, w, labels, chunk, z_loss):
    loss, dh, dw = _per_device(h, w, labels, chunk, z_loss, grads=True)
    return loss / labels.size, (dh, dw.astype(w.dtype), labels)


def _fused_ce_bwd(chunk, z_loss, res, g):
    dh, dw, labels = res
    scale = g / labels.size
    return (scale * dh).astype(dh.dtype), (scale * dw).astype(dw.dtype), \
        np.zeros(labels.shape, jax.dtypes.float0)


fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)
