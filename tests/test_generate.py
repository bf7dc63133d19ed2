"""generate.py: distinct-n, batched generation of prompts of different lengths, the CLI on a trained run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import generate
import train
from model import Decoder, ModelConfig
from model import distinct, distinct_n, generate_ids, pad_left

SMALL = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=64,
                    dtype="float32")


def test_distinct_n_on_hand_computed_examples():
    samples = [[1, 2, 3, 1, 2], [1, 2, 4]]
    # 1-grams: 8, unique {1,2,3,4}; 2-grams: 12 23 31 12 | 12 24, unique 4 of 6; 3-grams: 123 231 312 | 124
    assert distinct(samples) == dict(distinct_1=4 / 8, distinct_2=4 / 6, distinct_3=1.0, distinct_4=1.0,
                                              distinct_5=1.0)
    assert distinct_n(samples, 6) == 0.0  # no sample has 6 tokens
    assert distinct_n(["the cat saw the cat".split()], 2) == 3 / 4
    assert distinct_n([[7, 7, 7, 7]], 1) == 1 / 4 and distinct_n([[7, 7, 7, 7]], 3) == 1 / 2
    assert distinct_n([], 1) == 0.0


def test_pad_left():
    tokens, start = pad_left([[5], [1, 2, 3], [8, 9]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5], [1, 2, 3], [0, 8, 9]])
    np.testing.assert_array_equal(start, [2, 0, 1])


def test_batch_of_prompts_of_different_lengths_equals_each_alone():
    model = Decoder(SMALL, nnx.Rngs(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (7,), 1, SMALL.vocab_size)).tolist()
    prompts = [ids[:1], ids[2:6], ids, ids[3:5]]
    forward = nnx.jit(lambda m, *a, **k: m(*a, **k))  # eager NNX on 8 devices takes seconds per call
    # the left-padded prefill gives each row the logits of its prompt alone, without a cache (padding masked,
    # RoPE positions from 0)
    tokens, start = pad_left(prompts)
    logits, _ = forward(model, jnp.asarray(tokens), cache=model.init_cache(4, 10), pos=0, start=jnp.asarray(start))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, start[b]:], forward(model, jnp.asarray([p]))[0], atol=1e-5)
    # greedy: one batched call == each prompt alone (which test_model checks against full recomputation)
    batch = generate_ids(model, prompts, 6, jax.random.key(0), temperature=0.0)
    for p, got in zip(prompts, batch):
        assert generate_ids(model, [p], 6, jax.random.key(0), temperature=0.0) == [got]
    # sampling: valid tokens, reproducible from the key, different across the rows of one prompt
    a = generate_ids(model, [ids[:2]] * 4, 8, jax.random.key(3), temperature=1.0, top_p=0.95)
    assert a == generate_ids(model, [ids[:2]] * 4, 8, jax.random.key(3), temperature=1.0, top_p=0.95)
    assert all(0 <= t < SMALL.vocab_size for row in a for t in row) and len({tuple(r) for r in a}) > 1


@pytest.fixture(scope="module")
def trained_run(corpus_cache, tmp_path_factory):
    """A tiny run trained for 2 steps; its final evaluation also samples (distinct-n)."""
    from conftest import TINY, make_cfg
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    cfg = make_cfg(*TINY, f"data.cache_dir={corpus_cache}", f"run_dir={run_dir}", "train.steps=2",
                   "sample.max_new_tokens=6", "sample.n_samples=4")
    final = train.Trainer(cfg).run()
    return run_dir, final


def test_final_evaluation_logs_distinct_n(trained_run):
    run_dir, final = trained_run
    saved = json.loads((run_dir / "metrics.json").read_text())["final"]
    for n in range(1, 6):
        assert 0 < final[f"distinct_{n}"] <= 1 and saved[f"distinct_{n}"] == final[f"distinct_{n}"]
    assert "val_loss" in saved


def test_cli_text_in_text_out(trained_run, capsys):
    run_dir, _ = trained_run
    args = ["--prompt", "The", "--prompt", "In 1900 the", "--max-new-tokens", "5", "--temperature", "0"]
    generate.main([str(run_dir), *args])
    out = capsys.readouterr().out
    assert out.startswith("The") and "\n\nIn 1900 the" in out
    model, tok, cfg = generate.open_run(run_dir / "checkpoints", step=2)
    assert cfg.train.steps == 2
    assert out.rstrip("\n") == "\n\n".join(generate.generate_text(model, tok, ["The", "In 1900 the"], 5, 0.0))


def test_cli_error_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main([str(tmp_path), "--prompt", "The"])
    assert e.value.code == 2 and "no complete checkpoint" in capsys.readouterr().err
