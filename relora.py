"""ReLoRA (SPEC §4; Lialin et al., ICLR 2024): high-rank training through low-rank updates that are merged and reset.

Each targeted model.Linear becomes a LoRALinear,

    y = x W + scale * (dropout(x) A^T) B^T        W [in, out] frozen, A [R, in], B [out, R] trained,

and every `reset_frequency` steps `merge_and_reset` folds the branch into W (W += scale (B A)^T), draws a new A,
sets B = 0 and s = 1, and prunes the LoRA parameters' Adam moments. After k resets W has moved by a sum of k
rank-R updates: up to k R, not R. The jagged schedule drops the LR to 0 after each reset and re-warms it.

W is a `Frozen` variable, not an nnx.Param: steps.train_step takes gradients and nnx.Optimizer keeps moments for
nnx.Param only, so W costs one copy of memory instead of three. Everything ReLoRA needs lives in the nnx state (W,
A, B, s, the moments, Adam's count) or is a pure function of (seed, step), so a checkpoint of the state captures it.
The trainer reaches all of it through a `Plan` (`plan(...)`), which is a no-op for full-rank training.
"""
import dataclasses
import itertools
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from config import BLOCK_LINEARS, ConfigError, reject_unknown
from model import Decoder, Linear, dense, param

# target_modules names: a block's MLP or attention (all its projections) or one projection, from config.BLOCK_LINEARS
TARGETS = {part for name in BLOCK_LINEARS for part in name.split(".")}
RESETS = ("random", "magnitude", "full")
_A_STREAM, _DROPOUT_STREAM, _PRUNE_STREAM = 0, 1, 2  # independent random streams off the run's seed


@dataclass(frozen=True)
class ReLoRAConfig:
    target_modules: tuple[str, ...] = ("swiglu", "attention")
    reset_frequency: int = 1000       # steps between merge-and-resets
    r: int = 128                      # rank R of A and B
    lora_alpha: float = 32.0          # scale = lora_alpha / r
    lora_dropout: float = 0.1         # on the LoRA branch's input, in training only
    keep_original_weights: bool = True  # W starts from the layer's weights (false: W = 0)
    trainable_scaling: bool = False   # scale = tanh(s), s trained and reset to 1 at each merge
    optimizer_reset: str = "random"   # random | magnitude | full: how LoRA moments are pruned at each merge
    prune_ratio: float = 0.999        # fraction of each LoRA moment zeroed (random, magnitude); full zeroes all
    restart_warmup_steps: int = 50    # linear LR re-warmup after each reset
    warm_start_steps: int = 0         # full-rank steps before the model is wrapped
    seed: int = 0                     # the run's `seed`, not a relora key: A draws, dropout and pruning use it

    @classmethod
    def from_dict(cls, d, seed: int = 0) -> "ReLoRAConfig | None":
        """Build from the `model.relora` block (None = ReLoRA off), rejecting unknown keys."""
        if d is None:
            return None
        d = dict(d)
        reject_unknown(d, [f.name for f in dataclasses.fields(cls) if f.name != "seed"], "model.relora.")
        if "target_modules" in d:
            t = d["target_modules"]
            d["target_modules"] = (t,) if isinstance(t, str) else tuple(t)
        cfg = cls(**d, seed=seed)
        cfg.validate()
        return cfg

    def validate(self):
        bad = sorted(set(self.target_modules) - TARGETS)
        if bad or not self.target_modules:
            raise ConfigError(f"model.relora.target_modules={list(self.target_modules)}: {bad or 'empty'}; use some of "
                              f"{sorted(TARGETS)} (embeddings, norms and the head stay full-rank)")
        for key in ("reset_frequency", "r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.relora.{key}={getattr(self, key)}; it must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"model.relora.lora_dropout={self.lora_dropout}; use a value in [0, 1)")
        if self.optimizer_reset not in RESETS:
            raise ConfigError(f"model.relora.optimizer_reset={self.optimizer_reset!r}; use one of {list(RESETS)}")
        if not 0 < self.prune_ratio <= 1:
            raise ConfigError(f"model.relora.prune_ratio={self.prune_ratio}; use a fraction in (0, 1] (0.999 keeps "
                              f"0.1% of the LoRA moments, the paper's default)")
        if not 0 <= self.restart_warmup_steps <= self.reset_frequency:
            raise ConfigError(f"model.relora.restart_warmup_steps={self.restart_warmup_steps}; use 0 to "
                              f"reset_frequency={self.reset_frequency}")
        if self.warm_start_steps < 0:
            raise ConfigError(f"model.relora.warm_start_steps={self.warm_start_steps}; use 0 or more")

    def reset_index(self, done: int) -> int | None:
        """k when the step that brought the count to `done` is followed by the k-th merge-and-reset, else None."""
        since = done - self.warm_start_steps
        return since // self.reset_frequency if since > 0 and since % self.reset_frequency == 0 else None


# ---------------------------------------------------------------------------------------------- the layer

class Frozen(nnx.Variable):
    """A weight outside training: not an nnx.Param, so it gets no gradient and no optimizer state."""


class LoRAParam(nnx.Param):
    """A, B and s: trained like any nnx.Param; the type lets the optimizer reset find them."""


def draw_a(cfg: ReLoRAConfig, reset: int, shapes: list[tuple[int, int]]) -> list:
    """Every layer's A ~ U(-1/sqrt(in), 1/sqrt(in)) [R, in] (shapes in layer order), from (seed, reset index): every
    host draws the same. One draw for all layers: XLA compiles one RNG call much faster than dozens."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), _A_STREAM), reset)
    u = jax.random.uniform(key, (sum(math.prod(s) for s in shapes),), jnp.float32, -1, 1)
    starts = itertools.accumulate((math.prod(s) for s in shapes), initial=0)
    return [u[i:i + math.prod(s)].reshape(s) / math.sqrt(s[1]) for i, s in zip(starts, shapes)]


class LoRALinear(nnx.Module):
    """model.Linear with its kernel frozen and a trained low-rank branch (SPEC §4)."""

    def __init__(self, base: Linear, cfg: ReLoRAConfig, layer: int, a):  # a: the first A [R, in]
        w = base.kernel
        d_in, d_out = w.shape
        in_is_d = w.get_metadata()["out_sharding"][0] == "fsdp"  # the kernel's D side, declared when it was made
        self.kernel = Frozen(w[...] if cfg.keep_original_weights else jnp.zeros_like(w[...]), **w.get_metadata())
        self.A = param(a, "lora_a_RD" if in_is_d else "lora_a_RX", LoRAParam)
        self.B = param(jnp.zeros((d_out, cfg.r), jnp.float32), "lora_b_XR" if in_is_d else "lora_b_DR", LoRAParam)
        # B = 0 alone makes the branch start at 0; A must not be zeroed too, or no gradient reaches either (SPEC §4)
        self.s = param(jnp.ones((), jnp.float32), "lora_s", LoRAParam) if cfg.trainable_scaling else None
        self.alpha_over_r = cfg.lora_alpha / cfg.r
        self.dropout, self.layer, self.dtype = cfg.lora_dropout, layer, base.dtype
        self.dropout_key = None  # set only in the train step's view of the model (`in_training`)

    def scale(self):
        return jnp.tanh(self.s[...]) if self.s is not None else self.alpha_over_r

    def __call__(self, x):  # [..., in] -> [..., out]
        x = x.astype(self.dtype)
        h = x
        if self.dropout_key is not None and self.dropout > 0:  # training only
            keep = jax.random.bernoulli(jax.random.fold_in(self.dropout_key, self.layer), 1 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1 - self.dropout), 0).astype(self.dtype)
        h = (self.scale() * dense(h, self.A[...].T.astype(self.dtype))).astype(self.dtype)  # [..., R]
        return dense(x, self.kernel[...].astype(self.dtype)) + dense(h, self.B[...].T.astype(self.dtype))

    def update(self):
        """scale (B A)^T [in, out]: the low-rank branch as a kernel."""
        return self.scale() * jnp.einsum("ri,or->io", self.A[...], self.B[...], precision=jax.lax.Precision.HIGHEST)

    def merged_kernel(self):
        """W + scale (B A)^T [in, out]: the plain kernel this layer computes with. The scale must be in the merge:
        `W += B A` would rescale every update after the first."""
        return self.kernel[...] + self.update()

    def merge_and_reset(self, a):
        """Fold the branch into W, then start a fresh one: A = a, B = 0, s = 1. The layer's function is unchanged."""
        self.kernel[...] = self.merged_kernel()
        self.A[...] = a
        self.B[...] = jnp.zeros_like(self.B[...])
        if self.s is not None:
            self.s[...] = jnp.ones_like(self.s[...])  # not 0: tanh(0) = 0 would switch the branch off for good


def wrap(model: Decoder, cfg: ReLoRAConfig) -> Decoder:
    """Replace, in place, every Linear whose module path names one of cfg.target_modules by a LoRALinear."""
    targets = sorted(((path, node) for path, node in nnx.iter_graph(model)
                      if isinstance(node, Linear) and set(cfg.target_modules) & set(path)), key=lambda t: str(t[0]))
    a = draw_a(cfg, 0, [(cfg.r, node.kernel.shape[0]) for _, node in targets])
    for layer, (path, node) in enumerate(targets):
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], LoRALinear(node, cfg, layer, a[layer]))
    if not targets:
        raise ConfigError(f"model.relora.target_modules={list(cfg.target_modules)} matches no layer of the model")
    return model


def lora_layers(model) -> list[LoRALinear]:
    """The wrapped layers, in layer order."""
    return sorted((node for _, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)), key=lambda m: m.layer)


def wrap_state(graphdef, state, cfg: ReLoRAConfig):
    """After a warm start: wrap the model of a (model, optimizer) state, keep the moments of the parameters that
    stay full-rank and Adam's counts, and start the LoRA parameters' moments at zero. Returns the new graphdef and
    state, sharded as declared (call under jax.set_mesh)."""
    def build(state):
        model, opt = nnx.merge(graphdef, state)
        wrap(model, cfg)
        new = nnx.Optimizer(model, opt.tx, wrt=nnx.Param)
        old = dict(nnx.to_flat_state(nnx.state(opt)))
        kept = [(p, old[p]) for p, v in nnx.to_flat_state(nnx.state(new)) if p in old and old[p].shape == v.shape]
        nnx.update(new, nnx.from_flat_state(kept))
        return model, new

    new_graphdef, abstract = nnx.split(nnx.eval_shape(build, state))
    shardings = nnx.get_partition_spec(abstract)
    return new_graphdef, jax.jit(lambda s: nnx.split(build(s))[1], donate_argnums=0, out_shardings=shardings)(state)


# ---------------------------------------------------------------------------------------------- merge and reset

@partial(jax.jit, static_argnums=(0, 3), donate_argnums=1)
def merge_and_reset(graphdef, state, reset: int, cfg: ReLoRAConfig):
    """The k-th (reset = k) merge-and-reset of a (model, optimizer) state, on device with the shardings kept:
    every LoRALinear merges and restarts its branch, and the LoRA parameters' optimizer state is pruned (Adam's
    count stays). Returns the new state and the fraction of the LoRA parameters' optimizer state now zero."""
    model, opt = nnx.merge(graphdef, state)
    layers = lora_layers(model)
    for layer, a in zip(layers, draw_a(cfg, reset, [layer.A.shape for layer in layers])):
        layer.merge_and_reset(a)
    zeroed = reset_optimizer(model, opt, cfg, reset)
    return constrain(nnx.state((model, opt))), zeroed


def constrain(state, specs=None):
    """The state constrained to the shardings its variables declare, or to `specs` (under jax.set_mesh; as is
    without a mesh)."""
    if jax.sharding.get_abstract_mesh().empty:
        return state
    return jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state) if specs is None else specs)


def reset_optimizer(model, opt: nnx.Optimizer, cfg: ReLoRAConfig, reset: int):
    """Prune, in place, every optimizer-state array of a LoRA parameter (Adam's mu and nu): zero all but a random
    1 - prune_ratio (one mask per parameter, shared by its moments), or those at or below the prune_ratio quantile of
    their magnitude, or everything (full). Arrays are found by their path ending in a LoRA parameter's path; the
    returned fraction of them now zero shows a reset that matched nothing."""
    lora = dict(nnx.to_flat_state(nnx.state(model, LoRAParam)))
    if cfg.optimizer_reset == "random":
        # One replicated draw for all masks (transiently 4 bytes per LoRA parameter on each device): XLA compiles one
        # RNG call much faster than dozens, and slicing it unsharded avoids resharding each piece.
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), _PRUNE_STREAM), reset)
        u = constrain(jax.random.uniform(key, (sum(v.size for v in lora.values()),)), P())
        offsets = dict(zip(lora, itertools.accumulate((v.size for v in lora.values()), initial=0)))
    zeros, total = jnp.zeros((), jnp.int32), 0
    for path, v in nnx.to_flat_state(nnx.state(opt)):
        owner = next((path[i:] for i in range(len(path)) if path[i:] in lora), None)
        if owner is None:
            continue
        x = v[...]
        if cfg.optimizer_reset == "full":
            keep = jnp.zeros(x.shape, bool)
        elif cfg.optimizer_reset == "random":
            keep = u[offsets[owner]:offsets[owner] + x.size].reshape(x.shape) >= cfg.prune_ratio
        else:
            keep = jnp.abs(x) > jnp.quantile(jnp.abs(x), cfg.prune_ratio)
        v[...] = jnp.where(keep, x, 0)
        zeros, total = zeros + jnp.sum(v[...] == 0), total + x.size
    return zeros / max(total, 1)


# ---------------------------------------------------------------------------------------------- schedule, step, logs

def jagged_schedule(envelope, cfg: ReLoRAConfig):
    """SPEC §4: `envelope` (train.lr_schedule: warmup, then cosine decay to min_lr_ratio x peak), except that right
    after each reset (and at the switch to ReLoRA after a warm start) the LR is 0 and rises linearly over
    restart_warmup_steps to the envelope's value where the re-warmup ends (as in the reference implementation).
    An optimizer reset without this re-warmup diverges (paper ablation). `t` counts completed steps: the k-th
    reset follows step t_k = warm_start_steps + k reset_frequency, so lr(t_k) = 0."""
    w, f, rw = cfg.warm_start_steps, cfg.reset_frequency, max(cfg.restart_warmup_steps, 1)

    def schedule(t):
        k = (t - w) // f
        t_k = w + k * f
        restarting = (t >= w) & ((k > 0) | (w > 0)) & (t - t_k < cfg.restart_warmup_steps)
        return jnp.where(restarting, (t - t_k) / rw * envelope(t_k + rw), envelope(t))

    return schedule


def in_training(model, dropout_key):
    """A view of the model whose LoRA layers drop out their branch's input with masks from `dropout_key` (folded with
    each layer's index); the model itself, and so evaluation and sampling, stays without dropout."""
    return nnx.with_attributes(model, only=LoRALinear, raise_if_not_found=False, dropout_key=dropout_key)


def training_step(step_fn, cfg: ReLoRAConfig, finish: bool = True):
    """step_fn(graphdef, state, *args, dropout_key=..., **kw) (steps.train_step, steps.accumulate) given the LoRA
    dropout's key of this step, drawn from (seed, Adam's step count) (the micro-batches of one step share it); with
    finish, step_fn returns (new state, metrics), and they are `finished`."""
    def step(graphdef, state, *args, **kw):
        _, opt = nnx.merge(graphdef, state)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), _DROPOUT_STREAM), opt.step[...])
        out = step_fn(graphdef, state, *args, dropout_key=key, **kw)
        return finished(graphdef, *out) if finish else out

    return step


def finished(graphdef, new, metrics):
    """A train step's new state constrained to its shardings, with the trainable scales' mean and std added to the
    metrics."""
    new = constrain(new)  # else XLA may pick others (norm scales), and the next call recompiles
    s = [layer.s[...] for layer in lora_layers(nnx.merge(graphdef, new)[0]) if layer.s is not None]
    if s:
        metrics.update(lora_s_mean=jnp.mean(jnp.stack(s)), lora_s_std=jnp.std(jnp.stack(s)))
    return new, metrics


def sizes(graphdef, state) -> dict:
    """What training holds: trainable parameters, frozen weights and optimizer-state bytes of a (model, optimizer)
    state. Adam keeps two moments per trainable parameter only."""
    model, opt = nnx.merge(graphdef, state)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return dict(trainable_params=count(nnx.state(model, nnx.Param)), frozen_params=count(nnx.state(model, Frozen)),
                lora_layers=len(lora_layers(model)),
                opt_state_bytes=sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt))))


# ---------------------------------------------------------------------------------------------- the trainer's plan

class Plan:
    """What ReLoRA does to a run, through the few calls the trainer makes; with cfg None (model.relora=null,
    full-rank training) every one of them leaves the run as it is."""

    def __init__(self, cfg: ReLoRAConfig | None):
        self.cfg = cfg

    def schedule(self, envelope):
        """The LR schedule: the jagged one around each reset, or `envelope` itself."""
        return jagged_schedule(envelope, self.cfg) if self.cfg else envelope

    def wrapped_at(self, step: int) -> ReLoRAConfig | None:
        """The config to wrap with when the state at `step` (completed steps) has LoRA layers, else None."""
        return self.cfg if self.cfg and step >= self.cfg.warm_start_steps else None

    def layout_at(self, step: int, graphdef, state):
        """(graphdef, state) in the layout a checkpoint of `step` has: wrapped once the warm start is over (call under
        jax.set_mesh)."""
        lora = self.wrapped_at(step)
        if lora and not lora_layers(nnx.merge(graphdef, state)[0]):
            return wrap_state(graphdef, state, lora)
        return graphdef, state

    def step(self, step_fn, finish: bool = True):
        """The train step, or the part of it that takes gradients (finish=False): training_step around `step_fn`,
        or `step_fn`."""
        return training_step(step_fn, self.cfg, finish) if self.cfg else step_fn

    def finishing(self, step_fn):
        """The part of the train step that updates the state, step_fn(graphdef, state, ...) -> (new state,
        metrics): `finished` after it, or `step_fn`."""
        if not self.cfg:
            return step_fn
        return lambda graphdef, state, *args, **kw: finished(graphdef, *step_fn(graphdef, state, *args, **kw))

    def after_step(self, done: int, graphdef, state):
        """Between steps (SPEC §4): wrap the model when the warm start ends, merge-and-reset every reset_frequency.
        Returns (graphdef, state, metrics to log or None); a new graphdef needs the steps compiled again. Call under
        jax.set_mesh."""
        r = self.cfg
        if r is None:
            return graphdef, state, None
        if r.warm_start_steps and done == r.warm_start_steps:
            graphdef, state = wrap_state(graphdef, state, r)
            return graphdef, state, dict(relora="wrapped", **sizes(graphdef, state))
        if (k := r.reset_index(done)) is not None:
            state, zeroed = merge_and_reset(graphdef, state, k, r)
            return graphdef, state, dict(relora_reset=k, optimizer_zeroed=float(zeroed))
        return graphdef, state, None

    def notes(self, graphdef, state) -> list[str]:
        """What the start-up log says: the trainable, frozen and optimizer sizes."""
        return ["relora: " + " ".join(f"{k}={v:,}" for k, v in sizes(graphdef, state).items())] if self.cfg else []


def plan(block, seed: int, mcfg) -> Plan:
    """The Plan of a `model.relora` block (null: full-rank) for the model `mcfg`, checked against its layers."""
    cfg = ReLoRAConfig.from_dict(block, seed)
    if cfg is None:
        return Plan(None)
    if not mcfg.linears():
        raise ConfigError(f"model.relora is set but model.kind={mcfg.KIND}: ReLoRA wraps the decoder's attention and "
                          f"MLP projections; set model.relora=null or model.kind=decoder")
    parts = {part for name in mcfg.linears() for part in name.split(".")}
    if missing := sorted(set(cfg.target_modules) - parts):
        raise ConfigError(f"model.relora.target_modules={list(cfg.target_modules)} names {missing}, which this "
                          f"model lacks (model.mlp={mcfg.mlp}: its MLP is `{mcfg.mlp_block}`); target "
                          f"{sorted(parts)} instead (`mlp` is the GELU MLP's up and down projections)")
    return Plan(cfg)
