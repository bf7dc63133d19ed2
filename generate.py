"""Text in, text out: sample from a trained run, and measure how diverse the samples are (distinct-n).

    python generate.py runs/local --prompt "The" --prompt "In 1900" --max-new-tokens 64 --temperature 0.8 \
        --top-k 0 --top-p 0.95 --seed 0
    python generate.py runs/local/checkpoints --step 200 --prompt "The" --temperature 0     # greedy

A module of its own, apart from model.py and train.py, because this is the inference side: it needs a checkpoint
and a tokenizer, not data files, an optimizer or the training loop, and a notebook or a script imports it as is.
The decoding itself (fixed-size KV cache, one lax.scan) is `model.generate`; here, prompts of different lengths
are left-padded into one batch (one jitted call for all of them), and text is encoded and decoded.
"""
import argparse
import logging
import sys
from pathlib import Path

import jax
import numpy as np

import checkpoint
import data
from model import ConfigError, generate


def distinct_n(samples, n: int) -> float:
    """Distinct-n (Li et al. 2016, arXiv:1510.03055): the number of unique n-grams over the number of n-grams,
    counted across all samples together (sequences of token ids or words). 0.0 when no sample has n items."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct(samples, max_n: int = 5) -> dict:
    """{"distinct_1": ..., ..., "distinct_<max_n>": ...} of the samples."""
    return {f"distinct_{n}": distinct_n(samples, n) for n in range(1, max_n + 1)}


def pad_left(prompts, pad_id: int = 0):
    """Token-id lists of different lengths -> tokens [B, P] int32 left-padded with pad_id, start [B]: where
    each row's prompt begins (model.generate masks what comes before it)."""
    P = max(map(len, prompts))
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids):] = ids
    return tokens, np.asarray([P - len(ids) for ids in prompts], np.int32)


def generate_ids(model, prompts, max_new_tokens: int, key, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[list[int]]:
    """The continuations (max_new_tokens ids each) of several prompts (non-empty lists of token ids), all in
    one jitted call. A prompt keeps its last seq_len - max_new_tokens tokens (at least one), so prompt and
    continuation fit in the context the model was trained on."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    keep = max(model.cfg.seq_len - max_new_tokens, 1)
    tokens, start = pad_left([list(p)[-keep:] for p in prompts])
    out = generate(model, tokens, max_new_tokens, key, temperature, top_k, top_p, start=start)
    if not out.is_fully_addressable:  # several processes: each holds only its devices' part
        from jax.experimental import multihost_utils
        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(jax.device_get(out))[:, tokens.shape[1]:].tolist()


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int = 0, top_p: float = 0.95, seed: int = 0) -> list[str]:
    """Each prompt followed by its sampled continuation (greedy at temperature 0). Text after an end-of-text
    token (the start of another document) is dropped; an empty prompt starts a new document."""
    eot = tokenizer.token_to_id(data.EOT)
    ids = [tokenizer.encode(p).ids or ([eot] if eot is not None else [0]) for p in prompts]
    new = generate_ids(model, ids, max_new_tokens, jax.random.key(seed), temperature, top_k, top_p)
    new = [n[:n.index(eot)] if eot in n else n for n in new]
    return [tokenizer.decode(p + n) for p, n in zip(ids, new)]


def tokenizer_path(cfg) -> Path:
    """tokenizer.json in the run's data folder (data.dir, or the built-in corpus, prepared if needed)."""
    return (Path(cfg.data.dir) if cfg.data.dir else data.builtin_corpus(cfg.data.cache_dir)) / "tokenizer.json"


def load(path, step: int | None = None, tokenizer=None):
    """(model, tokenizer, config) of a run directory or checkpoint directory (its latest step, or `step`);
    `tokenizer`: a tokenizer.json to use instead of the one in the run's data folder."""
    model, cfg, _ = checkpoint.load(path, step)
    tok_path = Path(tokenizer) if tokenizer else tokenizer_path(cfg)
    if not tok_path.exists():
        raise data.DataError(f"no tokenizer at {tok_path}; pass --tokenizer PATH, the tokenizer.json the data was "
                             f"prepared with")
    return model, data.load_tokenizer(tok_path), cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run directory (holding checkpoints/) or a checkpoint directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several, generated in one batch)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the one of the run's data)")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens={a.max_new_tokens}; use 1 or more")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        model, tok, _ = load(a.path, a.step, a.tokenizer)
    except (ConfigError, checkpoint.CheckpointError, data.DataError) as e:  # bad input: the message says what to fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    texts = generate_text(model, tok, a.prompt or [""], a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    print("\n\n".join(texts))


if __name__ == "__main__":
    main()
