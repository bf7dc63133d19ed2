"""Throughput of the real train step: compile time, step time, tokens/s, model FLOP/s and MFU.

    python benchmarks/throughput.py                                   # configs/local.yaml, synthetic batches
    python benchmarks/throughput.py -cn gpu size=medium model.seq_len=2048 data.batch_size=8 data.grad_accum=1
    python benchmarks/throughput.py --preset picodo1                  # Picodo's CPU shape 1 (below)
    python benchmarks/throughput.py --preset picodo2                  # Picodo's CPU shape 2
    python benchmarks/throughput.py --real --relora -cn relora        # the ReLoRA step on the built-in corpus
    python benchmarks/throughput.py --maml -cn maml                   # meta step vs next-token step vs pico-maml's
    python benchmarks/throughput.py --maml --preset picodo2           # the same at Picodo's shape 2
    python benchmarks/throughput.py --sweep-sizes tiny,small,medium,large model.seq_len=256 data.batch_size=8
    python benchmarks/throughput.py --sweep-devices 1,2,4,8 data.batch_size=16   # virtual CPU devices, FSDP

Arguments are main.py's: `-cn NAME` picks a config in configs/ (default local) and `key=value` overrides follow
Hydra's syntax; the flags below come on top. The step is the trainer's own (`steps.jit_train_step`, with its
donation and pinned output shardings; `--relora` wraps the model, so the step is relora.training_step). It is
compiled ahead of time (the compile time printed), run `--warmup` times, then `--steps` times, each step
synchronised (block_until_ready on the whole new state); the step time is the median of those.

Reported: model FLOPs per token = the config's `flops_per_token()`, i.e. 6 x matmul params (2 forward, 4 backward; the
head counts, the embedding lookup does not) + 6 L T D for attention scores and values (12 L T D halved by the
causal mask); tokens/s = batch x seq_len / step time; achieved FLOP/s = the two multiplied; MFU = achieved / peak,
all through `host.throughput`, the function the training log uses. The peak is the datasheet's dense peak for
the compute dtype (table `chips.CHIPS`: TPU v2-v6e, A100, H100, H200, L4, T4) times the device count, or on
CPU the best FLOP/s of large jnp matmuls measured in this process, before and after the timed steps (the higher
one is used: a low peak would inflate MFU). `--relora` counts the same model FLOPs (a frozen weight gets no weight
gradient, so its true cost is lower: the MFU of a ReLoRA step is a model-equivalent figure).

Picodo's CPU baseline (issue #8): on a 2-core AVX-512 machine, fp32, vocab 50257, Picodo's trainer runs
    picodo1: d_model 256, 4 layers, 4 heads, seq 256, batch 16: ~1,100 tokens/s, ~98 MFLOP/token = ~107 GFLOP/s
    picodo2: d_model 512, 8 layers, 8 heads, seq 512, batch 8:  ~420 tokens/s = ~134 GFLOP/s
`--preset picodo1|picodo2` sets those shapes, with model.loss_chunk=512 (the fused cross-entropy; our model: SwiGLU with d_hidden 4 D, an untied head, so compare FLOP/s
not tokens/s) and reports `vs_picodo` = our model FLOP/s over Picodo's; the target is >= 1.25, with the achieved
FLOP/s >= 50% of the matmul peak measured in the same run. Run it on an otherwise idle machine.

`--maml` times three train steps on one state, alternating one step of each per round: next-token prediction, a
meta episode (maml.py, hybrid_ratio 1: every micro-batch an episode; the model.maml block of the config, else
configs/maml.yaml's) and the same episode as pico-maml computes it (maml.recomputing_grads: the backbone run again
at each inner step); it reports each one's median and their ratios to the next-token step.

Sweeps run each point in a subprocess (the device count must be fixed before jax starts) and print a table:
`--sweep-sizes` adds `size=NAME` (configs/size/), `--sweep-devices` runs on N virtual CPU devices (or the first N
accelerators) with `mesh.data=1 mesh.fsdp=N`, showing per-device parameter and optimizer bytes falling as 1/N.
The last line printed is always one JSON object (a sweep: {"sweep": [one object per point]}).
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import aot  # noqa: E402
import chips  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import host  # noqa: E402
import maml  # noqa: E402
import steps  # noqa: E402
import train_state  # noqa: E402
from model import BATCH_AXES, count_params  # noqa: E402

PRESETS = {  # Picodo's two CPU shapes (issue #8); fp32, vocab 50257, MHA, d_hidden = 4 d_model
    "picodo1": (["model.vocab_size=50257", "model.seq_len=256", "model.d_model=256", "model.n_layers=4",
                 "model.n_heads=4", "model.n_kv_heads=4", "model.dtype=float32", "data.batch_size=16",
                 "model.loss_chunk=512"], 107e9),
    "picodo2": (["model.vocab_size=50257", "model.seq_len=512", "model.d_model=512", "model.n_layers=8",
                 "model.n_heads=8", "model.n_kv_heads=8", "model.dtype=float32", "data.batch_size=8",
                 "model.loss_chunk=512"], 134e9),
}
# The keys of the JSON object a single run prints last (tests/test_benchmark.py reads them).
KEYS = ("config", "device", "n_devices", "params", "dtype", "batch_size", "seq_len", "compile_s", "step_s",
        "tokens_per_s", "flops_per_token", "flops_per_s", "peak_flops_per_s", "peak_source", "mfu",
        "param_bytes_per_device", "opt_bytes_per_device", "loss")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-cn", "--config-name", default="local", help="a config in configs/ (as main.py -cn)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.d_model=256 size=small")
    p.add_argument("--preset", choices=sorted(PRESETS), help="one of Picodo's CPU shapes (overrides come after it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", dest="real", action="store_false", help="random token batches (default)")
    src.add_argument("--real", action="store_true", help="batches of the config's data (data.dir or built-in corpus)")
    p.set_defaults(real=False)
    p.add_argument("--relora", action="store_true", help="time the ReLoRA step (configs/relora.yaml's model.relora "
                                                         "unless the config has one; no warm start)")
    p.add_argument("--maml", action="store_true", help="meta step vs next-token step vs pico-maml's recomputation")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--sweep-sizes", help="comma-separated pico sizes (configs/size/), one subprocess each")
    p.add_argument("--sweep-devices", help="comma-separated device counts, one subprocess each (FSDP over N)")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def compose(a):
    overrides = (PRESETS[a.preset][0] if a.preset else []) + list(a.overrides)
    overrides += ["wandb.mode=disabled", "checkpoint.dynamics.layers=[]"]
    cfg = config.compose(a.config_name, overrides)
    if a.relora:
        block = cfg.model.relora or OmegaConf.load(ROOT / "configs" / "relora.yaml").model.relora
        cfg.model.relora = OmegaConf.merge(block, {"warm_start_steps": 0})
    return cfg


def state_bytes_per_device(state) -> tuple[int, int]:
    """Bytes of (parameters, optimizer state) held by the first device: its shard of every array."""
    model_state, opt_state = state[0], state[1]  # nnx.split((model, optimizer))

    def on_first(tree):
        dev = jax.devices()[0]
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
                   for s in x.addressable_shards if s.device == dev)
    return on_first(model_state), on_first(opt_state)


def measure(a) -> dict:
    """One configuration in this process: the numbers of KEYS."""
    cfg = compose(a)
    config.check_keys(cfg)
    mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.data.grad_accum == "auto":  # as the trainer chooses it (-cn gpu and -cn tpu ship it)
        cfg.data.grad_accum, note, _ = aot.auto_grad_accum(cfg, chips.here(), mesh)
        print(note, file=sys.stderr)
    steps.check_batch(mesh, cfg.data.batch_size, cfg.data.grad_accum, mesh.size)
    mcfg, plan, _, graphdef, state = train_state.build(cfg, mesh)
    B, T = cfg.data.batch_size, mcfg.seq_len
    train_step = steps.jit_train_step(graphdef, state, mesh, plan, cfg.data.grad_accum,
                                      cfg.train.nan_policy == "skip")
    sharding = NamedSharding(mesh, P(BATCH_AXES, None))
    n_steps = a.warmup + a.steps + 1  # +1: the batch the compiled step is lowered with
    if a.real:
        d = data.data_dir(cfg.data)
        tokens = data.open_tokens(d / "train.bin", cfg.data.token_dtype, mcfg.vocab_size, T)
        train_data = data.TrainData(data.BinRows(tokens, T, mcfg.vocab_size, d / "train.bin"), cfg.seed, B)
        batches = data.prefetch(lambda s: train_data.batch(s, sharding), range(n_steps))
    else:  # device-resident random tokens, drawn once per step (a pure function of the step)
        batches = ((s, jax.device_put(np.random.default_rng(s).integers(0, mcfg.vocab_size, (B, T + 1), np.int32),
                                      sharding)) for s in range(n_steps))
    peak = [host.peak_flops(mcfg.dtype)]
    params = count_params(nnx.merge(graphdef, state)[0])
    with jax.set_mesh(mesh):
        _, tokens = next(batches)
        t = time.perf_counter()
        step = train_step.compile(state, tokens)
        compile_s = time.perf_counter() - t
        times = []
        for i, (_, tokens) in enumerate(batches):
            t = time.perf_counter()
            state, m = step(state, tokens)
            jax.block_until_ready((state, m))
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    peak.append(host.peak_flops(mcfg.dtype))
    peak_flops, peak_source = max(peak)
    step_s = float(np.median(times))
    tp = host.throughput(B * T, step_s, mcfg, peak_flops)
    param_bytes, opt_bytes = state_bytes_per_device(state)
    return dict(config=a.config_name, device=jax.devices()[0].device_kind, n_devices=mesh.size,
                params=params, dtype=mcfg.dtype, batch_size=B, seq_len=T, compile_s=compile_s,
                step_s=step_s, tokens_per_s=tp["tokens_per_s"], flops_per_token=mcfg.flops_per_token(),
                flops_per_s=tp["flops_per_s"], peak_flops_per_s=peak_flops, peak_source=peak_source, mfu=tp["mfu"],
                param_bytes_per_device=param_bytes, opt_bytes_per_device=opt_bytes, loss=float(m["loss"]))


def measure_maml(a) -> dict:
    """Median step seconds of the next-token, meta and recomputing-meta train steps, alternated on one state."""
    cfg = compose(a)
    block = cfg.model.maml or OmegaConf.load(ROOT / "configs" / "maml.yaml").model.maml
    cfg.model.maml = OmegaConf.merge(block, {"hybrid_ratio": 1.0})
    config.check_keys(cfg)
    mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    mcfg, plan, _, graphdef, state = train_state.build(cfg, mesh)
    meta, B, T = maml.config_of(cfg), cfg.data.batch_size, mcfg.seq_len
    variants = dict(next_token=None, meta=maml.Objective(meta, mcfg.vocab_size - 1),
                    meta_recomputing=maml.Objective(meta, mcfg.vocab_size - 1, recompute=True))
    sharding = NamedSharding(mesh, P(BATCH_AXES, None))
    tokens = jax.device_put(np.random.default_rng(0).integers(0, mcfg.vocab_size - 1, (B, T + 1), np.int32), sharding)
    compiled, states, times = {}, {}, {k: [] for k in variants}
    with jax.set_mesh(mesh):
        for name, obj in variants.items():
            states[name] = jax.tree.map(jnp.copy, state)
            compiled[name] = steps.jit_train_step(graphdef, states[name], mesh, plan, cfg.data.grad_accum,
                                                  objective=obj).compile(states[name], tokens)
        for i in range(a.warmup + a.steps):
            for name in variants:  # alternated: the machine's drift hits every variant alike
                t = time.perf_counter()
                states[name], m = compiled[name](states[name], tokens)
                jax.block_until_ready((states[name], m))
                if i >= a.warmup:
                    times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    r = dict(config=a.config_name, preset=a.preset, device=jax.devices()[0].device_kind, n_devices=mesh.size,
             batch_size=B, seq_len=T, inner_steps=meta.inner_steps, **{f"{k}_step_s": v for k, v in med.items()})
    r.update(meta_vs_next_token=med["meta"] / med["next_token"],
             recomputing_vs_next_token=med["meta_recomputing"] / med["next_token"])
    print(f"{r['device']} x{r['n_devices']} | batch {B} x seq {T}, {meta.inner_steps} inner steps")
    for k, v in med.items():
        print(f"{k:18} {v * 1e3:8.1f} ms  {v / med['next_token']:.2f}x")
    return r


def report(r: dict, picodo: float | None = None):
    print(f"{r['device']} x{r['n_devices']} | {r['params'] / 1e6:.2f}M params, {r['dtype']}, batch {r['batch_size']} "
          f"x seq {r['seq_len']}")
    print(f"compile (first step)   {r['compile_s']:.2f} s")
    print(f"step (median)          {r['step_s'] * 1e3:.1f} ms")
    print(f"tokens/s               {r['tokens_per_s']:,.0f}")
    print(f"model FLOPs / token    {r['flops_per_token'] / 1e6:.2f} M  (6 x matmul params + 6 L T D attention)")
    print(f"achieved               {r['flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"peak                   {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['peak_source']})")
    print(f"MFU                    {r['mfu']:.1%}")
    print(f"per device             params {r['param_bytes_per_device'] / 2**20:.1f} MiB, "
          f"optimizer {r['opt_bytes_per_device'] / 2**20:.1f} MiB")
    if picodo:
        print(f"vs Picodo              {r['vs_picodo']:.2f}x its {picodo / 1e9:.0f} GFLOP/s (target >= 1.25x, and MFU >= 50%)")


def sweep(a, argv) -> list[dict]:
    """One subprocess per point; returns their JSON objects."""
    strip = {"--sweep-sizes", "--sweep-devices"}
    base, skip = [], False
    for x in argv:  # argv without the sweep flags
        if skip:
            skip = False
            continue
        if x in strip:
            skip = True
        elif not any(x.startswith(s + "=") for s in strip):
            base.append(x)
    points = []
    for size in (a.sweep_sizes.split(",") if a.sweep_sizes else [None]):
        for n in ([int(n) for n in a.sweep_devices.split(",")] if a.sweep_devices else [None]):
            args, env = list(base), dict(os.environ)
            if size:
                args.append(f"size={size}")
            if n:
                args += ["mesh.data=1", f"mesh.fsdp={n}"]
                flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
                env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"
                env["JAX_NUM_CPU_DEVICES"] = str(n)
            out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"point size={size} devices={n} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            points.append(dict(size=size, **r))
    print(f"{'size':8}{'devices':>8}{'params':>10}{'compile s':>11}{'step ms':>10}{'tokens/s':>11}"
          f"{'GFLOP/s':>9}{'MFU':>7}{'param MiB/dev':>15}{'opt MiB/dev':>13}")
    for r in points:
        print(f"{r['size'] or '-':8}{r['n_devices']:>8}{r['params'] / 1e6:>9.1f}M{r['compile_s']:>11.2f}"
              f"{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>11,.0f}{r['flops_per_s'] / 1e9:>9.1f}{r['mfu']:>7.1%}"
              f"{r['param_bytes_per_device'] / 2**20:>15.2f}{r['opt_bytes_per_device'] / 2**20:>13.2f}")
    return points


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.sweep_sizes or a.sweep_devices:
        print(json.dumps(dict(sweep=sweep(a, argv))))
        return
    logging.getLogger("jax").setLevel(logging.WARNING)
    if a.maml:
        print(json.dumps(measure_maml(a)))
        return
    r = measure(a)
    picodo = PRESETS[a.preset][1] if a.preset else None
    if picodo:
        r.update(preset=a.preset, picodo_flops_per_s=picodo, vs_picodo=r["flops_per_s"] / picodo)
    report(r, picodo)
    print(json.dumps(r))


if __name__ == "__main__":
    host.reuse_host_memory()  # as main.py does: on CPU, each step reuses the last one's memory (a restart)
    host.cpu_unless_accelerator()  # and no plugin tracebacks on a host without chips
    main()
