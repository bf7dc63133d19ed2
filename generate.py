"""Text in, text out: sample from a trained run.

    python generate.py runs/local --prompt "The" --prompt "In 1900" --max-new-tokens 64 --temperature 0.8 \
        --top-k 0 --top-p 0.95 --seed 0
    python generate.py runs/local/checkpoints --step 200 --prompt "The" --temperature 0     # greedy

A module of its own, apart from train.py, because this is the inference side: it needs a checkpoint and a
tokenizer (train_state.load), not data files or the training loop, and a notebook or a script imports it as is.
The decoding itself (fixed-size KV cache, one lax.scan, left-padded prompts in one batch) is in model.py; here,
text is encoded and decoded.
"""
import argparse
import logging
import sys

import jax

import data
import host
import prepare
import train_state
from checkpoint import CheckpointError
from config import ConfigError
from model import generate_ids
from tokenizer import path as tokenizer_path


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int = 0, top_p: float = 0.95, seed: int = 0) -> list[str]:
    """Each prompt followed by its sampled continuation (greedy at temperature 0). Text after an end-of-text
    token (the start of another document) is dropped; an empty prompt starts a new document."""
    eot = tokenizer.token_to_id(prepare.EOT)
    ids = [tokenizer.encode(p).ids or ([eot] if eot is not None else [0]) for p in prompts]
    new = generate_ids(model, ids, max_new_tokens, jax.random.key(seed), temperature, top_k, top_p)
    new = [n[:n.index(eot)] if eot in n else n for n in new]
    return [tokenizer.decode(p + n) for p, n in zip(ids, new)]


def open_run(path, step: int | None = None, tokenizer=None):
    """(model, tokenizer, config) of a run directory or checkpoint directory (its latest step, or `step`);
    `tokenizer`: a tokenizer.json to use instead of the one in the run's data folder."""
    model, cfg, _ = train_state.load(path, step)
    return model, run_tokenizer(cfg, tokenizer), cfg


def run_tokenizer(cfg, tokenizer=None):
    """The tokenizer of a run (its data.tokenizer, else the tokenizer.json in its data folder), or `tokenizer`
    (a tokenizer.json or a Hub tokenizer id)."""
    tok_path = tokenizer_path(cfg.data, tokenizer)
    if tok_path is None:
        raise data.DataError(f"the run has no tokenizer (no data.tokenizer, no tokenizer.json in "
                             f"{data.data_dir(cfg.data)}); pass --tokenizer PATH, the tokenizer.json the data was "
                             f"prepared with, or a Hub tokenizer id")
    return prepare.load_tokenizer(tok_path)


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
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json or a Hub tokenizer id (default: the run's)")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens={a.max_new_tokens}; use 1 or more")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        model, tok, _ = open_run(a.path, a.step, a.tokenizer)
    except (ConfigError, CheckpointError, data.DataError) as e:  # bad input: the message says what to fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    texts = generate_text(model, tok, a.prompt or [""], a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    print("\n\n".join(texts))


if __name__ == "__main__":
    host.cpu_unless_accelerator()
    main()
