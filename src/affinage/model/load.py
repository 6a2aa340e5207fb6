"""Load the recipe's tokenizer and model, offline, ready for training.

Everything the recipe says about the model is applied here and nowhere else: dtype, attention
implementation, ``trust_remote_code``, random or pretrained weights, 4-bit quantisation (QLoRA)
and LoRA/DoRA adapters. Choices the machine cannot honour (flash-attention without CUDA, 4-bit
without bitsandbytes) fail here, before any data is tokenized, with a message that says what to
change. Gradient checkpointing is left to the trainer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional

from affinage.model.errors import ModelLoadError
from affinage.model.resolve import resolve_model_path
from affinage.recipe.schema import ModelSpec, Recipe

log = logging.getLogger(__name__)

_GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


# ------------------------------------------------------------------------------------ tokenizer
def _tokenizer_json_parts(path: Path) -> Optional[dict]:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    return {k: data.get(k) for k in ("normalizer", "pre_tokenizer")}


def load_tokenizer_folder(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a local folder, tokenizing exactly as its ``tokenizer.json`` says.

    ``AutoTokenizer`` (transformers 5) picks a class from ``model_type`` or ``tokenizer_class`` and
    some classes rebuild the normalizer/pre-tokenizer instead of reading them: on a qwen2 folder it
    re-splits digits, on Lucie-7B (declared ``LlamaTokenizer``) it drops the custom normalizer, so
    ids differ from the ones the model was trained on. When the folder has a ``tokenizer.json``
    whose normalizer or pre-tokenizer the chosen class changed, the folder's own file wins
    (``PreTrainedTokenizerFast``). Folders that declare the generic class load with it directly.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    declared = None
    tc_file = path / "tokenizer_config.json"
    if tc_file.is_file():
        declared = json.loads(tc_file.read_text(encoding="utf-8")).get("tokenizer_class")
    on_disk = _tokenizer_json_parts(path)
    if on_disk is not None and declared in _GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if on_disk is not None and backend is not None:
        loaded = json.loads(backend.to_str())
        changed = [k for k in on_disk if loaded.get(k) != on_disk[k]]
        if changed:
            log.warning(
                "%s rewrote the %s of %s/tokenizer.json; using the file as it is (PreTrainedTokenizerFast) "
                "so that token ids match the ones the model was trained with",
                type(tok).__name__, " and ".join(changed), path,
            )
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return tok


def load_tokenizer(spec: ModelSpec):
    """The recipe's tokenizer (``model.tokenizer`` or the model's folder), with a pad token, padding right.

    A missing pad token is set to the EOS token (else UNK): collators must then mask padding by
    the attention mask, not by comparing ids with ``pad_token_id``, or EOS would never be learnt.
    """
    source = spec.tokenizer or spec.name_or_path
    revision = spec.revision if spec.tokenizer is None else None
    path = resolve_model_path(source, revision=revision, mirrors=spec.mirrors, kind="tokenizer")
    tok = load_tokenizer_folder(path, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelLoadError(
                f"the tokenizer in {path} has no pad, eos or unk token to pad batches with; "
                "give a tokenizer folder whose tokenizer_config.json sets pad_token"
            )
        tok.pad_token = fallback
    tok.padding_side = "right"
    return tok


# ---------------------------------------------------------------------------------------- model
def resolve_dtype(name: str):
    """torch dtype for ``model.dtype``: ``auto`` is bfloat16 on a GPU that supports it, else float32.

    float32 (not float16) on older GPUs such as V100s: float16 weights cannot be trained by the
    Trainer's mixed precision, and a full fine-tune in float16 diverges.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ModelLoadError(f"unknown model.dtype {name!r}: use auto, float32, bfloat16 or float16") from None


def check_attention(attn_implementation: str, dtype) -> None:
    """Refuse attention kernels this machine cannot run, before loading anything."""
    import torch

    flash = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    if attn_implementation in flash:
        module = flash[attn_implementation]
        problems = []
        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible (flash-attention kernels run on NVIDIA GPUs only)")
        if importlib.util.find_spec(module) is None:
            problems.append(f"the `{module}` package is not installed")
        if dtype not in (torch.bfloat16, torch.float16):
            problems.append(f"model.dtype resolves to {str(dtype).replace('torch.', '')} but flash-attention needs bfloat16 or float16")
        if problems:
            raise ModelLoadError(
                f"model.attn_implementation: {attn_implementation} cannot be used here: " + "; ".join(problems) + ". "
                "Use `attn_implementation: sdpa` (works everywhere, and `affinage smoke` uses it on CPU), or run on a "
                "GPU node where flash-attn is installed (pip install flash-attn --no-build-isolation) with dtype "
                "bfloat16 (A100/H100) or float16."
            )
    if attn_implementation == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise ModelLoadError("model.attn_implementation: flex_attention needs torch >= 2.5; use sdpa")


def bnb_config(quantization, *, dtype_name: Optional[str] = None):
    """The ``BitsAndBytesConfig`` for a recipe's ``method.quantization`` (4-bit QLoRA base)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "method.kind: qlora needs bitsandbytes: pip install 'affinage[qlora]' (or bitsandbytes>=0.45); "
            "or use method.kind: lora"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(dtype_name or quantization.compute_dtype),
    )


def load_config(spec: ModelSpec, path: Optional[Path] = None):
    """config.json of the recipe's model, with ``use_cache=False`` (training: no KV cache, no leak across packed rows)."""
    from transformers import AutoConfig

    path = path or resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code, local_files_only=True)
    except ValueError as e:
        if spec.trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ModelLoadError(
            f"{path} needs its own Python code (config.json has auto_map / an unknown model_type) and "
            "model.trust_remote_code is false. Read the *.py files in that folder; if you trust them, set "
            "`model.trust_remote_code: true` in the recipe."
        ) from e
    config.use_cache = False
    return config


def build_random_model(config, seed: int, dtype, *, attn_implementation: str = "sdpa", trust_remote_code: bool = False):
    """Random weights for ``config``, a function of ``seed`` only.

    Initialised in float32 then cast, so the same seed gives the same weights whatever the
    training dtype (``affinage merge`` rebuilds the base this way, in float32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    return model.to(dtype)


def lora_config(lora):
    """peft ``LoraConfig`` for a recipe's ``method.lora``."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets,
        use_dora=lora.dora,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def load_model(recipe: Recipe, *, device_map=None):
    """The model the recipe trains: base (pretrained or random, optionally 4-bit) plus LoRA adapters.

    Returns a ``PeftModel`` for lora/qlora, a plain ``PreTrainedModel`` for full. The RNG is seeded
    with ``recipe.seed`` just before ``get_peft_model`` so that LoRA's random init is reproducible.
    ``device_map`` is passed to ``from_pretrained``; for QLoRA on a GPU it defaults to
    ``{"": LOCAL_RANK}`` (each DDP process holds its own 4-bit copy on its own GPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    method = recipe.method
    dtype = resolve_dtype(spec.dtype)
    check_attention(spec.attn_implementation, dtype)
    path = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    config = load_config(spec, path)

    if spec.init == "random":
        model = build_random_model(
            config, recipe.seed, dtype, attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code
        )
        if device_map is not None:
            log.warning("device_map=%r ignored for model.init: random (the model is built in memory)", device_map)
    else:
        kwargs = dict(
            config=config,
            dtype=dtype,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=True,
        )
        if device_map is not None:
            kwargs["device_map"] = device_map
        if method.kind == "qlora":
            kwargs["quantization_config"] = bnb_config(method.quantization)
            if device_map is None and torch.cuda.is_available():
                # 4-bit weights are quantised where they are loaded: put them on this process's GPU
                kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.use_cache = False

    if method.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # casts norms/embeddings to fp32 and freezes the base; checkpointing stays the trainer's call
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method.kind in ("lora", "qlora"):
        from peft import get_peft_model

        torch.manual_seed(recipe.seed)
        model = get_peft_model(model, lora_config(method.lora))
    return model


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts: the one count (plan, eval, provenance, merge use it).

    4-bit weights count as their unpacked size and ZeRO-3 shards as whole (``ds_numel``);
    transformers' ``num_parameters()`` knows the first but not the second, hence our own. Shared
    (tied) parameters count once: ``parameters()`` yields each tensor once.
    """
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.__class__.__name__ == "Params4bit":
            # two 4-bit values per byte of the storage dtype
            n = n * 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable
