"""Learning dynamics (SPEC §3): which layers a run snapshots, their capture in one jitted function, and saving it.

With each checkpoint, the trainer calls `dynamics_step` on that step's training batch and on the fixed eval batch,
then `save`: activations at the last token, kernels and loss gradients of checkpoint.dynamics.layers in every
block, written as snapshots.py's files.
"""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import snapshots
from config import BLOCK_LINEARS, ConfigError
from loss import cross_entropy
from relora import LoRALinear


def choose_layers(mcfg, layers) -> tuple[tuple[str, ...], str | None]:
    """The checkpoint.dynamics.layers this model has (its config's `linears()`), and a note on those it lacks. A name
    no block ever has is an error (a typo); one another config has (swiglu.* with model.mlp=gelu, every name for the
    families without decoder blocks) is skipped with the note."""
    for layer in layers:
        if layer not in BLOCK_LINEARS:
            raise ConfigError(f"checkpoint.dynamics.layers: {layer!r} is not a layer of a block; choose from "
                              f"{tuple(BLOCK_LINEARS)}")
    have = mcfg.linears()
    if not have:
        return (), f"learning dynamics: off for model.kind={mcfg.KIND} (snapshots are of decoder blocks)" \
            if layers else None
    kept = tuple(x for x in layers if x in have)
    missing = [x for x in layers if x not in have]
    return kept, f"learning dynamics: skipping {missing} (no such layer with model.mlp={mcfg.mlp})" \
        if missing else None


def head_entropy(q, k):
    """Mean entropy (nats) of each head's causal attention distribution, over rows and query positions: q [B, T, H,
    E], k [B, T, K, E] -> [H]. One row's [H, T, T] probabilities at a time (never the whole batch's)."""
    B, T, H, E = q.shape
    group = H // k.shape[2]
    causal = jnp.tril(jnp.ones((T, T), bool))

    def row(qk):
        qr, kr = qk  # [T, H, E], [T, K, E]
        s = jnp.einsum("thE,shE->hts", qr.astype(jnp.float32), jnp.repeat(kr, group, axis=1).astype(jnp.float32))
        logp = jax.nn.log_softmax(jnp.where(causal, s / jnp.sqrt(E), -jnp.inf), axis=-1)
        return -jnp.sum(jnp.where(causal, jnp.exp(logp) * logp, 0.0), axis=-1).mean(axis=-1)  # [H]

    return jax.lax.map(row, (q, k)).mean(axis=0)


def dynamics_step(graphdef, state, tokens, layers: tuple[str, ...]) -> dict:
    """Activations at the last token, kernels and loss gradients of `layers` (e.g. "attention.v") in every block,
    for the batch tokens [N, T + 1], from a (model, optimizer) state, and every block's attention-head entropy
    (`head_entropy/blocks.<i>.attention`, [H]). Intermediates come from nnx.capture over the Python loop of blocks
    (a view of the model with scan_layers off), so nothing is sown into the model and the train step is as it
    was; the attention probabilities exist here only, from the captured queries and keys."""
    model, _ = nnx.merge(graphdef, state)
    model = nnx.with_attributes(model, cfg=dataclasses.replace(model.cfg, scan_layers=False))
    # every kernel, trained or not: a ReLoRA layer's frozen W gets d loss / dW = d loss / d(W + scale B A)
    model_def, params, rest = nnx.split(model, nnx.Any(nnx.Param, nnx.PathContains("kernel")), ...)

    def loss(params):
        m = nnx.merge(model_def, params, rest)
        logits, inter = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]), inter

    (_, inter), grads = jax.value_and_grad(loss, has_aux=True)(params)
    out = {}
    for i in range(len(model.blocks)):
        for layer in layers:
            path, name = ("blocks", i, *layer.split(".")), f"blocks.{i}.{layer}"
            out[f"activations/{name}"] = _at(inter, path)["__call__"][0][:, -1, :]
            module = _at(model, path, getattr)
            if isinstance(module, LoRALinear):  # W and scale (B A)^T; snapshots.write adds them up
                out[f"weights_base/{name}"], out[f"weights_update/{name}"] = module.kernel[...], module.update()
            else:
                out[f"weights/{name}"] = module.kernel[...]
            out[f"gradients/{name}"] = _at(grads, path)["kernel"][...]
        out[f"head_entropy/blocks.{i}.attention"] = head_entropy(*_at(inter, ("blocks", i, "attention"))
                                                                 ["queries_keys"][0])
    return out


def _at(tree, path, get_name=lambda t, p: t[p]):
    """Walk a path of names and list indices through a state (or, with getattr, a module)."""
    for p in path:
        tree = tree[p] if isinstance(p, int) else get_name(tree, p)
    return tree


def save(directory, split: str, arrays: dict, tokens=None) -> dict | None:
    """Write one split of dynamics_step's output (and the batch, for `train`): called on every process, whose rows
    are gathered; process 0 writes, and returns the arrays as written (None elsewhere)."""
    if jax.process_count() > 1:
        arrays = multihost_utils.process_allgather(arrays, tiled=True)
        tokens = None if tokens is None else multihost_utils.process_allgather(tokens, tiled=True)
    if jax.process_index() != 0:
        return None
    host = snapshots.complete({k: np.asarray(v) for k, v in jax.device_get(arrays).items()})
    snapshots.write(directory, split, host, None if tokens is None else np.asarray(jax.device_get(tokens)))
    return host


FORMATS = ("picojax", "pico")  # checkpoint.dynamics.format: pico also writes pico-train's .pt files


def check_format(fmt: str, layers) -> dict:
    """pico-train's module name of each snapshot layer when checkpoint.dynamics.format=pico ({} otherwise), after
    checking that torch is there and that pico-train has every layer."""
    if fmt not in FORMATS:
        raise ConfigError(f"checkpoint.dynamics.format={fmt!r}; use one of {list(FORMATS)}")
    if fmt != "pico" or not layers:
        return {}
    if importlib.util.find_spec("torch") is None:
        raise ConfigError("checkpoint.dynamics.format=pico writes pico-train's .pt files, which needs torch: pip "
                          "install torch (the CPU build is enough), or set checkpoint.dynamics.format=picojax")
    if missing := [x for x in layers if not BLOCK_LINEARS[x][1]]:
        raise ConfigError(f"checkpoint.dynamics.format=pico: pico-train has no layer {missing} (the GELU MLP); "
                          f"choose checkpoint.dynamics.layers among attention.* and swiglu.*")
    return {x: BLOCK_LINEARS[x][1] for x in layers}
