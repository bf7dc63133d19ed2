"""Text -> nanoGPT `.bin` token files, streaming: documents from text files (.txt / .md ...: documents separated by
two blank lines; .jsonl; .parquet with a text column; any of them .gz or .xz compressed) or a Hub text dataset
(`hf:NAME`, streamed through `datasets`), tokenized by worker processes and appended to train.bin / valid.bin as
they come, so memory stays bounded whatever the input size.

A module of its own, apart from data.py (which reads token files at train time, with jax), because its worker
processes import only `tokenizers` and numpy: they start fast and stay small.

    python prepare.py --out data/mine --vocab-size 8192 books/*.txt        # trains a byte-level BPE
    python prepare.py --out data/mine --tokenizer path/to/tokenizer.json wiki.jsonl.gz
    python prepare.py --out data/tinystories --vocab-size 8192 hf:roneneldan/TinyStories   # streamed from the Hub
(`python data.py prepare ...` is the same command.)

Every `valid_every`-th document goes to valid.bin (with fewer documents, the last one; with one document, the last
5% of its tokens). A BPE is trained on the first `bpe_sample_mb` MB of training text (100 by default), a bounded
sample, so that training the tokenizer does not hold the whole input in memory either. The outputs appear
atomically: each file is written under a temporary name and renamed when complete, meta.json last.
"""
import argparse
import gzip
import json
import lzma
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from config import DataError

EOT = "<|endoftext|>"
BATCH_CHARS = 1 << 20  # about 1 MB of text per worker task (its encodings take ~10x that, briefly)


def train_bpe(docs, vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization) trained on `docs`; deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


# ---------------------------------------------------------------------------------------------- reading text

def _open(f: Path):
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(f.suffix, open)
    return opener(f, "rt", encoding="utf-8")


def iter_docs(source: str, text_key: str = "text"):
    """The documents of one input, one at a time."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{source} is a Hub text dataset: streaming it needs `datasets` (pip install datasets)")
        name, _, split = source[3:].partition(":")
        for row in datasets.load_dataset(name, split=split or "train", streaming=True):
            if row.get(text_key):
                yield row[text_key]
        return
    f = Path(source).expanduser()
    if not f.exists():
        raise DataError(f"input {f} does not exist")
    kind = Path(f.stem).suffix if f.suffix in (".gz", ".xz") else f.suffix
    if kind == ".parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(f)
        if text_key not in pf.schema_arrow.names:
            raise DataError(f"{f} has no column {text_key!r} (its columns: {pf.schema_arrow.names}); pass "
                            f"--text-key COLUMN")
        for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    elif kind in (".jsonl", ".json"):
        with _open(f) as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        text = json.loads(line).get(text_key)
                    except (json.JSONDecodeError, AttributeError):
                        raise DataError(f"{f}, line {n}: not a JSON object per line (JSON Lines)") from None
                    if text:
                        yield text
    else:  # plain text: two blank lines between documents
        with _open(f) as fh:
            lines, blanks = [], 0
            for line in fh:
                line = line.rstrip("\n")
                if line:
                    blanks = 0
                else:
                    blanks += 1
                    if blanks == 2:
                        doc, lines, blanks = "\n".join(lines).strip(), [], 0
                        if doc:
                            yield doc
                        continue
                lines.append(line)
            doc = "\n".join(lines).strip()
            if doc:
                yield doc


def documents(sources, valid_every: int, text_key: str):
    """(document, goes to valid.bin) for every document of every input, in order."""
    i = 0
    for source in sources:
        for doc in iter_docs(str(source), text_key):
            i += 1
            yield doc, i % valid_every == 0


# ---------------------------------------------------------------------------------------------- tokenizing

_TOKENIZER = None


def _start_worker(tokenizer_json: str):
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the pool is the parallelism
    from tokenizers import Tokenizer
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode(docs, flags, eot, dtype):
    """Token ids of a batch of documents, each followed by eot: (train ids, valid ids, train ids per document)."""
    out = {False: [], True: []}
    lengths = []
    for enc, valid in zip(_TOKENIZER.encode_batch(docs), flags):
        ids = enc.ids + ([eot] if eot is not None else [])
        out[valid].extend(ids)
        lengths.append(0 if valid else len(ids))
    return np.asarray(out[False], dtype), np.asarray(out[True], dtype), lengths


def _batches(docs):
    batch, size = ([], []), 0
    for doc, valid in docs:
        batch[0].append(doc)
        batch[1].append(valid)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = ([], []), 0
    if batch[0]:
        yield batch


def prepare(sources, out_dir, tokenizer: str = "bpe", vocab_size: int = 4096, valid_every: int = 20,
            workers: int | None = None, bpe_sample_mb: float = 100, text_key: str = "text") -> Path:
    """Tokenize `sources` into out_dir/{train,valid}.bin + tokenizer.json + meta.json (see the module docstring).
    tokenizer: "bpe" (train one of `vocab_size`), a tokenizer.json path or a Hub name. workers: tokenizing
    processes (default: the CPU count, at most 8; 0 tokenizes in this process)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        budget, sample = bpe_sample_mb * 2 ** 20, []
        for doc, valid in documents(sources, valid_every, text_key):
            if not valid:
                sample.append(doc)
                budget -= len(doc)
                if budget <= 0:
                    break
        if not sample:
            raise DataError(f"no text found in {list(map(str, sources))}")
        tok = train_bpe(sample, vocab_size)
        del sample
    elif Path(tokenizer).expanduser().exists():
        tok = load_tokenizer(Path(tokenizer).expanduser())
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_pretrained(tokenizer)
    vocab, eot = tok.get_vocab_size(), tok.token_to_id(EOT)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    tmp = {name: out / f".{name}.tmp" for name in ("train.bin", "valid.bin")}
    counts, n_docs, last_doc = {"train.bin": 0, "valid.bin": 0}, 0, 0
    bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenizing into {out}", mininterval=1.0, file=sys.stderr)
    start = time.perf_counter()
    with open(tmp["train.bin"], "wb") as train_f, open(tmp["valid.bin"], "wb") as valid_f:
        def write(result):
            nonlocal n_docs, last_doc
            train, valid, lengths = result
            if lengths:  # where the last document's tokens start in train.bin, in case it must move to valid.bin
                last_doc = counts["train.bin"] + len(train) - lengths[-1]
            train.tofile(train_f)
            valid.tofile(valid_f)
            counts["train.bin"] += len(train)
            counts["valid.bin"] += len(valid)
            n_docs += len(lengths)
            bar.update(len(train) + len(valid))
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):,.0f}", docs=n_docs)

        batches = _batches(documents(sources, valid_every, text_key))
        if workers == 0:
            _start_worker(tok.to_str())
            for docs, flags in batches:
                write(_encode(docs, flags, eot, dtype))
        else:  # in order, at most 2 tasks per worker in flight: memory stays bounded however fast the reading is
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                     initargs=(tok.to_str(),)) as pool:
                flight = deque()
                for docs, flags in batches:
                    flight.append(pool.submit(_encode, docs, flags, eot, dtype))
                    if len(flight) >= 2 * workers:
                        write(flight.popleft().result())
                while flight:
                    write(flight.popleft().result())
    bar.close()
    if n_docs == 0:
        raise DataError(f"no text found in {list(map(str, sources))}")
    if counts["valid.bin"] == 0:  # fewer documents than valid_every: the last one (or 5% of a single one) validates
        cut = last_doc if n_docs > 1 else int(counts["train.bin"] * 0.95)
        train = np.fromfile(tmp["train.bin"], dtype)
        train[cut:].tofile(tmp["valid.bin"])
        train[:cut].tofile(tmp["train.bin"])
        counts = {"train.bin": cut, "valid.bin": len(train) - cut}
    for name, path in tmp.items():
        os.replace(path, out / name)
    tok.save(str(out / "tokenizer.json"))
    meta = dict(vocab_size=vocab, dtype=np.dtype(dtype).name, train_tokens=counts["train.bin"],
                valid_tokens=counts["valid.bin"], eot_id=eot, tokenizer=tokenizer, sources=[str(f) for f in sources],
                documents=n_docs, bpe_sample_mb=bpe_sample_mb if tokenizer == "bpe" else None)
    (out / ".meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(out / ".meta.json.tmp", out / "meta.json")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files (.txt, .jsonl, .parquet; .gz / .xz) or hf:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="bpe", help="'bpe' (train one), a tokenizer.json path, or a Hub name")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size when training a BPE")
    p.add_argument("--valid-every", type=int, default=20, help="every n-th document goes to valid.bin")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: CPUs, at most 8)")
    p.add_argument("--bpe-sample-mb", type=float, default=100, help="MB of training text the BPE is trained on")
    p.add_argument("--text-key", default="text", help="the text field of .jsonl / .parquet / Hub rows")
    a = p.parse_args(argv)
    try:
        out = prepare(a.inputs, a.out, a.tokenizer, a.vocab_size, a.valid_every, a.workers, a.bpe_sample_mb,
                      a.text_key)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(json.loads((out / "meta.json").read_text()), indent=1))


if __name__ == "__main__":
    main()
