"""The train state of a run: the mesh, the (model, optimizer) pair built directly sharded, the layout a checkpoint
of a given step has, and the inference loader that rebuilds a model from a checkpoint directory alone.

A module of its own, between the pieces (families, ReLoRA, Orbax) and their users, because the trainer and
`load` (generate.py, export.py, a notebook) must build exactly the same state to restore into; the trainer's
step and loop (train.py) are not needed to load a model.
The state is functional NNX: `nnx.split((model, optimizer))` gives a static graphdef and a pytree of arrays,
FSDP-sharded from the SHARDING table in model.py.
"""
from pathlib import Path

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from omegaconf import OmegaConf

import maml
import relora
from checkpoint import CheckpointError, Checkpoints, abstract_like
from config import ConfigError
from families import build_model, model_config


def make_mesh(data_size: int, fsdp_size: int, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over every device (or `devices`, e.g. a compile target's); -1 on one axis takes all the
    devices the other leaves."""
    n = jax.device_count() if devices is None else len(devices)
    if fsdp_size == -1 and data_size > 0 and n % data_size == 0:
        fsdp_size = n // data_size
    elif data_size == -1 and fsdp_size > 0 and n % fsdp_size == 0:
        data_size = n // fsdp_size
    if data_size * fsdp_size != n or data_size < 1:
        raise ConfigError(f"mesh.data={data_size} x mesh.fsdp={fsdp_size} does not match the {n} devices here; "
                          f"make the product {n} (or set one of them to -1)")
    return jax.make_mesh((data_size, fsdp_size), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices)


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


def init_state(mcfg, tx, mesh, seed: int, lora: relora.ReLoRAConfig | None = None, weights=None,
               abstract: bool = False, meta: maml.MetaConfig | None = None):
    """Build model and optimizer directly sharded (no full copy on one device): graphdef, state. `weights` (an
    nnx.State of the model's parameters, e.g. export.init_weights) replace the random ones. With `lora`, the
    model's targeted layers are ReLoRA-wrapped before the optimizer is built, so it holds moments for A and B only.
    With `meta`, the model gets its meta-learning head (maml.attach), trained and checkpointed with it.
    `abstract`: the state as jax.ShapeDtypeStructs carrying their shardings, nothing allocated (aot.py compiles
    for a target's devices with them)."""
    def build(weights):
        model = build_model(mcfg, nnx.Rngs(seed))
        if weights is not None:
            nnx.update(model, weights)
        if meta is not None:
            maml.attach(model, meta, seed)
        if lora is not None:
            relora.wrap(model, lora)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(build, weights))
        shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), nnx.get_partition_spec(abstract_state))
        if abstract:
            return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract_state, shardings)
        state = jax.jit(lambda w: nnx.split(build(w))[1], out_shardings=shardings)(weights)
    return graphdef, state


def build(cfg, mesh, weights=None, platform: str = "", abstract: bool = False, compute_capability: str = ""):
    """Everything a run config's state is made of, at step 0: (model config, ReLoRA plan, LR schedule, graphdef,
    state), from `weights` where given (init_state). Bad model or ReLoRA keys fail here, before anything
    compiles. `platform`, `compute_capability` and `abstract`: a compile target's (aot.py): the model as it runs
    there, and its state as shapes with shardings."""
    mcfg = model_config(cfg.model, platform, compute_capability)
    if mcfg.linears() and mcfg.d_model % mesh.shape["fsdp"]:  # the decoder; the other families are replicated
        raise ConfigError(f"model.d_model={mcfg.d_model} is not divisible by mesh.fsdp={mesh.shape['fsdp']}: FSDP "
                          f"shards every weight along d_model; pick a mesh.fsdp that divides it")
    plan = relora.plan(cfg.model.get("relora"), cfg.seed, mcfg)
    meta = maml.config_of(cfg)
    if meta is not None:
        meta.check(mcfg, cfg.data.batch_size // cfg.data.grad_accum)  # an episode's rows: one micro-batch
        if meta.num_layers > 1 and meta.hidden_dim % mesh.shape["fsdp"]:
            raise ConfigError(f"model.maml.hidden_dim={meta.hidden_dim} is not divisible by mesh.fsdp="
                              f"{mesh.shape['fsdp']}: FSDP shards the head's last kernel along it; pick a multiple")
    schedule = plan.schedule(lr_schedule(cfg.opt, cfg.train.steps))
    graphdef, state = init_state(mcfg, make_tx(cfg.opt, schedule), mesh, cfg.seed, plan.wrapped_at(0), weights,
                                 abstract, meta)
    return mcfg, plan, schedule, graphdef, state


def saved_model_block(block) -> dict:
    """A checkpoint's `model:` block as this machine and version can run it: the boolean model.remat of checkpoints
    from before the remat policies is `block` / `none`; a GPU run's attention=cudnn is auto (cuDNN on a GPU, XLA
    elsewhere)."""
    block = dict(block)
    if isinstance(block.get("remat"), bool):
        block["remat"] = "block" if block["remat"] else "none"
    if block.get("attention") == "cudnn":
        block["attention"] = "auto"
    return block


def check_same_model(saved_block, mcfg, where, meta_block=None):
    """Refuse a checkpoint made by another model: the fields that define the parameters must agree (keys a checkpoint
    predates take their defaults; dtype, attention, remat, scan_layers and loss_chunk may differ), the meta head's
    (model.maml's num_layers and hidden_dim, `meta_block` this run's) too."""
    saved, now = model_config(saved_model_block(saved_block)).param_fields(), mcfg.param_fields()
    saved["maml head"], now["maml head"] = maml.head_dims(saved_block.get("maml")), maml.head_dims(meta_block)
    diff = {k: (saved.get(k), now.get(k)) for k in dict(saved) | now if saved.get(k) != now.get(k)}
    if diff:
        desc = ", ".join(f"model.{k}: checkpoint {a} vs this run {b}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"the checkpoint in {where} was made by a different model ({desc}); use the "
                              f"checkpoint's model config or a new run_dir")


def restore(ckpts: Checkpoints, step: int, mcfg, plan, graphdef, state, mesh, meta_block=None):
    """(graphdef, state, loop) of checkpoint `step`, after checking it was made by this model (and meta head: this
    run's model.maml block), in the layout it was saved in and with the shardings of `state` on `mesh`."""
    check_same_model(ckpts.config(step)["model"], mcfg, ckpts.step_dir(step), meta_block)
    with jax.set_mesh(mesh):
        graphdef, state = plan.layout_at(step, graphdef, state)
    state, loop = ckpts.restore(step, abstract_like(state))
    return graphdef, state, loop


def load(path, step: int | None = None):
    """A trained model from nothing but a checkpoint directory (a run's checkpoint dir, or a run dir holding
    `checkpoints/`): returns (model, config, loop) with the model on this host's devices."""
    path = Path(path).expanduser()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    ckpts = Checkpoints(path, keep=None, use_async=False)
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    cfg = OmegaConf.create(ckpts.config(step))
    cfg.model = saved_model_block(cfg.model)
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1  # this host's devices, whatever the run used
    mesh = make_mesh(1, -1)
    mcfg, plan, _, graphdef, state = build(cfg, mesh)
    graphdef, state, loop = restore(ckpts, step, mcfg, plan, graphdef, state, mesh, cfg.model.get("maml"))
    return nnx.merge(graphdef, state)[0], cfg, loop
