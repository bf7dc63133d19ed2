"""What a run measures besides its training loss: the validation losses of every eval set, and at the end a sample
and distinct-n of the model's continuations.

A module of its own because none of it is the loop: the trainer (train.py) calls `Evaluator.losses` at eval steps
and the rest once at the end, with the state of that moment.
"""
import math

import jax
import numpy as np

import data
from model import distinct, generate_ids

GREEDY_PROMPT = 8  # tokens of each validation prompt for the greedy distinct-n


class Evaluator:
    """The run's validation sets (name: rows; `val` is the run's validation data) and sample settings, on `mesh`."""

    def __init__(self, cfg, mesh, mcfg, tokenizer, eval_sets: dict, valid_rows, batch_sharding):
        self.cfg, self.mesh, self.mcfg, self.tokenizer = cfg, mesh, mcfg, tokenizer  # tokenizers.Tokenizer or None
        self.eval_sets, self.valid_rows, self.batch_sharding = eval_sets, valid_rows, batch_sharding

    def losses(self, eval_step, state) -> dict:
        """<set>_loss and <set>_ppl of every validation set, by the compiled eval step (steps.jit_eval_step)."""
        out = {}
        with jax.set_mesh(self.mesh):
            for name, rows in self.eval_sets.items():
                total, count = 0.0, 0.0
                for tokens in data.valid_batches(rows, self.cfg.eval.batch_size, self.mcfg.seq_len,
                                                 self.cfg.eval.max_tokens, self.batch_sharding):
                    s, n = eval_step(state, tokens)
                    total, count = total + s, count + n
                loss = float(total / count)
                out.update({f"{name}_loss": loss, f"{name}_ppl": math.exp(min(loss, 50.0))})
        return out

    def prompt_ids(self):
        """sample.prompt as token ids through the run's tokenizer, and the tokenizer (None without one: token 0)."""
        tok = self.tokenizer
        return (tok.encode(self.cfg.sample.prompt).ids if tok else []) or [0], tok

    def sample(self, model) -> str:
        """sample.prompt and one continuation of it, as text."""
        s = self.cfg.sample
        ids, tok = self.prompt_ids()
        with jax.set_mesh(self.mesh):
            new = generate_ids(model, [ids], s.max_new_tokens, jax.random.key(self.cfg.seed),
                               s.temperature, s.top_k, s.top_p)[0]
        ids = ids[-max(self.mcfg.seq_len - s.max_new_tokens, 1):] + new  # the prompt as generate_ids kept it
        return tok.decode(ids) if tok else " ".join(map(str, ids))

    def diversity(self, model) -> dict:
        """distinct-1..5 over token ids (0 samples: {}): `distinct_n` of sample.n_samples sampled continuations of
        sample.prompt (sample.temperature, top_k, top_p), and `greedy_distinct_n` of greedy continuations of
        sample.n_samples different prompts, the first GREEDY_PROMPT tokens of evenly spaced validation sequences
        (greedy decoding of one prompt n times would give n copies of one text)."""
        s = self.cfg.sample
        if not (s.n_samples and s.max_new_tokens):
            return {}
        ids, _ = self.prompt_ids()
        n_seqs = self.valid_rows.n_rows
        prompts = [self.valid_rows.read([i * n_seqs // s.n_samples])[0, :GREEDY_PROMPT].astype(np.int64).tolist()
                   for i in range(s.n_samples)]
        key = jax.random.key(self.cfg.seed)
        with jax.set_mesh(self.mesh):
            sampled = generate_ids(model, [ids] * s.n_samples, s.max_new_tokens, key, s.temperature, s.top_k,
                                   s.top_p)
            greedy = generate_ids(model, prompts, s.max_new_tokens, key, 0.0)
        return dict(**distinct(sampled), **{f"greedy_{k}": v for k, v in distinct(greedy).items()})
