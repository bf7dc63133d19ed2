"""Meta-learning pretraining (maml.py): the meta gradient against pico-maml's recomputing schedule and a finite
difference, the hybrid at ratio 0 bit for bit next-token prediction, sharded == one device, exact resume, the head
in the checkpoint and not in the Hugging Face files, and bad knobs."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

import export
import maml
import steps
import train
import train_state
from config import ConfigError
from conftest import TINY, make_cfg

META = "model.maml={hybrid_ratio:0.5,n_way:8,k_shot:3,inner_steps:3,inner_lr:0.5,num_layers:3,hidden_dim:16,order:1}"
VOCAB = "model.vocab_size=4160"  # room above the built-in tokenizer's 4096 ids for the mask token


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def built(*overrides, devices=None):
    cfg = make_cfg(*TINY, VOCAB, "model.dtype=float32", *overrides)
    mesh = train_state.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
    mcfg, plan, _, graphdef, state = train_state.build(cfg, mesh)
    return cfg, mesh, mcfg, plan, graphdef, state


def tokens_for(cfg, mesh, seed=0):
    rows = np.random.default_rng(seed).integers(0, 4096, (cfg.data.batch_size, cfg.model.seq_len + 1))
    return jax.device_put(jnp.asarray(rows, jnp.int32), NamedSharding(mesh, P(steps.BATCH_AXES)))


@pytest.mark.parametrize("order", [1, 2])
def test_meta_gradient_equals_the_recomputing_reference(order):
    cfg, mesh, mcfg, plan, graphdef, state = built(META, f"model.maml.order={order}", "mesh.fsdp=1", "mesh.data=-1")
    meta = maml.config_of(cfg)
    model, _ = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, key = tokens_for(cfg, mesh), jax.random.key(7)

    def ours(p):
        return maml.meta_loss(meta, nnx.merge(model_def, p, rest), tokens, key, 4096)[0]

    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(ours))(params)
        ref_loss, ref = jax.jit(lambda p: maml.recomputing_grads(meta, model_def, p, rest, tokens, key, 4096))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(leaves(grads), leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    flat = dict(nnx.to_flat_state(grads))
    assert float(jnp.abs(flat[("maml_head", "kernels", 0)][...]).max()) > 0  # the head learns
    assert float(jnp.abs(flat[("blocks", 0, "attention", "q", "kernel")][...]).max()) > 0  # so does the backbone
    assert float(jnp.abs(flat[("head", "kernel")][...]).max()) == 0  # the LM head has no part in an episode
    if order == 2:  # the exact gradient: a central difference along a random direction agrees
        # a direction scaled to each parameter's spread (a unit one is too coarse for the small weights)
        d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * (jnp.std(x) + 1e-3), params)
        eps = 1e-3
        f = jax.jit(lambda s: ours(jax.tree.map(lambda p, v: p + s * v, params, d)))
        fd = (f(eps) - f(-eps)) / (2 * eps)
        exact = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
        np.testing.assert_allclose(fd, exact, rtol=1e-2)
        # and first order is another gradient
        first = dataclasses.replace(meta, order=1)
        g1 = jax.jit(jax.grad(lambda p: maml.meta_loss(first, nnx.merge(model_def, p, rest), tokens, key, 4096)[0]))
        with jax.set_mesh(mesh):
            one = g1(params)
        d1 = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(one), jax.tree.leaves(d)))
        assert abs(float(d1 - exact)) > 0.05 * abs(float(exact))


def pico_maml_meta_branch(torch, llama, head, x, sup, query, classes, mask: int, meta):
    """pico-maml-train's meta branch (its trainer.py, the `do_meta` branch; SPEC §6) as the code is, in torch, on a
    given episode: two masked inputs, the class mapper with its clamp to 0, the head an nn.Sequential adapted by
    torch SGD on the support states (the backbone frozen: no gradient reaches it from the inner loop), the query
    loss backpropagated through the backbone and the adapted head, and the head restored before the outer step.
    Returns the query loss and the last inner step's support gradient, which stays in the head's .grad (nothing
    zeroes it before the query backward)."""
    B, K = x.shape[0], len(sup)
    support_ids, query_ids = x.clone(), x.clone()
    support_labels, query_labels = support_ids[:, sup].clone(), query_ids[:, query].clone()
    support_ids[:, sup] = mask
    query_ids[:, query] = mask
    mapper = torch.full((head[-1].out_features,), -1, dtype=torch.long)
    mapper[classes] = torch.arange(len(classes))
    ys, yq = mapper[support_labels.reshape(-1)].clamp(min=0), mapper[query_labels].clamp(min=0)
    inner = torch.optim.SGD(head.parameters(), lr=meta.inner_lr)
    original = {k: v.clone() for k, v in head.state_dict().items()}
    for _ in range(meta.inner_steps):
        inner.zero_grad()
        hidden = llama.model(support_ids).last_hidden_state.detach()  # return_hidden: after the final norm
        logits = head(hidden[:, sup].reshape(B * K, -1))[:, classes]
        torch.nn.functional.cross_entropy(logits, ys).backward()
        inner.step()
    last_support = [p.grad.clone() for p in head.parameters()]
    hidden = llama.model(query_ids).last_hidden_state[:, query]
    loss = torch.nn.functional.cross_entropy(head(hidden)[:, classes], yq)
    loss.backward()
    head.load_state_dict(original)
    return loss, last_support


def test_the_meta_gradient_is_pico_maml_trains_on_its_episode(tmp_path):
    """picojax's order-1 meta gradient against the torch transcription of pico-maml's meta branch, given picojax's
    exported weights, its head and its episode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, mesh, mcfg, plan, graphdef, state = built(META, "model.maml.hybrid_ratio=1", "mesh.fsdp=1", "mesh.data=-1")
    meta = maml.config_of(cfg)
    model, _ = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, key, mask = tokens_for(cfg, mesh), jax.random.key(7), 4096

    def ours(p):
        return maml.meta_loss(meta, nnx.merge(model_def, p, rest), tokens, key, mask)[0]

    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(ours))(params)
    x = np.asarray(tokens)[:, :-1]
    e = maml.episode(meta, jnp.asarray(x), key, mask, mcfg.vocab_size)
    assert len(set(x[:, np.asarray(e.support)].reshape(-1).tolist())) > meta.n_way  # a random n_way was drawn

    export.export_hf(model, tmp_path / "hf")
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                          attn_implementation="eager")
    layers = []
    for i, (k, b) in enumerate(maml.head_params(model)):
        linear = torch.nn.Linear(*k.shape)
        linear.weight.data, linear.bias.data = torch.tensor(np.asarray(k).T), torch.tensor(np.asarray(b))
        layers += [linear] + ([torch.nn.ReLU()] if i < meta.num_layers - 1 else [])
    head = torch.nn.Sequential(*layers)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
    ref_loss, last_support = pico_maml_meta_branch(torch, llama, head, t(x), t(e.support), int(e.query),
                                                   t(e.classes), mask, meta)
    assert abs(float(loss) - float(ref_loss.detach())) < 1e-5

    def close(a, b, what):  # to 1e-5 of the gradient's largest entry, per tensor
        scale = max(float(np.abs(b).max()), 1e-12)
        assert float(np.abs(a - b).max()) <= 1e-5 * scale, (what, float(np.abs(a - b).max()), scale)

    backbone = export.state_dict(nnx.merge(model_def, grads, rest), "hf")  # picojax's gradient in Llama's layout
    for name, p in llama.named_parameters():
        if name == "lm_head.weight":  # no part in an episode
            assert p.grad is None and not np.abs(backbone[name]).any()
            continue
        close(backbone[name], p.grad.numpy(), name)
    flat = dict(nnx.to_flat_state(grads))
    torch_linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    first_order, literal = [], []
    for i, m in enumerate(torch_linears):
        for j, (kind, ours_g) in enumerate((("weight", flat[("maml_head", "kernels", i)][...].T),
                                           ("bias", flat[("maml_head", "biases", i)][...]))):
            code = getattr(m, kind).grad.numpy()  # what pico-maml's outer step applies
            support = last_support[2 * i + j].numpy()
            close(np.asarray(ours_g), code - support, f"head {i} {kind}")  # the first-order term
            first_order.append(code - support)
            literal.append(code)
    diff = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(literal, first_order)))
    norm = np.sqrt(sum((b ** 2).sum() for b in first_order))
    print(f"pico-maml's literal head gradient (+ the last support gradient) differs from first-order MAML's by "
          f"{diff / norm:.1%} of its norm")  # the README's figure
    assert diff / norm > 1e-3


def test_an_episode_masks_as_pico_maml_and_picks_its_classes():
    meta = maml.MetaConfig(k_shot=4, n_way=12)
    x = np.random.default_rng(0).integers(0, 50, (8, 32))
    e = maml.episode(meta, jnp.asarray(x, jnp.int32), jax.random.key(0), 99, 100)
    sup, query = np.asarray(e.support), int(e.query)
    pos = np.append(sup, query)
    assert len(set(pos.tolist())) == 5 and pos.min() >= 1 and pos.max() <= 31  # randperm(L - 1) + 1
    # two inputs: the support positions masked in one, the query position in the other, nothing else changed
    assert (np.asarray(e.support_ids)[:, sup] == 99).all() and (np.asarray(e.query_ids)[:, query] == 99).all()
    assert (np.delete(np.asarray(e.support_ids), sup, 1) == np.delete(x, sup, 1)).all()
    assert (np.delete(np.asarray(e.query_ids), query, 1) == np.delete(x, query, 1)).all()
    c = np.asarray(e.classes)
    assert len(set(c.tolist())) == 12 and 99 not in c
    labels = x[:, sup].reshape(-1)
    distinct = sorted(set(labels.tolist()))
    assert len(distinct) > 12 and set(c.tolist()) <= set(distinct)  # more than n_way: n_way of them
    assert np.asarray(e.ys).tolist() == [c.tolist().index(v) if v in c else 0 for v in labels]  # outside: class 0
    assert np.asarray(e.yq).tolist() == [c.tolist().index(v) if v in c else 0 for v in x[:, query]]
    # a random n_way, drawn from the episode's key, not the smallest ids (BPE's earliest merges)
    draws = {tuple(np.asarray(maml.classes_of(jnp.asarray(labels), 12, 100, 99, jax.random.key(k))).tolist())
             for k in range(20)}
    assert len(draws) > 10 and tuple(distinct[:12]) not in draws
    picked = np.concatenate([np.asarray(d) for d in draws])
    assert len(set(picked.tolist())) == len(distinct)  # every label can be a class
    # fewer than n_way: all of them, sorted (torch.unique), then distinct random ids that are not the mask
    few = np.asarray(maml.classes_of(jnp.asarray([5, 3, 5, 9]), 6, 100, 99, jax.random.key(1))).tolist()
    assert few[:3] == [3, 5, 9] and len(set(few)) == 6 and 99 not in few


def test_ratio_0_is_next_token_prediction_bit_for_bit():
    def two_steps(*overrides):
        cfg, mesh, mcfg, plan, graphdef, state = built("data.grad_accum=2", *overrides)
        meta = maml.config_of(cfg)
        obj = maml.Objective(meta, 4096) if meta else None
        step = steps.jit_train_step(graphdef, state, mesh, plan, 2, objective=obj)
        out = []
        with jax.set_mesh(mesh):
            for s in range(2):
                state, m = step(state, tokens_for(cfg, mesh, s))
                out.append(float(m["loss"]))
        model, _ = nnx.merge(graphdef, state)
        return out, leaves(nnx.state(model, nnx.Not(nnx.PathContains("maml_head"))))

    ar_loss, ar_params = two_steps()
    loss, params = two_steps(META, "model.maml.hybrid_ratio=0")
    assert loss == ar_loss
    for a, b in zip(ar_params, params):
        np.testing.assert_array_equal(a, b)
    meta_loss, _ = two_steps(META, "model.maml.hybrid_ratio=1")
    assert meta_loss != ar_loss


def test_sharded_equals_one_device_with_relora_and_accumulation():
    out = []
    for devices, mesh in ((jax.devices()[:1], "mesh.fsdp=1"), (None, "mesh.fsdp=4")):
        cfg, m, mcfg, plan, graphdef, state = built(META, "model.maml.hybrid_ratio=1", "data.grad_accum=2",
                                                    "model.relora={r:4,warm_start_steps:0,lora_dropout:0.0}", mesh,
                                                    "mesh.data=-1", devices=devices)
        step = steps.jit_train_step(graphdef, state, m, plan, 2, objective=maml.Objective(maml.config_of(cfg), 4096))
        with jax.set_mesh(m):
            state, metrics = step(state, tokens_for(cfg, m))
        out.append((leaves(state), {k: float(v) for k, v in metrics.items()}))
    (one, m1), (eight, m8) = out
    assert m1["meta_batches"] == 2 and 0 <= m1["query_acc"] <= 2
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_exact_and_the_head_is_checkpointed_but_not_exported(tiny_cfg):
    cfg = tiny_cfg(META, VOCAB, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=null",
                   "data.grad_accum=2", "mesh.data=2", "mesh.fsdp=4", "train.log_every=1")
    straight = train.Trainer(cfg)
    final = straight.run()
    compiles = {k: p._cache_size() for k, p in straight.train_step.programs.items()}
    assert compiles == dict(zeros=1, accumulate=1, apply=1)  # 4 steps, each program compiled once
    ref = leaves(straight.state)
    history = json.loads((straight.run_dir / "metrics.json").read_text())["history"]
    assert {h["meta_batches"] for h in history} <= {0.0, 1.0, 2.0} and len({h["meta_batches"] for h in history}) > 1
    assert all("query_acc" in h and "support_acc" in h and "inner_grad_norm" in h
               for h in history if h["meta_batches"])
    shutil.rmtree(straight.ckpt.step_dir(4))  # as if killed after step 2
    resumed = train.Trainer(cfg)
    assert resumed.start_step == 2
    assert resumed.run()["val_loss"] == final["val_loss"]
    for a, b in zip(leaves(resumed.state), ref):
        np.testing.assert_array_equal(a, b)
    restored, _, _ = train_state.load(straight.run_dir)
    assert restored.maml_head.kernels[0].shape == (32, 16)
    hf = straight.ckpt.step_dir(4)
    assert not any("maml" in k for k in load_file(str(hf / "model.safetensors")))
    model = export.import_hf(hf)[0]  # the plain decoder, as before
    np.testing.assert_array_equal(model.head.kernel[...], restored.head.kernel[...])


@pytest.mark.parametrize("knob, message", [
    ("model.maml.k_shot=31", "k_shot=31: an episode masks k_shot \\+ 1 distinct positions of \\[1, seq_len\\)"),
    ("model.maml.n_way=100", "n_way=100: an episode's support set holds at most 16 rows x k_shot=3"),
    ("model.maml.inner_steps=0", "inner_steps=0; it must be at least 1"),
    ("model.maml.hybrid_ratio=1.5", "hybrid_ratio=1.5; use a probability in \\[0, 1\\]"),
    ("model.maml.order=3", "order=3; use 1"),
    ("+model.maml.dropout=0.1", "unknown config key 'model.maml.dropout'"),
    ("model.vocab_size=4096", "the tokenizer has no mask token and its 4096 ids fill model.vocab_size=4096"),
])
def test_bad_knobs_fail_at_start_up(tiny_cfg, knob, message):
    with pytest.raises(ConfigError, match=message):
        train.Trainer(tiny_cfg(META, VOCAB, knob))
