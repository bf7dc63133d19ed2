"""Meta-learning pretraining as pico-maml-train runs it (SPEC §6; Africa et al. 2025, arXiv 2508.02189): subset-masked
LM (SMLMT) episodes and MAML on a classifier head, as one objective of the jitted train step.

A micro-batch is, with probability `hybrid_ratio`, a meta episode instead of next-token prediction. The episode,
as pico-maml draws it: K = k_shot support positions and one query position, distinct, drawn from [1, T) and the
same for every row; two inputs, the support input with only the K support positions replaced by the mask token and
the query input with only the query position (so the query's hidden state sees the support tokens, and the support
states see the query token); the support labels' distinct ids are the N = n_way classes (a random n_way of them
when there are more, padded with random other ids when fewer), a label outside them class 0. A classifier head (an
MLP on the decoder's final hidden state, its vocabulary logits restricted to the classes) is adapted by
`inner_steps` SGD steps on the support positions' cross-entropy, and the query position's cross-entropy through
the adapted head is the outer loss. The backbone is frozen in the inner loop, so the support states are computed
once (pico-maml recomputes them at every inner step: `recomputing_grads`, kept as the reference and for
benchmarks/throughput.py): two forwards per episode; the inner loop is a `lax.scan`. order 1 (the paper's
first-order MAML): the support states carry no gradient, the head's gradient is the query gradient at the
adapted head, applied to the head as it was, the backbone's the query gradient through the query's hidden state.
order 2: the exact gradient through the inner loop and both forwards.

The head lives in the model (`model.maml_head`), so it is in the optimizer and the checkpoint; the Hugging Face
export reads the decoder's own layers only. Every draw is a pure function of (seed, Adam's step count, micro-batch
index): a resumed run draws what it would have, and every process agrees without a broadcast.
"""
import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from config import ConfigError, reject_unknown
from model import param

_STREAM = 3  # the run's random streams: relora.py uses 0-2
MASK_NAMES = ("<mask>", "[mask]", "<|mask|>", "<|mask_token|>")
# step metrics summed over a step's meta micro-batches: the meter divides them by `meta_batches`, not by the steps
PER_META = ("support_acc", "query_acc", "query_loss", "inner_grad_norm")


@dataclass(frozen=True)
class MetaConfig:
    hybrid_ratio: float = 0.5   # probability that a micro-batch is a meta episode (0: next-token prediction only)
    k_shot: int = 4             # support positions per row
    n_way: int = 32             # classes per episode
    inner_steps: int = 10       # SGD steps on the head per episode
    inner_lr: float = 1e-3
    order: int = 1              # 1: first-order MAML (pico-maml, the paper); 2: the exact gradient through the loop
    num_layers: int = 2         # head: num_layers - 1 hidden ReLU layers of hidden_dim, then [hidden_dim, vocab]
    hidden_dim: int = 256
    mask_id: int | None = None  # null: the tokenizer's mask token, else the first id above its vocabulary
    seed: int = 0               # the run's `seed`

    @classmethod
    def from_dict(cls, d, seed: int = 0) -> "MetaConfig | None":
        """Build from the `model.maml` block (None = off), rejecting unknown keys."""
        if d is None:
            return None
        d = dict(d)
        reject_unknown(d, [f.name for f in dataclasses.fields(cls) if f.name != "seed"], "model.maml.")
        return cls(**d, seed=seed)

    def check(self, mcfg, micro_rows: int):
        """The knobs against the model (a decoder, its seq_len and vocabulary) and the micro-batch rows."""
        if not mcfg.linears():
            raise ConfigError(f"model.maml is set but model.kind={mcfg.KIND}: the meta head reads a decoder's "
                              f"hidden states; set model.maml=null or model.kind=decoder")
        if not 0 <= self.hybrid_ratio <= 1:
            raise ConfigError(f"model.maml.hybrid_ratio={self.hybrid_ratio}; use a probability in [0, 1]")
        for key in ("k_shot", "inner_steps", "num_layers", "hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.maml.{key}={getattr(self, key)}; it must be at least 1")
        if self.order not in (1, 2):
            raise ConfigError(f"model.maml.order={self.order}; use 1 (first-order MAML) or 2 (exact)")
        if self.k_shot + 1 > mcfg.seq_len - 1:
            raise ConfigError(f"model.maml.k_shot={self.k_shot}: an episode masks k_shot + 1 distinct positions of "
                              f"[1, seq_len), which model.seq_len={mcfg.seq_len} cannot hold; use k_shot <= "
                              f"{mcfg.seq_len - 2}")
        if not 2 <= self.n_way <= min(micro_rows * self.k_shot, mcfg.vocab_size):
            raise ConfigError(f"model.maml.n_way={self.n_way}: an episode's support set holds at most "
                              f"{micro_rows} rows x k_shot={self.k_shot} = {micro_rows * self.k_shot} labels (vocabulary "
                              f"{mcfg.vocab_size}); use 2 <= n_way <= {min(micro_rows * self.k_shot, mcfg.vocab_size)}"
                              f", or more rows per micro-batch")


def head_dims(block) -> str | None:
    """What a `model.maml` block makes of the head's parameters (None: no head), to compare checkpoints by."""
    if block is None:
        return None
    meta = MetaConfig.from_dict(block)
    return f"{meta.num_layers} layers of {meta.hidden_dim}" if meta.num_layers > 1 else "1 layer"


def config_of(cfg) -> MetaConfig | None:
    """The run's `model.maml` block (null: off)."""
    return MetaConfig.from_dict(cfg.model.get("maml"), cfg.seed)


def mask_id(meta: MetaConfig, tokenizer, vocab_size: int) -> tuple[int, str]:
    """The mask token's id and the start-up note saying which: model.maml.mask_id, else the tokenizer's mask token
    (tokenizers.Tokenizer; None: the data has none), else the first id above the tokenizer's vocabulary (pico's
    vocab_size 50304 leaves the ids above the OLMo tokenizer's 50280 unused)."""
    if meta.mask_id is not None:
        if not 0 <= meta.mask_id < vocab_size:
            raise ConfigError(f"model.maml.mask_id={meta.mask_id} is outside the vocabulary [0, {vocab_size})")
        return meta.mask_id, f"maml: mask token {meta.mask_id} (model.maml.mask_id)"
    if tokenizer is None:
        raise ConfigError("model.maml: the run has no tokenizer to take a mask token from; set data.tokenizer (a "
                          "tokenizer.json or a Hub id, e.g. allenai/OLMo-7B-0724-hf for pico's data) or "
                          "model.maml.mask_id to an id the data never uses")
    for name in MASK_NAMES:
        if (i := tokenizer.token_to_id(name)) is not None and i < vocab_size:
            return i, f"maml: mask token {i} ({name!r}, the tokenizer's)"
    n = tokenizer.get_vocab_size()
    if n >= vocab_size:
        raise ConfigError(f"model.maml: the tokenizer has no mask token and its {n} ids fill model.vocab_size="
                          f"{vocab_size}; raise model.vocab_size (e.g. to {-(-(n + 1) // 64) * 64}) or set "
                          f"model.maml.mask_id")
    return n, f"maml: mask token {n} (the first id above the tokenizer's {n})"


# ---------------------------------------------------------------------------------------------- the head

def xavier(key, d_in: int, d_out: int):
    limit = math.sqrt(6 / (d_in + d_out))
    return jax.random.uniform(key, (d_in, d_out), jnp.float32, -limit, limit)


class MetaHead(nnx.Module):
    """pico-maml's classifier head: Linear(D, H), ReLU, ..., Linear(H, V); xavier-uniform kernels, torch's default
    bias init U(+-1/sqrt(fan_in)). FSDP shards its first kernel along D and its last along H."""

    def __init__(self, d_model: int, vocab_size: int, meta: MetaConfig, rngs: nnx.Rngs):
        dims = [d_model] + [meta.hidden_dim] * (meta.num_layers - 1) + [vocab_size]
        names = ["maml_in_DH"] + ["maml_hidden_HH"] * (meta.num_layers - 2) + ["maml_out_HV"]
        if meta.num_layers == 1:
            names = ["maml_in_DV"]
        self.kernels = nnx.List([param(xavier(rngs.params(), a, b), n) for a, b, n in zip(dims, dims[1:], names)])
        self.biases = nnx.List([param(jax.random.uniform(rngs.params(), (b,), jnp.float32, -a ** -0.5, a ** -0.5),
                                      "maml_bias") for a, b in zip(dims, dims[1:])])


def attach(model, meta: MetaConfig, seed: int):
    """Give a decoder its meta head (model.maml_head), drawn from its own stream of the run's seed."""
    model.maml_head = MetaHead(model.cfg.d_model, model.cfg.vocab_size, meta,
                               nnx.Rngs(jax.random.fold_in(jax.random.key(seed), _STREAM)))
    return model


def head_params(model) -> list:
    """[(kernel, bias), ...] of the head, as arrays."""
    h = model.maml_head
    return [(k[...], b[...]) for k, b in zip(h.kernels, h.biases)]


def restrict(head: list, classes) -> list:
    """The head with its last layer cut to the class ids' columns: [..., (kernel [H, N], bias [N])]."""
    (k, b) = head[-1]
    return head[:-1] + [(k[:, classes], b[classes])]


def head_logits(head: list, h):
    """h [N, D] float32 -> [N, classes] logits."""
    for k, b in head[:-1]:
        h = jax.nn.relu(h @ k + b)
    return h @ head[-1][0] + head[-1][1]


def head_loss(head: list, h, y):
    """Mean cross-entropy and accuracy of the head on rows h [N, D], class indices y [N]."""
    logits = head_logits(head, h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), jnp.mean(logits.argmax(-1) == y)


# ---------------------------------------------------------------------------------------------- an episode

def classes_of(labels, n_way: int, vocab_size: int, mask: int, key):
    """The episode's n_way class ids, as pico-maml picks them: the support labels' distinct ids, sorted (torch.unique);
    with more than n_way, a random n_way of them in random order (its randperm); with fewer, then random ids, which
    unlike pico-maml's randint are none of them nor the mask token. All distinct."""
    k_pick, k_pad = jax.random.split(key)
    size = max(labels.size, n_way)
    uniq = jnp.unique(labels, size=size, fill_value=-1)  # sorted, -1 after the distinct ids
    n = jnp.sum(uniq >= 0)
    shuffled = uniq[jax.random.permutation(k_pick, size)]
    picked = shuffled[jnp.argsort(shuffled < 0, stable=True)][:n_way]  # the distinct ids first, in random order
    chosen = jnp.where(n > n_way, picked, uniq[:n_way])
    perm = jax.random.permutation(k_pad, vocab_size)
    taken = jnp.isin(perm, uniq) | (perm == mask)
    pads = perm[jnp.argsort(taken, stable=True)][:n_way]  # ids not taken come first
    i = jnp.arange(n_way)
    return jnp.where(i < n, chosen, pads[jnp.clip(i - n, 0, n_way - 1)])


def class_index(labels, classes):
    """Each label's index among the classes; 0 for a label outside them (pico-maml's convention)."""
    return jnp.argmax(labels[..., None] == classes, axis=-1)


@dataclass
class Episode:
    support_ids: jax.Array  # [B, T]: the inputs with the K support positions masked
    query_ids: jax.Array    # [B, T]: the inputs with the query position masked
    support: jax.Array      # [K] support positions
    query: jax.Array        # the query position
    ys: jax.Array           # [B * K] support class indices
    yq: jax.Array           # [B] query class indices
    classes: jax.Array      # [N] the class ids


def episode(meta: MetaConfig, x, key, mask: int, vocab_size: int) -> Episode:
    """An episode of the inputs x [B, T], as pico-maml builds one (SPEC §6): its two masked inputs, positions,
    class indices and classes."""
    k_pos, k_cls = jax.random.split(key)
    T = x.shape[1]
    pos = jax.random.choice(k_pos, jnp.arange(1, T), (meta.k_shot + 1,), replace=False)  # randperm(L - 1) + 1
    labels = x[:, pos]  # [B, K + 1]
    support = labels[:, :-1].reshape(-1)
    classes = classes_of(support, meta.n_way, vocab_size, mask, k_cls)
    return Episode(x.at[:, pos[:-1]].set(mask), x.at[:, pos[-1]].set(mask), pos[:-1], pos[-1],
                   class_index(support, classes), class_index(labels[:, -1], classes), classes)


def inner_loop(meta: MetaConfig, head: list, hs, ys):
    """inner_steps SGD steps of the (restricted) head on the support rows hs [B * K, D]: the adapted head and the
    mean norm of the inner gradients."""
    def sgd(head, _):
        g = jax.grad(lambda p: head_loss(p, hs, ys)[0])(head)
        return jax.tree.map(lambda p, d: p - meta.inner_lr * d, head, g), optax.tree.norm(g)

    adapted, norms = jax.lax.scan(sgd, head, None, length=meta.inner_steps)
    return adapted, norms.mean()


def meta_loss(meta: MetaConfig, model, tokens, key, mask: int):
    """The outer loss of one episode on tokens [B, T + 1] (the inputs are tokens[:, :-1], as for next-token
    prediction) and its metrics. Differentiate it with respect to the model's parameters: its gradient is the
    order-1 or order-2 meta gradient."""
    e = episode(meta, tokens[:, :-1], key, mask, model.cfg.vocab_size)
    hs = model.features(e.support_ids)[0][:, e.support].astype(jnp.float32)  # [B, K, D], once: the backbone is
    hs = hs.reshape(-1, hs.shape[-1])  # frozen in the inner loop
    hq = model.features(e.query_ids)[0][:, e.query].astype(jnp.float32)  # [B, D]
    head = restrict(head_params(model), e.classes)
    if meta.order == 1:  # the support forward carries no gradient: XLA runs no backward through it
        hs = jax.lax.stop_gradient(hs)
        adapted, inner_norm = inner_loop(meta, head, hs, e.ys)
        # the query gradient at the adapted head lands on the head as it was (first order)
        adapted = jax.tree.map(lambda p, a: p + jax.lax.stop_gradient(a - p), head, adapted)
    else:
        adapted, inner_norm = inner_loop(meta, head, hs, e.ys)
    loss, query_acc = head_loss(adapted, hq, e.yq)
    support_acc = head_loss(jax.lax.stop_gradient(adapted), hs, e.ys)[1]
    return loss, dict(support_acc=support_acc, query_acc=query_acc, query_loss=loss, inner_grad_norm=inner_norm)


def recomputing_grads(meta: MetaConfig, model_def, params, rest, tokens, key, mask: int):
    """The meta gradient as pico-maml computes it: the backbone run again at every inner step and for the query
    (inner_steps + 1 forward passes), the inner loop a Python loop. The same numbers as `meta_loss`'s gradient,
    at several times the cost: the tests' reference and benchmarks/throughput.py's comparison."""
    def features(p, xm):
        return nnx.merge(model_def, p, rest).features(xm)[0].astype(jnp.float32)

    def outer(p):
        model = nnx.merge(model_def, p, rest)
        e = episode(meta, tokens[:, :-1], key, mask, model.cfg.vocab_size)
        head = restrict(head_params(model), e.classes)
        adapted = head
        for _ in range(meta.inner_steps):
            frozen = jax.lax.stop_gradient(p) if meta.order == 1 else p
            # + 0 x (this step's head): the features are computed again, as pico-maml does, instead of XLA sharing
            # one computation between the steps (the same numbers: the head is finite)
            zero = 0.0 * jax.lax.stop_gradient(adapted[0][0][0, 0])
            hs = features(jax.tree.map(lambda x: x + zero, frozen), e.support_ids)[:, e.support]
            hs = hs.reshape(len(tokens) * meta.k_shot, -1)
            g = jax.grad(lambda a: head_loss(a, hs, e.ys)[0])(adapted)
            if meta.order == 1:
                g = jax.lax.stop_gradient(g)
            adapted = jax.tree.map(lambda a, d: a - meta.inner_lr * d, adapted, g)
        if meta.order == 1:
            adapted = jax.tree.map(lambda h, a: h + jax.lax.stop_gradient(a - h), head, adapted)
        return head_loss(adapted, features(p, e.query_ids)[:, e.query], e.yq)[0]

    return jax.value_and_grad(outer)(params)


# ---------------------------------------------------------------------------------------------- the objective

class Objective:
    """The hybrid objective of steps.train_step: `micro_grads(ar, model_def, rest, step)` turns the next-token
    gradient function `ar(params, tokens) -> (loss, grads)` into one of (params, tokens, index) -> (loss, grads,
    metrics) that takes a meta episode instead with probability hybrid_ratio, drawn from (seed, step, index)."""

    def __init__(self, meta: MetaConfig, mask: int, recompute: bool = False):
        self.meta, self.mask, self.recompute = meta, mask, recompute  # recompute: pico-maml's schedule (benchmarks)

    def micro_grads(self, ar, model_def, rest, step):
        meta = self.meta
        zeros = dict(meta_batches=jnp.zeros(()), **{k: jnp.zeros(()) for k in PER_META})

        def ar_branch(params, tokens, key):
            loss, grads = ar(params, tokens)
            return loss, grads, zeros

        def meta_branch(params, tokens, key):
            if self.recompute:
                value, grads = recomputing_grads(meta, model_def, params, rest, tokens, key, self.mask)
                return value, grads, dict(zeros, meta_batches=jnp.ones(()), query_loss=value)

            def loss(p):
                return meta_loss(meta, nnx.merge(model_def, p, rest), tokens, key, self.mask)
            (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return value, grads, dict(meta_batches=jnp.ones(()), **metrics)

        def grads(params, tokens, index):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(meta.seed), _STREAM), step)
            key = jax.random.fold_in(key, index)
            if meta.hybrid_ratio == 0:  # statically: the run is next-token prediction, bit for bit
                return ar_branch(params, tokens, key)
            if meta.hybrid_ratio == 1:
                return meta_branch(params, tokens, key)
            is_meta = jax.random.uniform(jax.random.fold_in(key, 1)) < meta.hybrid_ratio
            return jax.lax.cond(is_meta, meta_branch, ar_branch, params, tokens, key)

        return grads

    def notes(self, model) -> list[str]:
        m = self.meta
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model.maml_head, nnx.Param)))
        return [f"maml: hybrid_ratio={m.hybrid_ratio} order={m.order} {m.n_way}-way {m.k_shot}-shot, "
                f"{m.inner_steps} inner steps at lr {m.inner_lr}; head {n:,} params (checkpointed, not exported)"]


def objective(meta: MetaConfig | None, mcfg, tokenizer=None) -> tuple["Objective | None", str | None]:
    """The run's objective (None: next-token prediction) and the note on its mask token (train_state.build has
    checked the knobs)."""
    if meta is None:
        return None, None
    mask, note = mask_id(meta, tokenizer, mcfg.vocab_size)
    return Objective(meta, mask), note
