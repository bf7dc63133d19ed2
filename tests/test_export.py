"""Hugging Face export and import: parity with transformers' LlamaForCausalLM, logits to 1e-4 in float32.

torch and transformers are imported inside the tests, so the rest of the suite never pays for them."""
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoint
import data
import export
import families
import prepare
import relora
import train
import train_state
from model import ConfigError, Decoder, ModelConfig

# grouped-query attention (4 heads, 2 kv heads); init_std 0.2 makes the logits O(5), so a wrong layout or RoPE
# convention moves them by O(1) (measured: an interleaved-pairs q/k layout gives a difference of ~10), not 1e-4
GQA = ModelConfig(vocab_size=128, seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_hidden=128,
                  init_std=0.2, dtype="float32")
TOKENS = np.random.RandomState(0).randint(0, GQA.vocab_size, (2, GQA.seq_len))


@pytest.fixture
def llama(monkeypatch):
    """transformers' LlamaForCausalLM, with the Hub offline: everything is loaded from local folders."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when the hub was imported
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM


def hf_logits(hf_model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_model.eval()(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def perturbed(model: Decoder, seed: int = 0) -> Decoder:
    """Norm scales away from their init of 1, so that a norm exported to the wrong place shows."""
    for i, (path, v) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if path[-1] == "scale":
            v[...] = 1 + 0.5 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), v.shape)
    return model


def test_export_matches_transformers_logits(llama, tmp_path):
    model = perturbed(Decoder(GQA, nnx.Rngs(0)))
    export.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"], config["tie_word_embeddings"]) == (2, 16, False)
    hf = llama.from_pretrained(tmp_path, local_files_only=True)
    assert hf.config.num_key_value_heads == 2 and hf.config.rms_norm_eps == GQA.norm_eps
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    ref = hf_logits(hf, TOKENS)
    assert np.abs(ref).max() > 1  # logits large enough for 1e-4 to mean something
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_tied_embeddings_export_as_tie_word_embeddings(llama, tmp_path):
    import dataclasses
    model = perturbed(Decoder(dataclasses.replace(GQA, tie_embeddings=True), nnx.Rngs(0)))
    export.export_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    hf = llama.from_pretrained(tmp_path, local_files_only=True)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), rtol=0, atol=1e-4)


def test_import_of_a_transformers_llama_matches_its_logits(llama, tmp_path):
    import torch
    from transformers import LlamaConfig
    torch.manual_seed(0)
    hf = llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.2, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, cfg = export.import_hf(tmp_path)
    assert (cfg.d_model, cfg.d_hidden, cfg.n_kv_heads, cfg.seq_len, cfg.rope_theta, cfg.norm_eps) == \
        (64, 96, 2, 64, 500000.0, 1e-5)
    tokens = np.random.RandomState(1).randint(0, 128, (2, 40))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(hf, tokens), rtol=0, atol=1e-4)
    # and back: the re-exported folder holds the same tensors
    export.export_hf(model, tmp_path / "again")
    from safetensors.numpy import load_file
    a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_relora_model_exports_its_merged_weights(llama, tmp_path):
    model = relora.wrap(perturbed(Decoder(GQA, nnx.Rngs(0))), relora.ReLoRAConfig(r=4, lora_dropout=0.0,
                                                                                    trainable_scaling=True))
    for i, layer in enumerate(relora.lora_layers(model)):  # a trained branch: B != 0, s != 1
        layer.B[...] = 0.2 * jax.random.normal(jax.random.key(i), layer.B.shape)
        layer.s[...] = jnp.asarray(0.7)
    before = [np.asarray(layer.B[...]) for layer in relora.lora_layers(model)]
    export.export_hf(model, tmp_path)
    after = [np.asarray(layer.B[...]) for layer in relora.lora_layers(model)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after)), "export must not merge the model in place"
    hf = llama.from_pretrained(tmp_path, local_files_only=True)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), rtol=0, atol=1e-4)


def test_cli_exports_a_trained_run(llama, tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=1")
    trainer = train.Trainer(cfg)
    trainer.run()
    out = export.main([cfg.run_dir, str(tmp_path / "hf"), "--step", "1"])
    assert (out / "tokenizer.json").exists()  # the built-in corpus's BPE, for AutoTokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)  # special tokens declared: lm-eval's hf needs eos
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.model_max_length) == \
        ("<|endoftext|>", eot, eot, cfg.model.seq_len)
    assert tok.decode(tok("The river")["input_ids"]) == "The river"
    assert GenerationConfig.from_pretrained(out, local_files_only=True).eos_token_id == eot
    assert type(AutoModelForCausalLM.from_pretrained(out, local_files_only=True)).__name__ == "LlamaForCausalLM"
    hf = llama.from_pretrained(out, local_files_only=True)
    tokens = np.random.RandomState(2).randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    np.testing.assert_allclose(np.asarray(trainer.model(jnp.asarray(tokens))), hf_logits(hf, tokens), rtol=0, atol=1e-4)
    with pytest.raises(checkpoint.CheckpointError):
        export.main([str(tmp_path / "nothing-here"), str(tmp_path / "x")])
    pico = export.main([cfg.run_dir, str(tmp_path / "pico"), "--format", "pico"])  # and back, as pico writes it
    back, _ = export.import_hf(pico)
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(tokens))), np.asarray(trainer.model(jnp.asarray(tokens))),
                               rtol=0, atol=1e-5)
    assert json.loads((pico / "config.json").read_text())["eos_token_id"] == eot


def test_import_refuses_what_the_pico_decoder_cannot_represent():
    base = dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    assert export.from_hf_config(base, "m").head_dim == 8
    for bad, match in ((dict(attention_bias=True), "attention_bias"), (dict(head_dim=16), "head_dim"),
                       (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "RoPE scaling"),
                       (dict(model_type="mistral"), "model_type")):
        with pytest.raises(ConfigError, match=match):
            export.from_hf_config({**base, **bad}, "m")


def test_every_checkpoint_is_also_a_llama_folder_with_merged_relora_weights(llama, tiny_cfg, tmp_path):
    """checkpoints/step_<k>/ holds config.json, model.safetensors and the tokenizer beside Orbax's items; a ReLoRA
    run's files are its merged weights (step 2: wrapped at step 1, its branch trained, not yet reset)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = tiny_cfg("train.steps=2", "checkpoint.every_steps=1", "checkpoint.keep=null", "model.relora.r=4",
                   "model.relora.warm_start_steps=1", "model.relora.reset_frequency=2",
                   "model.relora.restart_warmup_steps=1", config="relora")
    train.Trainer(cfg).run()
    tokens = np.random.RandomState(3).randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    for step in (0, 1, 2):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step}"
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "state"} <= \
            {p.name for p in folder.iterdir()} and not list(folder.glob(".*.tmp"))
        model, _, _ = train_state.load(tmp_path / "run", step)  # Orbax's items still restore beside them
        assert (step < 2) or relora.lora_layers(model)
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert type(hf).__name__ == "LlamaForCausalLM"
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(hf, tokens), rtol=0, atol=1e-4)
    assert AutoTokenizer.from_pretrained(folder, local_files_only=True).eos_token == "<|endoftext|>"


def test_a_model_llama_cannot_hold_says_so_once_and_checkpoints_without_hf_files(tiny_cfg, tmp_path, capsys):
    train.Trainer(tiny_cfg("train.steps=1", "model.qk_norm=true")).run()
    out = capsys.readouterr().out
    assert out.count("checkpoints have no Hugging Face files (model.qk_norm=True") == 1
    assert not (tmp_path / "run" / "checkpoints" / "step_1" / "config.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "state").is_dir()


def test_a_run_starts_from_a_llama_or_a_pico_decoder_folder(tiny_cfg, tmp_path):
    """model.init_from: a new run's parameters are the folder's (pico's interleaved RoPE rows undone), in a
    full-rank run and as the frozen W of a ReLoRA run; the architecture is checked first; a resumed run ignores it."""
    mcfg = families.model_config(tiny_cfg().model)
    tokenizer = data.data_dir(tiny_cfg().data) / "tokenizer.json"
    source = perturbed(Decoder(dataclasses.replace(mcfg, init_std=0.2), nnx.Rngs(3)))
    want = {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
    for fmt, extra in (("hf", ()), ("pico", ("model.relora.r=4", "model.relora.warm_start_steps=0"))):
        folder = export.export(source, tmp_path / fmt, fmt, tokenizer)  # the data's own tokenizer: accepted
        trainer = train.Trainer(tiny_cfg(f"model.init_from={folder}", f"run_dir={tmp_path / fmt}-run", *extra,
                                         config="relora" if extra else "local"))
        model = trainer.model
        if extra:
            assert relora.lora_layers(model)
            model = export.import_hf(export.export(model, tmp_path / f"{fmt}-merged", "hf"))[0]  # W + 0 (B = 0)
        got = {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert got.keys() == want.keys()
        for p in want:
            np.testing.assert_array_equal(got[p], want[p], err_msg=f"{fmt} {p}")
        if fmt == "hf":
            trainer.save(0)
            trainer.wait_for_files()
    with pytest.raises(ConfigError, match=r"config.json has d_hidden=128, d_model=32, n_heads=4, this run "
                                          r"model.d_hidden=256, .*; set `model.d_hidden=128 model.d_model=32 "):
        train.Trainer(tiny_cfg(f"model.init_from={tmp_path / 'hf'}", "model.d_model=64", "model.n_heads=8"))
    other = Path(shutil.copytree(tmp_path / "hf", tmp_path / "hf-other-tokenizer"))
    prepare.train_bpe(["one two three four five"] * 50, 300).save(str(other / "tokenizer.json"))
    with pytest.raises(ConfigError, match="another tokenizer than the run's data"):
        train.Trainer(tiny_cfg(f"model.init_from={other}"))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(ConfigError, match="holds no \\*.safetensors"):
        train.Trainer(tiny_cfg(f"model.init_from={tmp_path / 'hf'}"))
    resumed = train.Trainer(tiny_cfg(f"model.init_from={tmp_path / 'hf'}", f"run_dir={tmp_path / 'hf'}-run"))
    assert "not read: the run resumes" in resumed.init_note
