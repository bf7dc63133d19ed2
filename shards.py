"""Token rows from parquet shards: pico's pretokenized datasets (`pico-lm/pretokenized-dolma`: shards of 20,480 rows,
one `input_ids` column of 2049 ids per row), from a local folder or from a Hub dataset, fetched into a bounded
local cache ahead of the rows the run reads next.

A module of its own, apart from data.py's .bin files, because it is the one that deals with remote files and
pyarrow: the shard list, downloads with retries, the cache and its eviction, decoding row groups.

Row g of a source is row g - start(s) of shard s, the shards in name order (as pico-train reads them), start(s)
the rows before it. A local folder's row counts come from the shards' footers; a Hub dataset's shards are taken
to hold as many rows as the first (pico's do; pico-train's resume arithmetic assumes it too), checked as each is
opened.
"""
import fnmatch
import json
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import HfApi, hf_hub_download

from config import DataError, brief

LISTING = ".picojax-files"  # a Hub dataset's file list, kept beside its cached shards
NUMBERED = re.compile(r"-(\d+)-of-(\d+)\.parquet$")  # train-00003-of-10000.parquet


def check_sequence(names: list[str], where):
    """Numbered shards (`-<i>-of-<n>`) must be all there: a gap would shift every later row."""
    nums = [m for m in map(NUMBERED.search, names) if m]
    if not nums:
        return
    total = int(nums[0].group(2))
    have = {int(m.group(1)) for m in nums}
    missing = sorted(set(range(min(total, max(have) + 1))) - have)
    if missing:
        raise DataError(f"{where}: shard {missing[0]} of {total} is missing ({len(missing)} missing in all) between "
                        f"the shards present; every later row would move: fetch or restore it (names like "
                        f"{names[0]})")


def endpoint_name(endpoint) -> str:
    """Which Hub a fetch asked, for its error message: data.hf_endpoint, else HF_ENDPOINT, else the Hub."""
    if endpoint:
        return f"data.hf_endpoint={endpoint}"
    return f"HF_ENDPOINT={os.environ['HF_ENDPOINT']}" if os.environ.get("HF_ENDPOINT") else "the Hub"


def cache_folder(cache_dir, repo: str) -> Path:
    return Path(cache_dir).expanduser() / "hub" / repo.replace("/", "--")


class HubFiles:
    """The shards of a Hub dataset (`repo`, files matching `pattern`), downloaded on demand into `cache_dir` with
    retries; at most `max_gb` kept there, the least recently used shards evicted first."""

    def __init__(self, repo: str, cache_dir, max_gb: float, revision=None, endpoint=None, retries: int = 3):
        self.repo, self.revision, self.endpoint, self.retries = repo, revision, endpoint, retries
        self.dir = cache_folder(cache_dir, repo)
        self.max_bytes = int(max_gb * 2 ** 30)
        self.names = sorted(fnmatch.filter(self._list(), "*.parquet"))
        self.pool, self.pending, self.used = ThreadPoolExecutor(max_workers=2), {}, OrderedDict()
        self.lock = threading.Lock()

    def _list(self) -> list[str]:
        """The dataset's files, from the Hub; each listing is kept in the cache (LISTING) so that a run whose
        shards are cached starts without the network (HF_HUB_OFFLINE=1, or the Hub out of reach)."""
        listing = self.dir / f"{LISTING}{'@' + self.revision if self.revision else ''}.json"
        try:
            files = HfApi(endpoint=self.endpoint).list_repo_files(self.repo, repo_type="dataset",
                                                                  revision=self.revision)
        except Exception as e:
            if listing.exists():
                print(f"data: the Hub dataset {self.repo} could not be listed ({brief(e, 80)}); using its listing "
                      f"cached in {listing}")
                return json.loads(listing.read_text())
            raise DataError(f"the Hub dataset {self.repo} could not be listed from {endpoint_name(self.endpoint)} "
                            f"({brief(e)}). Check the "
                            f"name; without the network here: fetch the shards the run needs where there is one "
                            f"(`hf download {self.repo} --repo-type dataset --include 'data/train-0000*' --local-dir "
                            f"DIR`) and set data.dir=DIR (or use your own .bin files: data.dir=DIR), set "
                            f"data.hf_endpoint to a Hub mirror you can reach, or fill the cache {self.dir} on a "
                            f"machine with the network (one start of the run there) and copy it here") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = listing.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(files))
        os.replace(tmp, listing)  # whole or not at all
        return files

    def _download(self, name: str) -> Path:
        for attempt in range(self.retries):
            try:
                return Path(hf_hub_download(self.repo, name, repo_type="dataset", revision=self.revision,
                                            local_dir=self.dir, endpoint=self.endpoint))
            except Exception as e:
                err = e
                time.sleep(0.5 * 2 ** attempt)
        raise DataError(f"shard {name} of the Hub dataset {self.repo} could not be fetched after {self.retries} "
                        f"tries ({brief(err)}); pre-fetch it "
                        f"where the network is there: `hf download {self.repo} {name} --repo-type dataset "
                        f"--local-dir {self.dir}`")

    def prefetch(self, name: str):
        with self.lock:
            if name not in self.pending and not (self.dir / name).exists():
                self.pending[name] = self.pool.submit(self._download, name)

    def path(self, name: str, keep=()) -> Path:
        """The local file of shard `name` (waiting for its download if needed); then the cache is trimmed to
        max_gb, never evicting `name` or `keep`."""
        local = self.dir / name
        if not local.exists():
            self.prefetch(name)
            with self.lock:
                future = self.pending.get(name)
            if future is not None:
                future.result()
            with self.lock:
                self.pending.pop(name, None)
        with self.lock:
            self.used[name] = None
            self.used.move_to_end(name)
            self._evict({name, *keep})
        return local

    def _evict(self, keep):
        files = [(n, self.dir / n) for n in self.used if (self.dir / n).exists()]
        total = sum(p.stat().st_size for _, p in files)
        for n, p in files:  # least recently used first
            if total <= self.max_bytes:
                break
            if n in keep or n in self.pending:
                continue
            total -= p.stat().st_size
            p.unlink()
            del self.used[n]


class Shards:
    """Parquet shards as one sequence of rows of `row_len` token ids (column `column`); `read(rows)` gives
    [len(rows), row_len] int32. Row groups are decoded when first read and the last few kept."""

    def __init__(self, names: list[str], column: str, row_len: int, vocab_size: int, where: str,
                 hub: HubFiles | None = None, ahead: int = 2):
        if not names:
            raise DataError(f"{where} holds no .parquet shards")
        self.names, self.column, self.row_len, self.V, self.path, self.hub, self.ahead = \
            names, column, row_len, vocab_size, where, hub, ahead
        check_sequence([Path(n).name for n in names], where)
        self.meta, self.group_starts, self.groups, self.lock = {}, {}, OrderedDict(), threading.Lock()
        first = self._meta(0)
        if hub is None:
            counts = [first.num_rows] + [self._meta(i).num_rows for i in range(1, len(names))]
        else:
            counts = [first.num_rows] * len(names)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n_rows = int(self.starts[-1])
        self._group(0, 0)  # the schema, the row length and the ids checked now, before anything compiles

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.row_len

    def _file(self, i: int) -> Path:
        if self.hub is None:
            return Path(self.names[i])
        keep = self.names[i + 1:i + 1 + self.ahead]
        for n in keep:  # the next shards download while this one is read
            self.hub.prefetch(n)
        return self.hub.path(self.names[i], keep)

    def _meta(self, i: int):
        if i not in self.meta:
            f = self._file(i)
            try:
                meta = pq.read_metadata(f)
            except Exception as e:
                raise DataError(f"shard {self.names[i]} is not a readable parquet file ({type(e).__name__}: "
                                f"{str(e)[:200]}); it is truncated or corrupt: "
                                + ("delete it from the cache to fetch it again" if self.hub else "re-create it")) \
                    from None
            names = meta.schema.to_arrow_schema().names
            if self.column not in names:
                raise DataError(f"shard {self.names[i]} has no column {self.column!r} (its columns: {names}); set "
                                f"data.column to the one holding the token ids")
            if self.hub is not None and i and meta.num_rows != self.meta[0].num_rows:
                raise DataError(f"shard {self.names[i]} holds {meta.num_rows} rows, the first "
                                f"{self.meta[0].num_rows}: a Hub dataset's row g is row g mod R of shard g // R (as "
                                f"pico-train reads it), which needs shards of equal size; fetch it into a folder "
                                f"(data.dir), where each shard's own row count is used")
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.meta[i] = meta
            self.group_starts[i] = np.concatenate([[0], np.cumsum(groups)])
        return self.meta[i]

    def _group(self, i: int, g: int) -> np.ndarray:
        key = (i, g)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        name = self.names[i]
        try:
            table = pq.ParquetFile(self._file(i)).read_row_group(g, columns=[self.column])
        except Exception as e:
            raise DataError(f"shard {name}, row group {g}, could not be decoded ({type(e).__name__}: {str(e)[:200]});"
                            f" it is corrupt: " + ("delete it from the cache to fetch it again" if self.hub
                                                   else "re-create it")) from None
        col = table.column(0).combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != self.row_len or lengths.max() != self.row_len):
            bad = int(lengths[lengths != self.row_len][0])
            raise DataError(f"shard {name}: a row holds {bad} ids in column {self.column!r}, not model.seq_len + 1 = "
                            f"{self.row_len}; set model.seq_len={bad - 1} (pico's rows: 2049 ids, seq_len 2048)")
        ids = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.row_len)
        if ids.size and (int(ids.max()) >= self.V or int(ids.min()) < 0):
            raise DataError(f"shard {name} contains token id {int(ids.max())} >= model.vocab_size={self.V}; set "
                            f"model.vocab_size above it (pico's OLMo tokenizer: 50280, or 50304 padded)")
        self.groups[key] = ids
        while len(self.groups) > 4:
            self.groups.popitem(last=False)
        return ids

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.row_len), np.int32)
        with self.lock:  # the training prefetch thread and the step loop (learning dynamics) both read
            shard = np.searchsorted(self.starts, rows, side="right") - 1
            for i in np.unique(shard):
                self._meta(int(i))
                sel = np.nonzero(shard == i)[0]
                local = rows[sel] - self.starts[i]
                gstarts = self.group_starts[int(i)]
                group = np.searchsorted(gstarts, local, side="right") - 1
                for g in np.unique(group):
                    take = np.nonzero(group == g)[0]
                    out[sel[take]] = self._group(int(i), int(g))[local[take] - gstarts[g]]
        return out

    def sample(self, limit: int) -> np.ndarray:
        """The first rows' ids, up to `limit` of them (the unigram entropy's sample)."""
        return self.read(np.arange(min(self.n_rows, max(1, limit // self.row_len)))).ravel()


def split_names(names, split: str | None) -> list[str]:
    """The shards of a split, in name order: names whose file name starts with it (train; val / valid /
    validation for valid). split None (a source named for one purpose): its val shards if it has any, else
    every shard."""
    prefixes = {"train": ("train",), "valid": ("val", "valid", "validation"), None: ("val", "valid", "validation")}
    own = sorted(n for n in names if re.match(rf"({'|'.join(prefixes[split])})[-_.]", Path(n).name))
    return own or (sorted(names) if split is None else [])


def local_shards(folder: Path) -> list[str]:
    """A folder's parquet shards, at any depth (hidden folders skipped); `split_names` picks a split's."""
    return sorted(str(p) for p in Path(folder).rglob("*.parquet")
                  if not any(x.startswith(".") for x in p.relative_to(folder).parts))
