"""The chips picojax targets, in one table (HBM, peak FLOP/s, HBM bandwidth, XLA's description of a GPU), and the
compile-only devices of a target such as `tpu:v5e-8` or `gpu:h100x8`, on which XLA's TPU and GPU compilers run on
any host (jax.experimental.topologies; libtpu and the CUDA plugin from requirements-aot.txt).

A module of its own, importing nothing of the project, because host.py (the peak FLOP/s behind the MFU of the
devices at hand) and aot.py (a target's devices, its HBM and its roofline) read the same facts.
"""
from dataclasses import dataclass, field

import os
import re
import sys

import jax
from jax.experimental import topologies


class TargetError(ValueError):
    """An unknown or malformed compile target; the message lists the known ones."""


@dataclass(frozen=True)
class Chip:
    """One JAX device of a kind, from its vendor's data sheet: dense peak FLOP/s in bf16 and fp32, HBM bytes and
    HBM bytes/s. `kinds`: substrings of jax's device_kind that name it. A GPU also carries the fields of XLA's
    GpuDeviceInfoProto (`gpu`), from which its compile-only target description is written."""
    name: str
    platform: str  # tpu | gpu
    kinds: tuple[str, ...]
    bf16: float
    fp32: float
    hbm: float
    bandwidth: float
    gpu: dict = field(default_factory=dict)
    topology: str = ""  # a TPU generation's name in libtpu topologies (v5e:2x4)
    cores_per_chip: int = 1  # a TPU name's count (v4-8) counts cores; a v4 / v5p chip has 2 (one JAX device)
    usable: float = 0.0  # HBM a program may plan per device: on TPU the compiler's own limit (0: hbm)
    interconnect: float = 0.0  # bytes/s between chips per chip, the data sheet's figure (ICI; NVLink; PCIe); 0: unknown

    def compute_capability(self) -> str:
        """A GPU's, e.g. "9.0" ("" for a TPU)."""
        return "%d.%d" % self.gpu["cuda_compute_capability"] if self.gpu else ""

    def memory(self) -> float:
        """The bytes a compiled program may use per device. On GPUs, jax preallocates a fraction of HBM
        (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75) and allocates from that pool only."""
        if self.platform == "gpu":
            return self.hbm * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return self.usable or self.hbm


T, G = 1e12, 1e9
GIB = 1 << 30


def _gpu(sms, cc, clock_ghz, l2_mb, smem_optin, smem_core, threads_core, fpus, memory, bandwidth):
    """The GpuDeviceInfoProto fields XLA's GPU compiler reads (names as in xla/stream_executor's proto)."""
    return dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                shared_memory_per_core=smem_core, threads_per_core_limit=threads_core, core_count=sms,
                fpus_per_core=fpus, block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=int(bandwidth), l2_cache_size=l2_mb << 20, clock_rate_ghz=clock_ghz,
                device_memory_size=int(memory), shared_memory_per_block_optin=smem_optin,
                cuda_compute_capability=cc, registers_per_core_limit=65536, registers_per_block_limit=65536)


# Data sheets: Google Cloud's TPU system architecture pages (per chip; a v2 / v3 JAX device is one core, half a
# chip; `usable`: the HBM libtpu's compiler allows a program, read from its RESOURCE_EXHAUSTED message), NVIDIA's
# H100 / H200 / A100 / L4 / T4 data sheets (SXM parts; dense, without sparsity). Memory sizes of the GPUs are what
# the driver reports (a little under the marketed GB). `interconnect`: the TPU pages' ICI bandwidth per chip (v4 2400,
# v5e 1600, v5p 4800, v6e 3584 Gbps), NVIDIA's NVLink per GPU (H100 / H200 900, A100 600 GB/s), PCIe for the L4
# (Gen4 x16, 64 GB/s) and the T4 (Gen3 x16, 32 GB/s); all both directions together, as the sheets quote them.
CHIPS = {
    "v2": Chip("TPU v2", "tpu", ("TPU v2",), 22.5 * T, 22.5 * T, 8 * GIB, 350 * G),
    "v3": Chip("TPU v3", "tpu", ("TPU v3",), 61.5 * T, 61.5 * T, 16 * GIB, 450 * G),
    "v4": Chip("TPU v4", "tpu", ("TPU v4",), 275 * T, 275 * T, 32 * GIB, 1228 * G, topology="v4", cores_per_chip=2,
               usable=30.75 * GIB, interconnect=300 * G),
    "v5e": Chip("TPU v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 197 * T, 197 * T, 16 * GIB, 819 * G, topology="v5e",
                usable=15.75 * GIB, interconnect=200 * G),
    "v5p": Chip("TPU v5p", "tpu", ("TPU v5p", "TPU v5"), 459 * T, 459 * T, 96 * GIB, 2765 * G, topology="v5p",
                cores_per_chip=2, usable=95.74 * GIB, interconnect=600 * G),
    "v6e": Chip("TPU v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 918 * T, 918 * T, 32 * GIB, 1640 * G, topology="v6e",
                usable=31.25 * GIB, interconnect=448 * G),
    "h100": Chip("NVIDIA H100 80GB HBM3", "gpu", ("H100",), 989 * T, 67 * T, 84929347584, 3.35e12,
                 _gpu(132, (9, 0), 1.98, 50, 232448, 233472, 2048, 128, 84929347584, 3.35e12), interconnect=900 * G),
    "h200": Chip("NVIDIA H200", "gpu", ("H200",), 989 * T, 67 * T, 150754820096, 4.8e12,
                 _gpu(132, (9, 0), 1.98, 50, 232448, 233472, 2048, 128, 150754820096, 4.8e12), interconnect=900 * G),
    "a100": Chip("NVIDIA A100-SXM4-80GB", "gpu", ("A100-SXM4-80GB", "A100 80GB"), 312 * T, 19.5 * T, 85167464448,
                 2.039e12, _gpu(108, (8, 0), 1.41, 40, 166912, 167936, 2048, 64, 85167464448, 2.039e12),
                 interconnect=600 * G),
    "a100-40g": Chip("NVIDIA A100-SXM4-40GB", "gpu", ("A100",), 312 * T, 19.5 * T, 42505273344, 1.555e12,
                     _gpu(108, (8, 0), 1.41, 40, 166912, 167936, 2048, 64, 42505273344, 1.555e12),
                     interconnect=600 * G),
    "l4": Chip("NVIDIA L4", "gpu", ("L4",), 121 * T, 30.3 * T, 24152899584, 300 * G,
               _gpu(58, (8, 9), 2.04, 48, 101376, 102400, 1536, 128, 24152899584, 300 * G), interconnect=64 * G),
    "t4": Chip("Tesla T4", "gpu", ("T4",), 65 * T, 8.1 * T, 15843000320, 320 * G,
               _gpu(40, (7, 5), 1.59, 4, 65536, 65536, 1024, 64, 15843000320, 320 * G), interconnect=32 * G),
}
CUDA_RUNTIME, CUDNN = (12, 8, 0), (9, 8)  # what the described GPUs run: jax[cuda12]'s CUDA and cuDNN wheels
# a TPU slice's chips -> its topology, 2-D (v5e, v6e) and 3-D (v4, v5p) tori
TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
EXAMPLES = ("tpu:v5e-8", "tpu:v4-8", "tpu:v5p-8", "tpu:v5e-256", "tpu:v5e-1", "gpu:h100", "gpu:h100x8",
            "gpu:h200x8", "gpu:a100x8", "gpu:a100-40g", "gpu:l4", "gpu:t4")


def chip_of(device_kind: str) -> Chip | None:
    """The table's chip for a jax device_kind (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"), None if unknown."""
    for chip in CHIPS.values():  # whole words ("L4" is not "L40S", "TPU v5" not "TPU v5p"); 80GB before 40GB
        if any(re.search(rf"(?<![\w-]){re.escape(k)}(?!\w)", device_kind, re.I) for k in chip.kinds):
            return chip
    return None


def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfigProto, in text form, describing `chip` to the GPU compiler."""
    info = dict(chip.gpu)
    major, minor = info.pop("cuda_compute_capability")
    lines = [f"  {k}: {v}" for k, v in info.items()]
    lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} }}")
    rt = CUDA_RUNTIME
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n"
            f"runtime_version {{ major: {rt[0]} minor: {rt[1]} patch: {rt[2]} }}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {CUDNN[0]} minor: {CUDNN[1]} }}\n"
            f'device_description_str: "{chip.name}"\n')


@dataclass(frozen=True)
class Target:
    """A compile target: `count` devices of `chip` (a GPU host, or a TPU slice named as Google names it)."""
    spec: str
    chip: Chip
    count: int
    topology: str

    def devices(self) -> list:
        """Its compile-only devices: XLA compiles for them on this host, nothing runs. Needs libtpu (TPU) or the
        CUDA plugin (GPU): `pip install -r requirements-aot.txt`."""
        try:
            if self.chip.platform == "tpu":
                # a v4 chip is one JAX device (megacore), as on a real v4; one chip is its own host
                kw = dict(chip_config_name="megacore") if self.chip.cores_per_chip == 2 else {}
                kw.update(chips_per_host_bounds=(1, 1, 1)) if self.count == 1 else None
                topo = topologies.get_topology_desc(platform="tpu", topology_name=self.topology, **kw)
            else:
                topo = topologies.get_topology_desc(self.spec, "cuda", target_config=gpu_target_config(self.chip),
                                                    topology=self.topology)
        except Exception as e:  # jax raises RuntimeError or ValueError, by plugin; the cause is kept in the message
            need = "libtpu (jax[tpu])" if self.chip.platform == "tpu" else "the CUDA plugin (jax[cuda12])"
            how = "pip install -r requirements-aot.txt" if sys.platform == "linux" else \
                f"they ship for Linux only (requirements-aot.txt skips them on {sys.platform}): compile on a Linux host"
            raise TargetError(f"cannot make compile-only devices for {self.spec}: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:300]}; it needs {need} of jax "
                              f"{jax.__version__}: {how}") from e
        return list(topo.devices)


def target(spec: str) -> Target:
    """`tpu:<generation>-<n>` (Google's slice names: v5e-8 is 8 chips, v4-8 and v5p-8 are 8 cores on 4 chips) or
    `gpu:<chip>[x<n>]` (n GPUs on one host, default 1)."""
    kind, _, name = str(spec).partition(":")
    known = f"known chips: tpu {[k for k, c in CHIPS.items() if c.topology]}, gpu " \
            f"{[k for k, c in CHIPS.items() if c.platform == 'gpu']}; e.g. {', '.join(EXAMPLES)}"
    if kind == "tpu":
        gen, _, n = name.rpartition("-")
        chip = CHIPS.get(gen)
        if chip is None or not chip.topology or not n.isdigit():
            raise TargetError(f"aot.target={spec!r} names no TPU slice; {known}")
        chips, torus = int(n) // chip.cores_per_chip, TORUS_3D if chip.cores_per_chip == 2 else TORUS_2D
        if int(n) % chip.cores_per_chip or chips not in torus:
            raise TargetError(f"aot.target={spec!r}: no {gen} slice of {n}; sizes: "
                              f"{[c * chip.cores_per_chip for c in torus]}")
        return Target(spec, chip, chips, f"{chip.topology}:{torus[chips]}")
    if kind == "gpu":
        gpu, _, n = name.rpartition("x") if name.rpartition("x")[2].isdigit() else (name, "", "1")
        chip = CHIPS.get(gpu)
        if chip is None or chip.platform != "gpu" or not 1 <= int(n) <= 64:
            raise TargetError(f"aot.target={spec!r} names no GPU host; {known}")
        return Target(spec, chip, int(n), f"1x1x{n}")
    raise TargetError(f"aot.target={spec!r}: write tpu:<slice> or gpu:<chip>[x<n>]; {known}")


def here() -> Target | None:
    """The accelerators this process runs on, as a Target (None on CPU, or on a chip the table lacks)."""
    devices = jax.devices()
    chip = chip_of(devices[0].device_kind)
    if devices[0].platform == "cpu" or chip is None:
        return None
    return Target(devices[0].device_kind, chip, len(devices), "")
