"""``training.kernels`` (``affinage.train.kernels``): resolution on this machine, Liger bound to one instance, compile.

Liger's Triton kernels need CUDA, so on CPU the *mechanism* is tested with plain-PyTorch stand-ins
written like Liger's pieces (a norm class whose ``__init__`` sets the attributes its ``forward``
reads, a SwiGLU ``forward``, a RoPE function): every norm/MLP/attention module of the instance is
patched, the loss and gradients stay bitwise equal, and no other model in the process changes.
With ``liger_kernel`` importable (it imports without a GPU), the real pieces are bound and checked
without running them.

torch.compile (inductor on CPU, through the HF Trainer's ``torch_compile``): measured on seeds 0, 1, 2
of a 1-layer LoRA Llama (B initialised random, so every LoRA gradient is non-zero) on padding-free
packed rows of varying length, the compiled and eager step losses differed by at most 8.5e-8
relative (seeds 1 and 2: bitwise equal) and one step's LoRA gradients by 2.6e-7 to 4.0e-7 relative to
their largest entry; the tolerances below (1e-5 relative) leave 25× room for another CPU's vectorisation.
"""

from __future__ import annotations

import importlib.util
import tempfile

import numpy as np
import pytest
import torch

from affinage.recipe.schema import KernelsSpec
from affinage.train.kernels import (
    KernelsError,
    apply_kernels,
    apply_liger,
    resolve_compile,
    resolve_liger,
)

LIGER = importlib.util.find_spec("liger_kernel") is not None


def tiny(model_type: str = "llama", seed: int = 0, layers: int = 2):
    import transformers

    cls_cfg, cls_model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[model_type]
    cfg = getattr(transformers, cls_cfg)(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return getattr(transformers, cls_model)(cfg).float()


# ---------------------------------------------------------------------------- plain stand-ins
CALLS = {"rms_norm": 0, "swiglu": 0, "rope": 0}


class TorchRMSNorm(torch.nn.Module):
    """Liger's LigerRMSNorm interface (``__init__(hidden_size, eps)`` sets what ``forward`` reads), HF's arithmetic."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon, self.stand_in = eps, True

    def forward(self, hidden_states):
        CALLS["rms_norm"] += 1
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def swiglu_forward(self, x):
    CALLS["swiglu"] += 1
    return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    from transformers.models.llama.modeling_llama import rotate_half

    CALLS["rope"] += 1
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


STAND_INS = {"rms_norm_class": TorchRMSNorm, "swiglu_forward": swiglu_forward, "rope": rope}


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ resolution
def test_liger_resolution_on_cpu_auto_is_off_and_on_is_a_clear_error():
    c = resolve_liger("auto", "llama", on_cuda=False)
    assert not c.on and "needs CUDA" in c.why
    assert not resolve_liger("off", "llama", on_cuda=True, installed=True).on
    with pytest.raises(KernelsError, match=r"training\.kernels\.liger on: needs CUDA.*liger: auto"):
        resolve_liger("on", "llama", on_cuda=False)


def test_liger_resolution_without_the_package_or_for_another_architecture():
    c = resolve_liger("auto", "llama", on_cuda=True, installed=False)
    assert not c.on and "affinage[gpu]" in c.why
    with pytest.raises(KernelsError, match=r"not installed: pip install 'affinage\[gpu\]'"):
        resolve_liger("on", "llama", on_cuda=True, installed=False)
    c = resolve_liger("auto", "gpt2", on_cuda=True, installed=True)
    assert not c.on and "model_type gpt2" in c.why and "llama" in c.why
    with pytest.raises(KernelsError, match="model_type gpt2"):
        resolve_liger("on", "gpt2", on_cuda=True, installed=True)
    assert resolve_liger("auto", "qwen2", on_cuda=True, installed=True).on


def test_compile_resolution_auto_is_off_with_the_reason_and_on_turns_on_the_trainer_option():
    cpu, gpu = resolve_compile("auto", on_cuda=False), resolve_compile("auto", on_cuda=True)
    assert not cpu.on and "measured slower on CPU" in cpu.why
    assert not gpu.on and "not measured on GPU" in gpu.why
    k = apply_kernels(tiny(layers=1), KernelsSpec(compile="on"), on_cuda=False)
    assert k.training_arguments() == {"torch_compile": True} and not k.liger.on
    assert apply_kernels(tiny(layers=1), KernelsSpec(), on_cuda=False).training_arguments() == {}
    with pytest.raises(KernelsError, match="liger on"):
        apply_kernels(tiny(layers=1), KernelsSpec(liger="on"), on_cuda=False)


# ------------------------------------------------------------------------------ instance patch
@pytest.mark.parametrize("model_type,norms_per_layer", [("llama", 2), ("mistral", 2), ("qwen2", 2), ("qwen3", 4)])
def test_liger_patch_binds_every_module_of_the_instance_with_the_same_loss_and_gradients(model_type, norms_per_layer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(model_type), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "gate_proj"],
                                                     init_lora_weights=False))  # B random: every LoRA gradient non-zero
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = loss_and_grads(model, ids)
    k = apply_kernels(model, KernelsSpec(liger="on"), on_cuda=True, functions=STAND_INS)
    assert k.liger.on and k.liger_modules == {"rms_norm": 2 * norms_per_layer + 1, "swiglu": 2, "rope": 2}
    for key in CALLS:
        CALLS[key] = 0
    got_loss, got = loss_and_grads(model, ids)
    assert CALLS == {"rms_norm": 2 * norms_per_layer + 1, "swiglu": 2, "rope": 2}  # the stand-ins really ran
    assert torch.equal(got_loss, ref_loss) and ref.keys() == got.keys() and all("lora_" in n for n in ref)
    for name, g in ref.items():
        assert torch.equal(got[name], g) and float(g.abs().max()) > 0, name


def test_liger_patch_leaves_other_models_and_the_transformers_module_alone():
    from transformers.models.llama import modeling_llama

    before = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP,
              modeling_llama.LlamaAttention.forward)
    other = tiny(seed=3)
    patched = tiny()
    apply_liger(patched, STAND_INS)
    later = tiny(seed=4)
    assert (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP,
            modeling_llama.LlamaAttention.forward) == before
    for m in (other, later):
        assert not any("forward" in mod.__dict__ for mod in m.modules())
    assert patched.model.norm.forward.__func__ is TorchRMSNorm.forward and patched.model.norm.stand_in
    assert list(patched.state_dict()) == list(other.state_dict())  # same weights, same names: checkpoints unchanged
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    for key in CALLS:
        CALLS[key] = 0
    with torch.no_grad():
        other(input_ids=ids)
    assert CALLS == {"rms_norm": 0, "swiglu": 0, "rope": 0}


def test_liger_patch_refuses_an_architecture_it_does_not_know():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(KernelsError, match="model_type gpt2"):
        apply_liger(gpt2, STAND_INS)
    assert not apply_kernels(gpt2, KernelsSpec(), on_cuda=True, functions=STAND_INS).liger.on


@pytest.mark.skipif(not LIGER, reason="liger_kernel not installed (pip install 'affinage[gpu]'); its pieces are checked where it is")
def test_the_real_liger_pieces_are_what_gets_bound():
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    model = tiny()
    counts = apply_liger(model)
    layer = model.model.layers[0]
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 2}
    assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert layer.input_layernorm.casting_mode == "llama" and layer.input_layernorm.offset == 0.0
    assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert layer.self_attn.forward.__func__.__globals__["apply_rotary_pos_emb"] is liger_rotary_pos_emb
    assert modeling_llama.apply_rotary_pos_emb is not liger_rotary_pos_emb


# ----------------------------------------------------------------------------------- compile
def packed_rows(n: int, seed: int, vocab: int = 256, length: int = 96) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        seqs = [int(x) for x in rng.integers(8, 40, size=int(rng.integers(1, 4)))]
        ids = rng.integers(3, vocab, size=sum(seqs))
        mask = np.zeros(len(ids), dtype=bool)
        pos = 0
        for s in seqs:
            mask[pos + s // 2: pos + s] = True  # the second half of each sample is its "answer"
            pos += s
        rows.append({"input_ids": ids, "loss_mask": mask, "seq_lens": np.asarray(seqs)})
    return rows


def compile_vs_eager(seed: int) -> dict:
    """3 LoRA steps on packed rows with training.kernels.compile off and on; one step's gradients of each."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from affinage.data.collator import PackedCollator
    from affinage.train.attention import use_varlen_attention
    from affinage.train.loss import AffinageTrainer, selective_lm_loss

    rows = packed_rows(6, seed)

    def run(compile_: str):
        torch._dynamo.reset()
        model = tiny(layers=1, seed=seed)
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # B random: every LoRA gradient non-zero
        use_varlen_attention(model, 256)
        kernels = apply_kernels(model, KernelsSpec(compile=compile_), on_cuda=False)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                                 use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False, seed=seed,
                                 logging_steps=1, disable_tqdm=True, **kernels.training_arguments())
        trainer = AffinageTrainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(0, task="sft"))
        # one step's gradients through the model as the Trainer runs it, before training moves the weights
        wrapped = torch.compile(model, backend="inductor") if compile_ == "on" else model  # what accelerate does with it
        loss, _ = selective_lm_loss(wrapped, PackedCollator(0, task="sft")(rows[:2]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], grads, type(trainer.model_wrapped).__name__

    (le, ge, ke), (lc, gc, kc) = run("off"), run("on")
    rel = {n: float((gc[n] - g).abs().max()) / (float(g.abs().max()) or float("nan")) for n, g in ge.items()} \
        if ge.keys() == gc.keys() else None  # a zero gradient gives nan: refused below
    return {"eager": le, "compiled": lc, "kinds": (ke, kc), "grad_rel": rel,
            "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(le, lc)) if len(le) == len(lc) else None}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_lora_training_gives_the_eager_losses_and_gradients(seed):
    """~220 s per seed on a loaded 2-core machine (inductor compiles forward and backward, recompiles for new row lengths)."""
    r = compile_vs_eager(seed)
    assert r["kinds"][1] == "OptimizedModule" and r["kinds"][0] != "OptimizedModule"
    assert len(r["eager"]) == len(r["compiled"]) == 3 and r["loss_rel"] <= 1e-5, r
    assert r["grad_rel"] and all(v <= 1e-5 for v in r["grad_rel"].values()), r["grad_rel"]


@pytest.mark.slow
def test_a_run_with_compile_on_trains_saves_and_reports_it(tmp_path, tiny_llama_dir, demo_data):
    """``train()`` end to end with ``training.kernels.compile: on``: the same losses as eager, a normal final/, the summary."""
    import json

    from affinage.recipe.loader import load_recipe_dict
    from affinage.run import RunDir
    from affinage.train.trainer import train

    def run(compile_: str):
        torch._dynamo.reset()
        recipe = load_recipe_dict({
            "name": f"compile-{compile_}", "task": "sft", "seed": 3,
            "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
            "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"sources": [{"path": str(demo_data / "qa_culture.jsonl"), "format": "chat", "max_records": 8}],
                     "max_length": 96, "cache_dir": str(tmp_path / "cache"), "num_proc": 1},
            "training": {"global_batch_size": 2, "micro_batch_size": 2, "duration": "2 steps", "report_to": ["none"],
                         "kernels": {"compile": compile_}},
            "output": {"dir": str(tmp_path / compile_)},
        })
        run_dir = RunDir.create(recipe.run_dir())
        result = train(recipe, run_dir)
        return result, run_dir, [m["loss"] for m in run_dir.read_metrics() if "loss" in m]

    eager, _, eager_losses = run("off")
    result, run_dir, losses = run("on")
    assert result.completed and result.kernels["compile"] == {"setting": "on", "on": True,
                                                              "why": "training.kernels.compile on (the HF Trainer's torch_compile, inductor)"}
    assert json.loads(run_dir.summary.read_text())["kernels"]["compile"]["on"] is True and not eager.kernels["compile"]["on"]
    assert (run_dir.final / "adapter_model.safetensors").exists()  # saved through the unwrapped model, no _orig_mod. prefix
    from safetensors.torch import load_file

    assert not any("_orig_mod" in k for k in load_file(str(run_dir.final / "adapter_model.safetensors")))
    assert len(losses) == len(eager_losses) == 2 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager_losses, losses))
