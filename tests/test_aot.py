"""Ahead-of-time compilation for the chips picojax targets (aot.py, chips.py): the run's own programs compiled by
XLA's TPU and GPU compilers for compile-only devices on this CPU host. Needs requirements-aot.txt (libtpu, the CUDA
plugin); without it these tests skip, except in CI, where they fail."""
import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import aot
import chips
import config
import relora
import traffic
import train
import train_state
from conftest import ROOT

AOT_TINY = [  # small enough to compile in seconds; seq 128 and head dim 32 as the TPU kernel takes them
    "model.vocab_size=512", "model.seq_len=128", "model.d_model=128", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.dtype=bfloat16", "data.batch_size=8", "eval.batch_size=8",
]


def compile_target(spec: str):
    """Skip (or in CI fail) when the compiler for spec's chips is not installed."""
    try:
        chips.target(spec).devices()
    except chips.TargetError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must compile for {spec}: {e}")
        if sys.platform != "linux":  # libtpu and the CUDA plugin have Linux wheels only (requirements-aot.txt's markers)
            pytest.skip(f"XLA's TPU and GPU compilers ship for Linux only, not {sys.platform}: {e}")
        pytest.skip(f"needs requirements-aot.txt (pip install -r requirements-aot.txt): {e}")


@pytest.fixture(scope="module", autouse=True)
def host():
    aot.compile_only_host()


def shard_bytes(b: aot.Build) -> int:
    """The state's bytes on one device, from the shardings it was declared with."""
    return aot.shard_bytes(b.state)


@pytest.mark.parametrize("spec, kernel", [("tpu:v5e-4", "splash"), ("gpu:h100x2", "cudnn")])
def test_tiny_run_compiles_sharded_with_its_kernel(spec, kernel):
    compile_target(spec)
    cfg = config.compose("local", [*AOT_TINY, "mesh.fsdp=-1"])
    b = aot.build(cfg, spec)
    n = len(b.mesh.devices.flat)
    assert n == chips.target(spec).count and dict(b.mesh.shape) == {"data": 1, "fsdp": n}
    train = aot.compile_train(b)
    found, calls = aot.attention_in(train.text, b.target.chip.platform)
    # splash: forward, dq and dkv kernels per layer; cuDNN: forward and backward per layer
    assert (found, calls) == (kernel, 3 * 2 if kernel == "splash" else 2 * 2)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(b.state))
    per_device, batch = shard_bytes(b), 8 * 129 * 4 / n
    assert per_device < total / n * 1.1  # FSDP: every matrix split n ways; the norm scales replicated are tiny
    if kernel == "cudnn":  # GPU buffers are not padded: the arguments are the state's shards and the batch's
        assert train.memory.arguments == pytest.approx(per_device + batch, rel=1e-6)
    else:  # TPU tiles pad small arrays
        assert per_device <= train.memory.arguments < 2 * (per_device + batch)
    assert train.memory.aliased > 0.9 * per_device  # the state is donated: its outputs reuse its buffers
    # the yardstick of benchmarks/RESULTS.md: the state, a gradient and the activations no plan can do without
    bound = aot.lower_bound(b)
    assert per_device * 4 / 3 < bound <= train.memory.total, (bound, train.memory)
    assert aot.lower_bound(aot.build(config.compose("local", ["study=lstm_tiny"]), spec)) is None  # decoder only


def test_two_gpus_cudnn_attention_compiles_with_accumulation_and_data_parallel():
    compile_target("gpu:h100x2")
    for mesh in (["mesh.data=2", "mesh.fsdp=1"], ["mesh.data=1", "mesh.fsdp=2"]):
        cfg = config.compose("local", [*AOT_TINY, *mesh, "data.grad_accum=2"])
        train = aot.compile_train(aot.build(cfg, "gpu:h100x2"))
        assert aot.attention_in(train.text, "gpu") == ("cudnn", 4)


@pytest.mark.parametrize("spec", ["tpu:v5e-4", "gpu:h100x2"])
def test_accumulation_plans_at_most_one_gradient_more(spec):
    """data.grad_accum at the same micro-batch (8 sequences): the sums, one gradient per device, and nothing that
    grows with the micro-batch count (each micro-batch's gradient is added as it comes, not kept)."""
    compile_target(spec)
    memory = {}
    for accum in (1, 2, 4):
        b = aot.build(config.compose("local", [*AOT_TINY, f"data.batch_size={8 * accum}"]), spec)
        memory[accum] = aot.compile_train(b, grad_accum=accum).memory
    plan = {accum: m.total for accum, m in memory.items()}
    gradient = shard_bytes(b) / 3  # the state is the parameters and AdamW's two moments, all float32
    assert plan[2] - plan[1] <= gradient, (plan, gradient)
    assert abs(plan[4] - plan[2]) <= 0.01 * gradient, plan
    # counted: the whole state and the sums beside it (the programs' unused arguments are what is on the device)
    assert memory[2].arguments >= 4 * gradient, (memory[2], gradient)


def test_gpu_float32_says_which_attention_it_takes():
    compile_target("gpu:h100")
    r = aot.analyze(config.compose("local", [*AOT_TINY, "model.dtype=float32"]), "gpu:h100", search=False)
    assert r["attention"] == dict(expected="xla", why="auto: cuDNN flash attention needs bf16 / fp16, "
                                  "model.dtype=float32", found="xla", calls=0)
    assert "FALLBACK" not in aot.report(r) and "attention: flash attention in JAX" in aot.report(r)


@pytest.mark.parametrize("spec", ["tpu:v5e-4", "gpu:h100x2"])
def test_flash_attention_in_jax_runs_on_each_devices_rows_of_the_batch(spec):
    """The plain-JAX flash path (model.attention=xla; TPUs at a seq_len the kernel refuses, float32 GPUs) under
    FSDP: every score block is [B / n, K, G, 128, 128] on a device. XLA:TPU left alone computed them for the whole
    batch on every chip (pico medium: 17.3 GiB per v5e chip against 6.8)."""
    compile_target(spec)
    cfg = config.compose("local", [*AOT_TINY, "model.attention=xla", "model.seq_len=256", "data.batch_size=16",
                                   "mesh.fsdp=-1"])
    b = aot.build(cfg, spec)
    train = aot.compile_train(b)
    assert aot.attention_in(train.text, b.target.chip.platform) == ("xla", 0)
    blocks = set(re.findall(r"f32\[(\d+),2,2,128,128\]", train.text))  # [b, K, G, query block, key block]
    assert blocks == {str(16 // len(b.mesh.devices.flat))}, blocks


def test_every_device_computes_only_its_rows_of_the_batch():
    """FSDP splits the work by rows: each device runs the blocks and the fused loss (model.loss_chunk) on its B / n
    sequences, the weights gathered. Left to the partitioner, the 8-GPU -cn gpu program held the whole
    micro-batch's activations on every GPU (16.9 GiB per GPU against 3.3 now), and on TPUs the loss was split
    over D, every chip running every chunk of the batch and all-reducing its float32 [chunk, V] logits."""
    for spec in ("gpu:h100x8", "tpu:v5e-4"):
        compile_target(spec)
    cfg = config.compose("local", [*AOT_TINY, "model.loss_chunk=64", "mesh.fsdp=-1", "data.batch_size=32"])
    temporaries = {spec: aot.compile_train(aot.build(cfg, spec)).memory.temporaries for spec in ("gpu:h100",
                                                                                                  "gpu:h100x8")}
    assert temporaries["gpu:h100x8"] < temporaries["gpu:h100"] / 2, temporaries  # main before: 0.85 of it
    text = aot.compile_train(aot.build(cfg, "tpu:v5e-4")).text
    assert not re.search(r"f32\[64,512\][^ ]* all-reduce", text)  # a loss chunk's logits summed over chips


SHIPPED = [  # every shipped accelerator config on every chip its comment names, with the attention it must hold
    ("tpu", "tpu:v5e-8", "splash"), ("tpu", "tpu:v4-8", "splash"), ("gpu", "gpu:h100", "cudnn"),
    ("gpu", "gpu:h100x2", "cudnn"), ("gpu", "gpu:h100x8", "cudnn"), ("colab", "gpu:t4", "xla"),
    ("colab", "gpu:l4", "cudnn"), ("colab", "gpu:a100-40g", "cudnn"), ("colab", "tpu:v5e-1", "splash")]


@pytest.mark.parametrize("name, spec, kernel", SHIPPED)
def test_shipped_configs_fit_their_chips_as_shipped(name, spec, kernel):
    """-cn tpu / gpu / colab at their real sizes (pico medium at 1024 x 2048 tokens, pico small, pico tiny): the
    train and eval steps fit with at least 10% of the usable memory to spare."""
    compile_target(spec)
    r = aot.analyze(config.compose(name), spec, search=False)
    assert (r["attention"]["expected"], r["attention"]["found"]) == (kernel, kernel)
    assert r["attention"]["calls"] > 0 or kernel == "xla"
    assert r["train"]["error"] is None and r["eval"]["error"] is None
    assert max(r["train"]["total"], r["eval"]["total"]) <= 0.9 * r["memory_limit"], aot.report(r)
    assert "fits: yes" in aot.report(r)


def test_relora_steps_compile_for_tpu_and_gpu():
    lora = ["+model.relora={target_modules: [swiglu, attention], r: 8, reset_frequency: 10, restart_warmup_steps: 2, "
              "warm_start_steps: 5}"]
    for spec, kernel in (("tpu:v5e-4", "splash"), ("gpu:h100x2", "cudnn")):
        compile_target(spec)
        b = aot.build(config.compose("local", [*AOT_TINY, *lora]), spec, wrapped=True)
        assert len(relora.lora_layers(nnx.merge(b.graphdef, b.state)[0])) == 2 * 7  # q k v o gate up down
        train = aot.compile_train(b)
        assert train.memory.error is None and aot.attention_in(train.text, b.target.chip.platform)[0] == kernel


def test_search_finds_the_largest_micro_batch_that_fits(monkeypatch):
    compile_target("gpu:h100")
    cfg = config.compose("local", [*AOT_TINY, "data.batch_size=16"])
    b = aot.build(cfg, "gpu:h100")
    limit = aot.compile_train(b, grad_accum=16).memory.total + 1  # room for micro-batches of one sequence only
    monkeypatch.setitem(chips.CHIPS, "h100", dataclasses.replace(b.target.chip, hbm=limit / 0.75))
    r = aot.analyze(cfg, "gpu:h100")
    assert not r["fits"] and r["largest_micro_batch"]["micro_batch"] == 1
    assert r["largest_micro_batch"]["grad_accum"] == 16
    assert "largest micro-batch that fits: 1 sequences (data.grad_accum=16" in aot.report(r)


def test_bad_targets_and_meshes_are_clear_errors():
    with pytest.raises(chips.TargetError, match=r"names no GPU host; known chips: .*gpu:h100x8"):
        chips.target("gpu:b300")
    with pytest.raises(chips.TargetError, match=r"no v5e slice of 6; sizes: \[1, 4, 8"):
        chips.target("tpu:v5e-6")
    compile_target("tpu:v5e-4")
    with pytest.raises(config.ConfigError, match=r"mesh.data=3 x mesh.fsdp=-1 does not match the 4 devices"):
        aot.build(config.compose("local", [*AOT_TINY, "mesh.data=3"]), "tpu:v5e-4")
    with pytest.raises(config.ConfigError, match=r"model.d_model=100 is not divisible by mesh.fsdp=8"):
        aot.build(config.compose("local", [*AOT_TINY, "model.d_model=100", "model.n_heads=2", "model.n_kv_heads=1",
                                           "data.batch_size=8"]), "tpu:v5e-8")


def test_chip_table_names_the_devices_and_serves_the_mfu_peak():
    assert chips.chip_of("TPU v5 lite").name == "TPU v5e" and chips.chip_of("TPU v5").name == "TPU v5p"
    assert chips.chip_of("NVIDIA A100-SXM4-40GB").hbm < chips.chip_of("NVIDIA A100-SXM4-80GB").hbm
    assert chips.chip_of("NVIDIA L40S") is None and chips.chip_of("cpu") is None
    assert 'core_count: 132' in chips.gpu_target_config(chips.CHIPS["h200"])


def test_main_py_compiles_for_a_target_and_trains_nothing(tmp_path):
    compile_target("gpu:h100x2")
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "aot.target=gpu:h100x2", *AOT_TINY,
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gpu:h100x2: 2 x NVIDIA H100 80GB HBM3" in out.stdout and "fits: yes" in out.stdout
    assert "attention: cuDNN fused attention (4 kernel calls" in out.stdout
    assert re.search(r"lower bound for the train step .*: \d+\.\d\d GiB; the plan is \d+\.\d\dx it", out.stdout)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), "aot.target=tpu:v7-8"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "names no TPU slice; known chips" in bad.stderr


@pytest.mark.parametrize("spec", ["tpu:v5e-4", "gpu:h100x2"])
def test_traffic_counts_each_collective_once_per_run_of_its_loop(spec):
    """traffic.count on a compiled program of known collectives: an all-gather in a loop of 3 trips (its carry in
    the gather, so XLA cannot hoist it) and a reduce-scatter after it (on a TPU, an all-reduce sliced)."""
    compile_target(spec)
    devices = chips.target(spec).devices()
    n, m, k = len(devices), 1024, 2048
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))

    def f(c, big):
        def body(i, c):
            return jax.lax.all_gather(c, "x", tiled=True).reshape(n, m).sum(0) * 0.5 + i
        c = jax.lax.fori_loop(0, 3, body, c)
        return c, jax.lax.psum_scatter(big, "x", tiled=True)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P()), out_specs=(P("x"), P("x"))))
    args = (jax.ShapeDtypeStruct((n * m,), "float32", sharding=NamedSharding(mesh, P("x"))),
            jax.ShapeDtypeStruct((k,), "float32", sharding=NamedSharding(mesh, P())))
    text = g.lower(*args).compile().as_text()
    t = traffic.count(text, n)
    assert t.of("all-gather", "f32") == pytest.approx(3 * n * m * 4 * (n - 1) / n)
    if re.search(r" reduce-scatter(-start)?\(|AllReduceScatterFusion", text):  # a reduce-scatter, or fused as one
        assert t.of("reduce-scatter", "f32") == pytest.approx(k * 4 * (n - 1) / n)
    else:  # XLA:TPU ran this small one as a whole all-reduce, then a slice: twice the bytes
        assert t.of("all-reduce", "f32") == pytest.approx(2 * k * 4 * (n - 1) / n)
    assert t.total == pytest.approx(3 * n * m * 4 * (n - 1) / n + t.of("reduce-scatter") + t.of("all-reduce"))
    assert not t.notes


@pytest.mark.parametrize("name, spec", [("tpu", "tpu:v5e-4"), ("gpu", "gpu:h100x2"), ("gpu", "gpu:h100x8")])
def test_pico_tiny_sends_no_more_than_fsdp_needs_and_sums_gradients_in_float32(name, spec):
    """The shipped config at pico tiny, 4 sequences per chip, one micro-batch: what its train step sends between
    chips (counted from the compiled text, loops weighted by their trips) within 1.15x of FSDP's minimum, and no
    gradient reduced in bfloat16 (before _cast_matmul, XLA:GPU reduce-scattered the block weights' in bf16)."""
    compile_target(spec)
    n = len(chips.target(spec).devices())
    cfg = config.compose(name, ["size=tiny", "data.grad_accum=1", f"data.batch_size={4 * n}", f"eval.batch_size={n}"])
    b = aot.build(cfg, spec)
    s = aot.traffic_summary(aot.compile_train(b), b, 1)
    assert s["total"] <= 1.15 * s["minimum"], s
    assert s["bf16_reductions"] == 0 and not s["notes"], s


def test_two_compile_only_processes_run_at_once_and_quietly(tmp_path):
    """libtpu's one-process lockfile does not stop a second compile-only process (aot.compile_only_host), and
    libtpu says nothing of the TPU VM it is not on."""
    compile_target("tpu:v5e-1")
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_MULTIPLE_LIBTPU_LOAD", "JAX_PLATFORMS")}
    runs = [subprocess.Popen([sys.executable, str(ROOT / "main.py"), "aot.target=tpu:v5e-1", "aot.search=false",
                              *AOT_TINY, f"run_dir={tmp_path / str(i)}"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for i in range(2)]
    for r in runs:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-3000:]
        assert "fits: yes" in out
        assert not any(w in out + err for w in ("libtpu_lockfile", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE",
                                                "Traceback"))


def test_trainer_checks_memory_before_its_first_step_on_an_accelerator(tiny_cfg, monkeypatch):
    """What the trainer does on a chip of the table, played on CPU with a chip of a few MB: the compiled steps'
    memory against it, and a clear error naming the largest micro-batch that fits, before any step runs."""
    cfg = tiny_cfg("data.batch_size=16")
    small = chips.Chip("a small chip", "tpu", ("small",), 1e12, 1e12, 0, 1e11)
    monkeypatch.setattr(chips, "here", lambda: chips.Target("cpu", dataclasses.replace(small, hbm=1e12), 8, ""))
    assert "memory per device (compiled): train step" in train.Trainer(cfg).memory_note
    one = aot.compile_train(aot.Build(cfg, chips.Target("cpu", small, 8, ""), *_built(cfg)), grad_accum=2)
    limit = one.memory.total + 1  # micro-batches of 8 sequences fit, 16 do not
    monkeypatch.setattr(chips, "here", lambda: chips.Target("cpu", dataclasses.replace(small, hbm=limit), 8, ""))
    with pytest.raises(config.ConfigError, match=r"does not fit: .* the largest micro-batch that fits is 8 "
                                                 r"sequences: data.grad_accum=2; knobs"):
        train.Trainer(cfg)


def test_grad_accum_auto_takes_the_fewest_micro_batches_that_fit(tiny_cfg, monkeypatch):
    """data.grad_accum=auto on a chip (played on CPU with a chip of a few MB, as above): 1 where the whole batch fits
    with 10% to spare, else the fewest micro-batches that do; 1 without an accelerator."""
    cfg = tiny_cfg("data.batch_size=32")
    small = chips.Chip("a small chip", "tpu", ("small",), 1e12, 1e12, 0, 1e11)
    two = aot.compile_train(aot.Build(cfg, chips.Target("cpu", small, 8, ""), *_built(cfg)), grad_accum=2)
    for hbm, chosen in ((1e12, 1), (two.memory.total / 0.9 + 1, 2)):  # 2 x 16 fits just, with 10% to spare
        here = chips.Target("cpu", dataclasses.replace(small, hbm=hbm), 8, "")
        monkeypatch.setattr(chips, "here", lambda: here)
        trainer = train.Trainer(tiny_cfg("data.batch_size=32", "data.grad_accum=auto"))
        assert trainer.cfg.data.grad_accum == chosen and trainer.train_step.grad_accum == chosen
        assert f"data.grad_accum=auto: {chosen} (micro-batches of {32 // chosen} sequences)" in trainer.accum_note
    monkeypatch.setattr(chips, "here", lambda: None)
    trainer = train.Trainer(tiny_cfg("data.batch_size=32", "data.grad_accum=auto"))
    assert trainer.cfg.data.grad_accum == 1 and "no accelerator here" in trainer.accum_note


def _built(cfg):
    mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    mcfg, plan, _, graphdef, state = train_state.build(cfg, mesh, abstract=True)
    return mesh, mcfg, plan, graphdef, state
