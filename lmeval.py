"""Downstream tasks through lm-evaluation-harness, in JAX: a `picojax` model for lm_eval (registered under that name)
backed by a picojax checkpoint on this host's devices, and the command that runs tasks on a run.

    python lmeval.py runs/local --tasks hellaswag,arc_easy --limit 200       # the latest checkpoint
    python lmeval.py runs/local --tasks blimp_anaphor_gender_agreement --step 1000 --batch-size 64
    python lmeval.py runs/local --tasks my_task --include-path my_tasks/     # tasks defined in local YAML files

From Python: `import lmeval; lm_eval.simple_evaluate(model="picojax", model_args="run_dir=runs/local,step=1000",
tasks=[...])`. Results go to <run_dir>/eval_results/step_<k>.json (pico-train's place for them) and, with --wandb,
to W&B. Not `evaluate.py`: lm-eval imports Hugging Face's `evaluate` package, which a file of that name shadows.

The model scores as lm-eval's own `hf` model does (same tokenization of context / continuation pairs, the same
rolling windows for perplexity, left truncation to the model's context), so their numbers agree (tests), but in
batches of fixed shapes (rows padded to a multiple of 64 tokens, batches padded to --batch-size) so that each
shape compiles once. generate_until decodes greedily with the KV cache (model.generate_ids), one batch of prompts
at a time, and cuts each continuation at the first stop sequence or end-of-text.
"""
import argparse
import difflib
import functools
import json
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import generate
import host
import prepare
import train_state
from checkpoint import CheckpointError
from config import ConfigError, DataError
from model import generate_ids

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  lm-eval's own models, before ours: its registry fills itself lazily only
    # while empty, so registering `picojax` first would hide `hf` and the rest (lm_eval.simple_evaluate(model="hf"))
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # an optional dependency: `main` says how to install it
    lm_eval = None
    TemplateLM, register_model = object, (lambda *names: (lambda cls: cls))

PAD = 64  # rows are padded to a multiple of this many tokens: few shapes, few compiles


@partial(jax.jit, static_argnums=0)
def _score(graphdef, state, tokens, targets):
    """Per position: log p(target) and whether the target is the argmax, [B, L] each."""
    logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, -1) == targets


@register_model("picojax")
class PicojaxLM(TemplateLM):
    def __init__(self, run_dir, step=None, batch_size=32, max_gen_toks=256, tokenizer=None, **kwargs):
        super().__init__()
        model, cfg, loop = train_state.load(run_dir, None if step in (None, "") else int(step))
        self.run_dir, self.step, self.cfg = Path(run_dir), loop["step"], cfg
        self.tok = generate.run_tokenizer(cfg, tokenizer)
        eot = self.tok.token_to_id(prepare.EOT)
        if eot is None:
            raise DataError(f"the tokenizer of {run_dir} has no {prepare.EOT} token, which lm-eval needs as its "
                            f"end-of-text / prefix token; prepare the data with prepare.py, which declares it")
        self._eot, self.model, self.max_length = eot, model, model.cfg.seq_len
        self.graphdef, self.state = nnx.split(model)
        # lm-eval passes its own batch_size (None unless --batch_size, "auto" not supported here: a fixed size)
        self.batch_size = 32 if batch_size in (None, "", "auto") else int(str(batch_size).split(":")[0])
        self.max_gen_toks = int(max_gen_toks)
        self.warned = False

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def _warn_truncated(self, n: int):
        if not self.warned:
            print(f"note: a request of {n} tokens exceeds the model's context ({self.max_length}); it is truncated "
                  f"from the left, as lm-eval's hf model does (said once)", file=sys.stderr)
            self.warned = True

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = []
        for _, context, continuation in requests:
            whole = context + continuation
            if len(whole) > self.max_length + 1:
                self._warn_truncated(len(whole))
            whole = whole[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        results = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            width = min(-(-len(rows[chunk[0]][0]) // PAD) * PAD, self.max_length)
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros_like(tokens)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp, greedy = jax.device_get(_score(self.graphdef, self.state, tokens, targets))
            for r, i in enumerate(chunk):
                n, c = len(rows[i][0]), rows[i][2]
                results[i] = (float(logp[r, n - c:n].sum()), bool(greedy[r, n - c:n].all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        windows, owner = [], []
        for j, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(j)
        totals = [0.0] * len(requests)
        for j, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[j] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = [None] * len(requests)
        groups = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, idx in groups.items():
            kw = json.loads(key)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(self.tok_decode([self._eot]))
            n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(requests[i].args[0]) or [self._eot]
                    if len(ids) > self.max_length - n_new:
                        self._warn_truncated(len(ids) + n_new)
                    prompts.append(ids)
                new = generate_ids(self.model, prompts, n_new, jax.random.key(int(kw.get("seed", 0))), temperature)
                for i, ids in zip(chunk, new):
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


@functools.lru_cache(maxsize=4)
def task_manager(include_path=None, tasks: tuple = ()):
    """lm-eval's task index (with the YAML tasks under include_path); a clear error without lm-eval. Indexing
    lm-eval's ~15,000 built-in tasks takes ~17 s here, so when every one of `tasks` is under include_path, only
    that folder is indexed; and an index is built once per process."""
    if lm_eval is None:
        raise ConfigError("lm-eval is not installed: pip install lm-eval==0.4.13 (an optional dependency of "
                          "picojax, for eval.tasks and lmeval.py)")
    from lm_eval.tasks import TaskManager
    if include_path:
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if tasks and set(tasks) <= set(own.all_tasks):
            return own
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(names: list[str], task_manager) -> None:
    """Unknown task names, with the close ones, before anything runs."""
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = {n: difflib.get_close_matches(n, known, n=4) for n in unknown}
        raise ConfigError("unknown lm-eval task(s): " + "; ".join(
            f"{n!r} (close: {c})" if c else repr(n) for n, c in hints.items())
            + "; `python -m lm_eval ls tasks` lists them, --include-path DIR adds YAML tasks of your own")


def run_tasks(cfg) -> list[str]:
    """A run's eval.tasks, checked before it trains: the names exist, and there is one process."""
    tasks = list(cfg.eval.tasks or [])
    if tasks:
        if jax.process_count() > 1:
            raise ConfigError("eval.tasks runs on one process; with several, run `python lmeval.py RUN_DIR --tasks "
                              "...` after training")
        check_tasks(tasks, task_manager(cfg.eval.task_include_path, tuple(tasks)))
    return tasks


def after_training(cfg, final: dict) -> dict:
    """A finished run's eval.tasks on its final checkpoint (main.py calls this after train.run; run_tasks checked
    the names before it trained): the scores go into final["tasks"], metrics.json and eval_results/step_<k>.json.
    Nothing for a run without tasks, an interrupted run, or a process other than 0."""
    tasks = list(cfg.eval.tasks or [])
    if not tasks or final.get("interrupted") or jax.process_index() != 0:
        return final
    res = evaluate(cfg.run_dir, tasks, final["step"], cfg.eval.task_limit, cfg.eval.batch_size,
                   cfg.eval.task_include_path, wandb=cfg.wandb.mode)
    final = dict(final, tasks=scores(res))
    metrics = Path(cfg.run_dir) / "metrics.json"
    if metrics.exists():
        metrics.write_text(json.dumps(dict(json.loads(metrics.read_text()), final=final), indent=1))
    print(lm_eval.utils.make_table(res))
    return final


def scores(res: dict) -> dict:
    """{task: {metric: value}} of lm-eval's results, numbers only (no sample counts)."""
    return {t: {m: v for m, v in ms.items() if isinstance(v, (int, float)) and m != "sample_len"}
            for t, ms in res["results"].items()}


def evaluate(run_dir, tasks: list[str], step=None, limit=None, batch_size: int = 32, include_path=None,
             wandb: str = "disabled", num_fewshot=None, tokenizer=None) -> dict:
    """Run lm-eval tasks on a run's checkpoint; writes <run_dir>/eval_results/step_<k>.json; returns lm-eval's
    results dict."""
    manager = task_manager(str(include_path) if include_path else None, tuple(tasks))
    check_tasks(tasks, manager)
    lm = PicojaxLM(run_dir, step, batch_size, tokenizer=tokenizer)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, num_fewshot=num_fewshot)
    run_dir = Path(run_dir)
    run_dir = run_dir.parent if run_dir.name == "checkpoints" else run_dir
    out = run_dir / "eval_results" / f"step_{lm.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: res[k] for k in ("results", "versions", "n-shot", "configs", "higher_is_better") if k in res}
    out.write_text(json.dumps(dict(step=lm.step, limit=limit, **keep), indent=1, default=str))
    if wandb != "disabled":
        import wandb as wb
        w = lm.cfg.get("wandb", {})
        run = wb.init(project=w.get("project") or "picojax", entity=w.get("entity"), mode=wandb, dir=str(run_dir),
                      name=f"{lm.cfg.get('name', run_dir.name)}-lm-eval", settings=wb.Settings(silent=True))
        run.log({f"lm_eval/{t}/{m}": v for t, ms in res["results"].items() for m, v in ms.items()
                 if isinstance(v, (int, float))}, step=lm.step)
        run.finish()
    return dict(res, path=str(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (holding checkpoints/) or a checkpoint directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    p.add_argument("--limit", type=float, default=None, help="at most this many examples per task (a fraction < 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")
    p.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"])
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json or a Hub tokenizer id (default: the run's)")
    a = p.parse_args(argv)
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    try:
        res = evaluate(a.run_dir, a.tasks.split(","), a.step, limit, a.batch_size, a.include_path, a.wandb,
                       a.num_fewshot, a.tokenizer)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(lm_eval.utils.make_table(res))
    print(f"wrote {res['path']}")


if __name__ == "__main__":
    host.cpu_unless_accelerator()
    main()
