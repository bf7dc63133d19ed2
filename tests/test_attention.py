"""The attention kernels (attention.py) against the reference: flash attention in plain JAX and the TPU's splash
attention (run by Pallas's interpreter on CPU) equal blockwise_attention and jax's own XLA attention, values and
gradients, causal with grouped-query heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention


def qkvg(T, B=1, H=12, K=4, E=32, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (B, T, H, E), dtype)
    k, v = (jax.random.normal(key, (B, T, K, E), dtype) for key in ks[1:3])
    return q, k, v, jax.random.normal(ks[3], q.shape, dtype)


def value_and_grads(f, q, k, v, g):
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * g), (0, 1, 2))(q, k, v)


def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


@pytest.mark.parametrize("T", [128, 200, 2048])  # 200: not a multiple of the 128-query block
def test_flash_attention_equals_blockwise_and_xla_attention(T):
    q, k, v, g = qkvg(T)
    out, grads = value_and_grads(attention.flash_attention, q, k, v, g)
    for ref in (attention.blockwise_attention, xla):
        ref_out, ref_grads = value_and_grads(ref, q, k, v, g)
        np.testing.assert_allclose(out, ref_out, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_flash_attention_keeps_no_scores_for_the_backward_pass():
    """Its residuals are q, k, v, the output and the log-sum-exp: O(T) memory, where the blockwise path keeps
    float32 scores and probabilities of every block (O(T^2))."""
    q, k, v, _ = qkvg(1024, H=4, K=2)
    residuals = lambda f: sum(x.size for x in jax.tree.leaves(jax.vjp(f, q, k, v)[1]))
    assert residuals(attention.flash_attention) < 4 * q.size + 2 * k.size  # q, k, v, out (+ lse, [T] per head)
    assert residuals(attention.blockwise_attention) > 1024 * 1024 * 4 / 2  # the scores' causal half at least


@pytest.mark.parametrize("T", [128, 384])
def test_splash_attention_equals_blockwise_attention_in_interpret_mode(T):
    """The TPU kernel, run by Pallas's interpreter on CPU: values and gradients of causal GQA 12/4 in float32."""
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (1, T, 12, 32))
    k, v = (jax.random.normal(key, (1, T, 4, 32)) for key in ks[1:3])
    g = jax.random.normal(ks[3], q.shape)
    splash = lambda q, k, v: attention.splash_attention(q, k, v, interpret=True)
    np.testing.assert_allclose(splash(q, k, v), attention.blockwise_attention(q, k, v), atol=1e-5)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * g), (0, 1, 2))(q, k, v)
             for f in (splash, attention.blockwise_attention)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5)
