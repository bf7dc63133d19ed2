"""prepare.py: text in every format it reads gives the same tokens; worker processes give the same bytes; memory
stays flat in the input's size; bad input fails without leaving a half-written dataset."""
import gzip
import json
import lzma
import resource
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import prepare
from config import DataError
from conftest import ROOT

DOCS = [(f"Document {i}. " + "The quick brown fox jumps over the lazy dog.\n\nA second paragraph. " * (3 + i % 5))
        .strip() for i in range(45)]


def tokens(out):
    return [np.fromfile(out / f, np.uint16) for f in ("train.bin", "valid.bin")]


def test_every_input_format_gives_the_same_tokens_and_workers_the_same_bytes(tmp_path, corpus_cache):
    tok = str(data.builtin_corpus(corpus_cache) / "tokenizer.json")
    txt = "\n\n\n".join(DOCS)
    (tmp_path / "a.txt").write_text(txt)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write(txt)
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write(txt)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"story": DOCS}), tmp_path / "a.parquet")
    want = tokens(prepare.prepare([tmp_path / "a.txt"], tmp_path / "txt", tok, workers=0))
    assert len(want[1]) and len(want[0]) > 5 * len(want[1])  # documents 20 and 40 held out
    for name, kw in (("a.txt.gz", {}), ("a.txt.xz", {}), ("a.jsonl", {}), ("a.parquet", dict(text_key="story"))):
        got = tokens(prepare.prepare([tmp_path / name], tmp_path / name.replace(".", "-"), tok, workers=0, **kw))
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w, err_msg=name)
    # two files are one stream of documents; worker processes write the same bytes as one process
    half = len(DOCS) // 2
    (tmp_path / "b1.txt").write_text("\n\n\n".join(DOCS[:half]))
    (tmp_path / "b2.txt").write_text("\n\n\n".join(DOCS[half:]))
    for w, g in zip(want, tokens(prepare.prepare([tmp_path / "b1.txt", tmp_path / "b2.txt"], tmp_path / "two", tok,
                                                 workers=2))):
        np.testing.assert_array_equal(g, w)
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["documents"] == len(DOCS) and meta["train_tokens"] == len(want[0])
    # a BPE is trained on a bounded sample of the text: here its first ~2 KB
    small = prepare.prepare([tmp_path / "a.txt"], tmp_path / "bpe", "bpe", 300, bpe_sample_mb=2e-3, workers=0)
    assert json.loads((small / "meta.json").read_text())["bpe_sample_mb"] == 2e-3


def test_memory_stays_flat_whatever_the_input_size(tmp_path, corpus_cache):
    """Peak RSS preparing a 12 MB text is within 6 MB of preparing a 1 MB one: nothing grows with the input."""
    tok = data.builtin_corpus(corpus_cache) / "tokenizer.json"
    doc = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40
    peaks = {}
    for mb in (1, 12):
        f = tmp_path / f"{mb}.txt"
        with open(f, "w") as fh:
            for i in range(mb * 2 ** 20 // (len(doc) + 12)):
                fh.write(f"{doc} {i}\n\n\n")
        code = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); import prepare; "
                f"prepare.prepare([{str(f)!r}], {str(tmp_path / str(mb))!r}, {str(tok)!r}, workers=0); "
                f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        peaks[mb] = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) / 1024
    assert peaks[12] - peaks[1] < 6, peaks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # (the test process itself is not measured)


def test_bad_input_names_the_file_and_leaves_no_dataset(tmp_path, corpus_cache):
    tok = str(data.builtin_corpus(corpus_cache) / "tokenizer.json")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: not a JSON object per line"):
        prepare.prepare([tmp_path / "ok.jsonl", tmp_path / "bad.jsonl"], tmp_path / "out", tok, workers=0)
    assert not any((tmp_path / "out" / f).exists() for f in ("train.bin", "valid.bin", "meta.json"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: \['body'\]\); pass --text-key"):
        prepare.prepare([tmp_path / "a.parquet"], tmp_path / "out", tok, workers=0)
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--out", str(tmp_path / "o"),
                        str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert r.returncode == 2 and "error: input" in r.stderr and "missing.txt does not exist" in r.stderr
