"""Loading as the recipe says: tokenizer padding, LoRA/DoRA/QLoRA/full, dtype, attention, remote code, random init."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from affinage.model.errors import ModelLoadError
from affinage.model.load import count_parameters, load_model, load_tokenizer
from affinage.model.tiny import train_tokenizer
from affinage.recipe.schema import ModelSpec

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(model, n=2, length=12):
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _expected_lora_params(base, r):
    return sum(r * (m.in_features + m.out_features) for name, m in base.named_modules() if name.split(".")[-1] in TARGETS)


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_pad_falls_back_to_eos_and_pads_right(tmp_path):
    tok = train_tokenizer(["Bonjour à tous, ceci est un texte."] * 5, vocab_size=300)
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(ModelSpec(name_or_path=str(tmp_path / "nomodel"), tokenizer=str(tmp_path / "tok"), mirrors=[]))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "right"
    batch = loaded(["Bonjour", "Bonjour à tous"], padding=True)
    assert batch["attention_mask"][0][-1] == 0  # padding on the right


def test_tokenizer_from_model_folder_keeps_its_pad(tiny_folders):
    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_folders["llama"]), mirrors=[]))
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"


@pytest.mark.shared
@pytest.mark.parametrize("name", ["lucie-7b-instruct", "mistral-7b-instruct-v0.3"])
def test_real_tokenizers_tokenize_as_their_tokenizer_json(real_tokenizers, name):
    """transformers 5's LlamaTokenizer drops Lucie's normalizer; load_tokenizer must keep the file's behaviour."""
    from tokenizers import Tokenizer

    folder = real_tokenizers / name
    text = "Deux  espaces, «guillemets» et\n  un retour : 3,14 €."
    raw = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    tok = load_tokenizer(ModelSpec(name_or_path=str(folder), mirrors=[]))
    assert tok(text)["input_ids"] == raw
    assert tok.pad_token is not None and tok.padding_side == "right"
    if name.startswith("mistral"):
        assert tok.pad_token == tok.eos_token == "</s>"  # Mistral ships no pad token


# ---------------------------------------------------------------------------------------- model
def test_lora_trains_only_adapters_and_counts_right(tiny_folders, make_recipe):
    from peft import PeftModel

    model = load_model(make_recipe(tiny_folders["llama"], "lora", lora={"r": 4}))
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    total, n_trainable = count_parameters(model)
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert n_trainable == _expected_lora_params(model.get_base_model(), 4)
    assert total == base_total + n_trainable
    assert model.get_nb_trainable_parameters() == (n_trainable, total)
    assert model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32


def test_lora_init_is_reproducible_from_the_seed(tiny_folders, make_recipe):
    def lora_a(seed):
        m = load_model(make_recipe(tiny_folders["mistral"], "lora", seed=seed))
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}

    a, b, c = lora_a(1), lora_a(1), lora_a(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_lora_explicit_targets_and_modules_to_save(tiny_folders, make_recipe):
    model = load_model(make_recipe(tiny_folders["qwen2"], "lora", lora={"targets": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".q_proj.lora_A" in n for n in names) and any(".v_proj.lora_B" in n for n in names)
    assert not any(".k_proj.lora" in n or "mlp" in n for n in names)
    assert any("lm_head" in n and "modules_to_save" in n for n in names)


def test_dora_has_trainable_magnitudes_and_backprops(tiny_folders, make_recipe):
    model = load_model(make_recipe(tiny_folders["llama"], "lora", lora={"dora": True}))
    mags = [n for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n]
    assert len(mags) == 2 * len(TARGETS)
    ids = _batch(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_qlora_on_cpu_quantises_to_4bit_and_trains(tiny_folders, make_recipe):
    bnb = pytest.importorskip("bitsandbytes")
    model = load_model(make_recipe(tiny_folders["llama"], "qlora"))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * len(TARGETS)  # every projection of both layers
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.quant_type == "nf4"
    ids = _batch(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # 4-bit weights are counted unpacked: same total as the unquantised LoRA model
    plain_total, plain_trainable = count_parameters(load_model(make_recipe(tiny_folders["llama"], "lora")))
    assert count_parameters(model) == (plain_total, plain_trainable)


def test_full_fine_tune_trains_everything(tiny_folders, make_recipe):
    model = load_model(make_recipe(tiny_folders["mistral"], "full"))
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "MistralForCausalLM" and model.config.use_cache is False


def test_dtype(tiny_folders, make_recipe):
    assert next(load_model(make_recipe(tiny_folders["llama"], "full", dtype="auto")).parameters()).dtype == torch.float32
    assert next(load_model(make_recipe(tiny_folders["llama"], "full", dtype="bfloat16")).parameters()).dtype == torch.bfloat16


def test_flash_attention_on_cpu_is_a_clear_error(tiny_folders, make_recipe):
    with pytest.raises(ModelLoadError) as err:
        load_model(make_recipe(tiny_folders["llama"], "lora", attn_implementation="flash_attention_2"))
    msg = str(err.value)
    assert "sdpa" in msg and "flash-attn" in msg
    assert "needs bfloat16 or float16" in msg  # the recipe asks for float32
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in msg


def test_attention_implementation_is_applied(tiny_folders, make_recipe):
    model = load_model(make_recipe(tiny_folders["llama"], "full", attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"


def test_random_init_is_deterministic_with_the_seed(tiny_folders, make_recipe):
    from safetensors.torch import load_file

    folder = tiny_folders["qwen2"]
    key = "model.layers.0.mlp.up_proj.weight"
    a = load_model(make_recipe(folder, "full", seed=11, init="random")).state_dict()[key]
    b = load_model(make_recipe(folder, "full", seed=11, init="random")).state_dict()[key]
    c = load_model(make_recipe(folder, "full", seed=12, init="random")).state_dict()[key]
    pretrained = load_file(folder / "model.safetensors")[key]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, pretrained)


# -------------------------------------------------------------------------------- remote code
REMOTE_CONFIG = '''
from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "affinage_remote_llama"
'''
REMOTE_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


@pytest.fixture
def remote_code_folder(tiny_folders, tmp_path, monkeypatch):
    """A tiny model whose config.json needs its own Python code (auto_map), as some hub models do."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    shutil.copytree(tiny_folders["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_type="affinage_remote_llama",
        architectures=["RemoteForCausalLM"],
        auto_map={"AutoConfig": "configuration_remote.RemoteConfig", "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_remote.py").write_text(REMOTE_MODEL)
    return folder


def test_remote_code_refused_by_default(remote_code_folder, make_recipe):
    recipe = make_recipe(remote_code_folder, "lora")
    assert recipe.model.trust_remote_code is False
    with pytest.raises(ModelLoadError, match="model.trust_remote_code: true"):
        load_model(recipe)


def test_remote_code_runs_when_trusted(remote_code_folder, make_recipe):
    model = load_model(make_recipe(remote_code_folder, "full", trust_remote_code=True))
    assert type(model).__name__ == "RemoteForCausalLM"
