"""The machine a run is on: the process set-up the entry points do before jax starts (glibc malloc, jax.distributed),
and what its devices can do (peak FLOP/s, the throughput and MFU formula).

A module of its own because none of it is training: main.py, benchmarks/throughput.py and the trainer's log all
call it; of the project it imports only chips.py, the table of the chips' peaks.
"""
import glob
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from chips import chip_of

# glibc malloc settings for speed on CPU: one arena, never mmap, never give freed memory back (reuse_host_memory)
HOST_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}



def reuse_host_memory():
    """Restart this process once with HOST_MALLOC in its environment, so that one step's memory is reused by the
    next. XLA:CPU allocates a step's temporaries afresh on every call from its worker threads; glibc gives those
    threads arenas of their own, which serve anything over 64 MB with mmap and unmap it on free, so every step
    page-faults its working set back in (a third of picodo2's step: benchmarks/RESULTS.md). glibc reads these
    settings only at process start (mallopt cannot set a size over 2 GB, nor the arenas of threads that exist),
    hence the restart, done by the entry points before any jax computation. Linux with glibc only; setting any of
    these variables yourself (e.g. MALLOC_ARENA_MAX=8) turns it off."""
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
            or any(k in os.environ for k in (*HOST_MALLOC, "GLIBC_TUNABLES"))):
        return
    os.environ.update(HOST_MALLOC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


# device files of the chips jax's plugins drive: NVIDIA GPUs (WSL2: /dev/dxg), TPUs (v2-v4 accel, v5e and later vfio)
ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def cpu_unless_accelerator():
    """Before jax starts its backends: on a host with no GPU or TPU device file, jax starts its CPU backend only.
    The CUDA plugin and libtpu that requirements-aot.txt installs for compile-only targets would otherwise each try
    to claim a chip that is not there, and print a traceback (cuInit failed) and libtpu's host warnings before
    every run. JAX_PLATFORMS, when set, is left to decide."""
    if "JAX_PLATFORMS" not in os.environ and not any(glob.glob(p) for p in ACCELERATOR_FILES):
        jax.config.update("jax_platforms", "cpu")


def init_distributed(d):
    """Start jax.distributed: explicitly from the `distributed:` keys, or auto-detected on SLURM and TPU pods."""
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


@jax.jit(static_argnums=0)
def _matmul_chain(n, a):
    for _ in range(8):
        a = a @ a * (1.0 / n)
    return a


def peak_flops(dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of all devices together and where the number comes from. On CPU, measured: the best of a few
    chains of 1024 x 1024 jnp matmuls, in float32 and in `dtype`, the faster one (best-of, so that a busy moment
    does not understate the peak and inflate MFU; its size against larger matmuls: benchmarks/RESULTS.md)."""
    dev = jax.devices()[0]
    kind = dev.device_kind
    chip = chip_of(kind)
    if chip is not None:  # chips.CHIPS: the data sheets' dense peaks
        per = chip.bf16 if jnp.dtype(dtype).itemsize <= 2 else chip.fp32
        return per * jax.device_count(), f"{kind} datasheet"
    if dev.platform != "cpu":
        return float("nan"), f"{kind}: unknown peak"
    n, best = 1024, 0.0
    for dt in dict.fromkeys([jnp.float32, jnp.dtype(dtype)]):
        a = jnp.ones((n, n), dt)
        _matmul_chain(n, a).block_until_ready()
        for _ in range(3):
            t = time.perf_counter()
            _matmul_chain(n, a).block_until_ready()
            best = max(best, 8 * 2 * n ** 3 / (time.perf_counter() - t))
    return best, "measured CPU matmul"


def throughput(tokens: int, seconds: float, mcfg, peak: float) -> dict:
    """tokens/s, model FLOP/s (mcfg.flops_per_token()) and MFU of `tokens` trained in `seconds`: the one formula of
    the training log and benchmarks/throughput.py."""
    tps = tokens / seconds
    flops = tps * mcfg.flops_per_token()
    return dict(tokens_per_s=tps, flops_per_s=flops, mfu=flops / peak)
