"""analyze.py: metrics with known answers and against direct numpy evaluations of their formulas, the OV circuit
against the model's attention, and an end-to-end run -> analysis -> JSON / PNG, with its errors."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import analyze
import train
from snapshots import load as load_dynamics
from model import Attention, ModelConfig, rope_tables

rng = np.random.default_rng(0)


def orthogonal(n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


# ---------------------------------------------------------------------------------------------- known answers

@pytest.mark.parametrize("n, p", [(32, 128), (200, 16)])  # fewer samples than units (the eval batch), and more
def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale(n, p):
    x, y = rng.standard_normal((n, p)), rng.standard_normal((n, p // 2))
    assert analyze.cka(x, x) == pytest.approx(1, abs=1e-12)
    base = analyze.cka(x, y)
    assert base < 0.99
    assert analyze.cka(x @ orthogonal(p), y) == pytest.approx(base, rel=1e-10)
    assert analyze.cka(3.7 * x, 0.2 * y @ orthogonal(p // 2)) == pytest.approx(base, rel=1e-10)
    assert analyze.cka(x + 5.0, y) == pytest.approx(base, rel=1e-10)  # columns are centred


@pytest.mark.parametrize("n, p", [(32, 128), (200, 16), (8, 16)])
def test_pwcca_is_one_on_itself_and_low_for_independent_sets(n, p):
    x = rng.standard_normal((n, p))
    assert analyze.pwcca(x, x) == pytest.approx(1, abs=1e-9)
    assert analyze.pwcca(x, 2 * x @ orthogonal(p)) == pytest.approx(1, abs=1e-9)  # CCA ignores invertible maps
    big = rng.standard_normal((4000, 4))
    assert analyze.pwcca(big, rng.standard_normal((4000, 4))) < 0.1
    assert analyze.pwcca(big, big @ orthogonal(4) + 0.1 * rng.standard_normal((4000, 4))) > 0.99


def test_effective_rank_gini_hoyer_condition_number_known_answers():
    n = 16
    assert analyze.per(np.eye(n)) == pytest.approx(1)
    u, v = rng.standard_normal(n), rng.standard_normal(n + 5)
    assert analyze.per(np.outer(u, v)) == pytest.approx(1 / n, rel=1e-6)  # n = min(in, out) singular values
    assert analyze.per(np.diag([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.5)
    one_hot, const = np.zeros(n), np.full(n, 0.3)
    one_hot[5] = -2.0  # |x| is what counts
    assert analyze.gini(one_hot) == pytest.approx(1 - 1 / n)
    assert analyze.gini(const) == pytest.approx(0, abs=1e-12)
    assert analyze.hoyer(one_hot) == pytest.approx(1)
    assert analyze.hoyer(const) == pytest.approx(0, abs=1e-12)
    assert analyze.condition_number(np.diag([0.5, 4.0, 2.0, 1.0])) == pytest.approx(8.0)
    assert analyze.condition_number(np.diag([1.0, 0.0])) == math.inf
    assert math.isnan(analyze.condition_number(np.zeros((3, 3))))  # 0 / 0: written as null


def test_metrics_match_direct_numpy_evaluations_of_their_formulas():
    w = rng.standard_normal((12, 7)) * rng.uniform(0.1, 3, 7)  # [in, out], uneven column scales
    x = np.abs(w).ravel()
    n = x.size
    s = np.sqrt(np.clip(np.linalg.eigvalsh(w.T @ w), 0, None))[::-1]  # singular values by another route
    assert analyze.frobenius(w) == pytest.approx(np.sqrt(np.sum(w ** 2)))
    assert analyze.nuclear(w) == pytest.approx(np.linalg.norm(w, "nuc"))
    assert analyze.nuclear(w) == pytest.approx(s.sum())
    assert analyze.max_abs(w) == pytest.approx(x.max())
    assert analyze.condition_number(w) == pytest.approx(np.linalg.cond(w))
    p = s / s.sum()
    assert analyze.per(w) == pytest.approx(np.exp(-np.sum(p * np.log(p))) / 7)
    # Gini as the mean absolute difference over twice the mean, the same quantity as the sorted-sum formula
    assert analyze.gini(w) == pytest.approx(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * x.sum()))
    assert analyze.hoyer(w) == pytest.approx((np.sqrt(n) - np.linalg.norm(x, 1) / np.linalg.norm(x, 2)) / (np.sqrt(n) - 1))

    a, b = rng.standard_normal((40, 10)), rng.standard_normal((40, 6))
    b[:, :3] += a[:, :3]  # partly shared
    h = np.eye(40) - 1 / 40  # HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = A A^T
    k, l = a @ a.T, b @ b.T
    hsic = lambda k, l: np.trace(k @ h @ l @ h)
    assert analyze.cka(a, b) == pytest.approx(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)), rel=1e-10)

    # PWCCA by covariance whitening (Sxx^-1/2 Sxy Syy^-1/2) and QR of the canonical variates, as the svcca code
    # does; 500 samples for 6 + 5 units, so the truncation keeps every direction
    a, b = rng.standard_normal((500, 6)), rng.standard_normal((500, 5))
    b[:, :2] += 0.5 * a[:, 1:3]
    a, b = a - a.mean(0), b - b.mean(0)
    inv_sqrt = lambda c: (lambda e, v: v @ np.diag(e ** -0.5) @ v.T)(*np.linalg.eigh(c))
    wa, wb = inv_sqrt(a.T @ a), inv_sqrt(b.T @ b)
    u, rho, _ = np.linalg.svd(wa @ a.T @ b @ wb)
    q, _ = np.linalg.qr(a @ wa @ u[:, :5])  # the 5 canonical variates of A
    alpha = np.abs(q.T @ a).sum(axis=1)
    assert analyze.pwcca(a, b) == pytest.approx(np.sum(alpha / alpha.sum() * rho), rel=1e-8)


# ---------------------------------------------------------------------------------------------- components

def test_ov_circuit_per_head_matches_a_direct_computation_and_the_models_attention():
    cfg = ModelConfig(vocab_size=16, seq_len=8, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_hidden=64,
                      dtype="float32")
    attn = Attention(cfg, nnx.Rngs(0))
    w_v, w_o = (np.asarray(k[...], np.float64) for k in (attn.v.kernel, attn.o.kernel))  # [D, K E], [H E, D]
    ov = analyze.ov_circuit(w_v, w_o, cfg.n_heads, cfg.n_kv_heads)
    e = cfg.head_dim
    direct = np.einsum("dhe,hef->hdf", w_v.reshape(32, 2, e)[:, [0, 0, 1, 1]], w_o.reshape(4, e, 32))
    np.testing.assert_allclose(np.stack(ov), direct, rtol=1e-12)
    assert all(np.linalg.matrix_rank(m) == e for m in ov)
    # one token attends only to itself, so attention is x W_V W_O = x sum_h W_OV^h (RoPE moves only q and k)
    x = jnp.asarray(rng.standard_normal((1, 1, 32)), jnp.float32)
    sin, cos = rope_tables(jnp.zeros((1, 1), jnp.int32), e, cfg.rope_theta)
    out, _ = attn(x, (sin, cos))
    np.testing.assert_allclose(out[0, 0], np.asarray(x[0, 0]) @ sum(ov), rtol=1e-5, atol=1e-6)


def test_components_name_layers_relora_variants_and_ov_heads():
    w = lambda *s: rng.standard_normal(s)
    snap = {("train", "weights", "blocks.0.attention.v"): w(8, 4), ("train", "weights", "blocks.0.attention.o"): w(8, 8),
            ("train", "weights_base", "blocks.0.attention.v"): w(8, 4),
            ("train", "weights_update", "blocks.0.attention.v"): w(8, 4),
            ("train", "gradients", "blocks.0.attention.v"): w(8, 4), ("train", "gradients", "blocks.0.attention.o"): w(8, 8),
            ("eval", "weights", "blocks.0.attention.o"): w(8, 8), ("eval", "activations", "blocks.0.attention.v"): w(5, 4),
            ("train", "tokens", None): np.zeros((2, 3))}
    model = dict(n_heads=2, n_kv_heads=1)
    weights = analyze.components(snap, "weights", "train", model)
    assert list(weights) == ["blocks.0.attention.o", "blocks.0.attention.ov.0", "blocks.0.attention.ov.1",
                             "blocks.0.attention.ov_all", "blocks.0.attention.v", "blocks.0.attention.v.base",
                             "blocks.0.attention.v.update"]
    w_v, w_o = snap[("train", "weights", "blocks.0.attention.v")], snap[("train", "weights", "blocks.0.attention.o")]
    np.testing.assert_allclose(weights["blocks.0.attention.ov.1"], w_v @ w_o[4:])
    np.testing.assert_array_equal(weights["blocks.0.attention.ov_all"],
                                  np.concatenate([weights["blocks.0.attention.ov.0"], weights["blocks.0.attention.ov.1"]], 1))
    grads = analyze.components(snap, "gradients", "train", model)
    assert list(grads) == ["blocks.0.attention.o", "blocks.0.attention.ov.0", "blocks.0.attention.ov.1",
                           "blocks.0.attention.ov_all", "blocks.0.attention.v"]
    # the product rule, checked against a finite difference of the OV map along the gradient direction
    d_v, d_o = snap[("train", "gradients", "blocks.0.attention.v")], snap[("train", "gradients", "blocks.0.attention.o")]
    eps = 1e-6
    np.testing.assert_allclose(grads["blocks.0.attention.ov.1"],
                               ((w_v + eps * d_v) @ (w_o + eps * d_o)[4:] - w_v @ w_o[4:]) / eps, rtol=1e-4, atol=1e-4)
    acts = analyze.components(snap, "activations", "eval", model)  # OV activations: a_V[:, kv(h)] @ W_O[h]
    np.testing.assert_allclose(acts["blocks.0.attention.ov.0"], snap[("eval", "activations", "blocks.0.attention.v")]
                               @ snap[("eval", "weights", "blocks.0.attention.o")][:4])


# ---------------------------------------------------------------------------------------------- end to end

def run_main(capsys, *argv) -> tuple[int, str]:
    try:
        analyze.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_analyze_a_relora_run_end_to_end_with_its_errors(tiny_cfg, tmp_path, capsys):
    relora = "+model.relora={r:4,reset_frequency:2,lora_alpha:8,lora_dropout:0.0,restart_warmup_steps:0}"
    t = train.Trainer(tiny_cfg("train.steps=3", "checkpoint.every_steps=1", relora, "opt.warmup_steps=0",
                               "checkpoint.dynamics.layers=[attention.v,attention.o,swiglu.down]"))
    t.run()  # snapshots at 0..3, every step at a nonzero LR; a merge-and-reset right before step 2's
    run = t.run_dir
    code, out = run_main(capsys, f"run_dir={run}", "steps={start:0,end:3,every:1}")
    assert code == 0, out
    for metric in analyze.METRICS:
        assert (run / "analysis" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        split = "eval" if metric in analyze.ACTIVATION_METRICS else "train"
        assert sorted(p.name for p in (run / "analysis" / metric / split).iterdir()) == ["0.json", "1.json", "2.json", "3.json"]
    record = json.loads((run / "analysis" / "per" / "train" / "1.json").read_text())
    assert (record["metric"], record["split"], record["step"]) == ("per", "train", 1)
    heads = json.loads((run / "analysis" / "head_entropy" / "train" / "0.json").read_text())["values"]["attention"]
    assert list(heads) == [f"blocks.{i}.attention{h}" for i in range(2) for h in ["", *(f".head.{h}" for h in range(4))]]
    assert heads["blocks.0.attention"] == pytest.approx(np.mean([heads[f"blocks.0.attention.head.{h}"] for h in range(4)]))
    names = [f"blocks.{i}.{c}" for i in range(2) for c in (
        "attention.o", "attention.o.base", "attention.o.update", *(f"attention.ov.{h}" for h in range(4)), "attention.ov_all",
        "attention.v", "attention.v.base", "attention.v.update", "swiglu.down", "swiglu.down.base", "swiglu.down.update")]
    assert list(record["values"]["weights"]) == names
    assert list(record["values"]["gradients"]) == [f"blocks.{i}.{c}" for i in range(2) for c in (
        "attention.o", *(f"attention.ov.{h}" for h in range(4)), "attention.ov_all", "attention.v", "swiglu.down")]
    snap = load_dynamics(run, 1)
    assert record["values"]["weights"]["blocks.1.swiglu.down.update"] == pytest.approx(
        analyze.per(snap[("train", "weights_update", "blocks.1.swiglu.down")]))
    assert record["values"]["gradients"]["blocks.0.attention.o"] == pytest.approx(
        analyze.per(snap[("train", "gradients", "blocks.0.attention.o")]))
    assert 0 < record["values"]["weights"]["blocks.0.attention.v.update"] <= 4 / 16  # rank r = 4 of 16
    # right after the merge the update is 0: its Frobenius norm is 0 and its effective rank undefined (null)
    after = json.loads((run / "analysis" / "per" / "train" / "2.json").read_text())["values"]["weights"]
    assert after["blocks.0.attention.v.update"] is None
    fro = json.loads((run / "analysis" / "frobenius" / "train" / "2.json").read_text())["values"]["weights"]
    assert fro["blocks.0.attention.v.update"] == 0 and fro["blocks.0.attention.v"] == fro["blocks.0.attention.v.base"] > 0
    # activations against the target step (the last): 1 there, and a direct evaluation at another step
    cka = {s: json.loads((run / "analysis" / "cka" / "eval" / f"{s}.json").read_text()) for s in (0, 3)}
    assert cka[3]["target_step"] == 3 and set(cka[3]["values"]) == {"activations"}
    assert all(v == pytest.approx(1) for v in cka[3]["values"]["activations"].values())
    key = ("eval", "activations", "blocks.1.attention.v")
    assert cka[0]["values"]["activations"]["blocks.1.attention.v"] == pytest.approx(
        analyze.cka(load_dynamics(run, 0)[key], load_dynamics(run, 3)[key]))
    assert "blocks.0.attention.ov.3" in cka[0]["values"]["activations"]

    # another split, a list of steps, a chosen target, a chosen output folder
    code, out = run_main(capsys, f"run_dir={run}", "metrics=[pwcca,hoyer]", "steps=[1,3]", "split=eval",
                         "target_step=1", f"out={tmp_path / 'a'}")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["hoyer", "hoyer.png", "pwcca", "pwcca.png"]
    assert json.loads((tmp_path / "a" / "pwcca" / "eval" / "3.json").read_text())["target_step"] == 1
    assert (tmp_path / "a" / "hoyer" / "eval" / "1.json").exists()

    # the side-by-side figure from analyzed runs
    code, out = run_main(capsys, f"compare=[{run},{run}]", f"out={tmp_path / 'cmp.png'}")
    assert code == 0 and (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG", out

    # bad input: exit 2, a message naming what is wrong and what is there
    for argv, expected in [
        ((f"run_dir={run}", "steps=[0,7]"), "step(s) [7] not stored in"),
        ((f"run_dir={run}", "steps={start:0,end:9,every:3}"), "steps present: [0, 1, 2, 3]"),
        ((f"run_dir={run}", "target_step=5"), "target_step=5 is not stored"),
        ((f"run_dir={run}", "metrics=[per,rank]"), "unknown ['rank']; known metrics: ['frobenius'"),
        ((f"run_dir={run}", "split=valid"), "split='valid'"),
        ((f"run_dir={run}", "wandb=maybe"), "wandb='maybe'"),
        ((f"run_dir={run}", "step=3"), "unknown key 'step'; known keys here: ['run_dir', 'metrics', 'steps'"),
        ((f"run_dir={tmp_path / 'nope'}",), "is not a directory"),
        ((f"run_dir={tmp_path / 'a'}",), "holds no snapshots"),
        (("metrics=[per]",), "run_dir is required"),
        ((f"compare=[{tmp_path / 'a'}]",), "holds no results; run `python analyze.py run_dir="),
    ]:
        code, out = run_main(capsys, *argv)
        assert code == 2 and out.startswith("error: ") and expected in out, (argv, out)
        assert "Traceback" not in out
