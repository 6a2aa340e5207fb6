"""Tiny same-architecture models: scaled-down configs, deterministic weights, offline folders, real tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from affinage.model.load import load_tokenizer_folder
from affinage.model.tiny import (
    build_tiny_model,
    save_tiny_model_folder,
    template_special_tokens,
    tiny_config,
    train_tokenizer,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRENCH = "Le Code civil des Français fut promulgué le 21 mars 1804 par Napoléon Bonaparte. « Ça marche ! » 😀"


def _linear_dims(model):
    return [d for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
            for d in (m.in_features, m.out_features)]


@pytest.mark.parametrize("model_type,gqa", [("llama", False), ("mistral", True), ("qwen2", False)])
def test_tiny_config_keeps_architecture(model_type, gqa):
    original = AutoConfig.for_model(model_type)
    small = tiny_config(original, vocab_size=500)
    assert type(small) is type(original) and small.model_type == model_type
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers, small.num_attention_heads) == (64, 128, 2, 4)
    assert small.num_key_value_heads == (2 if gqa else 4)
    assert small.vocab_size == 500
    assert small.max_position_embeddings == 2048
    assert small.tie_word_embeddings == original.tie_word_embeddings
    assert small.rope_parameters == original.rope_parameters
    if model_type == "mistral":
        assert small.sliding_window == original.sliding_window
    if model_type == "qwen2":
        assert small.layer_types == original.layer_types[:2]
    model = build_tiny_model(small, seed=0)
    assert all(d % 32 == 0 for d in _linear_dims(model)), _linear_dims(model)


def test_tiny_config_rejects_token_ids_outside_vocab():
    config = AutoConfig.for_model("llama", eos_token_id=900)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_config(config, vocab_size=500)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    config = AutoConfig.for_model("mistral")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(config, seed=3, vocab_size=256)
    assert torch.equal(torch.rand(1), before)
    b = build_tiny_model(config, seed=3, vocab_size=256)
    c = build_tiny_model(config, seed=4, vocab_size=256)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_folder_reloads_offline_with_identical_logits(tiny_folders, model_type):
    folder = tiny_folders[model_type]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    tok = load_tokenizer_folder(folder)
    ids = tok(FRENCH, return_tensors="pt")["input_ids"]
    rebuilt = build_tiny_model(AutoConfig.from_pretrained(folder), seed=7)  # same seed as the fixture
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    assert reloaded.config.model_type == model_type
    assert reloaded.config.vocab_size == len(tok)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, reloaded(ids).logits)


def test_same_seed_same_folder_bytes(tmp_path):
    a = save_tiny_model_folder(tmp_path / "a", "qwen2", seed=5, chat_template=CHATML)
    b = save_tiny_model_folder(tmp_path / "b", "qwen2", seed=5, chat_template=CHATML)
    c = save_tiny_model_folder(tmp_path / "c", "qwen2", seed=6, chat_template=CHATML)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_trained_tokenizer_round_trips_and_keeps_chat_tokens_whole():
    tok = train_tokenizer([FRENCH] * 20, vocab_size=300, chat_template=CHATML, extra_special_tokens=["<tool>"])
    assert template_special_tokens(CHATML) == ["<|im_start|>", "<|im_end|>"]
    for t in ("<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<tool>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.decode(tok(FRENCH)["input_ids"]) == FRENCH  # byte-level: accents, guillemets, emoji
    text = tok.apply_chat_template([{"role": "user", "content": "Bonjour"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nBonjour<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_qwen2_folder_tokenizes_as_trained(tiny_folders):
    """AutoTokenizer would give a qwen2 folder Qwen2Tokenizer, which re-splits digits; ours must not."""
    from tokenizers import Tokenizer

    folder = tiny_folders["qwen2"]
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = load_tokenizer_folder(folder)
    assert tok(FRENCH, add_special_tokens=False)["input_ids"] == raw.encode(FRENCH, add_special_tokens=False).ids


@pytest.mark.shared
@pytest.mark.parametrize("name", ["lucie-7b-instruct", "mistral-7b-instruct-v0.3"])
def test_tiny_model_from_real_config_and_tokenizer(real_tokenizers, name):
    folder = real_tokenizers / name
    original = AutoConfig.from_pretrained(folder, local_files_only=True)
    tok = load_tokenizer_folder(folder)
    model = build_tiny_model(folder, seed=0, vocab_size=len(tok))
    cfg = model.config
    assert cfg.model_type == original.model_type and type(model).__name__ == original.architectures[0]
    assert cfg.vocab_size == len(tok) == original.vocab_size
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16  # GQA kept, head_dim consistent (Lucie's was 128)
    assert cfg.tie_word_embeddings == original.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == original.rope_parameters["rope_theta"]
    assert cfg.bos_token_id == original.bos_token_id and cfg.eos_token_id == original.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    ids = tok(FRENCH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
