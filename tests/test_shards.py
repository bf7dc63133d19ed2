"""Parquet token shards in pico's schema (one list column of seq_len + 1 ids per row): both orders, resume as a pure
function of the step, validation and the learning-dynamics batch from shards, a Hub dataset through a local
stand-in (a download that fails then succeeds, a bounded cache), and the bad-input errors."""
import huggingface_hub
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from omegaconf import OmegaConf

import data
import snapshots
import train
from config import DataError
from hub_standin import Hub

T, V, ROWS, GROUP = 32, 4096, 40, 16  # seq_len, vocab, rows per shard, rows per row group


def write_shard(path, ids, column="input_ids"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(list(ids), pa.list_(pa.int32()))}), path, row_group_size=GROUP)


def pico_folder(root, n_shards=3, seed=0, val_rows=24):
    """data/train-0000i-of-0000n.parquet and data/val-00000-of-00001.parquet; returns (train rows, val rows)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, V, (n_shards * ROWS, T + 1), dtype=np.int32)
    for i in range(n_shards):
        write_shard(root / "data" / f"train-{i:05d}-of-{n_shards:05d}.parquet", rows[i * ROWS:(i + 1) * ROWS])
    val = rng.integers(0, V, (val_rows, T + 1), dtype=np.int32)
    write_shard(root / "data" / "val-00000-of-00001.parquet", val)
    return rows, val


def dcfg(**kw):
    return OmegaConf.create(dict(dict(token_dtype="uint16", column="input_ids", cache_dir="~/.cache/picojax",
                                      cache_max_gb=1.0, prefetch_shards=2, hf_endpoint=None), **kw))


def test_sequential_order_is_pico_trains_rows_and_a_pure_function_of_the_step(tmp_path):
    rows, val = pico_folder(tmp_path)
    src = data.open_source(tmp_path, "train", dcfg(), V, T)
    assert src.n_rows == len(rows) and src.n_tokens == rows.size
    B = 12  # batches cross shard and row-group boundaries, and the end of the data (120 rows: step 10 wraps)
    seq = data.TrainData(src, 0, B, "sequential")
    for step in (0, 3, 4, 9, 10, 13):
        g = (step * B + np.arange(B)) % len(rows)
        np.testing.assert_array_equal(seq.rows(step), rows[g])
    fresh = data.TrainData(data.open_source(tmp_path, "train", dcfg(), V, T), 0, B, "sequential")
    np.testing.assert_array_equal(fresh.rows(13), seq.rows(13))  # resume mid-shard: no replay of earlier steps
    np.testing.assert_array_equal(fresh.rows(3, 5, 9), rows[3 * B + 5:3 * B + 9])  # a process reads only its rows
    shuffled = data.TrainData(src, 7, B, "shuffled")
    epoch = np.concatenate([shuffled.rows(s) for s in range(len(rows) // B)])  # one epoch: every row once
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, rows))
    assert not np.array_equal(epoch, rows)
    # the global batch on 8 devices is the same rows
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # 12 rows: 3 per device
    np.testing.assert_array_equal(np.asarray(seq.batch(4, NamedSharding(mesh, P("data", None)))), seq.rows(4))
    np.testing.assert_array_equal(data.open_source(tmp_path, "valid", dcfg(), V, T).read(np.arange(24)), val)


def test_a_run_trains_on_shards_with_validation_and_the_dynamics_batch_from_shards(tiny_cfg, tmp_path):
    rows, val = pico_folder(tmp_path / "d")
    eval_rows = np.random.default_rng(5).integers(0, V, (16, T + 1), dtype=np.int32)
    write_shard(tmp_path / "tinsy" / "val-00000-of-00001.parquet", eval_rows)
    cfg = tiny_cfg(f"data.dir={tmp_path / 'd'}", "data.order=sequential", "train.steps=2", "checkpoint.every_steps=1",
                   f"checkpoint.dynamics.eval_data={tmp_path / 'tinsy'}", "checkpoint.dynamics.layers=[attention.v]")
    trainer = train.Trainer(cfg)
    np.testing.assert_array_equal(trainer.train_data.rows(1), rows[16:32])
    final = trainer.run()
    assert np.isfinite(final["val_loss"])
    s = snapshots.load(tmp_path / "run", 1)
    np.testing.assert_array_equal(s[("train", "tokens", None)], rows[16:32])  # the batch of step 1 (next update)
    assert s[("eval", "activations", "blocks.0.attention.v")].shape[0] == cfg.eval.batch_size
    assert "tinsy" in trainer.saver.dynamics_rows.path and trainer.saver.dynamics_rows.n_rows == 16
    np.testing.assert_array_equal(trainer.valid_rows.read(np.arange(24)), val)  # the folder's val shard


def test_bad_shards_are_named_with_the_fix(tmp_path):
    ids = np.zeros((ROWS, T + 1), np.int32)
    cases = {
        "column": (lambda r: write_shard(r / "train-00000-of-00001.parquet", ids, column="tokens"),
                   r"no column 'input_ids' \(its columns: \['tokens'\]\); set data.column"),
        "length": (lambda r: write_shard(r / "train-00000-of-00001.parquet", np.zeros((ROWS, T), np.int32)),
                   rf"a row holds {T} ids .* not model.seq_len \+ 1 = {T + 1}; set model.seq_len={T - 1}"),
        "vocab": (lambda r: write_shard(r / "train-00000-of-00001.parquet", ids + V),
                  rf"contains token id {V} >= model.vocab_size={V}"),
        "corrupt": (lambda r: (r.mkdir(), (r / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not parquet")),
                    "is not a readable parquet file .* truncated or corrupt"),
        "gap": (lambda r: [write_shard(r / f"train-{i:05d}-of-00003.parquet", ids) for i in (0, 2)],
                "shard 1 of 3 is missing"),
    }
    for name, (make, message) in cases.items():
        make(tmp_path / name)
        with pytest.raises(DataError, match=message):
            data.open_source(tmp_path / name, "train", dcfg(), V, T)


def test_a_hub_dataset_is_fetched_ahead_retried_and_cached_within_its_bound(tmp_path, monkeypatch):
    rows, val = pico_folder(tmp_path / "src", n_shards=4)
    hub = Hub()
    try:
        hub.add_dataset("pico-lm/toks", {str(p.relative_to(tmp_path / "src")): p.read_bytes()
                                         for p in (tmp_path / "src").rglob("*.parquet")})
        hub.fail_files["data/train-00002-of-00004.parquet"] = 1  # fails once, then succeeds
        shard_mb = (tmp_path / "src" / "data" / "train-00000-of-00004.parquet").stat().st_size / 2 ** 20
        d = dcfg(cache_dir=str(tmp_path / "cache"), cache_max_gb=2.5 * shard_mb / 1024, hf_endpoint=hub.url,
                 prefetch_shards=1)
        src = data.open_source("hf://datasets/pico-lm/toks", "train", d, V, T)
        seq = data.TrainData(src, 0, 20, "sequential")
        got = np.concatenate([seq.rows(s) for s in range(8)])  # 160 rows: all four shards, in order
        np.testing.assert_array_equal(got, rows)
        assert hub.downloads.count("data/train-00002-of-00004.parquet") == 2  # retried
        cached = sorted(p.name for p in (tmp_path / "cache" / "hub" / "pico-lm--toks").rglob("*.parquet"))
        assert len(cached) <= 2 and "train-00003-of-00004.parquet" in cached  # the oldest evicted
        np.testing.assert_array_equal(data.open_source("hf://datasets/pico-lm/toks", None, d, V, T).read([0, 23]),
                                      val[[0, 23]])
        full = dcfg(cache_dir=str(tmp_path / "full"), hf_endpoint=hub.url)  # a cache that holds every shard
        data.open_source("hf://datasets/pico-lm/toks", "train", full, V, T).read(np.arange(len(rows)))
    finally:
        hub.close()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # offline (or the Hub down), a filled cache opens as it did: its listing is kept beside the shards
    again = data.open_source("hf://datasets/pico-lm/toks", "train", full, V, T)
    np.testing.assert_array_equal(data.TrainData(again, 0, len(rows), "sequential").rows(0), rows)
    # without one: a clear error naming the ways out, no traceback
    with pytest.raises(DataError, match=r"(?s)pico-lm/toks could not be listed .*`hf download pico-lm/toks "
                                        r"--repo-type dataset .* set data.dir=DIR.*data.hf_endpoint.*fill the cache"):
        data.open_source("hf://datasets/pico-lm/toks", "train", dcfg(cache_dir=str(tmp_path / "none")), V, T)
