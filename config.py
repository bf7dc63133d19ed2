"""The run config: base.yaml's keys, the resolvers it uses, the one check for keys nobody defines, and the names
of a block's layers that configs (checkpoint.dynamics.layers, model.relora.target_modules) and files use.

A module of its own, below every other one (it imports omegaconf and hydra only), because the model, the families,
ReLoRA, the trainer and analyze.py all reject unknown keys the same way and raise the same ConfigError, and
because analyze.py and snapshots.py, which import no jax, read the layer names too.
"""
import math
from pathlib import Path

from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parent / "configs"
RESOLVERS = {
    "mul": lambda *xs: math.prod(xs),  # ${mul:a,b} = a * b (base.yaml: d_hidden = 4 d_model)
    # ${unless:a,b[,c]} = b unless a is set, else c (null): tpu.yaml and gpu.yaml give pico's data unless data.dir
    "unless": lambda given, value, otherwise=None: otherwise if given else value,
}

# A block's linear layers, the one table of their names: picojax path under blocks.<i> ->
# (Hugging Face Llama name under model.layers.<i>, pico-train name under layers.<i>). Learning
# dynamics, ReLoRA targets, export and pico-train's snapshot files read it; the GELU MLP
# (model.mlp=gelu) has neither name.
BLOCK_LINEARS = {
    "attention.q": ("self_attn.q_proj", "attention.q_proj"),
    "attention.k": ("self_attn.k_proj", "attention.k_proj"),
    "attention.v": ("self_attn.v_proj", "attention.v_proj"),
    "attention.o": ("self_attn.o_proj", "attention.o_proj"),
    "swiglu.gate": ("mlp.gate_proj", "swiglu.w_0"),
    "swiglu.up": ("mlp.up_proj", "swiglu.w_1"),
    "swiglu.down": ("mlp.down_proj", "swiglu.w_2"),
    "mlp.up": (None, None),
    "mlp.down": (None, None),
}


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the fix."""


class DataError(ValueError):
    """Bad data input; the message names the file (or shard) and the fix."""


def brief(e: BaseException, limit: int = 200) -> str:
    """An exception in one line for an error message or a warning: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


def register_resolvers():
    """Make base.yaml's resolvers known to OmegaConf (idempotent); called before anything reads a config."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose(name: str = "local", overrides=()):
    """The config `python main.py -cn NAME overrides...` runs with (for notebooks, tests and benchmarks)."""
    register_resolvers()
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return hydra_compose(name, overrides=list(overrides))


def reject_unknown(given, known, prefix: str = "", what: str = "config key", error=ConfigError):
    """Raise `error` naming every key of `given` that `known` lacks (prefix: where they sit, e.g. "model.")."""
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise error(f"unknown {what}{'s' if len(unknown) > 1 else ''} {names}; known keys here: "
                    f"{[str(k) for k in known if k != 'defaults']}")


# blocks whose keys are not base.yaml's: checked by their readers
FREE_BLOCKS = ("model.relora", "model.maml", "eval.sets")


def check_keys(cfg, ref=None, prefix: str = ""):
    """Reject keys that base.yaml does not define (a typo in an override or a config file). model.relora's and
    model.maml's keys are ReLoRAConfig's and MetaConfig's, eval.sets' the names of validation sets, the families' sub-blocks their configs': those
    check themselves."""
    register_resolvers()
    ref = OmegaConf.load(CONFIGS / "base.yaml") if ref is None else ref
    reject_unknown(cfg, ref, prefix)
    for k in cfg:
        if f"{prefix}{k}" in FREE_BLOCKS or not OmegaConf.is_dict(ref[k]):
            continue
        if not OmegaConf.is_dict(cfg[k]):  # e.g. wandb=disabled, which would fail deep inside the run
            keys = [str(x) for x in ref[k]]
            raise ConfigError(f"{prefix}{k}={cfg[k]}: {prefix}{k} is a block of keys {keys}, not a value; set one "
                              f"of them, e.g. {prefix}{k}.{keys[0]}={cfg[k]}")
        check_keys(cfg[k], ref[k], f"{prefix}{k}.")
