"""`affinage smoke` shrinks every architecture family of the template zoo, rope scaling variants included."""

from __future__ import annotations

import pytest
import torch

from affinage.model.tiny import tiny_config

# Real shapes of each family's config.json (sizes and rope settings as published), built offline.
FAMILIES = {
    "llama3.1": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                               max_position_embeddings=131072, vocab_size=128256, bos_token_id=128000, eos_token_id=128009,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               rope_theta=500000.0)),
    "llama2": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)),
    "mistral-v0.3": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=32768, sliding_window=None, rope_theta=1e6)),
    "mistral-nemo": ("mistral", dict(hidden_size=5120, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                     head_dim=128, vocab_size=131072, max_position_embeddings=1024000, rope_theta=1e6)),
    "mixtral": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
    "qwen2.5-yarn": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                                   vocab_size=152064, max_position_embeddings=32768,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "qwen3": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128, vocab_size=151936, max_position_embeddings=40960)),
    "gemma2": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=256, vocab_size=256000, sliding_window=4096)),
    "gemma3": ("gemma3_text", dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                                   head_dim=256, vocab_size=262208, sliding_window=1024, num_hidden_layers=34,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "phi3.5-longrope": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32064, max_position_embeddings=131072, original_max_position_embeddings=4096,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48})),
    "phi4-mini-partial-rotary": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                              num_key_value_heads=8, vocab_size=200064, partial_rotary_factor=0.75,
                                              max_position_embeddings=131072, original_max_position_embeddings=4096,
                                              bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
                                              rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                                            "long_factor": [1.5] * 48})),
    "olmo2": ("olmo2", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=100352,
                            pad_token_id=100277, eos_token_id=100257)),
    "granite": ("granite", dict(hidden_size=4096, intermediate_size=12800, num_attention_heads=32, num_key_value_heads=8,
                                vocab_size=49155, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "command-r": ("cohere", dict(hidden_size=8192, intermediate_size=22528, num_attention_heads=64, num_key_value_heads=8,
                                 vocab_size=256000, bos_token_id=5, eos_token_id=255001, pad_token_id=0)),
    "smollm3": ("smollm3", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=4,
                                vocab_size=128256, bos_token_id=128000, eos_token_id=128012, pad_token_id=128004)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_config_of_every_family_builds_and_runs(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = FAMILIES[family]
    real = AutoConfig.for_model(model_type, **kwargs)
    tiny = tiny_config(real)
    assert tiny.model_type == real.model_type and tiny.hidden_size == 64 and tiny.num_hidden_layers == 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny)
    ids = torch.randint(0, 500, (1, 12))
    logits = model(ids, use_cache=False).logits
    assert logits.shape == (1, 12, tiny.vocab_size) and torch.isfinite(logits).all()
