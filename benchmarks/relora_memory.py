"""Full-rank vs ReLoRA training of the same model: step time and memory (SPEC §4).

    python benchmarks/relora_memory.py                      # a small model on CPU, about a minute
    python benchmarks/relora_memory.py --d-model 768 --layers 12 --vocab 50304 --seq 1024 --batch 16 \\
        --rank 128 --dtype bfloat16                         # pico medium-like, on one GPU

Each mode runs in its own process (so device peaks do not mix) on one device, and reports: trainable and frozen
parameters, optimizer-state bytes, all state bytes, the compiled step's own memory (XLA memory_analysis(): its
temporaries, and arguments + outputs - donated + temporaries as the step's peak), the device's peak bytes in use
where the backend reports it (GPU, TPU; not CPU), and the median step time.
"""
import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import relora  # noqa: E402
import steps  # noqa: E402
import train_state  # noqa: E402
from config import CONFIGS  # noqa: E402
from model import ModelConfig  # noqa: E402


def measure(a) -> dict:
    mcfg = ModelConfig(vocab_size=a.vocab, seq_len=a.seq, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                       n_kv_heads=a.kv_heads, d_hidden=4 * a.d_model, dtype=a.dtype)
    lora = relora.ReLoRAConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0) if a.mode == "relora" else None
    opt = OmegaConf.load(CONFIGS / "base.yaml").opt
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:1])
    graphdef, state = train_state.init_state(mcfg, train_state.make_tx(opt, 1e-3), mesh, 0, lora)
    sizes = relora.sizes(graphdef, state)
    step = jax.jit(partial(relora.Plan(lora).step(steps.train_step), graphdef), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq + 1), 0, a.vocab)
    with jax.set_mesh(mesh):
        mem = step.lower(state, tokens).compile().memory_analysis()
        times = []
        for i in range(a.steps + 2):  # the first two compile and settle
            t = time.perf_counter()
            state, m = step(state, tokens)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(mode=a.mode, device=jax.devices()[0].device_kind, **sizes,
                state_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
                step_temp_bytes=mem.temp_size_in_bytes if mem else None,
                step_peak_bytes=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                 + mem.temp_size_in_bytes) if mem else None,
                device_peak_bytes=stats.get("peak_bytes_in_use"),
                step_ms=1e3 * float(np.median(times[2:])), loss=float(m["loss"]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--mode", choices=["full", "relora"], help=argparse.SUPPRESS)  # one mode, in this process
    a = p.parse_args()
    if a.mode:
        print(json.dumps(measure(a)))
        return
    rows = []
    for mode in ("full", "relora"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mb = lambda x: "n/a" if x is None else f"{x / 2 ** 20:.1f} MiB"
    print(f"d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}, batch {a.batch} x {a.seq}, {a.dtype}, "
          f"ReLoRA rank {a.rank} on attention + SwiGLU; {rows[0]['device']}")
    cols = [("trainable params", lambda r: f"{r['trainable_params'] / 1e6:.2f}M"),
            ("frozen params", lambda r: f"{r['frozen_params'] / 1e6:.2f}M"),
            ("optimizer state", lambda r: mb(r["opt_state_bytes"])),
            ("all state", lambda r: mb(r["state_bytes"])),
            ("step temporaries", lambda r: mb(r["step_temp_bytes"])),
            ("step peak (XLA)", lambda r: mb(r["step_peak_bytes"])),
            ("device peak", lambda r: mb(r["device_peak_bytes"])),
            ("step time", lambda r: f"{r['step_ms']:.1f} ms")]
    print(f"{'':18}{'full-rank':>14}{'ReLoRA':>14}")
    for name, fmt in cols:
        print(f"{name:18}{fmt(rows[0]):>14}{fmt(rows[1]):>14}")


if __name__ == "__main__":
    main()
