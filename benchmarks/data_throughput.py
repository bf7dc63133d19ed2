"""Host time per training batch from parquet shards in pico's schema, against the .bin path.

    python benchmarks/data_throughput.py                        # pico's B=1024 x 2049, two shards of 20,480 rows
    python benchmarks/data_throughput.py --batch 16 --seq 128 --rows 4096   # the local CPU config's batch

Writes shards of random ids (`input_ids`, list<int32>, as pyarrow writes them, one row group per 1,024 rows) into a
temporary folder, then times `TrainData.rows(step)` (what the prefetch thread does per step: find the rows, decode
the row groups, gather) over every step of the shards, in both orders, and the same batch from a .bin file.
Reported: median and worst ms per batch; compare with the step time (the prefetch thread builds batches two steps
ahead, so a batch costs the step nothing while it takes less than a step).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=20480, help="rows per shard")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50304)
    a = p.parse_args()
    L = a.seq + 1
    d = OmegaConf.create(dict(column="input_ids", token_dtype="uint16", cache_dir="~/.cache/picojax",
                              cache_max_gb=1, prefetch_shards=2, hf_endpoint=None))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for i in range(a.shards):
            ids = rng.integers(0, a.vocab, (a.rows, L), dtype=np.int32)
            offsets = pa.array(np.arange(0, ids.size + 1, L, dtype=np.int32))
            col = pa.ListArray.from_arrays(offsets, pa.array(ids.ravel()))
            pq.write_table(pa.table({"input_ids": col}), tmp / f"train-{i:05d}-of-{a.shards:05d}.parquet",
                           row_group_size=1024)
        ids.astype(np.uint16).tofile(tmp / "train.bin")  # the last shard's ids as a .bin file, for the baseline
        print(f"wrote {a.shards} shards of {a.rows} x {L} ids in {time.perf_counter() - t0:.1f} s "
              f"({sum(f.stat().st_size for f in tmp.glob('*.parquet')) / 2 ** 20:.0f} MiB)")
        shards = data.open_source(tmp, "train", d, a.vocab, a.seq)
        binary = data.BinRows(np.memmap(tmp / "train.bin", np.uint16, "r"), a.seq, a.vocab, tmp / "train.bin")
        for name, source, order in (("parquet sequential", shards, "sequential"),
                                    ("parquet shuffled", shards, "shuffled"),
                                    (".bin shuffled", binary, "shuffled")):
            td = data.TrainData(source, 0, a.batch, order)
            steps = max(1, min(source.n_rows // a.batch, 64))
            times = []
            for s in range(steps):
                t = time.perf_counter()
                td.rows(s)
                times.append(time.perf_counter() - t)
            ms = np.array(times) * 1e3
            print(f"{name:20s} B={a.batch} x {L}: median {np.median(ms):7.1f} ms/batch, worst {ms.max():7.1f} ms "
                  f"({steps} steps)")


if __name__ == "__main__":
    main()
