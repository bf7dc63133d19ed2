"""The run picojax is for, as shipped: `python main.py -cn tpu opt.peak_lr=0.004` and `python main.py -cn gpu` start
pico-train's run (pico's dolma rows in its order, Paloma validation, the OLMo tokenizer) against a local stand-in
for the Hub serving shards of pico's schema and a tokenizer, with only what a CPU needs overridden; their
checkpoints load with AutoTokenizer and AutoModelForCausalLM. Also: the tokenizer fetched once and cached
atomically, a cached start without the network, and quiet CPU runs with the accelerator plugins installed."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

import prepare
import tokenizer
from conftest import ROOT
from config import DataError
from hub_standin import Hub

T, ROWS, SHARDS, VAL_ROWS = 32, 40, 4, 24
OLMO, DOLMA, PALOMA = "allenai/OLMo-7B-0724-hf", "pico-lm/pretokenized-dolma", "pico-lm/pretokenized-paloma-tinsy"
CPU = [  # what a CPU needs: a tiny model, a small batch, two steps (and no W&B: nothing reaches the network)
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", f"model.seq_len={T}",
    "model.vocab_size=1024", "data.batch_size=32", "eval.batch_size=8", "train.steps=2", "train.log_every=1",
    "sample.max_new_tokens=4", "sample.n_samples=0", "wandb.mode=disabled"]


def parquet(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"input_ids": pa.array(list(rows), pa.list_(pa.int32()))}), sink, row_group_size=16)
    return sink.getvalue().to_pybytes()


def olmo_like_tokenizer() -> dict:
    """A small byte-level BPE with the OLMo tokenizer's special tokens and config (eos <|endoftext|>, pad
    <|padding|>, no bos; GPTNeoXTokenizer), as the Hub repository holds them."""
    tok = prepare.train_bpe(["The cat sat on the mat. " * 20, "A dog ran in the park, and the sun was out."], 400)
    tok.add_special_tokens(["<|padding|>"])
    config = dict(add_bos_token=False, add_eos_token=False, bos_token=None, eos_token="<|endoftext|>",
                  pad_token="<|padding|>", unk_token=None, clean_up_tokenization_spaces=True,
                  model_max_length=1000000000000000019884624838656, tokenizer_class="GPTNeoXTokenizer")
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode(),
            "special_tokens_map.json": json.dumps(dict(eos_token="<|endoftext|>", pad_token="<|padding|>")).encode()}


@pytest.fixture(scope="module")
def pico_hub():
    """The stand-in Hub with pico's two datasets (in their schema, rows of seq_len + 1 ids) and the tokenizer."""
    hub, rng = Hub(), np.random.default_rng(0)
    train = rng.integers(0, 400, (SHARDS * ROWS, T + 1), dtype=np.int32)
    hub.add_dataset(DOLMA, {f"data/train-{i:05d}-of-{SHARDS:05d}.parquet": parquet(train[i * ROWS:(i + 1) * ROWS])
                            for i in range(SHARDS)})
    hub.add_dataset(PALOMA, {"data/val-00000-of-00001.parquet": parquet(rng.integers(0, 400, (VAL_ROWS, T + 1)))})
    hub.add_model(OLMO, olmo_like_tokenizer())
    yield hub
    hub.close()


def main_py(tmp_path, hub_url, *args):
    env = dict(os.environ, HF_ENDPOINT=hub_url)
    env.pop("JAX_PLATFORMS")  # as a user's shell has it: main.py keeps jax to the CPU on a host without chips
    return subprocess.run([sys.executable, "main.py", *args, f"data.cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [["-cn", "tpu", "opt.peak_lr=0.004"], ["-cn", "gpu"]])
def test_the_shipped_tpu_and_gpu_commands_start_pico_trains_run(pico_hub, tmp_path, command):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    run = tmp_path / "run"
    r = main_py(tmp_path, pico_hub.url, *command, *CPU, f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    out, err = r.stdout, r.stderr
    for noise in ("Jax plugin configuration error", "cuInit", "TPU_WORKER_HOSTNAMES", "Traceback", "HTTP Request"):
        assert noise not in out + err  # requirements-aot.txt's plugins stay quiet on a host without chips
    cached = tmp_path / "cache" / "tokenizers" / "allenai--OLMo-7B-0724-hf" / "tokenizer.json"
    assert f"tokenizer: {cached}" in out
    assert f"data: train.steps=2 x data.batch_size=32 = 64 rows of the {SHARDS * ROWS} in hf://datasets/{DOLMA}" in out
    assert "0.4 epochs" in out and "warning" not in out

    cfg = OmegaConf.load(run / "config.yaml")
    assert (cfg.data.hf_dataset, cfg.data.order, cfg.data.tokenizer) == (DOLMA, "sequential", OLMO)
    assert cfg.data.valid == cfg.checkpoint.dynamics.eval_data == f"hf://datasets/{PALOMA}"
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["step"] == 2 and np.isfinite(final["val_loss"])  # evaluated on the Paloma rows
    assert (tmp_path / "cache/hub/pico-lm--pretokenized-paloma-tinsy/data/val-00000-of-00001.parquet").exists()
    assert (run / "learning_dynamics" / "2").is_dir()  # the fixed eval batch from paloma-tinsy

    step_dir = run / "checkpoints" / "step_2"
    tok = transformers.AutoTokenizer.from_pretrained(step_dir)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|padding|>", None)
    ours = prepare.load_tokenizer(cached)
    assert tok("The cat sat")["input_ids"] == ours.encode("The cat sat").ids
    model = transformers.AutoModelForCausalLM.from_pretrained(step_dir)
    hf = json.loads((step_dir / "config.json").read_text())
    special = (ours.token_to_id("<|endoftext|>"), ours.token_to_id("<|padding|>"))
    assert (hf["eos_token_id"], hf["pad_token_id"]) == special
    with torch.no_grad():
        logits = model(torch.tensor([tok("The cat sat")["input_ids"]])).logits
    assert logits.shape[-1] == 1024 and torch.isfinite(logits).all()
    assert "sample: '" in out  # decoded through the OLMo tokenizer


def test_a_hub_tokenizer_is_fetched_once_and_a_killed_fetch_leaves_nothing(pico_hub, tmp_path, monkeypatch):
    dead = "http://127.0.0.1:9"  # nothing listens there
    d = OmegaConf.create(dict(dir=None, hf_dataset=None, tokenizer=OLMO, cache_dir=str(tmp_path), hf_endpoint=dead))
    folder = tokenizer.cache_folder(tmp_path, OLMO)

    def killed(*args, local_dir, **kw):  # half the files written, then the fetch dies
        (local_dir / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "snapshot_download", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenizer.path(d)
    assert not folder.exists() and not list(folder.parent.iterdir())  # no half-written tokenizer, no temporary
    monkeypatch.undo()

    with pytest.raises(DataError, match=f"(?s)the tokenizer {OLMO} \\(data.tokenizer\\) could not be fetched.*hf "
                                        "download.*data.hf_endpoint"):
        tokenizer.path(d)
    d.hf_endpoint = pico_hub.url
    got = tokenizer.path(d)
    assert got == folder / "tokenizer.json" and sorted(p.name for p in folder.iterdir()) == sorted(tokenizer.FILES)
    d.hf_endpoint = dead  # a cached start needs no network
    start = time.perf_counter()
    assert tokenizer.path(d) == got
    assert time.perf_counter() - start < 1.0
