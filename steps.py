"""The jitted steps of a run: the train step (an optimizer step over the global batch, in micro-batches), the
eval step, and their compiled form with the state donated and its shardings kept.

A module of its own because two callers compile exactly these programs: the trainer (train.py), which runs them,
and aot.py, which compiles them for a target's chips without running them (memory, FLOPs, kernels).
"""
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import NamedSharding, PartitionSpec as P

import relora
from config import ConfigError
from loss import loss_fn, token_losses
from model import BATCH_AXES


def check_batch(mesh, batch_size: int, grad_accum: int, eval_batch: int):
    """The batch against the mesh, before anything compiles (train_state.build checks the model against it)."""
    dp = mesh.size
    if batch_size % grad_accum or (batch_size // grad_accum) % dp:
        raise ConfigError(f"data.batch_size={batch_size} / data.grad_accum={grad_accum} is not divisible by the "
                          f"data-parallel size {dp} (mesh.data x mesh.fsdp); make each micro-batch a multiple of {dp}")
    if eval_batch % dp:
        raise ConfigError(f"eval.batch_size={eval_batch} is not divisible by the data-parallel size {dp}")


# ---------------------------------------------------------------------------------------------- steps

def train_step(graphdef, state, tokens, dropout_key=None, grad_accum: int = 1, skip_nonfinite: bool = False,
               objective=None, platform: str = ""):
    """One optimizer step on the global batch tokens [B, T + 1], split into `grad_accum` micro-batches (platform:
    the devices', for the accumulator's layout; see `accumulator`). dropout_key:
    the step's LoRA dropout key (relora.training_step passes it), None for no dropout. objective: None for
    next-token prediction, or one whose micro_grads(...) gives each micro-batch's (loss, grads, metrics), e.g.
    maml.Objective (metrics summed over the micro-batches). With skip_nonfinite, a step whose loss or gradient is
    NaN / inf leaves the state as it was."""
    old = jax.tree.map(lambda x: x, state)  # own containers: the update below mutates the merged Variables
    model, opt = nnx.merge(graphdef, state)
    net = model if dropout_key is None else relora.in_training(model, dropout_key)
    model_def, params, rest = nnx.split(net, nnx.Param, ...)  # gradients for nnx.Param only
    ar = jax.value_and_grad(lambda params, tokens: loss_fn(nnx.merge(model_def, params, rest), tokens))
    if objective is None:
        grad = lambda params, tokens, index: (*ar(params, tokens), {})
    else:
        grad = objective.micro_grads(ar, model_def, rest, opt.step[...])
    if grad_accum == 1:
        loss, grads, extra = grad(params, tokens, 0)
    else:
        B = tokens.shape[0]
        # micro-batch a takes rows a, a + A, a + 2A, ...: every device keeps an equal share of each one
        micro = tokens.reshape(B // grad_accum, grad_accum, -1).swapaxes(0, 1)
        micro = jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES, None))

        def acc(carry, xs):
            micro_loss, micro_grads, micro_metrics = grad(params, *xs)
            return jax.tree.map(jnp.add, carry, (micro_loss, accumulator(micro_grads, platform), micro_metrics)), None

        metrics = jax.eval_shape(grad, params, micro[0], 0)[2]
        zeros = (jnp.zeros(()), accumulator(jax.tree.map(jnp.zeros_like, params), platform),
                 jax.tree.map(jnp.zeros_like, metrics))
        (loss, grads, extra), _ = jax.lax.scan(acc, zeros, (micro, jnp.arange(grad_accum)))
        loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    opt.update(model, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = nnx.state((model, opt))
    if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return new, dict(loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32), **extra)


def accumulator(grads, platform: str):
    """The gradients as the accumulation loop holds them. On a TPU, each matrix with the longer dimension of its
    shard minor, as the TPU lays out the parameters themselves: XLA otherwise holds the embedding's [V, D / n]
    shard row-major in the loop (its scatter-add's layout), where the TPU's (8, 128) tiles pad D / n to 128 (pico
    small on a v5e-8: 48 -> 128, a 9 MiB gradient held in 25 MiB). Elsewhere as XLA chooses."""
    if platform != "tpu":
        return grads
    mesh = jax.sharding.get_abstract_mesh()

    def held(g, spec):
        if g.ndim != 2:
            return g
        rows, cols = NamedSharding(mesh, spec).shard_shape(g.shape)
        return with_layout_constraint(g, Layout(major_to_minor=(1, 0))) if rows > cols else g
    return jax.tree.map(held, grads, nnx.get_partition_spec(grads))


def eval_step(graphdef, state, tokens):
    """Summed loss and token count of one validation batch."""
    model, _ = nnx.merge(graphdef, state)
    losses = token_losses(model(tokens[:, :-1]), tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)


def jit_train_step(graphdef, state, mesh, plan: relora.Plan, grad_accum: int = 1, skip_nonfinite: bool = False,
                   objective=None):
    """The compiled train step for `graphdef` (ReLoRA's when the plan has one) and `objective` (train_step's),
    donating the state and keeping the shardings it was created with (XLA would otherwise pick its own for some
    outputs, e.g. shard the norm scales, and every step after the first would recompile)."""
    shardings = (jax.tree.map(lambda x: x.sharding, state), NamedSharding(mesh, P()))
    return jax.jit(partial(plan.step(train_step), graphdef, grad_accum=grad_accum, skip_nonfinite=skip_nonfinite,
                           objective=objective, platform=mesh.devices.flat[0].platform), donate_argnums=0,
                   out_shardings=shardings)


def jit_eval_step(graphdef):
    """The compiled eval step for `graphdef`."""
    return jax.jit(partial(eval_step, graphdef))
