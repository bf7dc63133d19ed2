"""Tests run on CPU with 8 virtual devices, so every sharding path is exercised."""
import os
import sys
import tempfile
from pathlib import Path

# --xla_backend_optimization_level=0: XLA:CPU compiles without LLVM's optimisation passes. The suite's programs
# are tiny, so compiling them is most of its time and running them little: tests/test_train.py takes 47 s with
# it, 93 s without; test_checkpoint + test_maml 418 s against 494 s. The same HLO is compiled (XLA's passes,
# sharding and buffer plans are untouched: test_aot's TPU and GPU plans are byte-for-byte the same); float results
# move by an ulp or so (vectorised reductions), far inside every test's tolerance.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
# one compilation cache for the session, shared with the `python main.py` subprocesses: many tests compile the
# same tiny programs (the same train step in a new Trainer), and XLA:CPU compiles are most of the suite's time
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="picojax-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # compile-only GPUs (tests/test_aot.py)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only TPUs in this and its subprocesses
os.environ["WANDB_MODE"] = "disabled"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import data  # noqa: E402
import host  # noqa: E402
from config import compose  # noqa: E402

for _k, _v in host.HOST_MALLOC.items():  # `python main.py` subprocesses start with them, so they skip the restart
    os.environ.setdefault(_k, _v)

TINY = [  # a model small enough to compile and step in seconds
    "model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "data.batch_size=16", "eval.batch_size=8", "eval.max_tokens=2048", "train.steps=3", "train.log_every=1",
    "eval.every_steps=0", "sample.max_new_tokens=0", "opt.warmup_steps=1", "wandb.mode=disabled",
    "checkpoint.dynamics.layers=[]",  # learning-dynamics snapshots are tested on their own
]


def make_cfg(*overrides, config="local"):
    """Compose a config exactly as `python main.py -cn CONFIG overrides...` would."""
    return compose(config, overrides)


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A data.cache_dir holding the built-in corpus, prepared once per session."""
    cache = tmp_path_factory.mktemp("cache")
    data.builtin_corpus(cache)
    return cache


@pytest.fixture
def tiny_cfg(corpus_cache, tmp_path):
    """Factory: the tiny local config on the built-in corpus, writing into tmp_path, plus overrides."""
    def make(*overrides, config="local"):
        return make_cfg(*TINY, f"data.cache_dir={corpus_cache}", f"run_dir={tmp_path / 'run'}", *overrides, config=config)
    return make
