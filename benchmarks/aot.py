"""The chips table of benchmarks/RESULTS.md: the pico sizes compiled ahead of time for the chips picojax targets.

    python benchmarks/aot.py                                     # every size on every target (hours on 2 cores)
    python benchmarks/aot.py --sizes tiny,small --targets gpu:h100,tpu:v5e-8
    python benchmarks/aot.py --sizes medium --targets tpu:v5e-8 model.remat=block   # overrides after the flags
    python benchmarks/aot.py --per-chip 4 --targets tpu:v5e-8,gpu:h100   # plan against aot.lower_bound, no search

Each point is `-cn tpu` (TPU targets) or `-cn gpu` (GPU targets) with size=NAME, model.seq_len=2048 and a global
batch of 1024 sequences, compiled by aot.py for the target's compile-only devices: the largest micro-batch whose
train step fits (bisection over compiles; data.grad_accum = 1024 / micro-batch), that step's memory per chip, the
eval step's, the roofline bound's MFU ceiling, and the compile time of one train step. The mesh is all FSDP, except
where d_model does not divide the chip count (pico tiny on a v5e-256): FSDP over their greatest common divisor, data
parallel over the rest. These are the compiler's plans, not measured step times: a lent device's first run should
compare them. Needs requirements-aot.txt. One row of Markdown per point as it finishes, then one JSON line with them
all.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import aot  # noqa: E402
import chips  # noqa: E402
import config  # noqa: E402

SIZES = ("tiny", "small", "medium", "large", "1b")
TARGETS = ("gpu:h100", "gpu:h100x8", "gpu:h200x8", "tpu:v4-8", "tpu:v5e-8", "tpu:v5p-8", "tpu:v5e-256")


def built(size: str, spec: str, batch: int, overrides) -> aot.Build:
    """`size` at seq 2048 and `batch` sequences in one micro-batch, as -cn tpu / -cn gpu would run it on `spec`."""
    tgt = chips.target(spec)
    cfg = config.compose(tgt.chip.platform, [f"size={size}", "model.seq_len=2048", f"data.batch_size={batch}",
                                             "data.grad_accum=1", f"eval.batch_size={tgt.count}", *overrides])
    fsdp = math.gcd(tgt.count, cfg.model.d_model)
    if fsdp != tgt.count and cfg.mesh.fsdp == -1:  # e.g. pico tiny (d_model 96) on a v5e-256: FSDP over 32, data 8
        cfg.mesh.fsdp, cfg.mesh.data = fsdp, tgt.count // fsdp
    return aot.build(cfg, spec)


def point(size: str, spec: str, overrides) -> dict:
    b = built(size, spec, 1024, overrides)
    t = time.perf_counter()
    micro, train, n = aot.largest_micro_batch(b)
    row = dict(size=size, target=spec, micro_batch=micro, compiles=n, search_s=time.perf_counter() - t)
    if train is not None:
        evaluate = aot.compile_eval(b)
        rf = aot.roofline(train, b, 1024 // micro)
        found, calls = aot.attention_in(train.text, b.target.chip.platform)
        row.update(grad_accum=1024 // micro, train_gib=train.memory.total / aot.GIB,
                   eval_gib=evaluate.memory.total / aot.GIB, usable_gib=b.target.chip.memory() / aot.GIB,
                   mfu_max=rf["mfu_max"], step_s_min=rf["step_s_min"], compile_s=train.seconds,
                   attention=f"{found} x{calls}")
    return row


def bound_point(size: str, spec: str, per_chip: int, overrides) -> dict:
    """The train step at `per_chip` sequences per chip (grad_accum 1, no search) against aot.lower_bound."""
    b = built(size, spec, per_chip * chips.target(spec).count, overrides)
    train, bound = aot.compile_train(b), aot.lower_bound(b)
    m = train.memory
    return dict(size=size, target=spec, per_chip=per_chip, train_gib=m.total / aot.GIB,
                arguments_gib=m.arguments / aot.GIB, temporaries_gib=m.temporaries / aot.GIB,
                bound_gib=bound / aot.GIB, ratio=m.total / bound, compile_s=train.seconds, error=m.error)


def bound_markdown(r: dict) -> str:
    if r["error"]:
        return f"| {r['size']} | {r['target']} | {r['per_chip']} | refused by the compiler: {r['error']} | | | |"
    return (f"| {r['size']} | {r['target']} | {r['per_chip']} | {r['train_gib']:.2f} ({r['arguments_gib']:.2f} + "
            f"{r['temporaries_gib']:.2f}) | {r['bound_gib']:.2f} | {r['ratio']:.2f}x | {r['compile_s']:.0f} s |")


def markdown(r: dict) -> str:
    if r.get("micro_batch") is None:
        return f"| {r['size']} | {r['target']} | no micro-batch fits | | | | | |"
    return (f"| {r['size']} | {r['target']} | {r['micro_batch']} (accum {r['grad_accum']}) | "
            f"{r['train_gib']:.2f} / {r['usable_gib']:.2f} | {r['eval_gib']:.2f} | {r['mfu_max']:.0%} | "
            f"{r['attention']} | {r['compile_s']:.0f} s |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--per-chip", type=int, default=0, help="instead of the search: the train step at this many "
                   "sequences per chip, its plan against aot.lower_bound")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every point, e.g. model.remat=block")
    a = p.parse_args(argv)
    aot.compile_only_host()
    if a.per_chip:
        header = ("| size | target | sequences per chip | train GiB per chip (arguments + temporaries) | lower bound GiB "
                  "| plan / bound | compile |")
        measure, row = (lambda size, spec: bound_point(size, spec, a.per_chip, a.overrides)), bound_markdown
    else:
        header = ("| size | target | largest micro-batch | train GiB / usable per chip | eval GiB | MFU ceiling | "
                  "attention | compile (one train step) |")
        measure, row = (lambda size, spec: point(size, spec, a.overrides)), markdown
    print(header)
    print("|---" * header.count(" | ") + "|---|", flush=True)
    rows = []
    for size in a.sizes.split(","):
        for spec in a.targets.split(","):
            rows.append(measure(size, spec))
            print(row(rows[-1]), flush=True)
    print(json.dumps(dict(points=rows)))


if __name__ == "__main__":
    main()
