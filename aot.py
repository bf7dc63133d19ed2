"""Compile a run for chips that are not here: `python main.py aot.target=tpu:v5e-8 ...` builds the run as it would
(config, mesh, sharded state, ReLoRA plan, batch shapes), compiles its train and eval steps with XLA's TPU or GPU
compiler for the target's compile-only devices (chips.py), and reports what the programs say, without training:
memory per device against HBM and whether it fits (else the largest micro-batch that does), FLOPs, a roofline
bound on the step time (so a ceiling on MFU), which attention kernel the program holds, and compile time.

A module of its own because nothing here trains: it compiles the run's own programs (train_state.build, steps.py)
and reads them; main.py calls it instead of train.run when aot.target is set, benchmarks/aot.py for its table.
"""
import dataclasses
import math
import os
import re
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from omegaconf import OmegaConf

import config
import maml
import train_state
from chips import Target, target
from config import ConfigError
from model import BATCH_AXES, ModelConfig
from steps import check_batch, jit_eval_step, jit_train_step
from traffic import Traffic, count as count_traffic, fsdp_minimum, summary

GIB = 1 << 30  # memory is printed in GiB, as XLA's messages print it ("15.75G")
KNOBS = ("data.grad_accum (smaller micro-batches), model.remat=block (recompute each block), model.loss_chunk=1024 "
         "(no [B, T, V] logits), mesh.fsdp (shard over more chips), eval.batch_size (the eval step)")


def compile_only_host():
    """Before jax starts its backends: this host's own devices stay the CPU (the TPU and CUDA plugins installed for
    compiling must not claim hardware that is not here), the CUDA plugin may describe GPUs it cannot see, and
    libtpu does not take its one-process lock (/tmp/libtpu_lockfile), so several compiles may run at once. libtpu is
    told it is on one host of a known kind, so that it does not print its warnings about the TPU VM it is not on
    (the target's topology is get_topology_desc's argument: these do not change the plans, RESULTS.md)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    jax.config.update("jax_platforms", "cpu")


@dataclasses.dataclass
class Memory:
    """A compiled program's plan per device, in bytes (memory_analysis; outputs that reuse a donated argument's
    buffer are counted once). A program the TPU compiler refused for memory has only `required`, from its
    RESOURCE_EXHAUSTED message, and `error`."""
    arguments: float = 0.0
    outputs: float = 0.0
    aliased: float = 0.0
    temporaries: float = 0.0
    code: float = 0.0
    required: float | None = None
    error: str | None = None

    @property
    def total(self) -> float:
        if self.required is not None:
            return self.required
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
                   m.generated_code_size_in_bytes)

    @classmethod
    def refused(cls, message: str) -> "Memory":
        """From the TPU compiler's out-of-memory message: the largest size it names is what the program needs."""
        units = dict(K=1 << 10, M=1 << 20, G=1 << 30, T=1 << 40)
        sizes = [float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([KMGT])\b", message)]
        first = next((line for line in message.splitlines() if "memory" in line.lower()), message.splitlines()[0])
        return cls(required=max(sizes) if sizes else math.inf, error=first.strip()[:300])


def out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


@dataclasses.dataclass
class Program:
    """One compiled step: its memory plan, XLA's cost analysis (TPU only; None on GPU), its text (the lowered
    StableHLO when the compiler refused it), compile time, and what it sends between chips per device and run
    (counted from its compiled text; None when refused)."""
    name: str
    memory: Memory
    cost: dict | None
    text: str
    seconds: float
    traffic: Traffic | None = None


def compile_step(name: str, jitted, args, mesh) -> Program:
    """Lower and compile `jitted` for `args` (shapes on a target's devices) in the mesh's context, the one the
    trainer runs its steps in (attention's kernels read it). The persistent compilation cache is off meanwhile:
    an executable for devices that are not here cannot be read back from it."""
    t = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.set_mesh(mesh):
            lowered = jitted.lower(*args)
            compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only out-of-memory is an answer, the rest is a bug
        if not out_of_memory(e):
            raise
        return Program(name, Memory.refused(str(e)), None, lowered.as_text(), time.perf_counter() - t)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text() or ""
    return Program(name, Memory.of(compiled), cost or None, text, time.perf_counter() - t,
                   count_traffic(text, mesh.size))


def attention_in(text: str, platform: str) -> tuple[str, int]:
    """The attention kernel a compiled program holds and how many calls of it: cuDNN's fused attention custom
    calls on a GPU, Pallas (Mosaic) kernel calls on a TPU, else none (XLA's own ops)."""
    call = r'(?:custom_call_target="|stablehlo\.custom_call @)'  # compiled HLO, or lowered StableHLO
    if platform == "gpu":
        n = len(re.findall(call + r"__cudnn\$fmha", text))
        return ("cudnn", n) if n else ("xla", 0)
    n = len(re.findall(call + r'"?tpu_custom_call', text))
    return ("splash", n) if n else ("xla", 0)


@dataclasses.dataclass
class Build:
    """A run config built for a target: everything the steps are compiled from, nothing allocated."""
    cfg: object
    target: Target
    mesh: object
    mcfg: object
    plan: object
    graphdef: object
    state: object
    objective: object = None  # steps.train_step's (maml.Objective with model.maml), None: next-token prediction
    note: str | None = None  # how data.grad_accum=auto was chosen
    chosen: "Program | None" = None  # and the train step it compiled for the choice


def build(cfg, spec: str, wrapped: bool = False) -> Build:
    """The run of `cfg` as it would start on `spec`'s chips (its checks first: keys, mesh, batch, model), with the
    state as shapes carrying their shardings; `wrapped`: in the layout after ReLoRA's warm start (LoRA branches on
    frozen weights) where the run starts full-rank. data.grad_accum=auto is chosen first (auto_grad_accum)."""
    config.check_keys(cfg)
    tgt = target(spec)
    mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, tgt.devices())
    note = chosen = None
    if cfg.data.grad_accum == "auto":
        accum, note, chosen = auto_grad_accum(cfg, tgt, mesh)
        cfg = OmegaConf.merge(cfg, {"data": {"grad_accum": accum}})
    return dataclasses.replace(on_devices(cfg, tgt, mesh, wrapped), note=note, chosen=chosen)


def on_devices(cfg, tgt: Target, mesh, wrapped: bool = False) -> Build:
    """`build` on a mesh of `tgt`'s devices, data.grad_accum a number."""
    check_batch(mesh, cfg.data.batch_size, cfg.data.grad_accum, cfg.eval.batch_size)
    mcfg, plan, schedule, graphdef, state = train_state.build(cfg, mesh, platform=tgt.chip.platform, abstract=True,
                                                              compute_capability=tgt.chip.compute_capability())
    if wrapped and plan.cfg and plan.wrapped_at(0) is None:
        tx = train_state.make_tx(cfg.opt, schedule)
        graphdef, state = train_state.init_state(mcfg, tx, mesh, cfg.seed, plan.cfg, abstract=True,
                                                 meta=maml.config_of(cfg))
    meta = maml.config_of(cfg)  # the mask token's id changes nothing compiled: the data's tokenizer is not read
    objective = maml.Objective(meta, mcfg.vocab_size - 1 if meta.mask_id is None else meta.mask_id) if meta else None
    return Build(cfg, tgt, mesh, mcfg, plan, graphdef, state, objective)


def batch_of(b: Build, rows: int):
    return jax.ShapeDtypeStruct((rows, b.mcfg.seq_len + 1), "int32", sharding=NamedSharding(b.mesh, P(BATCH_AXES)))


def compile_train(b: Build, grad_accum: int | None = None) -> Program:
    """The train step as the trainer compiles it (steps.jit_train_step), at data.batch_size in `grad_accum`
    micro-batches (default: data.grad_accum). With accumulation that is three programs run one after another (zero
    sums, one micro-batch's gradient added, the optimizer step): their texts together, the largest one's memory (each
    counts what is on the device while it runs: the state, the sums, the batch) and XLA's costs."""
    c = b.cfg
    accum = c.data.grad_accum if grad_accum is None else grad_accum
    step = jit_train_step(b.graphdef, b.state, b.mesh, b.plan, accum, c.train.nan_policy == "skip", b.objective)
    with jax.set_mesh(b.mesh):
        arguments = step.arguments(b.state, batch_of(b, c.data.batch_size))
    programs = {k: compile_step(f"train {k}", step.programs[k], args, b.mesh) for k, args in arguments.items()}
    largest = max(programs.values(), key=lambda p: (p.memory.error is not None, p.memory.total))
    costs = [p.cost for p in programs.values() if p.cost]
    sent = None if any(p.traffic is None for p in programs.values()) else \
        sum((p.traffic.scaled(accum if k == "accumulate" else 1) for k, p in programs.items()), Traffic())
    return Program("train", largest.memory, max(costs, key=lambda x: x.get("flops", 0)) if costs else None,
                   "\n".join(p.text for p in programs.values()), sum(p.seconds for p in programs.values()), sent)


def compile_eval(b: Build) -> Program:
    return compile_step("eval", jit_eval_step(b.graphdef), (b.state, batch_of(b, b.cfg.eval.batch_size)), b.mesh)


def fits(p: Program, b: Build, spare: float = 0.0) -> bool:
    return p.memory.error is None and p.memory.total <= (1 - spare) * b.target.chip.memory()


SPARE = 0.1  # of the chip's memory that data.grad_accum=auto leaves free, as the shipped configs do


def auto_grad_accum(cfg, tgt: Target | None, mesh) -> tuple[int, str, "Program | None"]:
    """data.grad_accum=auto: the fewest micro-batches whose train step fits `tgt`'s chips with SPARE to spare (the
    micro-batch search over compile-only memory, on the mesh the run has), the start-up line that says so and that
    train step; 1 without an accelerator (tgt None: nothing to fit)."""
    if tgt is None:
        return 1, "data.grad_accum=auto: 1 (no accelerator here: the whole batch in one micro-batch)", None
    b = on_devices(OmegaConf.merge(cfg, {"data": {"grad_accum": 1}}), tgt, mesh)
    B, limit = cfg.data.batch_size, (1 - SPARE) * tgt.chip.memory()
    counts = [a for a in range(1, B + 1) if B % a == 0 and (B // a) % mesh.size == 0]  # ascending
    # a first guess from the lower bound (plans have been 1.4 to 3x it), then one count at a time each way
    bound = lambda a: lower_bound(dataclasses.replace(b, cfg=OmegaConf.merge(b.cfg, {"data": {"grad_accum": a}})))
    j = next((i for i, a in enumerate(counts) if 1.5 * (bound(a) or 0) <= limit), len(counts) - 1)
    plans = {}

    def ok(i):
        if i not in plans:
            plans[i] = compile_train(b, counts[i])
        return fits(plans[i], b, SPARE)
    if ok(j):
        while j > 0 and ok(j - 1):
            j -= 1
    else:
        j += 1
        while j < len(counts) and not ok(j):
            j += 1
    n = len(plans)
    if j == len(counts):
        raise ConfigError(f"data.grad_accum=auto: no micro-batch of data.batch_size={B} fits {tgt.chip.name} with "
                          f"{SPARE:.0%} to spare, not one sequence per device ({n} compiles); knobs that help: {KNOBS}")
    accum, p = counts[j], plans[j]
    micro = B // accum
    return accum, (f"data.grad_accum=auto: {accum} (micro-batches of {micro} sequences), the fewest whose train step "
                   f"fits {tgt.chip.name} with {SPARE:.0%} to spare: {gb(p.memory.total)} of {gb(tgt.chip.memory())} "
                   f"per device ({n} compiles)"), p


def largest_micro_batch(b: Build) -> tuple[int | None, Program | None, int]:
    """The largest micro-batch (data.batch_size / data.grad_accum, a multiple of the data-parallel size dividing
    the batch) whose train step fits, by bisection over compile-only memory:
    (micro-batch or None, its program, compiles made)."""
    B, dp = b.cfg.data.batch_size, b.mesh.size
    sizes = [m for m in range(dp, B + 1, dp) if B % m == 0]
    lo, hi, best, n = 0, len(sizes) - 1, (None, None), 0
    while lo <= hi:
        mid = (lo + hi) // 2
        p, n = compile_train(b, B // sizes[mid]), n + 1
        if fits(p, b):
            best, lo = (sizes[mid], p), mid + 1
        else:
            hi = mid - 1
    return best[0], best[1], n


def shard_bytes(tree) -> int:
    """Bytes on one device of a tree of arrays (or ShapeDtypeStructs) carrying NamedShardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def lower_bound(b: Build) -> float | None:
    """Bytes per device that any plan of the decoder's train step needs (issue #23's yardstick, None for the other
    families): the state as the run shards it (parameters, AdamW's moments) and one float32 gradient; the inputs
    the backward pass keeps (each block's input under model.remat=block, else every block's activations); one
    block's activations in the compute dtype, only those its backward pass cannot do without (the inputs of its
    matmuls, q, k and v for attention's, and the MLP's pre-activations, from which the activation is recomputed);
    and the float32 logits of one loss chunk (of the whole micro-batch without model.loss_chunk).
    Temporaries of the optimizer update, collectives and kernels' scratch are left out, so a plan above it is
    expected; benchmarks/RESULTS.md compares them (goal: within 2x)."""
    m = b.mcfg
    if not isinstance(m, ModelConfig):  # the LSTM and k-gram families (families.py)
        return None
    tokens = b.cfg.data.batch_size // b.cfg.data.grad_accum // b.mesh.size * m.seq_len  # per device, micro-batch
    act = np.dtype(m.dtype).itemsize
    model, _ = nnx.merge(b.graphdef, b.state)
    gradient = shard_bytes(nnx.state(model, nnx.Param))  # parameters are float32, and so their gradients
    # two norm outputs, q, attention's output; k, v; the MLP's pre-activations (SwiGLU: gate and up)
    width = 4 * m.d_model + 2 * m.n_kv_heads * m.head_dim + (2 if m.mlp == "swiglu" else 1) * m.d_hidden
    block = tokens * width * act
    kept = m.n_layers * (tokens * m.d_model * act if m.remat == "block" else block)
    logits = min(m.loss_chunk or tokens, tokens) * m.vocab_size * 4
    return shard_bytes(b.state) + gradient + kept + block + logits


REMAT_FLOPS = {"none": 1.0, "dots": 1.0, "block": 4 / 3}  # model.remat=block recomputes the forward (2 of 6)


def roofline(p: Program, b: Build, grad_accum: int) -> dict:
    """A lower bound on the step time per device, max(FLOPs / peak, bytes / HBM bandwidth), and the MFU it allows.
    FLOPs: the model's (the MFU formula's), with the forward pass once more under model.remat=block. Bytes: the
    arguments read and the outputs written, which any step moves at least. XLA's own counts (TPU) are shown beside
    them, not used: its cost analysis counts one micro-batch (grad_accum > 1: the accumulate program), a loop body
    once (scan_layers) and the operands of every fusion and kernel call, so it is neither a bound nor a
    measurement."""
    chip, c = b.target.chip, b.cfg
    peak = chip.bf16 if b.mcfg.dtype in ("bfloat16", "float16") else chip.fp32
    model_flops = b.mcfg.flops_per_token() * c.data.batch_size * b.mcfg.seq_len / b.mesh.size
    cost = p.cost or {}
    traffic = p.memory.arguments + p.memory.outputs
    executed = model_flops * REMAT_FLOPS.get(getattr(b.mcfg, "remat", "none"), 1.0)
    times = dict(compute=executed / peak, memory=traffic / chip.bandwidth)
    if p.traffic is not None and chip.interconnect and b.mesh.size > 1:  # the collectives, at the data sheet's rate
        times["interconnect"] = p.traffic.total / chip.interconnect
    bound = max(times.values())
    return dict(model_flops=model_flops, executed_flops=executed, xla_flops=cost.get("flops"),
                xla_bytes=cost.get("bytes accessed"), xla_looped=grad_accum > 1 or getattr(b.mcfg, "scan_layers",
                                                                                           False),
                bytes=traffic, step_s_min=bound, mfu_max=model_flops / peak / bound, times=times,
                bound=max(times, key=times.get))


def traffic_summary(p: Program, b: Build, grad_accum: int) -> dict | None:
    """What the train step sends between chips per device and step, against FSDP's minimum for the run (the
    parameters split over mesh.fsdp; traffic.fsdp_minimum)."""
    if p.traffic is None:
        return None
    params = jax.tree.leaves(nnx.state(nnx.merge(b.graphdef, b.state)[0], nnx.Param))
    split = sum(x.size for x in params if tuple(x.sharding.shard_shape(x.shape)) != tuple(x.shape))
    return summary(p.traffic, fsdp_minimum(split, dict(b.mesh.shape), grad_accum, np.dtype(b.mcfg.dtype).itemsize))


def preflight(cfg, tgt: Target, mesh, mcfg, plan, graphdef, state, objective=None) -> str:
    """The trainer's check before its first step on an accelerator: its train and eval steps compiled for the
    devices it runs on, their memory per device against the chip's; a ConfigError that says what fits (the
    largest micro-batch, the knobs) when they do not, instead of XLA's RESOURCE_EXHAUSTED mid-run. Returns the
    start-up log's line."""
    b = Build(cfg, tgt, mesh, mcfg, plan, graphdef, state, objective)
    train, evaluate = compile_train(b), compile_eval(b)
    limit = tgt.chip.memory()
    line = (f"memory per device (compiled): train step {gb(train.memory.total)}, eval step "
            f"{gb(evaluate.memory.total)} of {gb(limit)} usable on {tgt.chip.name}")
    if fits(train, b) and fits(evaluate, b):
        return line
    if fits(train, b):
        what = f"the eval step does not fit: lower eval.batch_size={cfg.eval.batch_size}"
    else:
        micro = largest_micro_batch(b)[0]
        what = (f"the largest micro-batch that fits is {micro} sequences: data.grad_accum="
                f"{cfg.data.batch_size // micro}" if micro else "no micro-batch fits, not one sequence per device")
    raise ConfigError(f"the run does not fit: {line}; {what}; knobs that help: {KNOBS}")


def analyze(cfg, spec: str, search: bool = True) -> dict:
    """Compile `cfg`'s train and eval steps for `spec` and report (a dict, what `report` prints)."""
    b = build(cfg, spec)
    train, evaluate = b.chosen or compile_train(b), compile_eval(b)
    chip, c = b.target.chip, b.cfg
    expected, why = b.mcfg.attention_impl() if hasattr(b.mcfg, "attention_impl") else ("none", "no attention")
    found, calls = attention_in(train.text, chip.platform)
    out = dict(target=spec, chip=chip.name, devices=len(b.mesh.devices.flat), mesh=dict(b.mesh.shape),
               config=dict(d_model=c.model.d_model, seq_len=b.mcfg.seq_len, batch_size=c.data.batch_size,
                           grad_accum=c.data.grad_accum, remat=b.mcfg.remat if hasattr(b.mcfg, "remat") else None,
                           dtype=b.mcfg.dtype),
               memory_limit=chip.memory(), hbm=chip.hbm,
               train=dataclasses.asdict(train.memory) | dict(total=train.memory.total),
               eval=dataclasses.asdict(evaluate.memory) | dict(total=evaluate.memory.total),
               fits=fits(train, b) and fits(evaluate, b), compile_s=dict(train=train.seconds, eval=evaluate.seconds),
               attention=dict(expected=expected, why=why, found=found, calls=calls),
               roofline=roofline(train, b, c.data.grad_accum) if train.memory.error is None else None,
               traffic=traffic_summary(train, b, c.data.grad_accum), lower_bound=lower_bound(b), note=b.note)
    if b.plan.cfg and b.plan.wrapped_at(0) is None:  # ReLoRA's step after the warm start, a program of its own
        wrapped = compile_train(build(b.cfg, spec, wrapped=True))
        out["relora_train"] = dataclasses.asdict(wrapped.memory) | dict(total=wrapped.memory.total)
        out["fits"] = out["fits"] and fits(wrapped, b)
        out["compile_s"]["relora_train"] = wrapped.seconds
    if search and not fits(train, b):
        m, p, n = largest_micro_batch(b)
        out["largest_micro_batch"] = dict(micro_batch=m, grad_accum=c.data.batch_size // m if m else None,
                                          total=p.memory.total if p else None, compiles=n)
        if p is not None:
            out["roofline"] = roofline(p, b, c.data.batch_size // m)
            out["traffic"] = traffic_summary(p, b, c.data.batch_size // m)
    return out


def gb(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f} GiB"


def report(r: dict) -> str:
    """The analysis as the lines `python main.py aot.target=...` prints."""
    t, e, lim = r["train"], r["eval"], r["memory_limit"]
    sums = " + gradient sums" if r["config"]["grad_accum"] > 1 else ""  # the accumulate program's, the largest
    lines = [f"{r['target']}: {r['devices']} x {r['chip']}, mesh {r['mesh']} (compile only: XLA's plan, not a "
             f"measurement)",
             f"train step, per device: arguments {gb(t['arguments'])} (parameters + optimizer state{sums} + batch), "
             f"temporaries {gb(t['temporaries'])}, outputs {gb(t['outputs'])} ({gb(t['aliased'])} of them in "
             f"donated buffers), total {gb(t['total'])} of {gb(lim)} usable"
             + (f" (HBM {gb(r['hbm'])}; jax preallocates XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)"
                if r["hbm"] != lim and r["target"].startswith("gpu") else ""),
             f"eval step, per device: total {gb(e['total'])}"]
    if r.get("note"):
        lines.insert(1, r["note"])
    if r.get("lower_bound") and not t["error"]:
        lines.append(f"lower bound for the train step (state, one gradient, kept activations, one block's, one loss "
                     f"chunk's logits): {gb(r['lower_bound'])}; the plan is {t['total'] / r['lower_bound']:.2f}x it")
    if "relora_train" in r:
        lines.append(f"ReLoRA's train step after its warm start, per device: total {gb(r['relora_train']['total'])}")
    for name, m in (("train", t), ("eval", e), ("ReLoRA train", r.get("relora_train"))):
        if m is None:
            continue
        if m["error"]:
            lines.append(f"{name} step refused by the compiler: {m['error']}")
    if r["fits"]:
        lines.append(f"fits: yes, {1 - max(t['total'], e['total']) / lim:.0%} of usable memory to spare")
    else:
        lines.append(f"fits: NO: the train step plans {gb(t['total'])} and the eval step {gb(e['total'])} per "
                     f"device, {gb(lim)} usable; knobs that help: {KNOBS}")
        big = r.get("largest_micro_batch")
        if big and big["micro_batch"]:
            lines.append(f"largest micro-batch that fits: {big['micro_batch']} sequences "
                         f"(data.grad_accum={big['grad_accum']} at data.batch_size={r['config']['batch_size']}), "
                         f"{gb(big['total'])} per device ({big['compiles']} compiles)")
        elif big:
            lines.append(f"no micro-batch fits, not even one sequence per device ({big['compiles']} compiles): "
                         f"use model.remat=block, model.loss_chunk, or more chips")
    rf = r["roofline"]
    if rf:
        looped = " (one micro-batch, a loop body counted once)" if rf["xla_looped"] else ""
        xla = (f"; XLA's cost analysis: {rf['xla_flops'] / 1e12:.2f} TFLOP, {gb(rf['xla_bytes'])} accessed"
               f"{looped}") if rf["xla_flops"] else ""
        lines.append(f"per device and step: model {rf['model_flops'] / 1e12:.2f} TFLOP (executed with remat "
                     f"{rf['executed_flops'] / 1e12:.2f}), at least {gb(rf['bytes'])} moved (arguments + outputs)"
                     f"{xla}")
        tr = r.get("traffic")
        if tr and r["devices"] > 1:
            lines.append(f"between chips, per device and step: {gb(tr['total'])} ({'; '.join(tr['kinds'])}), "
                         f"{tr['total'] / tr['minimum']:.2f}x FSDP's minimum of {gb(tr['minimum'])} (weights "
                         f"gathered in the compute dtype for the forward and the backward, gradients "
                         f"reduce-scattered in float32)" + "".join(f"; {n}" for n in tr["notes"]))
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rf["times"].items())
        lines.append(f"roofline: step >= {rf['step_s_min'] * 1e3:.1f} ms ({times}: {rf['bound']}-bound), "
                     f"MFU <= {rf['mfu_max']:.0%}")
    a = r["attention"]
    kernel = {"cudnn": "cuDNN fused attention", "splash": "Pallas splash attention",
              "xla": "flash attention in JAX (XLA ops, no fused kernel)"}
    line = f"attention: {kernel.get(a['found'], a['found'])} ({a['calls']} kernel calls in the train step)"
    if a["expected"] in ("cudnn", "splash") and a["found"] != a["expected"]:
        line += f"; FALLBACK: the config asks for {a['expected']} ({a['why']})"
    lines.append(line)
    lines.append("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    return "\n".join(lines)


def run(cfg) -> dict:
    """main.py with aot.target set: compile, print the report; nothing trains."""
    r = analyze(cfg, cfg.aot.target, cfg.aot.search)
    print(report(r))
    return r
