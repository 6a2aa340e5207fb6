"""Training compute of a run, and the EU AI Act "one third" check for people who modify a model.

**FLOPs of this run** (architecture-based estimate, the usual ``C ≈ 6·N·D``): ``N`` is the model's
parameter count (embeddings included, tied ones once), ``D`` the tokens the training processed
(``num_input_tokens_seen``: padding excluded, every resumed session included).

* full fine-tuning: forward ``2ND`` + backward ``4ND`` = ``6ND``;
* LoRA/QLoRA: the frozen base still runs forward (``2ND``) and back-propagates activations
  (``2ND``) but computes no weight gradients: ``4ND`` (adapter FLOPs are negligible);
* gradient checkpointing recomputes the forward pass: ``+2ND``.

**The check.** The Commission's guidelines for providers of general-purpose AI models (July 2025)
presume that whoever modifies a GPAI model becomes the provider of the modified model when the
modification's training compute exceeds **one third of the original model's training compute**;
when that compute is not known, one third of the threshold that presumes a model to be GPAI
(10^23 FLOP) is used instead. A base model trained with less than 10^23 FLOP is not presumed to be
a GPAI model, so the rule does not apply to it: base + modification are compared with 10^23 FLOP. The base model's compute comes from ``card.base_model_training_flops``,
else from :data:`KNOWN_MODELS` (6·N·D from published parameter and token counts: estimates), else
the fallback. This is an indication for the user, not legal advice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

GPAI_PRESUMPTION_FLOP = 1e23
SYSTEMIC_RISK_FLOP = 1e25


def _c(params: float, tokens: float) -> float:
    return 6 * params * tokens


#: base model id (lower case, without org for matching) → (training FLOP estimate, how it was obtained)
KNOWN_MODELS: dict[str, tuple[Optional[float], str]] = {
    "llama-2-7b": (_c(6.74e9, 2.0e12), "6·N·D: 6.74B parameters × 2.0T tokens (Llama 2 paper)"),
    "meta-llama-3-8b": (_c(8.03e9, 15e12), "6·N·D: 8.03B parameters × 15T tokens (Meta, Llama 3 release)"),
    "llama-3.1-8b": (_c(8.03e9, 15e12), "6·N·D: 8.03B parameters × 15T tokens (Meta, Llama 3.1 model card)"),
    "llama-3.2-1b": (_c(1.24e9, 9e12), "6·N·D: 1.24B parameters × 9T tokens (Meta, Llama 3.2 model card)"),
    "llama-3.2-3b": (_c(3.21e9, 9e12), "6·N·D: 3.21B parameters × 9T tokens (Meta, Llama 3.2 model card)"),
    "qwen2.5-0.5b": (_c(0.49e9, 18e12), "6·N·D: 0.49B parameters × 18T tokens (Qwen2.5 technical report)"),
    "qwen2.5-1.5b": (_c(1.54e9, 18e12), "6·N·D: 1.54B parameters × 18T tokens (Qwen2.5 technical report)"),
    "qwen2.5-7b": (_c(7.61e9, 18e12), "6·N·D: 7.61B parameters × 18T tokens (Qwen2.5 technical report)"),
    "lucie-7b": (_c(6.71e9, 3.1e12), "6·N·D: 6.71B parameters × about 3.1T tokens (OpenLLM-France, Lucie-7B card)"),
    "mistral-7b-v0.1": (None, "Mistral AI has not published the training tokens of Mistral-7B"),
    "mistral-7b-v0.3": (None, "Mistral AI has not published the training tokens of Mistral-7B"),
}
_SUFFIX = re.compile(r"(-hf|-instruct|-chat|-chat-hf|-it)+$")


def known_model(name_or_path: str) -> Optional[tuple[str, Optional[float], str]]:
    """(key, FLOP or None, note) for a model id such as ``Qwen/Qwen2.5-7B-Instruct``; instruct variants match their base."""
    name = name_or_path.rstrip("/").split("/")[-1].lower()
    for candidate in (name, _SUFFIX.sub("", name)):
        if candidate in KNOWN_MODELS:
            flop, note = KNOWN_MODELS[candidate]
            return candidate, flop, note
    return None


def training_flops(parameters: int, tokens: int, method: str, gradient_checkpointing: bool = False) -> tuple[float, str]:
    """(FLOP, formula) for a run; see the module docstring."""
    factor = 6 if method == "full" else 4
    if gradient_checkpointing:
        factor += 2
    return float(factor * parameters * tokens), f"{factor}·N·D ({method}{', gradient checkpointing' if gradient_checkpointing else ''})"


def compute_check(run_flops: Optional[float], base_name: str, *, init: str = "pretrained",
                  declared: Optional[float] = None) -> dict:
    """Compare ``run_flops`` with one third of the base's training compute; says whether the user likely becomes a provider."""
    out: dict = {"run_flops": run_flops, "base_model": base_name}
    if init == "random":
        out.update(base_flops=None, base_flops_source="random init: this run trains the model from scratch",
                   threshold=GPAI_PRESUMPTION_FLOP, threshold_rule="training from scratch: the GPAI presumption threshold (10^23 FLOP)")
    elif declared is not None:
        out.update(base_flops=float(declared), base_flops_source="card.base_model_training_flops (declared in the recipe)")
    else:
        known = known_model(base_name)
        if known and known[1] is not None:
            out.update(base_flops=known[1], base_flops_source=f"affinage known-models table: {known[2]}")
        else:
            out.update(base_flops=None, base_flops_source=(known[2] if known else "unknown (not in the recipe, not in affinage's table)"))
    small_base = out.get("base_flops") is not None and out["base_flops"] < GPAI_PRESUMPTION_FLOP
    if "threshold" not in out:
        if small_base:
            out.update(threshold=GPAI_PRESUMPTION_FLOP - out["base_flops"],
                       threshold_rule="the base model is below the GPAI presumption threshold, so the one-third rule "
                                      "does not apply: base + this run are compared with 10^23 FLOP")
        elif out["base_flops"] is not None:
            out.update(threshold=out["base_flops"] / 3, threshold_rule="one third of the base model's training compute")
        else:
            out.update(threshold=GPAI_PRESUMPTION_FLOP / 3,
                       threshold_rule="base compute unknown: one third of the GPAI presumption threshold (10^23 FLOP / 3)")
    if run_flops is None:
        out.update(ratio=None, likely_provider=None, verdict="unknown: the training compute of this run is not known")
        return out
    out["ratio"] = run_flops / out["threshold"]
    out["likely_provider"] = run_flops > out["threshold"]
    if init == "random":
        out["verdict"] = ("above 10^23 FLOP: the model is presumed to be a general-purpose AI model and you are its provider"
                          if out["likely_provider"] else
                          "below 10^23 FLOP: not presumed to be a general-purpose AI model by its compute")
    elif small_base:
        out["verdict"] = ("base + this run exceed 10^23 FLOP: the modified model is presumed to be a general-purpose AI "
                          "model and you are likely its provider" if out["likely_provider"] else
                          "base + this run stay below 10^23 FLOP: neither is presumed to be a general-purpose AI model "
                          "by its compute")
    elif out["likely_provider"]:
        out["verdict"] = ("above the threshold: you likely become the provider of the modified model, with the provider "
                          "obligations (technical documentation, copyright policy, this training-content summary)")
    else:
        out["verdict"] = (f"below the threshold ({out['ratio']:.2g} of it): you are likely not presumed to become the "
                          "provider of a new general-purpose AI model by this modification")
    return out


# ------------------------------------------------------------------------------------ parameters
def safetensors_parameters(folder: Path) -> Optional[int]:
    """Parameters stored in a folder's ``*.safetensors`` files, from their headers only (no weights read)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:  # reads the header; tensors are not loaded
            for name in fh.keys():
                count = 1
                for d in fh.get_slice(name).get_shape():
                    count *= int(d)
                total += count
    return total


def config_parameters(folder: Path, trust_remote_code: bool = False) -> Optional[int]:
    """Parameters of the architecture in ``folder/config.json``, built on the meta device (no memory, no weights)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        from affinage.model.load import count_parameters

        return count_parameters(model)[0]
    except Exception:
        return None
