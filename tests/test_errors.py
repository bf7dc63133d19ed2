"""Bad inputs give a clear error naming the problem and the fix, raised before anything compiles,
never a stack trace from deep inside JAX. Each test asserts the library's exception type and key words of its
message: the offending value or file, and the config key to change."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

import prepare
import train
from conftest import ROOT
from data import DataError
from model import ConfigError

RNG = np.random.default_rng(0)


def words(*ws):
    """A `match=` pattern requiring every one of `ws` (literally, in any order) in the message."""
    return "(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in ws)


def write_bins(folder, train=None, valid=None, dtype=np.uint16):
    """A data.dir with train.bin / valid.bin; a None file gets valid random ids (enough for the tiny config)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train.bin", train), ("valid.bin", valid)):
        if isinstance(ids, bytes):
            (folder / name).write_bytes(ids)
        else:
            np.asarray(RNG.integers(0, 4096, 4000) if ids is None else ids, dtype=dtype).tofile(folder / name)
    return folder


# ---------------------------------------------------------------------------------------------- data

def test_missing_data_file(tiny_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=words(str(empty / "train.bin"), "does not exist", "data.dir",
                                              "data.py prepare")):
        train.Trainer(tiny_cfg(f"data.dir={empty}"))


def test_bin_length_not_multiple_of_token_size(tiny_cfg, tmp_path):
    d = write_bins(tmp_path / "d", train=b"\x01" * 201)
    with pytest.raises(DataError, match=words("train.bin", "201 bytes", "not a multiple of 2", "data.token_dtype")):
        train.Trainer(tiny_cfg(f"data.dir={d}"))


@pytest.mark.parametrize("bad", ["train.bin", "valid.bin"])
def test_token_id_beyond_vocab(tiny_cfg, tmp_path, bad):
    ids = RNG.integers(0, 4096, 4000)
    ids[123] = 5000
    d = write_bins(tmp_path / "d", **{bad.removesuffix(".bin"): ids})
    with pytest.raises(DataError, match=words(bad, "token id 5000", "model.vocab_size=4096", "set model.vocab_size")):
        train.Trainer(tiny_cfg(f"data.dir={d}", "model.vocab_size=4096"))


def test_tokenizer_vocab_beyond_model_vocab(tiny_cfg):
    # the built-in corpus's meta.json says 4096 tokens
    with pytest.raises(DataError, match=words("train.bin", "4096 tokens", "model.vocab_size=1000",
                                              "model.vocab_size>=4096")):
        train.Trainer(tiny_cfg("model.vocab_size=1000"))


def test_seq_len_longer_than_data(tiny_cfg, tmp_path):
    d = write_bins(tmp_path / "d", train=np.arange(20))
    with pytest.raises(DataError, match=words("train.bin", "holds 20 tokens", "model.seq_len + 1 = 33",
                                              "lower model.seq_len")):
        train.Trainer(tiny_cfg(f"data.dir={d}"))


def test_token_dtype_mismatching_meta_json(tiny_cfg):
    # the built-in corpus is uint16 and has a meta.json saying so
    with pytest.raises(DataError, match=words("train.bin", "uint16", "meta.json", "data.token_dtype=uint32",
                                              "set data.token_dtype=uint16")):
        train.Trainer(tiny_cfg("data.token_dtype=uint32"))


def test_valid_file_too_short_for_one_eval_batch(tiny_cfg, tmp_path):
    # 100 tokens = 3 sequences of 32 + 1 < eval.batch_size=8; raised at construction, not after training
    d = write_bins(tmp_path / "d", valid=RNG.integers(0, 4096, 100))
    with pytest.raises(DataError, match=words("valid.bin", "holds 3 sequences", "eval.batch_size=8",
                                              "lower eval.batch_size")):
        train.Trainer(tiny_cfg(f"data.dir={d}"))


def test_eval_max_tokens_below_one_eval_batch(tiny_cfg):
    with pytest.raises(DataError, match=words("valid.bin", "holds 2 sequences", "eval.batch_size=8",
                                              "raise eval.max_tokens")):
        train.Trainer(tiny_cfg("eval.max_tokens=64"))


@pytest.mark.parametrize("overrides", [["model.seq_len=2048", "eval.batch_size=32"], ["data.batch_size=32768"]])
def test_the_builtin_corpus_under_a_run_it_cannot_hold(tiny_cfg, overrides):
    # seq 2048: 15 validation sequences, fewer than an eval batch of 32; a batch of 32768 rows: more than it holds
    with pytest.raises(DataError, match=words("the built-in corpus", "for local and Colab runs", "data.batch_size",
                                              "eval.batch_size", "data.hf_dataset=pico-lm/pretokenized-dolma",
                                              "data.tokenizer=allenai/OLMo-7B-0724-hf", "-cn tpu", "data.dir=DIR")):
        train.Trainer(tiny_cfg(*overrides))


def test_a_tokenizer_path_that_is_not_there(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match=words(f"data.tokenizer={tmp_path / 'nope.json'}", "no such file",
                                              "Hub tokenizer id")):
        train.Trainer(tiny_cfg(f"data.tokenizer={tmp_path / 'nope.json'}"))


def test_a_tokenizer_with_more_ids_than_the_model(tiny_cfg, tmp_path):
    tok = prepare.train_bpe(["a small text for a small tokenizer"], 300)
    tok.add_tokens([f"extra{i}" for i in range(4200)])  # past the local config's 4096
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=words(str(tmp_path / "tokenizer.json"), f"{tok.get_vocab_size()} ids",
                                              "model.vocab_size=4096", "model.vocab_size>=")):
        train.Trainer(tiny_cfg(f"data.tokenizer={tmp_path / 'tokenizer.json'}"))


def test_wandb_online_without_credentials(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match=words("wandb.mode=online", "no W&B credentials", "wandb login",
                                                "WANDB_API_KEY", "wandb.mode=offline")):
        train.Trainer(tiny_cfg("wandb.mode=online", "data.dir=/nonexistent"))  # said before the data is opened
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # `wandb login`'s entry: the check passes
    with pytest.raises(DataError, match="train.bin does not exist"):
        train.Trainer(tiny_cfg("wandb.mode=online", "data.dir=/nonexistent"))


def test_the_epochs_a_run_makes_are_said_at_start_up(tiny_cfg, capsys):
    trainer = train.Trainer(tiny_cfg("train.steps=2000"))  # 32,000 rows of the corpus's 23,134 at seq_len 32
    n = trainer.train_rows.n_rows
    trainer.start()
    out = capsys.readouterr().out
    assert f"warning: data: train.steps=2,000 x data.batch_size=16 = 32,000 rows of the {n:,}" in out
    assert f"{32000 / n:.3g} epochs; rows repeat (each epoch in a new order, data.order=shuffled)" in out


# ---------------------------------------------------------------------------------------------- model and layout

def test_n_heads_not_divisible_by_n_kv_heads(tiny_cfg):
    with pytest.raises(ConfigError, match=words("model.n_heads=4", "model.n_kv_heads=3", "n_kv_heads to divide")):
        train.Trainer(tiny_cfg("model.n_heads=4", "model.n_kv_heads=3"))


@pytest.mark.parametrize("overrides, shown", [
    (["data.batch_size=12"], "data.batch_size=12 / data.grad_accum=1"),
    (["data.batch_size=16", "data.grad_accum=4"], "data.batch_size=16 / data.grad_accum=4"),
])
def test_batch_not_divisible_by_data_parallel_size(tiny_cfg, overrides, shown):
    with pytest.raises(ConfigError, match=words(shown, "data-parallel size 8", "multiple of 8")):
        train.Trainer(tiny_cfg(*overrides))


def test_mesh_not_matching_device_count(tiny_cfg):
    with pytest.raises(ConfigError, match=words("mesh.data=3", "mesh.fsdp=2", "8 devices", "product 8", "-1")):
        train.Trainer(tiny_cfg("mesh.data=3", "mesh.fsdp=2"))


def test_d_model_not_divisible_by_fsdp(tiny_cfg):
    # head dim 36 / 6 = 6 is even, so the model itself is valid; only the FSDP layout is not
    with pytest.raises(ConfigError, match=words("model.d_model=36", "mesh.fsdp=8", "pick a mesh.fsdp")):
        train.Trainer(tiny_cfg("model.d_model=36", "model.n_heads=6", "model.n_kv_heads=2", "mesh.fsdp=8"))


# ---------------------------------------------------------------------------------------------- unknown keys

def test_unknown_key_override(tiny_cfg):
    with pytest.raises(ConfigCompositionException, match=words("opt.peak_llr")):
        tiny_cfg("opt.peak_llr=1")


def test_unknown_key_appended(tiny_cfg):
    cfg = tiny_cfg("+opt.peak_llr=1")  # '+' gets it past Hydra; the library must still reject it
    with pytest.raises(ConfigError, match=words("unknown config key 'opt.peak_llr'", "peak_lr")):
        train.Trainer(cfg)


def test_a_value_for_a_block_names_its_keys(tiny_cfg):
    with pytest.raises(ConfigError, match=words("wandb=disabled: wandb is a block of keys", "wandb.mode=disabled")):
        train.Trainer(tiny_cfg("wandb=disabled"))  # it used to fail in the run: 'str' object has no attribute 'mode'


def cli(tmp_path, *overrides):
    """Run `python main.py overrides...` as a user would; Hydra's output folder goes into tmp_path."""
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "main.py", *overrides, f"hydra.run.dir={tmp_path / 'hydra'}",
                           "hydra.output_subdir=null"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_unknown_key(tmp_path):
    r = cli(tmp_path, "opt.peak_llr=1")
    assert r.returncode != 0
    assert "peak_llr" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("overrides, shown", [
    (["+train.foo=1"], "unknown config key 'train.foo'"),  # ConfigError from the library
    (["data.dir={empty}"], "train.bin does not exist"),  # DataError from the library
])
def test_cli_library_error_is_one_line(tmp_path, overrides, shown):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(tmp_path, *(o.format(empty=empty) for o in overrides))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and shown in lines[0], r.stderr
