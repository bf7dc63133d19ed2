"""Compare the runs of a sweep: one table and one plot.

    python main.py -m model.kind=decoder,lstm,kgram_mlp     # a Hydra multirun: multirun/<date>/<time>/<job>/
    python report.py multirun/2026-11-23/05-30-00             # or any folder holding run directories

Writes into that folder `report.md` and `report.csv` (per run: validation loss and perplexity at the end, the
perplexity of every other validation set (eval.sets), distinct-1..5 of greedy and of top-p samples, the lm-eval
task scores (eval.tasks), parameters, training tokens/s) and `val_loss.png` (validation loss
against training tokens, every run). A run is named by the overrides that differ between the runs (from Hydra's
`.hydra/overrides.yaml`), else by its folder. Everything is read from each run's metrics.json and config.yaml.
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

DISTINCT = range(1, 6)
COLUMNS = ["run", "kind", "params", "val_loss", "val_ppl", "tokens_per_s", "tokens",
           *[f"greedy_distinct_{n}" for n in DISTINCT], *[f"top_p_distinct_{n}" for n in DISTINCT]]


def find_runs(folder: Path) -> list[Path]:
    """The run directories (holding metrics.json) in folder, or folder itself; job numbers in numeric order."""
    if (folder / "metrics.json").exists():
        return [folder]
    runs = [p.parent for p in folder.glob("*/metrics.json")]
    return sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def labels(runs: list[Path]) -> list[str]:
    """Each run's overrides that not every run shares; the folder name where there are none."""
    overrides = []
    for r in runs:
        f = r / ".hydra" / "overrides.yaml"
        overrides.append(yaml.safe_load(f.read_text()) or [] if f.exists() else [])
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    return [" ".join(o for o in ov if o not in shared) or r.name for r, ov in zip(runs, overrides)]


def row(run: Path, label: str) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    final, history = metrics["final"], metrics["history"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h][1:]  # the first log includes compiling
    out = dict(run=label, kind=cfg["model"].get("kind", "decoder"), params=final.get("params"),
               val_loss=final.get("val_loss"), val_ppl=final.get("val_ppl"),
               tokens_per_s=statistics.median(speeds) if speeds else None, tokens=final.get("tokens"))
    for n in DISTINCT:
        out[f"greedy_distinct_{n}"] = final.get(f"greedy_distinct_{n}")
        out[f"top_p_distinct_{n}"] = final.get(f"distinct_{n}")
    out.update({k: v for k, v in final.items() if k.endswith("_ppl") and k != "val_ppl"})  # eval.sets
    for task, scores in (final.get("tasks") or {}).items():  # eval.tasks: each metric but the stderrs
        out.update({f"{task} {m.split(',')[0]}": v for m, v in scores.items() if "stderr" not in m})
    return out


def extra_columns(rows: list[dict]) -> list[str]:
    """The columns beyond COLUMNS that some run has: other validation sets' perplexity, lm-eval scores."""
    return sorted({k for r in rows for k in r if k not in COLUMNS})


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    extra = extra_columns(rows)
    head = ["run", "kind", "params", "val loss", "val ppl", "tokens/s", "greedy distinct-1..5", "top-p distinct-1..5",
            *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dist = lambda p: " / ".join(fmt(r[f"{p}_distinct_{n}"], ".2f") for n in DISTINCT)
        lines.append("| " + " | ".join([
            r["run"], r["kind"], "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M", fmt(r["val_loss"], ".3f"),
            fmt(r["val_ppl"], ".1f"), fmt(r["tokens_per_s"], ",.0f"), dist("greedy"), dist("top_p"),
            *(fmt(r.get(c), ".4g") for c in extra)]) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Path], names: list[str], out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for run, name in zip(runs, names):
        history = json.loads((run / "metrics.json").read_text())["history"]
        points = [(h["tokens"], h["val_loss"]) for h in history if "val_loss" in h and "tokens" in h]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a multirun folder (multirun/<date>/<time>) or any folder of run directories")
    a = p.parse_args(argv)
    folder = Path(a.folder).expanduser()
    runs = find_runs(folder)
    if not runs:
        print(f"error: no run directory (one holding metrics.json) in {folder}; point at a multirun folder, e.g. "
              f"multirun/<date>/<time>, after its runs have finished", file=sys.stderr)
        sys.exit(2)
    names = labels(runs)
    rows = [row(r, n) for r, n in zip(runs, names)]
    (folder / "report.md").write_text(markdown(rows))
    with open(folder / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS + extra_columns(rows), restval="")
        w.writeheader()
        w.writerows(rows)
    plot(runs, names, folder / "val_loss.png")
    print(markdown(rows) + f"\nwrote {folder / 'report.md'}, {folder / 'report.csv'}, {folder / 'val_loss.png'}")


if __name__ == "__main__":
    main()
