"""Learning-dynamics analysis (SPEC §3): metrics of every stored layer over a run's checkpoints, as JSON and plots.

    python analyze.py run_dir=runs/local                                  # every metric at every stored step
    python analyze.py run_dir=runs/local metrics=[per,cka] steps=[0,100,200] target_step=200
    python analyze.py run_dir=runs/local 'steps={start:0,end:300,every:50}' split=eval wandb=offline
        # (quoted: bash would split {a,b} on the commas)
    python analyze.py compare=[runs/local,runs/relora] metrics=[per] out=docs/relora_effective_rank.png

A separate module from the trainer and dynamics.py's capture: the analysis reads only the snapshot files
(<run_dir>/learning_dynamics/<step>/{train,eval}.safetensors, see snapshots.py) and the run's config.yaml, so it
imports no jax, orbax or flax and can run on a laptop over snapshots pulled from anywhere. A pico-train run
directory (checkpoints/step_<k>/learning_dynamics/{train,val}_*.pt and training_config.yaml, e.g. a released pico
model's, or a picojax run written with checkpoint.dynamics.format=pico) is read the same way (torch needed), so
`compare` puts the pico suite and picojax runs side by side.

Keys (Hydra-style key=value, the same grammar as main.py):
    run_dir      the run to analyze
    metrics      list of metric names (default: all, below)
    steps        null (every stored step) | a list [0,100] | a range {start:0,end:300,every:100} (end included);
                 every step must be stored
    split        train | eval: the batch the gradients were taken on (weights are the same in both); activations
                 always use eval, the fixed evaluation batch, the same sequences at every step
    target_step  the step CKA and PWCCA compare each step's activations with (default: the last step analyzed)
    out          the analysis directory (default <run_dir>/analysis); with compare, the PNG to write
    wandb        disabled | offline | online: also log every value to W&B (project: the run's wandb.project)
    compare      a list of run dirs already analyzed: one side-by-side figure of metrics[0] (default per) instead

Metrics. On weights and gradients W [in, out], with singular values s (np.linalg.svd):
    frobenius ||W||_F;  nuclear sum s;  max_abs max |w_ij|;  condition_number s_max / s_min;
    per (proportional effective rank) exp(-sum p_i ln p_i) / n, p = s / sum s, n = min(in, out);
    gini of |w| sorted ascending: sum((2i - n - 1) x_i) / (n sum x);  hoyer (sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1)
On the attention of the split's batch (snapshots of picojax 2026-12 on; older runs and pico-train's have none):
    head_entropy  each head's mean entropy of its causal attention distribution, -sum_s p_ts ln p_ts averaged over
                  rows and query positions t (nats; uniform attention over t + 1 keys gives ln(t + 1)); per block:
                  blocks.<i>.attention (the heads' mean) and blocks.<i>.attention.head.<h>
On the eval activations X [N, p] of a step against Y [N, q] of target_step:
    cka    linear CKA (Kornblith et al. 2019) of column-centred X, Y: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
    pwcca  projection-weighted CCA (Morcos et al. 2018), see `pwcca`.

Components, per block i (names as stored: blocks.<i>.<layer>):
    blocks.<i>.<layer>                 every stored layer (a ReLoRA layer: its effective kernel W + scale (B A)^T)
    blocks.<i>.<layer>.base, .update   ReLoRA layers only, weights only: the frozen W and scale (B A)^T
    blocks.<i>.attention.ov.<h>        the OV circuit of query head h (Elhage et al. 2021), from attention.v and
                                       attention.o: weights W_V[:, kv(h)] @ W_O[h] [D, D] (rank <= head dim E, so its
                                       condition number is numerically infinite and its per at most E / D);
                                       activations a_V[:, kv(h)] @ W_O[h] [N, D]; gradients by the product rule,
                                       dW_V[:, kv(h)] @ W_O[h] + W_V[:, kv(h)] @ dW_O[h] [D, D] (pico-analyze's OV
                                       gradient, O_h dV_h + dO_h V_h in its layout). pico-analyze's OV weights
                                       multiply the other way round (V[kv(h)] O[:, h] in
                                       PyTorch's [out, in] layout, an [E, E] matrix: same nonzero eigenvalues, other
                                       singular values); this is the map the residual stream sees, x -> x W_OV.
    blocks.<i>.attention.ov_all        every head's OV side by side, [D, H D] (activations [N, H D]), as
                                       pico-analyze concatenates them
    kv(h) = h // (n_heads / n_kv_heads) selects head dim columns kv(h) E .. (kv(h) + 1) E;
    W_O[h] is rows h E .. (h+1) E.

Output layout (under `out`):
    <metric>/<split>/<step>.json   {"metric", "split", "step", ["target_step",] "values": {kind: {component: value}}}
                                   kind: weights, gradients (split = the `split` key) or activations (split = eval);
                                   a value that is not finite (0 / 0, x / 0) is null
    <metric>.png                   a panel per (kind, layer), a line per block (and OV head) over steps; ReLoRA's
                                   base dashed and update dotted
"""
import json
import math
import os
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # small matrices: BLAS threads cost more than they save (benchmarks/RESULTS.md)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import snapshots  # noqa: E402
from config import ConfigError, reject_unknown  # noqa: E402

KEYS = {"run_dir": None, "metrics": None, "steps": None, "split": "train", "target_step": None, "out": None,
        "wandb": "disabled", "compare": None}


class AnalysisError(ConfigError):
    """Bad input to the analysis; the message names the key or file and the fix."""


# ---------------------------------------------------------------------------------------------- metrics

def singular_values(w) -> np.ndarray:
    """Descending singular values, in float64."""
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


def frobenius(w) -> float:
    return float(np.linalg.norm(np.asarray(w, np.float64)))


def nuclear(w, s=None) -> float:  # s: w's singular values, when already computed
    return float((singular_values(w) if s is None else s).sum())


def max_abs(w) -> float:
    return float(np.abs(np.asarray(w, np.float64)).max())


def condition_number(w, s=None) -> float:
    s = singular_values(w) if s is None else s
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf if s[0] > 0 else math.nan


def per(w, s=None) -> float:
    """Proportional effective rank (Roy & Vetterli 2007, over n = min(in, out)): 1 for an identity, 1/n at rank 1."""
    s = singular_values(w) if s is None else s
    if s[0] == 0:
        return math.nan  # a zero matrix (a ReLoRA update right after a merge) has no spectrum to spread
    p = s / s.sum()
    p = p[p > 0]  # 0 ln 0 = 0
    return float(np.exp(-np.sum(p * np.log(p))) / len(s))


def gini(w) -> float:
    """Gini coefficient of |w| (Hurley & Rickard 2009): 0 for a constant vector, 1 - 1/n for a one-hot."""
    x = np.sort(np.abs(np.asarray(w, np.float64)).ravel())
    n = x.size
    return float(np.sum((2 * np.arange(1, n + 1) - n - 1) * x) / (n * x.sum())) if x[-1] > 0 else math.nan


def hoyer(w) -> float:
    """Hoyer sparsity (Hoyer 2004): 0 for a constant vector, 1 for a one-hot."""
    x = np.abs(np.asarray(w, np.float64)).ravel()
    n = x.size
    return float((math.sqrt(n) - x.sum() / np.linalg.norm(x)) / (math.sqrt(n) - 1)) if x.max() > 0 else math.nan


def cka(x, y) -> float:
    """Linear CKA of X [N, p] and Y [N, q] (Kornblith et al. 2019): 1 for X = Y, invariant to orthogonal transforms
    and isotropic scaling of either."""
    x, y = (np.asarray(a, np.float64) - np.asarray(a, np.float64).mean(0) for a in (x, y))
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def pwcca(x, y, rtol: float = 1e-6) -> float:
    """Projection-weighted CCA of X [N, p] and Y [N, q] (Morcos et al. 2018; Google's svcca `compute_pwcca`, which
    pico-analyze vendors): the canonical correlations rho_i of the two sets, averaged with weights alpha_i that say
    how much canonical direction h_i of X accounts for X's own units: alpha_i = sum_j |<h_i, x_j>| over the
    centred columns x_j, normalised to sum 1, with the h_i orthonormal. PWCCA(X, X) = 1.

    CCA needs more samples than directions: with N = 32 sequences and 128 units it fits any two sets perfectly.
    So each set is first truncated to its top principal directions (SVCCA, Raghu et al. 2017): min(its rank,
    (N - 1) // 2), the rank counting singular values above rtol * s_max, so the two sets together have no more
    directions than centred data has samples (with N > 2 p + 1 and N > 2 q + 1, nothing is dropped). rho are
    then the singular values of U_X^T U_Y = A diag(rho) B^T (U: the truncated sets' orthonormal bases, from
    np.linalg.svd) and H = U_X A (orthonormal already: no QR). Few samples still bias rho upwards; a larger
    eval.batch_size gives tighter values. Differences from the svcca code: the truncation replaces its epsilon
    regularisation; alpha uses centred units; units are the columns here (svcca takes [units, samples], and
    pico-analyze passes its stored [N, units] arrays unchanged, so it treats the sequences as the units)."""
    x, y = (np.asarray(a, np.float64) - np.asarray(a, np.float64).mean(0) for a in (x, y))
    (ux, sx, _), (uy, sy, _) = (np.linalg.svd(a, full_matrices=False) for a in (x, y))
    keep = lambda s: min(int(np.sum(s > rtol * s[0])) if s[0] > 0 else 0, (x.shape[0] - 1) // 2)
    kx, ky = keep(sx), keep(sy)
    if min(kx, ky) == 0:
        return math.nan
    a, rho, _ = np.linalg.svd(ux[:, :kx].T @ uy[:, :ky], full_matrices=False)  # rho: min(kx, ky) correlations
    h = ux[:, :kx] @ a  # [N, min(kx, ky)] canonical directions of X
    alpha = np.abs(h.T @ x).sum(axis=1)
    return float(np.sum(alpha / alpha.sum() * np.clip(rho, 0, 1)))


MATRIX_METRICS = dict(frobenius=frobenius, nuclear=nuclear, max_abs=max_abs, condition_number=condition_number,
                      per=per, gini=gini, hoyer=hoyer)  # on weights and gradients
ACTIVATION_METRICS = dict(cka=cka, pwcca=pwcca)  # a step's eval activations against target_step's
def head_entropy(h) -> float:
    """A head's mean attention entropy, as dynamics.head_entropy stored it (nats)."""
    return float(h)


ATTENTION_METRICS = dict(head_entropy=head_entropy)  # from the snapshots' head_entropy/blocks.<i>.attention [H]
METRICS = {**MATRIX_METRICS, **ACTIVATION_METRICS, **ATTENTION_METRICS}
SPECTRAL = ("nuclear", "condition_number", "per")  # take the singular values, computed once per matrix
LOG_SCALE = ("condition_number",)


# ---------------------------------------------------------------------------------------------- components

def ov_circuit(w_v, w_o, n_heads: int, n_kv_heads: int) -> list:
    """Per query head h: W_V[:, kv(h) E:(kv(h)+1) E] @ W_O[h E:(h+1) E, :], kernels [in, out] (y = x @ W).
    With a_V [N, K E] activations for w_v, the head's OV activations [N, D] instead."""
    e = w_o.shape[0] // n_heads
    group = n_heads // n_kv_heads
    return [np.asarray(w_v, np.float64)[:, (h // group) * e:(h // group + 1) * e]
            @ np.asarray(w_o, np.float64)[h * e:(h + 1) * e, :] for h in range(n_heads)]


def components(snap: dict, kind: str, split: str, model: dict) -> dict:
    """{component name: matrix} of one kind (weights, gradients, activations) from a snapshots.load snapshot."""
    out = {}
    for (s, k, layer), value in snap.items():
        if s != split:
            continue
        if k == kind:
            out[layer] = value
        elif kind == "weights" and k in ("weights_base", "weights_update"):
            out[f"{layer}.{k.removeprefix('weights_')}"] = value
    heads = model["n_heads"], model["n_kv_heads"]
    for layer in sorted(out):
        m = re.fullmatch(r"(blocks\.\d+)\.attention\.v", layer)
        block = m and m.group(1)
        w_v, w_o = (snap.get((split, "weights", f"{block}.attention.{x}")) for x in ("v", "o")) if m else (None, None)
        if w_o is None or kind == "gradients" and (w_v is None or f"{block}.attention.o" not in out):
            continue
        ovs = ov_circuit(out[layer], w_o, *heads)
        if kind == "gradients":  # d(W_V W_O) = dW_V W_O + W_V dW_O, per head
            ovs = [a + b for a, b in zip(ovs, ov_circuit(w_v, out[f"{block}.attention.o"], *heads))]
        for h, ov in enumerate(ovs):
            out[f"{block}.attention.ov.{h}"] = ov
        out[f"{block}.attention.ov_all"] = np.concatenate(ovs, axis=1)
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# ---------------------------------------------------------------------------------------------- the analysis

def select_steps(spec, present: list[int], where) -> list[int]:
    """steps=null | int | [list] | {start, end, every} -> sorted steps, each of which must be stored."""
    if spec is None:
        steps = present
    elif isinstance(spec, int):
        steps = [spec]
    elif isinstance(spec, list) and all(isinstance(s, int) for s in spec):
        steps = sorted(set(spec))
    elif isinstance(spec, dict) and set(spec) <= {"start", "end", "every"} and "every" in spec:
        start, end = spec.get("start", present[0] if present else 0), spec.get("end", present[-1] if present else 0)
        if not (isinstance(spec["every"], int) and spec["every"] > 0):
            raise AnalysisError(f"steps.every={spec['every']!r}; use a positive integer")
        steps = list(range(start, end + 1, spec["every"]))
    else:
        raise AnalysisError(f"steps={spec!r}; use a list (steps=[0,100,200]), a range "
                            f"(quoted in a shell: 'steps={{start:0,end:300,every:100}}', end included) or leave it "
                            f"out for all stored steps")
    missing = [s for s in steps if s not in present]
    if missing or not steps:
        raise AnalysisError(f"step(s) {missing or steps} not stored in {where}; steps present: {present}")
    return steps


def run_config(run_dir: Path) -> tuple[dict, dict]:
    """(the run's config, {n_heads, n_kv_heads}) from picojax's config.yaml, or else from the training_config.yaml
    of a pico-train run (model.attention_n_heads, attention_n_kv_heads; name: checkpointing.run_name)."""
    for name in ("config.yaml", "training_config.yaml"):
        if (run_dir / name).exists():
            cfg = OmegaConf.to_container(OmegaConf.load(run_dir / name), resolve=True)
            break
    else:
        raise AnalysisError(f"{run_dir} has neither config.yaml (picojax) nor training_config.yaml (pico-train); "
                            f"the analysis reads the number of heads from it (the trainer writes both)")
    m = cfg.get("model") or {}
    if name == "config.yaml":
        return cfg, m
    cfg.setdefault("name", (cfg.get("checkpointing") or {}).get("run_name") or run_dir.name)
    heads = m.get("attention_n_heads")
    if heads is None:
        raise AnalysisError(f"{run_dir / name} has no model.attention_n_heads; is it a pico-train run's config?")
    return cfg, dict(n_heads=heads, n_kv_heads=m.get("attention_n_kv_heads") or heads)


def analyze(run_dir, metrics=None, steps=None, split="train", target_step=None, out=None, wandb="disabled") -> dict:
    """Compute, write and plot; returns {metric: {step: {kind: {component: value}}}}."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise AnalysisError(f"run_dir={run_dir} is not a directory; point it at a run (e.g. runs/local)")
    present = snapshots.stored_steps(run_dir)
    if not present:
        raise AnalysisError(f"{run_dir} holds no snapshots (neither picojax's learning_dynamics/<step>/ nor "
                            f"pico-train's checkpoints/step_<k>/learning_dynamics/*.pt); train with "
                            f"checkpoint.dynamics.layers set (default [attention.v,attention.o,swiglu.down]) and "
                            f"checkpoint.every_steps=N")
    explicit = metrics is not None
    metrics = list(METRICS) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise AnalysisError(f"metrics: unknown {unknown or 'empty list'}; known metrics: {list(METRICS)}")
    if split not in ("train", "eval"):
        raise AnalysisError(f"split={split!r}; use train or eval (activations always use eval)")
    if wandb not in ("disabled", "offline", "online"):
        raise AnalysisError(f"wandb={wandb!r}; use disabled, offline or online")
    steps = select_steps(steps, present, run_dir / "learning_dynamics")
    target_step = steps[-1] if target_step is None else target_step
    if target_step not in present:
        raise AnalysisError(f"target_step={target_step} is not stored in {run_dir / 'learning_dynamics'}; "
                            f"steps present: {present}")
    run_cfg, model = run_config(run_dir)
    out = Path(out).expanduser() if out else run_dir / "analysis"

    matrix = [m for m in metrics if m in MATRIX_METRICS]
    acts = [m for m in metrics if m in ACTIVATION_METRICS]
    target = components(snapshots.load(run_dir, target_step), "activations", "eval", model) if acts else None
    results = {m: {} for m in metrics}
    for step in steps:
        snap = snapshots.load(run_dir, step)
        if matrix:
            data = {kind: components(snap, kind, split, model) for kind in ("weights", "gradients")}
            spectra = {kind: {c: singular_values(w) for c, w in comps.items()} for kind, comps in data.items()} \
                if set(matrix) & set(SPECTRAL) else {}
            for m in matrix:
                value = (lambda kind, c, w: METRICS[m](w, s=spectra[kind][c])) if m in SPECTRAL else \
                    (lambda kind, c, w: METRICS[m](w))
                results[m][step] = {kind: {c: value(kind, c, w) for c, w in comps.items()}
                                    for kind, comps in data.items()}
        if acts:
            mine = components(snap, "activations", "eval", model)
            for m in acts:
                results[m][step] = {"activations": {c: METRICS[m](a, target[c]) for c, a in mine.items()}}
        heads = {layer: v for (s, k, layer), v in snap.items() if s == split and k == "head_entropy"}
        for m in (m for m in metrics if m in ATTENTION_METRICS and heads):
            values = {}
            for layer, v in sorted(heads.items(), key=lambda kv: _sort_key(kv[0])):
                values[layer] = float(np.mean(v))
                values.update({f"{layer}.head.{h}": METRICS[m](x) for h, x in enumerate(v)})
            results[m][step] = {"attention": values}
    for m in [m for m in ATTENTION_METRICS if m in results and not results[m]]:
        if explicit:
            raise AnalysisError(f"metrics: {m} needs the attention entropies that snapshots of picojax from 2026-12 "
                                f"on store; {run_dir} has none (an older run, or a pico-train one)")
        del results[m]

    for m, by_step in results.items():
        msplit = "eval" if m in ACTIVATION_METRICS else split
        for step, values in by_step.items():
            record = dict(metric=m, split=msplit, step=step)
            if m in ACTIVATION_METRICS:
                record["target_step"] = target_step
            record["values"] = {k: {c: _finite(v) for c, v in vals.items()} for k, vals in values.items()}
            path = out / m / msplit / f"{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
        title = f"{m} ({msplit}" + (f", against step {target_step})" if m in ACTIVATION_METRICS else ")")
        plot_metric(by_step, out / f"{m}.png", f"{run_cfg.get('name', run_dir.name)}: {title}", log=m in LOG_SCALE)
    if wandb != "disabled":
        log_wandb(results, split, run_cfg, run_dir, out, wandb)
    return results


def _finite(v):
    return v if math.isfinite(v) else None


def log_wandb(results: dict, split: str, run_cfg: dict, run_dir: Path, out: Path, mode: str):
    """One W&B run `<name>-analysis` with every value as `<metric>/<split>/<kind>/<component>`, x = the step."""
    import wandb
    w = run_cfg.get("wandb", {})
    run = wandb.init(project=w.get("project") or "picojax", entity=w.get("entity"), mode=mode, dir=str(out),
                     name=f"{run_cfg.get('name', run_dir.name)}-analysis",
                     config=dict(run_dir=str(run_dir), split=split),
                     settings=wandb.Settings(silent=True, console="off"))
    for step in sorted({s for by_step in results.values() for s in by_step}):
        row = {}
        for m, by_step in results.items():
            msplit = "eval" if m in ACTIVATION_METRICS else split
            for kind, vals in by_step.get(step, {}).items():
                row.update({f"{m}/{msplit}/{kind}/{c}": v for c, v in vals.items() if math.isfinite(v)})
        run.log(row, step=step)
    run.finish()


# ---------------------------------------------------------------------------------------------- plots

def _panel(name: str):
    """blocks.<i>.<layer>[.base|.update|.<head>] -> (block, panel layer, line style, head or None)."""
    parts = name.split(".")
    block, rest = int(parts[1]), parts[2:]
    if rest[-1] in ("base", "update"):
        return block, ".".join(rest[:-1]), "--" if rest[-1] == "base" else ":", None
    if rest[:2] == ["attention", "ov"]:
        return block, "attention.ov", "-", int(rest[2])
    if rest[:2] == ["attention", "head"]:
        return block, "attention.heads", "-", int(rest[2])
    return block, ".".join(rest), "-", None


def plot_metric(by_step: dict, path: Path, title: str, log: bool = False):
    """A panel per (kind, layer), a line per block (OV: per head, same colour) over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    steps = sorted(by_step)
    kinds = list(by_step[steps[0]])
    series = {}  # (kind, layer) -> {component: (block, style, [values])}
    for kind in kinds:
        for step in steps:
            for c, v in by_step[step].get(kind, {}).items():
                block, layer, style, _ = _panel(c)
                series.setdefault((kind, layer), {}).setdefault(c, (block, style, {}))[2][step] = v
    layers = sorted({layer for _, layer in series}, key=lambda l: (l in ("attention.ov", "attention.heads"), l))
    n_blocks = 1 + max((b for lines in series.values() for b, _, _ in lines.values()), default=0)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_blocks))
    height = 2.4 * len(kinds) + 1.0  # inches: the panels, plus the title above and the legend below
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.2 * len(layers), height), squeeze=False, sharex=True)
    for r, kind in enumerate(kinds):
        for col, layer in enumerate(layers):
            ax = axes[r][col]
            lines = series.get((kind, layer))
            if not lines:
                ax.set_visible(False)
                continue
            for c, (block, style, vals) in lines.items():
                xs = [s for s in steps if s in vals]
                ys = [vals[s] if math.isfinite(vals[s]) else np.nan for s in xs]
                thin = layer in ("attention.ov", "attention.heads")
                ax.plot(xs, ys, style, color=colors[block], lw=0.8 if thin else 1.4, marker=".", ms=3)
            ax.set_title(f"{kind}: {layer}", fontsize=9)
            ax.tick_params(labelsize=7)
            if log:
                ax.set_yscale("log")
            if r == len(kinds) - 1:
                ax.set_xlabel("step", fontsize=8)
    handles = [Line2D([], [], color=colors[b], label=f"block {b}") for b in range(n_blocks)]
    if any(style != "-" for lines in series.values() for _, style, _ in lines.values()):
        handles += [Line2D([], [], color="gray", ls="--", label="ReLoRA base W"),
                    Line2D([], [], color="gray", ls=":", label="ReLoRA update scale (BA)^T")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    # fixed margins, in inches: tight_layout took seconds per figure
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.75 / height, top=1 - 0.5 / height, wspace=0.3, hspace=0.35)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def compare(run_dirs: list, metric: str = "per", split: str = "train", out=None, kind: str = "weights") -> Path:
    """Side by side from analyzed runs: a panel per layer, a colour per run, a thin line per block (per head for the
    OV circuit) and their mean thick. Effective kernels only: no ReLoRA base / update."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if metric not in METRICS:
        raise AnalysisError(f"metrics=[{metric}]: unknown; known metrics: {list(METRICS)}")
    if metric in ACTIVATION_METRICS:
        split, kind = "eval", "activations"
    runs = {}
    for run in map(lambda p: Path(p).expanduser(), run_dirs):
        files = sorted((run / "analysis" / metric / split).glob("*.json"), key=lambda p: int(p.stem))
        if not files:
            raise AnalysisError(f"{run / 'analysis' / metric / split} holds no results; run "
                                f"`python analyze.py run_dir={run} metrics=[{metric}]` first")
        runs[run.name] = {int(f.stem): json.loads(f.read_text())["values"][kind] for f in files}
    layers = sorted({_panel(c)[1] for by_step in runs.values() for vals in by_step.values() for c in vals
                     if _panel(c)[2] == "-"}, key=lambda l: (l == "attention.ov", l))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.0), squeeze=False)
    for (name, by_step), color in zip(runs.items(), plt.get_cmap("tab10").colors):
        steps = sorted(by_step)
        for ax, layer in zip(axes[0], layers):
            comps = sorted({c for s in steps for c in by_step[s] if _panel(c)[1] == layer and _panel(c)[2] == "-"},
                           key=_sort_key)
            grid = np.array([[by_step[s].get(c) if by_step[s].get(c) is not None else np.nan for c in comps]
                             for s in steps], dtype=float)
            ax.plot(steps, grid, color=color, lw=0.6, alpha=0.45)
            ax.plot(steps, np.nanmean(grid, axis=1), color=color, lw=2.2, label=name)
            ax.set_title(f"{kind}: {layer}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(metric, fontsize=9)
    axes[0][0].legend(fontsize=7, frameon=False, title="thick: mean over blocks", title_fontsize=7)
    fig.tight_layout()
    out = Path(out).expanduser() if out else Path(f"compare_{metric}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- CLI

def parse(argv: list[str]) -> dict:
    """key=value overrides in Hydra's grammar -> the known keys with their defaults filled in."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except HydraException as e:
        raise AnalysisError(f"could not parse {' '.join(argv)}: {str(e).splitlines()[0]}; use key=value "
                            f"(known keys: {list(KEYS)})") from None
    given = {o.key_or_group: o.value() for o in overrides}
    reject_unknown(given, KEYS, what="key", error=AnalysisError)
    cfg = {**KEYS, **given}
    for key in ("metrics", "compare"):
        if isinstance(cfg[key], str):
            cfg[key] = [cfg[key]]
    return cfg


def main(argv=None):
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        if cfg["compare"]:
            metric = (cfg["metrics"] or ["per"])
            if len(metric) != 1:
                raise AnalysisError(f"compare plots one metric; got metrics={metric}")
            print(f"wrote {compare(cfg['compare'], metric[0], cfg['split'], cfg['out'])}")
            return
        if not cfg["run_dir"]:
            raise AnalysisError("run_dir is required (python analyze.py run_dir=runs/local), or compare=[run, run]")
        out = Path(cfg["out"] or Path(cfg["run_dir"]) / "analysis")
        results = analyze(cfg["run_dir"], cfg["metrics"], cfg["steps"], cfg["split"], cfg["target_step"], out,
                          cfg["wandb"])
        steps = sorted({s for r in results.values() for s in r})
        print(f"{len(results)} metric(s) x {len(steps)} step(s) ({steps[0]}..{steps[-1]}) -> {out}/<metric>/<split>/"
              f"<step>.json and {out}/<metric>.png")
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
