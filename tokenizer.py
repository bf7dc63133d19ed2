"""The run's tokenizer: `data.tokenizer` (a Hub tokenizer id such as pico-train's allenai/OLMo-7B-0724-hf, fetched
once into data.cache_dir, or a tokenizer.json path), else the tokenizer.json beside the run's data. The sample, every
checkpoint's Hugging Face folder, generate.py, lmeval.py, model.init_from's check and MAML's mask id all read it
through `path`.

A module of its own because a Hub id brings a fetch, a cache and the Hub's offline rules (HF_HUB_OFFLINE,
HF_ENDPOINT, data.hf_endpoint) with it, apart from the token rows (data.py, shards.py).
"""
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import snapshot_download

import data
import prepare
from config import DataError, brief
from shards import endpoint_name

# what pico-train saves with each checkpoint (tokenizer.save_pretrained) and a Hub tokenizer is fetched as
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_hub_id(spec) -> bool:
    """OWNER/NAME[@REVISION] that is not a path here."""
    s = str(spec)
    name = s.partition("@")[0]
    return (name.count("/") == 1 and not s.startswith((".", "/", "~")) and not name.endswith(".json")
            and not Path(s).expanduser().exists())


def cache_folder(cache_dir, repo: str) -> Path:
    """Where the Hub tokenizer `repo` (NAME@REVISION: its own folder) is kept."""
    return Path(cache_dir).expanduser() / "tokenizers" / repo.replace("/", "--")


def fetch(repo: str, cache_dir, endpoint=None) -> Path:
    """tokenizer.json of the Hub tokenizer `repo` (NAME@REVISION pins a revision), with its tokenizer_config.json
    and special_tokens_map.json beside it. Fetched once: a cached copy is used as it is, without the network. The
    files land in a temporary folder renamed into place when complete, so a killed fetch leaves nothing behind."""
    out = cache_folder(cache_dir, repo)
    if (out / "tokenizer.json").exists():
        return out / "tokenizer.json"
    name, _, revision = repo.partition("@")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        try:
            snapshot_download(name, revision=revision or None, allow_patterns=list(FILES), local_dir=tmp,
                              endpoint=endpoint)
        except Exception as e:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            raise DataError(
                f"the tokenizer {repo} (data.tokenizer) could not be fetched from {endpoint_name(endpoint)}{offline}: "
                f"{brief(e)}. "
                f"Check the name; without the network here, fetch it where there is one (`hf download {name} "
                f"{' '.join(FILES)} --local-dir {out}`) and copy that folder here, point data.tokenizer at a "
                f"tokenizer.json, or set data.hf_endpoint to a Hub mirror you can reach") from None
        if not (tmp / "tokenizer.json").exists():
            raise DataError(f"the Hub repository {repo} (data.tokenizer) has no tokenizer.json (a fast tokenizer); "
                            f"point data.tokenizer at a tokenizer.json, or at a repository that has one")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        try:
            os.replace(tmp, out)
        except OSError:  # another process put it in place first
            if not (out / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "tokenizer.json"


def path(d, spec=None) -> Path | None:
    """The tokenizer.json of a run's `data:` block: `spec` or data.tokenizer (a Hub id, a file, or a folder holding
    one), else the one beside the run's data; None when there is none."""
    spec = spec or d.get("tokenizer")
    if not spec:
        own = data.data_dir(d) / "tokenizer.json"
        return own if own.exists() else None
    if is_hub_id(spec):
        return fetch(str(spec), d.cache_dir, d.get("hf_endpoint"))
    p = Path(str(spec)).expanduser()
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.exists():
        raise DataError(f"data.tokenizer={spec}: no such file; give a tokenizer.json (Hugging Face `tokenizers` "
                        f"format), a folder holding one, or a Hub tokenizer id such as allenai/OLMo-7B-0724-hf")
    return p


def load(p: Path | None, vocab_size: int):
    """The tokenizers.Tokenizer at `p` (None: None), whose ids must fit model.vocab_size to be the run's."""
    tok = None if p is None else prepare.load_tokenizer(p)
    if tok is not None and tok.get_vocab_size() > vocab_size:
        raise DataError(f"the tokenizer {p} has {tok.get_vocab_size()} ids but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size>={tok.get_vocab_size()} (a multiple of 64 is fastest)")
    return tok


def note(p: Path | None) -> str:
    """The start-up line on the run's tokenizer."""
    return f"tokenizer: {p}" if p else \
        "tokenizer: none (no data.tokenizer, no tokenizer.json beside the data): samples print token ids"
