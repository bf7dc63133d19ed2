"""Token data at train time: sources of rows of seq_len + 1 token ids (nanoGPT-format `.bin` files here, parquet
shards in shards.py), the data order, the global batch of a step, and validation batches.

A `.bin` file is a flat little-endian array of token ids (uint16, or uint32 for vocabularies above 65536);
prepare.py makes them from text, with `tokenizer.json` (Hugging Face `tokenizers` format) and `meta.json` beside.

Data order (pico's principle): the training file is cut into chunks of seq_len + 1 tokens (inputs and labels
shifted by one, neighbouring chunks sharing one token). Row g = step * batch + i of the global batch is chunk
perm_e[g mod n_chunks] with e = g // n_chunks and perm_e a permutation drawn from (seed, e) (data.order=shuffled),
or chunk g mod n_chunks (sequential, pico-train's order): the batch at a step is a pure function of (seed, step)
whatever the device or process count.
"""
import functools
import json
import os
import queue
import sys
import threading
from pathlib import Path

import jax
import numpy as np

import prepare
import shards
from config import ConfigError, DataError

CORPUS = Path(__file__).resolve().parent / "corpus" / "wiki.txt.xz"  # 104 English Wikipedia articles, CC BY-SA
SCAN_LIMIT = 1 << 28  # files up to this many tokens are scanned for out-of-vocab ids when opened


# ---------------------------------------------------------------------------------------------- the built-in corpus

def builtin_corpus(cache_dir, vocab_size: int = 4096) -> Path:
    """The built-in corpus (corpus/wiki.txt.xz, real English) as .bin files, prepared on first use."""
    out = Path(os.path.expanduser(cache_dir)) / f"wiki-bpe{vocab_size}"
    if not (out / "meta.json").exists():
        print(f"preparing the built-in corpus in {out} (once)")
        prepare.prepare([CORPUS], out, "bpe", vocab_size, workers=0)
    return out


def data_dir(d) -> Path:
    """The folder of a run's data (the `data:` block), where its tokenizer.json is looked for: data.dir, a Hub
    dataset's cache folder, or the built-in corpus, prepared if needed."""
    if d.dir:
        return Path(d.dir).expanduser()
    if d.get("hf_dataset"):
        return shards.cache_folder(d.cache_dir, d.hf_dataset.partition("@")[0])
    return builtin_corpus(d.cache_dir)


# ---------------------------------------------------------------------------------------------- loading

def open_tokens(path, dtype: str, vocab_size: int, seq_len: int) -> np.memmap:
    """Memory-map a .bin file, checking what can be checked cheaply before any compile."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; set data.dir to a folder holding train.bin and valid.bin "
                        f"(make one with `python data.py prepare --out DIR files...`), or data.dir=null for the "
                        f"built-in corpus")
    dt = np.dtype(dtype)
    meta = path.parent / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("dtype") and m["dtype"] != dt.name:
            raise DataError(f"{path} holds {m['dtype']} tokens (meta.json) but data.token_dtype={dt.name}; "
                            f"set data.token_dtype={m['dtype']}")
        if m.get("vocab_size", 0) > vocab_size:
            raise DataError(f"{path}'s tokenizer has {m['vocab_size']} tokens but model.vocab_size={vocab_size}; "
                            f"set model.vocab_size>={m['vocab_size']}")
    size = path.stat().st_size
    if size % dt.itemsize:
        raise DataError(f"{path} is {size} bytes, not a multiple of {dt.itemsize} ({dt.name} tokens): the file is "
                        f"truncated or not {dt.name}; check data.token_dtype (uint16, or uint32 for vocabularies "
                        f"> 65536)")
    n = size // dt.itemsize
    if n < seq_len + 1:
        raise DataError(f"{path} holds {n} tokens, fewer than model.seq_len + 1 = {seq_len + 1}; "
                        f"lower model.seq_len or use more data")
    tokens = np.memmap(path, dtype=dt, mode="r")
    if n <= SCAN_LIMIT:
        check_ids(tokens, vocab_size, path)
    return tokens


def check_ids(ids, vocab_size: int, path):
    top = int(ids.max())
    if top >= vocab_size:
        raise DataError(f"{path} contains token id {top} >= model.vocab_size={vocab_size}; set model.vocab_size "
                        f"above {top} (the tokenizer's vocabulary size) or re-tokenize the data")


def unigram_entropy(tokens, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def local_rows(sharding, shape) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of a global [B, ...] array that this process's devices hold."""
    spans = {(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map(shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise DataError(f"this process's rows of the batch are not contiguous ({sorted(spans)}); "
                        "order the mesh's devices by process")
    return lo, hi


def to_global(rows_fn, sharding, shape) -> jax.Array:
    """Build a global array from this process's rows only (`rows_fn(lo, hi)` reads them)."""
    lo, hi = local_rows(sharding, shape)
    return jax.make_array_from_process_local_data(sharding, rows_fn(lo, hi), shape)


class BinRows:
    """A .bin file as rows of seq_len + 1 tokens: row r is tokens[r T : r T + T + 1] (neighbouring rows share a
    token, inputs and labels shifted by one)."""

    def __init__(self, tokens, seq_len: int, vocab_size: int, path="train.bin"):
        self.tokens, self.T, self.V, self.path = tokens, seq_len, vocab_size, path
        self.n_rows, self.n_tokens, self.row_len = (len(tokens) - 1) // seq_len, len(tokens), seq_len + 1

    def read(self, rows) -> np.ndarray:
        out = np.stack([self.tokens[s:s + self.T + 1] for s in np.asarray(rows) * self.T]).astype(np.int32)
        if self.n_tokens > SCAN_LIMIT:  # large files are checked batch by batch instead of upfront
            check_ids(out, self.V, self.path)
        return out

    def sample(self, limit: int) -> np.ndarray:
        return np.asarray(self.tokens[:limit])


ORDERS = ("shuffled", "sequential")


class TrainData:
    """The global training batch at step s, a pure function of (seed, s): tokens [B, T + 1] from a row source
    (BinRows, shards.Shards). Row g = s B + i of the stream is source row g mod n (sequential: pico-train's order,
    step s reads rows s B .. (s + 1) B - 1) or perm_e[g mod n] with e = g // n and perm_e a permutation drawn from
    (seed, e) (shuffled)."""

    def __init__(self, source, seed: int, batch_size: int, order: str = "shuffled"):
        if order not in ORDERS:
            raise DataError(f"data.order={order!r}; use one of {list(ORDERS)}")
        self.source, self.seed, self.B, self.order = source, seed, batch_size, order
        self.n_chunks = source.n_rows

    @functools.lru_cache(maxsize=2)
    def perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)

    def indices(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        g = step * self.B + np.arange(lo, self.B if hi is None else hi)
        if self.order == "sequential":
            return g % self.n_chunks
        return np.array([self.perm(e)[c] for e, c in zip(g // self.n_chunks, g % self.n_chunks)])

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows lo..hi of the global batch at `step`, [hi - lo, T + 1] int32."""
        return self.source.read(self.indices(step, lo, hi))

    def batch(self, step: int, sharding) -> jax.Array:
        return to_global(lambda lo, hi: self.rows(step, lo, hi), sharding, (self.B, self.source.row_len))


def n_valid_batches(n_rows: int, batch_size: int, seq_len: int, max_tokens: int | None, path="valid.bin") -> int:
    """How many whole eval batches a validation source of n_rows rows gives (within eval.max_tokens); at least
    one, or DataError."""
    n_chunks = n_rows
    if max_tokens:
        n_chunks = min(n_chunks, max(1, max_tokens // seq_len))
    n_batches = n_chunks // batch_size
    if n_batches == 0:
        raise DataError(f"{path} holds {n_chunks} sequences of model.seq_len + 1 tokens, fewer than "
                        f"eval.batch_size={batch_size}; lower eval.batch_size or model.seq_len, or raise "
                        f"eval.max_tokens")
    return n_batches


def valid_batches(source, batch_size: int, seq_len: int, max_tokens: int | None, sharding, path="valid.bin"):
    """Consecutive rows of a validation source (BinRows: non-overlapping chunks of the file), the same every
    time; drops a partial batch."""
    n_batches = n_valid_batches(source.n_rows, batch_size, seq_len, max_tokens, path)
    for b in range(n_batches):
        yield to_global(lambda lo, hi: source.read(b * batch_size + np.arange(lo, hi)), sharding,
                        (batch_size, source.row_len))


def open_source(spec, split: str | None, d, vocab_size: int, seq_len: int):
    """A row source from a spec: a .bin file (data.token_dtype), a folder (its <split>.bin, else its parquet shards
    of the split, shards.split_names), a .parquet file, or hf://datasets/OWNER/NAME[@REVISION] (a Hub dataset's
    parquet shards, fetched into data.cache_dir as the run reaches them). split: train, valid, or None for a
    source named for one purpose (data.valid): its val shards if any, else all of it."""
    spec, bin_name = str(spec), f"{split or 'valid'}.bin"
    if spec.startswith("hf://datasets/"):
        repo, _, rev = spec.removeprefix("hf://datasets/").partition("@")
        hub = shards.HubFiles(repo, d.cache_dir, d.cache_max_gb, rev or None, d.hf_endpoint)
        names = _split_shards(hub.names, split, spec)
        return shards.Shards(names, d.column, seq_len + 1, vocab_size, f"{spec} ({split or 'all'} shards)", hub,
                             d.prefetch_shards)
    path = Path(spec).expanduser()
    if path.suffix == ".parquet":
        return shards.Shards([str(path)], d.column, seq_len + 1, vocab_size, str(path))
    if path.is_dir() and not (path / bin_name).exists() and any(path.rglob("*.parquet")):
        return shards.Shards(_split_shards(shards.local_shards(path), split, path), d.column, seq_len + 1,
                             vocab_size, f"{path} ({split or 'all'} shards: names starting with {split or 'val'})")
    if path.is_dir() or not path.suffix:
        path = path / bin_name
    return BinRows(open_tokens(path, d.token_dtype, vocab_size, seq_len), seq_len, vocab_size, path)


def _split_shards(names, split, where) -> list[str]:
    """A source's shards of `split` (shards.split_names); a validation split it lacks is an error naming the fix."""
    own = shards.split_names(names, split)
    if not own and split == "valid":
        raise DataError(f"{where} has no validation shards (names starting with val / valid / validation); set "
                        f"data.valid to a validation source, e.g. "
                        f"data.valid=hf://datasets/pico-lm/pretokenized-paloma-tinsy (pico's)")
    return own


def check_sets(sets) -> dict:
    """eval.sets: names that can be metric keys (<name>_loss), none of them `val` (the run's own validation data)."""
    sets = dict(sets or {})
    bad = [k for k in sets if not str(k).isidentifier() or k == "val"]
    if bad:
        raise ConfigError(f"eval.sets: names {bad} cannot be set names (letters, digits, _; `val` is the run's own "
                          f"validation data); e.g. '+eval.sets={{c4: data/paloma/c4}}'")
    return sets


PICO_DATA = ("data.hf_dataset=pico-lm/pretokenized-dolma data.order=sequential data.tokenizer=allenai/OLMo-7B-0724-hf "
             "data.valid=hf://datasets/pico-lm/pretokenized-paloma-tinsy")  # what -cn tpu and -cn gpu set


def is_builtin(d) -> bool:
    return not d.dir and not d.get("hf_dataset")


def check_builtin(train, valid, cfg):
    """The built-in corpus (0.74M tokens) is for local and Colab runs: a seq_len or a batch it cannot hold is an
    error that says where a real run's data comes from."""
    T, B, E = cfg.model.seq_len, cfg.data.batch_size, cfg.eval.batch_size
    if train.n_rows >= B and valid.n_rows >= E:
        return
    raise DataError(f"the built-in corpus ({train.n_tokens:,} tokens of Wikipedia, for local and Colab runs) holds "
                    f"{train.n_rows:,} training and {valid.n_rows} validation sequences of model.seq_len + 1 = "
                    f"{T + 1} tokens, fewer than data.batch_size={B} or eval.batch_size={E}. A run of this size "
                    f"needs real data: pico's ({PICO_DATA}; -cn tpu and -cn gpu set these), or your own .bin files "
                    f"or shards (data.dir=DIR, made by `python prepare.py --out DIR ...`)")


def epochs_note(train, cfg) -> str:
    """How many times the run reads its training rows, for the start-up lines; a warning past one epoch."""
    rows = cfg.train.steps * cfg.data.batch_size
    epochs = rows / train.n_rows
    note = (f"data: train.steps={cfg.train.steps:,} x data.batch_size={cfg.data.batch_size:,} = {rows:,} rows of "
            f"the {train.n_rows:,} in {train.path}: {epochs:.3g} epoch{'' if epochs == 1 else 's'}")
    if epochs > 1 + 1e-9:
        repeats = ("each epoch in a new order" if cfg.data.order == "shuffled" else "the same rows in the same order")
        note = f"warning: {note}; rows repeat ({repeats}, data.order={cfg.data.order})"
    return note


def open_run_data(cfg):
    """A run's row sources: (train, validation, the learning-dynamics eval batch's, {eval set name: source} with
    the validation data as `val`), each checked to hold at least one eval batch."""
    T, V, d = cfg.model.seq_len, cfg.model.vocab_size, cfg.data
    train = open_source(train_spec(d), "train", d, V, T)
    valid = open_source(d.valid, None, d, V, T) if d.valid else open_source(train_spec(d), "valid", d, V, T)
    spec = cfg.checkpoint.dynamics.eval_data
    dyn = open_source(spec, None, d, V, T) if spec else valid
    if is_builtin(d) and not d.valid:
        check_builtin(train, valid, cfg)
    sets = {"val": valid, **{name: open_source(s, None, d, V, T) for name, s in check_sets(cfg.eval.sets).items()}}
    for rows, n, what in [*((r, cfg.eval.max_tokens, f"eval set {k}") for k, r in sets.items()),
                          (dyn, None, "learning-dynamics eval batch")]:
        n_valid_batches(rows.n_rows, cfg.eval.batch_size, T, n, f"{rows.path} ({what})")
    return train, valid, dyn, sets


def train_spec(d) -> str:
    """Where a run's training rows come from: data.dir, else data.hf_dataset (a Hub dataset id), else the built-in
    corpus (data_dir's order)."""
    return f"hf://datasets/{d.hf_dataset}" if d.hf_dataset and not d.dir else str(data_dir(d))


def prefetch(make, steps, depth: int = 2):
    """Yield make(s) for s in steps, built `depth` ahead in a thread so reading never stalls the device."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for s in steps:
                if stop.is_set():
                    return
                q.put((s, make(s)))
        except BaseException as e:  # surface reader errors in the training thread
            q.put((None, e))
        q.put((None, None))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            s, item = q.get()
            if isinstance(item, BaseException):
                raise item
            if s is None:
                return
            yield s, item
    finally:
        stop.set()


if __name__ == "__main__":  # `python data.py prepare ...`, as before prepare.py: the same command
    if sys.argv[1:2] != ["prepare"]:
        sys.exit("usage: python data.py prepare --out DIR INPUTS... (or python prepare.py ...: see its --help)")
    prepare.main(sys.argv[2:])
