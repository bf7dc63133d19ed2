"""The data pipeline and the training loop, end to end on the built-in corpus."""
import json
import subprocess
import sys

import numpy as np

import data
import prepare
import train
from conftest import ROOT


def test_builtin_corpus_is_real_text_with_subword_tokens_and_reused(corpus_cache):
    out = data.builtin_corpus(corpus_cache)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 4096 and meta["train_tokens"] > 500_000
    tokens = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    text = prepare.load_tokenizer(out / "tokenizer.json").decode(tokens[:200].tolist())
    assert "Anarchism is a political philosophy" in text
    assert len(text) / 200 > 3  # subword tokens: several characters each
    mtime = (out / "train.bin").stat().st_mtime_ns
    data.builtin_corpus(corpus_cache)  # second use: nothing rebuilt
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert 6 < data.unigram_entropy(tokens, 4096) < 8


def test_prepare_cli_with_trained_bpe_and_with_a_tokenizer_file(tmp_path, corpus_cache):
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i) for i in range(30)]
    src = tmp_path / "a.txt"
    src.write_text("\n\n\n".join(docs))
    subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--out", str(tmp_path / "bpe"),
                    "--vocab-size", "300", str(src)], check=True, capture_output=True)
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    train_ids = np.fromfile(tmp_path / "bpe" / "train.bin", dtype=np.uint16)
    valid_ids = np.fromfile(tmp_path / "bpe" / "valid.bin", dtype=np.uint16)
    assert len(train_ids) == meta["train_tokens"] and len(valid_ids) == meta["valid_tokens"] > 0
    tok = prepare.load_tokenizer(tmp_path / "bpe" / "tokenizer.json")
    assert tok.decode(valid_ids.tolist()).startswith("Document 19.")  # every 20th document is held out
    # an existing tokenizer.json (here the built-in corpus's) instead of training one
    prepare.main(["--out", str(tmp_path / "file"), "--tokenizer",
                  str(data.builtin_corpus(corpus_cache) / "tokenizer.json"), str(src)])
    ids = np.fromfile(tmp_path / "file" / "train.bin", dtype=np.uint16)
    text = prepare.load_tokenizer(tmp_path / "file" / "tokenizer.json").decode(ids[:50].tolist())
    assert ids.max() < 4096 and "quick brown fox" in text


def test_batch_is_a_pure_function_of_seed_and_step(corpus_cache):
    tokens = data.open_tokens(data.builtin_corpus(corpus_cache) / "train.bin", "uint16", 4096, 64)
    a, b = data.TrainData(data.BinRows(tokens, 64, 4096), 0, 8), data.TrainData(data.BinRows(tokens, 64, 4096), 0, 8)
    np.testing.assert_array_equal(a.rows(7), b.rows(7))
    assert not np.array_equal(a.rows(7), a.rows(8))
    assert not np.array_equal(a.rows(7), data.TrainData(data.BinRows(tokens, 64, 4096), 1, 8).rows(7))
    # one epoch visits every chunk exactly once
    small = data.TrainData(data.BinRows(tokens[:64 * 40 + 1], 64, 4096), 0, 8)
    starts = np.concatenate([small.rows(s)[:, 0] for s in range(5)])
    assert sorted(starts) == sorted(tokens[:64 * 40:64])


def test_tiny_model_validation_loss_falls_on_builtin_corpus(tiny_cfg, capsys):
    cfg = tiny_cfg("train.steps=40", "train.log_every=20", "opt.peak_lr=1e-2", "opt.warmup_steps=5",
                   "sample.max_new_tokens=8")
    trainer = train.Trainer(cfg)
    before = trainer.evaluate()["val_loss"]
    final = trainer.run()
    assert final["val_loss"] < before - 1.0, (before, final)
    assert capsys.readouterr().out.count("sample: 'The") == 1
    compiles = {k: p._cache_size() for k, p in trainer.train_step.programs.items()}
    assert compiles == dict(step=1)  # 40 steps, one compile: the state keeps its shardings
    assert final["val_loss"] < final["unigram_entropy"] + 0.5
    metrics = json.loads((trainer.run_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [20, 40]
    for key in ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert np.isfinite(metrics["history"][-1][key]), key
