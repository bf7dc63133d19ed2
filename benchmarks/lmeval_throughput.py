"""lm-eval `loglikelihood` requests per second: the `picojax` model (lmeval.py) against lm-eval's own `hf` model on
the same checkpoint (its Llama folder), on this machine.

    python main.py train.steps=40 run_dir=runs/bench                    # any run; the local config by default
    python benchmarks/lmeval_throughput.py runs/bench --n 512 --batch-size 64

Requests are multiple-choice-like: a context of 20-100 tokens of validation text and a continuation of 1-10
tokens, the shape of HellaSwag / ARC. Each backend runs them twice (the first pass includes compiling / warm-up);
the second is reported. The scores are compared too (max |difference| of the log-likelihoods).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import lmeval  # noqa: E402
from checkpoint import Checkpoints  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    ours = lmeval.PicojaxLM(a.run_dir, batch_size=a.batch_size)
    step_dir = Checkpoints(Path(a.run_dir) / "checkpoints", keep=None, use_async=False).step_dir(ours.step)
    theirs = HFLM(pretrained=str(step_dir), batch_size=a.batch_size, device="cpu", dtype="float32")
    valid = np.fromfile(data.data_dir(ours.cfg.data) / "valid.bin", np.uint16)[:20000]
    rng = np.random.default_rng(0)
    words = ours.tok_decode(valid.tolist()).split()
    reqs = []
    for i in range(a.n):
        start, n_ctx, n_cont = rng.integers(0, len(words) - 120), rng.integers(15, 80), rng.integers(1, 8)
        ctx = " ".join(words[start:start + n_ctx])
        cont = " " + " ".join(words[start + n_ctx:start + n_ctx + n_cont])
        reqs.append(Instance("loglikelihood", {}, (ctx, cont), i))
    out = {}
    for name, lm in (("picojax", ours), ("hf", theirs)):
        for rep in range(2):
            t = time.perf_counter()
            res = lm.loglikelihood(reqs, disable_tqdm=True)
            dt = time.perf_counter() - t
        out[name] = np.array([x for x, _ in res])
        print(f"{name:8s} {a.n} requests, batch {a.batch_size}: {a.n / dt:8.1f} requests/s ({dt:.2f} s, 2nd pass)")
    print(f"max |logprob difference| {np.abs(out['picojax'] - out['hf']).max():.2e}")


if __name__ == "__main__":
    main()
