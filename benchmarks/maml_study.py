"""The README's MAML study: a next-token run and a hybrid (meta-learning) run of the same model, side by side.

    python main.py -cn maml model.maml.hybrid_ratio=0 train.steps=600 checkpoint.every_steps=100 run_dir=runs/maml-ar
    python main.py -cn maml train.steps=600 checkpoint.every_steps=100 run_dir=runs/maml-hybrid
    python benchmarks/maml_study.py runs/maml-ar runs/maml-hybrid --out docs/maml_study.png

Reads each run's metrics.json (validation loss against tokens; the hybrid's support / query accuracy against steps)
and its learning-dynamics snapshots through analyze.py (effective rank `per` of the stored weights, the mean over
layers and blocks; attention-head entropy on the fixed eval batch, the mean over heads and blocks), writes one
figure of four panels and prints a Markdown table per checkpoint step, then one JSON line.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analyze  # noqa: E402


def curves(run: Path) -> dict:
    history = json.loads((run / "metrics.json").read_text())["history"]
    evals = [(h["step"], h["tokens"], h["val_loss"]) for h in history if "val_loss" in h]
    meta = [(h["step"], h["support_acc"], h["query_acc"]) for h in history if h.get("meta_batches")]
    found = analyze.analyze(run, metrics=["per", "head_entropy"], split="eval", out=run / "analysis")
    per = {s: float(np.mean([v for c, v in r["weights"].items() if ".ov" not in c])) for s, r in found["per"].items()}
    heads = {s: float(np.mean([v for c, v in r["attention"].items() if ".head." in c]))
             for s, r in found["head_entropy"].items()}
    return dict(evals=evals, meta=meta, per=per, entropy=heads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ar")
    p.add_argument("hybrid")
    p.add_argument("--out", default="docs/maml_study.png")
    a = p.parse_args(argv)
    runs = {"next-token": curves(Path(a.ar)), "hybrid 0.5": curves(Path(a.hybrid))}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.4))
    for name, c in runs.items():
        ax[0].plot([t for _, t, _ in c["evals"]], [v for _, _, v in c["evals"]], marker=".", label=name)
        ax[2].plot(sorted(c["per"]), [c["per"][s] for s in sorted(c["per"])], marker=".", label=name)
        ax[3].plot(sorted(c["entropy"]), [c["entropy"][s] for s in sorted(c["entropy"])], marker=".", label=name)
    meta = runs["hybrid 0.5"]["meta"]
    ax[1].plot([s for s, _, _ in meta], [x for _, x, _ in meta], lw=0.8, label="support (adapted head)")
    ax[1].plot([s for s, _, _ in meta], [x for _, _, x in meta], lw=0.8, label="query")
    titles = ("validation loss vs tokens", "hybrid: episode accuracy vs step", "effective rank (per), mean",
              "attention-head entropy (nats), mean")
    for x, t in zip(ax, titles):
        x.set_title(t, fontsize=9)
        x.legend(fontsize=7)
    ax[0].set_xlabel("tokens")
    for x in ax[1:]:
        x.set_xlabel("step")
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80)
    print("| step | val loss next-token | val loss hybrid | per next-token | per hybrid | entropy next-token | "
          "entropy hybrid |")
    print("|---|---|---|---|---|---|---|")
    ar, hy = runs["next-token"], runs["hybrid 0.5"]
    val = {name: {s: v for s, _, v in c["evals"]} for name, c in runs.items()}
    for s in sorted(ar["per"]):
        cell = lambda d: f"{d[s]:.3f}" if s in d else ""
        print(f"| {s} | {cell(val['next-token'])} | {cell(val['hybrid 0.5'])} | {cell(ar['per'])} | "
              f"{cell(hy['per'])} | {cell(ar['entropy'])} | {cell(hy['entropy'])} |")
    last = meta[-10:]
    print(json.dumps(dict(runs=runs, last_support_acc=float(np.mean([x for _, x, _ in last])) if last else None,
                          last_query_acc=float(np.mean([x for _, _, x in last])) if last else None)))


if __name__ == "__main__":
    main()
