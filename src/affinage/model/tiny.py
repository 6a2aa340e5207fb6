"""Tiny models of a real architecture, for ``affinage smoke`` and for tests.

A 7B recipe is checked on a laptop by running the whole pipeline with a model that has the same
``model_type`` and architecture flags (GQA, tied embeddings, sliding window, rope settings) and
the *real* tokenizer, but a few hundred thousand weights instead of billions. Every Linear layer
keeps dimensions that are multiples of 32 so that bitsandbytes 4-bit layers (QLoRA) run on CPU.

Everything here is deterministic given a seed: two builds give bitwise equal weights, and a
tokenizer trained twice on the same texts gives the same ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2  # when the original uses grouped-query attention
TINY_MAX_POSITIONS = 2048

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# Special tokens written literally in chat templates: <|im_start|>, <|start_header_id|>, [INST], <start_of_turn>...
_TEMPLATE_TOKENS = re.compile(
    r"<\|[A-Za-z0-9_.\-]+\|>"
    r"|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|TOOL_CONTENT)\]"
    r"|<(?:start|end)_of_turn>"
)

# A few lines of French so that a tokenizer can be trained without any data file.
DEFAULT_TEXTS: tuple[str, ...] = (
    "Le Code civil des Français fut promulgué le 21 mars 1804 par Napoléon Bonaparte.",
    "La Déclaration des droits de l'homme et du citoyen est adoptée le 26 août 1789.",
    "Victor Hugo publie Les Misérables en 1862, pendant son exil à Guernesey.",
    "La loi de séparation des Églises et de l'État est votée le 9 décembre 1905.",
    "Le fromage de Comté bénéficie d'une appellation d'origine depuis 1958.",
    "Molière, de son vrai nom Jean-Baptiste Poquelin, meurt en 1673 après une représentation du Malade imaginaire.",
    "L'Académie française, fondée en 1635 par Richelieu, veille sur la langue.",
    "Question : quelle est la capitale de la France ? Réponse : Paris, sur la Seine.",
    "Les droits de l'homme sont naturels, inaliénables et sacrés ; la loi est l'expression de la volonté générale.",
    "Le Conseil constitutionnel contrôle la conformité des lois à la Constitution du 4 octobre 1958.",
    "« Liberté, égalité, fraternité » est la devise de la République française.",
    "Marie Curie reçoit le prix Nobel de chimie en 1911 pour ses travaux sur le radium.",
)


# --------------------------------------------------------------------------------------- config
_ROPE_KEYS = ("rope_parameters", "rope_scaling")
_PER_FREQUENCY = ("short_factor", "long_factor", "ext_factor")  # longrope (Phi-3.5/4): one factor per rotary pair


def _shrink_rope(d: dict) -> None:
    """Rope settings that follow the tiny head size (transformers validates them against it).

    Per-frequency lists (longrope's ``short_factor``/``long_factor``) have one entry per rotary
    pair, ``head_dim · partial_rotary_factor / 2``: they are cut to the tiny model's count (the
    first, highest-frequency entries: a smoke test checks the code path, not the scaling's values).
    ``original_max_position_embeddings`` is kept below the tiny ``max_position_embeddings`` so that
    the scaling stays active as in the real model. ``mrope_section`` (multimodal rope) sums to the
    rotary half-size and is rescaled proportionally.
    """
    head_dim = d.get("head_dim") or TINY_HIDDEN // TINY_HEADS
    for key in _ROPE_KEYS:
        rope = d.get(key)
        if not isinstance(rope, dict):
            continue
        factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
        pairs = int(head_dim * factor) // 2
        for name in _PER_FREQUENCY:
            if isinstance(rope.get(name), list) and len(rope[name]) != pairs:
                values = list(rope[name])
                rope[name] = (values + values[-1:] * pairs)[:pairs]
        omax = rope.get("original_max_position_embeddings")
        if isinstance(omax, int) and omax >= d["max_position_embeddings"]:
            rope["original_max_position_embeddings"] = max(1, d["max_position_embeddings"] // 2)
        if isinstance(rope.get("mrope_section"), list) and sum(rope["mrope_section"]):
            sec = rope["mrope_section"]
            scaled = [max(1, round(x * pairs / sum(sec))) for x in sec]
            scaled[-1] += pairs - sum(scaled)
            rope["mrope_section"] = scaled
    omax = d.get("original_max_position_embeddings")
    if isinstance(omax, int) and omax >= d["max_position_embeddings"]:
        d["original_max_position_embeddings"] = max(1, d["max_position_embeddings"] // 2)


def tiny_config(config, vocab_size: Optional[int] = None, *, max_position_embeddings: int = TINY_MAX_POSITIONS):
    """A scaled-down copy of ``config``: same ``model_type``, architecture and flags, tiny sizes.

    Sizes: hidden 64, intermediate 128, 2 layers, 4 heads (2 key/value heads when the original
    uses GQA), head_dim 16, ``max_position_embeddings`` 2048 (enough for smoke sequences; rope
    models are not bound by it). ``vocab_size`` should be ``len(tokenizer)`` so that the real
    tokenizer's ids all have an embedding; by default the original vocabulary is kept.
    Per-layer lists (``layer_types``) are cut to the new depth; a pre-quantized model's
    ``quantization_config`` is dropped (the tiny weights are plain float32).
    """
    d = config.to_dict()
    heads = d.get("num_attention_heads")
    kv = d.get("num_key_value_heads")
    gqa = kv is not None and heads is not None and kv < heads
    for key in ("_name_or_path", "quantization_config", "torch_dtype", "transformers_version", "auto_map"):
        d.pop(key, None)
    d.update(
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        max_position_embeddings=max_position_embeddings,
        dtype="float32",
    )
    if "num_key_value_heads" in d:
        d["num_key_value_heads"] = TINY_KV_HEADS if gqa else TINY_HEADS
    if "head_dim" in d:
        d["head_dim"] = TINY_HIDDEN // TINY_HEADS
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:TINY_LAYERS]
    if isinstance(d.get("max_window_layers"), int):
        d["max_window_layers"] = min(d["max_window_layers"], TINY_LAYERS)
    # mixture-of-experts families: few small experts
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(d.get(key), int):
            d[key] = TINY_INTERMEDIATE
    for key, cap in (("num_local_experts", 4), ("num_experts", 4), ("n_routed_experts", 4), ("num_experts_per_tok", 2)):
        if isinstance(d.get(key), int):
            d[key] = min(d[key], cap)
    _shrink_rope(d)
    if vocab_size is not None:
        d["vocab_size"] = int(vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = d.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i >= d["vocab_size"]:
                raise ValueError(
                    f"{key}={ids} is outside the vocabulary ({d['vocab_size']} ids): the tokenizer does not "
                    "match this config.json; pass vocab_size=len(tokenizer) with the model's own tokenizer"
                )
    return type(config).from_dict(d)


def build_tiny_model(config_or_folder, seed: int = 0, vocab_size: Optional[int] = None, *, trust_remote_code: bool = False):
    """A random-init tiny model (float32) of the architecture of a config or a model folder.

    Weights depend only on ``seed`` (the global RNG state is left untouched).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config_or_folder, PretrainedConfig):
        config = config_or_folder
    else:
        config = AutoConfig.from_pretrained(os.fspath(config_or_folder), trust_remote_code=trust_remote_code, local_files_only=True)
    small = tiny_config(config, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


# ------------------------------------------------------------------------------------ tokenizer
def template_special_tokens(chat_template: Optional[str]) -> list[str]:
    """Special tokens a chat template writes literally (``<|im_start|>``, ``[INST]``...), in order of appearance."""
    if not chat_template:
        return []
    seen: dict[str, None] = {}
    for m in _TEMPLATE_TOKENS.finditer(chat_template):
        if m.group(0) not in SPECIAL_TOKENS:
            seen.setdefault(m.group(0))
    return list(seen)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2000,
    chat_template: Optional[str] = None,
    extra_special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
):
    """A byte-level BPE tokenizer trained on ``texts`` (any UTF-8 text round-trips, no unknown bytes).

    Special tokens: ``<unk>`` (id 0), ``<s>``, ``</s>``, ``<pad>``, then ``extra_special_tokens`` and
    the tokens ``chat_template`` writes literally, each encoded as one id. No BOS is added
    automatically (templates that want one write ``{{ bos_token }}``). The returned
    ``vocab_size`` may be smaller than asked when the texts have few distinct merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extras = list(dict.fromkeys([*extra_special_tokens, *template_special_tokens(chat_template)]))
    extras = [t for t in extras if t not in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *extras],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=extras,
        chat_template=chat_template,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------- folder
def save_tiny_model_folder(
    path: str | os.PathLike,
    model_type: str = "llama",
    texts: Optional[Iterable[str]] = None,
    vocab_size: int = 2000,
    seed: int = 0,
    chat_template: Optional[str] = None,
    *,
    extra_special_tokens: Sequence[str] = (),
    tie_word_embeddings: Optional[bool] = None,
) -> Path:
    """Write a complete offline Hugging Face folder: config.json, model.safetensors, tokenizer files.

    ``model_type`` is any causal-LM type transformers knows ("llama", "mistral", "qwen2"...): its
    default config is scaled down by :func:`tiny_config`. ``texts`` train the tokenizer (a few
    built-in French lines by default). The folder loads with ``AutoModelForCausalLM.from_pretrained``
    and :func:`affinage.model.load.load_tokenizer`; its ``tokenizer_config.json`` names the generic
    fast tokenizer class so that no architecture-specific tokenizer class rewrites the trained one.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} is not a causal LM known to transformers")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(
        list(texts) if texts is not None else DEFAULT_TEXTS,
        vocab_size=vocab_size,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens,
    )
    base = AutoConfig.for_model(model_type)
    base.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    base.bos_token_id = tokenizer.bos_token_id
    base.eos_token_id = tokenizer.eos_token_id
    base.pad_token_id = tokenizer.pad_token_id
    if tie_word_embeddings is not None:
        base.tie_word_embeddings = tie_word_embeddings
    config = tiny_config(base, vocab_size=len(tokenizer))
    model = build_tiny_model(config, seed=seed)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
