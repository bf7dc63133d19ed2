"""The jitted steps of a run: the train step (an optimizer step over the global batch: one program, or with
micro-batches one per micro-batch and one for the update), the eval step, and their compiled form with the state
donated and its shardings kept.

A module of its own because two callers compile exactly these programs: the trainer (train.py), which runs them,
and aot.py, which compiles them for a target's chips without running them (memory, FLOPs, kernels).
"""
import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
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

def gradients(graphdef, state, tokens, index=0, dropout_key=None, objective=None):
    """(loss, gradients, metrics) of the micro-batch `tokens` [b, T + 1], the `index`-th of its step. dropout_key:
    the step's LoRA dropout key (relora.training_step passes it), None for no dropout. objective: None for
    next-token prediction (no metrics), or one whose micro_grads(...) gives them, e.g. maml.Objective."""
    model, opt = nnx.merge(graphdef, state)
    net = model if dropout_key is None else relora.in_training(model, dropout_key)
    model_def, params, rest = nnx.split(net, nnx.Param, ...)  # gradients for nnx.Param only
    ar = jax.value_and_grad(lambda params, tokens: loss_fn(nnx.merge(model_def, params, rest), tokens))
    if objective is None:
        return (*ar(params, tokens), {})
    return objective.micro_grads(ar, model_def, rest, opt.step[...])(params, tokens, index)


def update(graphdef, state, loss, grads, extra, skip_nonfinite: bool = False):
    """The optimizer step with `grads`; the metrics are the loss, the gradient's norm, whether either is NaN / inf
    and `extra`. With skip_nonfinite, a step whose loss or gradient is NaN / inf leaves the state as it was."""
    old = jax.tree.map(lambda x: x, state)  # own containers: the update below mutates the merged Variables
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = nnx.state((model, opt))
    if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return new, dict(loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32), **extra)


def train_step(graphdef, state, tokens, dropout_key=None, skip_nonfinite: bool = False, objective=None):
    """One optimizer step on the batch tokens [B, T + 1] in one program (data.grad_accum=1)."""
    return update(graphdef, state, *gradients(graphdef, state, tokens, 0, dropout_key, objective), skip_nonfinite)


def accumulate(graphdef, state, sums, tokens, index, dropout_key=None, grad_accum: int = 2, objective=None,
               platform: str = ""):
    """`sums` (loss, gradients, metrics) plus those of micro-batch `index` of the global batch tokens [B, T + 1]:
    rows index, index + A, index + 2A, ..., so every device keeps an equal share of each micro-batch. platform: the
    devices', for the gradients' layout (see `accumulator`)."""
    B = tokens.shape[0]
    micro = jax.lax.dynamic_index_in_dim(tokens.reshape(B // grad_accum, grad_accum, -1), index, 1, keepdims=False)
    micro = jax.lax.with_sharding_constraint(micro, P(BATCH_AXES, None))
    loss, grads, metrics = gradients(graphdef, state, micro, index, dropout_key, objective)
    return jax.tree.map(jnp.add, sums, (loss, accumulator(grads, platform), metrics))


def apply(graphdef, state, sums, grad_accum: int = 2, skip_nonfinite: bool = False):
    """The optimizer step with the accumulated sums: the mean loss and gradient over the micro-batches, the metrics
    summed."""
    loss, grads, extra = sums
    return update(graphdef, state, loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads), extra,
                  skip_nonfinite)


def accumulator(grads, platform: str):
    """The gradients as they are added up. On a TPU, each matrix with the longer dimension of its shard minor, as
    the TPU lays out the parameters themselves: XLA otherwise makes the embedding's [V, D / n] gradient row-major
    (its scatter-add's layout), where the TPU's (8, 128) tiles pad D / n to 128 (pico small on a v5e-8: 48 -> 128,
    a 9 MiB gradient held in 25 MiB). Elsewhere as XLA chooses."""
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


# ---------------------------------------------------------------------------------------------- compiled

class TrainStep:
    """The compiled train step, `step(state, tokens) -> (state, metrics)`, the state donated and its shardings kept
    (XLA would otherwise pick its own for some outputs, e.g. shard the norm scales, and every step after the first
    would recompile). With grad_accum 1 one program; else `accumulate` per micro-batch into sums it is given donated
    and gives back, then `apply`: separate programs, because a loop in one cost the TPU two to three gradients more
    than one micro-batch alone, these one (benchmarks/RESULTS.md)."""

    def __init__(self, graphdef, state, mesh, plan: relora.Plan, grad_accum: int = 1, skip_nonfinite: bool = False,
                 objective=None):
        self.grad_accum = grad_accum
        rep = NamedSharding(mesh, P())
        shardings = jax.tree.map(lambda x: x.sharding, state)
        if grad_accum == 1:
            self.programs = dict(step=jax.jit(
                partial(plan.step(train_step), graphdef, skip_nonfinite=skip_nonfinite, objective=objective),
                donate_argnums=0, out_shardings=(shardings, rep)))
            return
        params = jax.tree.map(lambda x: x.sharding, nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
        sums = (rep, params, rep)  # loss, gradients, metrics (a prefix: the objective's metrics, all replicated)
        self.programs = dict(
            # keep_unused: the arguments are what is on the device (the optimizer's moments, the batch), so the
            # memory plans (aot.py) count them
            zeros=jax.jit(partial(zero_sums, graphdef, grad_accum=grad_accum, objective=objective),
                          out_shardings=sums, keep_unused=True),
            accumulate=jax.jit(partial(plan.step(accumulate, finish=False), graphdef, grad_accum=grad_accum,
                                       objective=objective, platform=mesh.devices.flat[0].platform),
                               donate_argnums=1, out_shardings=sums, keep_unused=True),
            apply=jax.jit(partial(plan.finishing(apply), graphdef, grad_accum=grad_accum,
                                  skip_nonfinite=skip_nonfinite), donate_argnums=0, out_shardings=(shardings, rep)))

    def __call__(self, state, tokens):
        p = self.programs
        if self.grad_accum == 1:
            return p["step"](state, tokens)
        sums = p["zeros"](state, tokens)
        for index in range(self.grad_accum):
            sums = p["accumulate"](state, sums, tokens, np.int32(index))
        return p["apply"](state, sums)

    def arguments(self, state, tokens) -> dict:
        """Each program's arguments, given the state's and the batch's (arrays or ShapeDtypeStructs)."""
        if self.grad_accum == 1:
            return dict(step=(state, tokens))
        sums = jax.eval_shape(self.programs["zeros"], state, tokens)
        return dict(zeros=(state, tokens), accumulate=(state, sums, tokens, np.int32(0)), apply=(state, sums))

    def compile(self, state, tokens) -> "TrainStep":
        """This step with every program compiled ahead of time for these arguments (call under jax.set_mesh)."""
        out = copy.copy(self)
        out.programs = {k: self.programs[k].lower(*args).compile()
                        for k, args in self.arguments(state, tokens).items()}
        return out


def zero_sums(graphdef, state, tokens, grad_accum: int = 2, objective=None):
    """Zero (loss, gradients, metrics) for `accumulate`, shaped as one micro-batch's."""
    micro = tokens[: tokens.shape[0] // grad_accum]
    shapes = jax.eval_shape(partial(gradients, graphdef, objective=objective), state, micro, 0)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def jit_train_step(graphdef, state, mesh, plan: relora.Plan, grad_accum: int = 1, skip_nonfinite: bool = False,
                   objective=None) -> TrainStep:
    """The compiled train step for `graphdef` (ReLoRA's when the plan has one) and `objective` (train_step's)."""
    return TrainStep(graphdef, state, mesh, plan, grad_accum, skip_nonfinite, objective)


def jit_eval_step(graphdef):
    """The compiled eval step for `graphdef`."""
    return jax.jit(partial(eval_step, graphdef))
