"""Faster kernels for the same computation: ``training.kernels`` resolved for this machine and model.

- ``liger``: Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU (``liger_kernel.transformers``), bound to the
  modules of *this* model instance. Liger's own ``apply_liger_kernel_to_llama(model=...)`` (and
  ``_apply_liger_kernel_to_instance``) also rebinds ``modeling_llama.apply_rotary_pos_emb``,
  ``LlamaRMSNorm`` and ``LlamaMLP`` in the module, which changes every other Llama in the process
  (a reference model, an evaluation copy) and every one built later; here the norms and MLPs of this
  instance get Liger's ``forward`` and its attention modules a copy of their ``forward`` that sees
  Liger's RoPE, nothing else. The head and loss stay with ``training.loss`` (``train.loss``).
  Triton needs CUDA: ``auto`` is on with CUDA and the package installed, for the architectures below.
- ``compile``: ``torch.compile`` through the HF Trainer's ``torch_compile`` (accelerate compiles the
  model it prepares; saving unwraps it). ``auto`` is off: on CPU, the bench's toy LoRA SFT ran 4.1×
  (3.9–10.1) fewer samples per CPU-second compiled, compile time and the recompiles of packed rows of
  varying length included (bench/bench_sft.py ``--compile``; docs/performance.md); on GPU it is not
  measured yet, so it stays off there until it is.

The choices are printed at the start and written to the run summary (``kernels``).
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from affinage.errors import UserError
from affinage.train.attention import base_model


class KernelsError(UserError):
    """training.kernels asks for a kernel this machine or model cannot run."""


#: model_type -> (modeling module, RMSNorm class, MLP class, attention class): Liger's instance patch
#: of these architectures is RMSNorm casting "llama", offset 0, SwiGLU, and the rotate-half RoPE.
LIGER_ARCHITECTURES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP", "LlamaAttention"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP", "MistralAttention"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP", "Qwen3Attention"),
}
INSTALL_HINT = "pip install 'affinage[gpu]' (liger-kernel)"


@dataclass
class KernelChoice:
    setting: str  # the recipe's value: auto, on or off
    on: bool
    why: str


@dataclass
class Kernels:
    """What runs, and why: printed at the start, ``kernels`` in summary.json."""

    liger: KernelChoice
    compile: KernelChoice
    liger_modules: Optional[dict] = None  # {"rms_norm": n, "swiglu": n, "rope": n} patched on this instance

    def training_arguments(self) -> dict:
        """Keywords for ``TrainingArguments``."""
        return {"torch_compile": True} if self.compile.on else {}

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        f = lambda c: f"{'on' if c.on else 'off'} ({c.setting}: {c.why})"  # noqa: E731
        return f"liger {f(self.liger)}; torch.compile {f(self.compile)}"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _model_type(model) -> Optional[str]:
    config = getattr(base_model(model), "config", None)
    return getattr(config, "model_type", None)


def liger_obstacle(model_type: Optional[str], on_cuda: bool, installed: Optional[bool] = None) -> Optional[str]:
    """Why Liger cannot run here (None: it can)."""
    if not on_cuda:
        return "needs CUDA (Triton kernels); this machine has none"
    if not (_installed("liger_kernel") if installed is None else installed):
        return f"the liger_kernel package is not installed: {INSTALL_HINT}"
    if model_type not in LIGER_ARCHITECTURES:
        return f"model_type {model_type} is not among the architectures affinage applies Liger to ({', '.join(LIGER_ARCHITECTURES)})"
    return None


def resolve_liger(setting: str, model_type: Optional[str], on_cuda: bool, installed: Optional[bool] = None) -> KernelChoice:
    if setting == "off":
        return KernelChoice("off", False, "training.kernels.liger off")
    obstacle = liger_obstacle(model_type, on_cuda, installed)
    if obstacle is None:
        return KernelChoice(setting, True, f"CUDA, liger_kernel installed, {model_type} supported")
    if setting == "on":
        raise KernelsError(f"training.kernels.liger on: {obstacle}. Set training.kernels.liger: auto (on where it can run) or off")
    return KernelChoice("auto", False, obstacle)


def resolve_compile(setting: str, on_cuda: bool) -> KernelChoice:
    if setting == "off":
        return KernelChoice("off", False, "training.kernels.compile off")
    if setting == "on":
        return KernelChoice("on", True, "training.kernels.compile on (the HF Trainer's torch_compile, inductor)")
    if on_cuda:
        return KernelChoice("auto", False, "not measured on GPU yet: off until measured faster (set compile: on to try it)")
    return KernelChoice("auto", False, "measured slower on CPU (compile time and recompiles on packed rows; docs/performance.md)")


# ------------------------------------------------------------------------------- instance patch
def liger_functions() -> dict[str, Callable]:
    """Liger's public pieces: the RMSNorm and SwiGLU ``forward`` and its RoPE function."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, liger_rotary_pos_emb

    return {"rms_norm_class": LigerRMSNorm, "swiglu_forward": LigerSwiGLUMLP.forward, "rope": liger_rotary_pos_emb}


def _rms_attributes(norm_class, module) -> dict:
    """The plain attributes ``norm_class.forward`` reads, as its ``__init__`` sets them, with this norm's epsilon."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or 1e-6
    with torch.device("meta"):
        proto = norm_class(1, eps=eps)
    return {k: v for k, v in vars(proto).items() if not k.startswith("_") and k != "training"}


def _forward_with(fn, name: str, replacement):
    """A copy of the function ``fn`` whose global ``name`` is ``replacement`` (the module is not touched).

    None when ``fn`` does not call ``name`` or is a decorator's wrapper (a copy would drop the decorator)."""
    if hasattr(fn, "__wrapped__") or name not in getattr(getattr(fn, "__code__", None), "co_names", ()):
        return None
    g = dict(fn.__globals__)
    g[name] = replacement
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__qualname__, new.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return new


def apply_liger(model, functions: Optional[dict] = None) -> dict:
    """Bind Liger's RMSNorm/SwiGLU/RoPE to this (PEFT-wrapped) model's modules; return the counts patched.

    ``functions`` (tests): the pieces of :func:`liger_functions` from elsewhere, e.g. plain PyTorch on CPU.
    """
    base = base_model(model)
    mt = _model_type(model)
    if mt not in LIGER_ARCHITECTURES:
        raise KernelsError(f"training.kernels.liger: model_type {mt} is not supported ({', '.join(LIGER_ARCHITECTURES)})")
    fns = functions or liger_functions()
    mod_name, norm_name, mlp_name, attn_name = LIGER_ARCHITECTURES[mt]
    modeling = importlib.import_module(mod_name)
    norm_cls, mlp_cls, attn_cls = (getattr(modeling, n) for n in (norm_name, mlp_name, attn_name))
    act = getattr(base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config, "hidden_act", None)
    rope = _forward_with(attn_cls.forward, "apply_rotary_pos_emb", fns["rope"])
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in base.modules():
        kind = type(module)
        if kind is norm_cls:  # also the copies inside PEFT's ModulesToSaveWrapper
            module.__dict__.update(_rms_attributes(fns["rms_norm_class"], module))
            module.forward = types.MethodType(fns["rms_norm_class"].forward, module)
            counts["rms_norm"] += 1
        elif kind is mlp_cls and act in ("silu", "swish"):
            module.forward = types.MethodType(fns["swiglu_forward"], module)
            counts["swiglu"] += 1
        elif kind is attn_cls and rope is not None:
            module.forward = types.MethodType(rope, module)
            counts["rope"] += 1
    if not counts["rms_norm"] and not counts["swiglu"] and not counts["rope"]:
        raise KernelsError(f"training.kernels.liger: no {norm_name}/{mlp_name}/{attn_name} module found in this {mt} model")
    return counts


def apply_kernels(model, spec, *, on_cuda: Optional[bool] = None, functions: Optional[dict] = None) -> Kernels:
    """Resolve ``spec`` (``recipe.schema.KernelsSpec``) for this machine and ``model``, apply Liger, return the choices.

    Call after the model is loaded (and wrapped by PEFT), before the Trainer is built; pass
    ``kernels.training_arguments()`` to the ``TrainingArguments``.
    """
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    mt = _model_type(model)
    liger = resolve_liger(spec.liger, mt, on_cuda, installed=True if functions is not None else None)
    counts = apply_liger(model, functions) if liger.on else None
    return Kernels(liger=liger, compile=resolve_compile(spec.compile, on_cuda), liger_modules=counts)


def plan_line(spec, model_type: Optional[str], on_cuda: bool) -> str:
    """``affinage plan``'s line: what ``training.kernels`` resolves to on a CUDA machine (or this one)."""
    where = "on a CUDA machine with liger-kernel" if on_cuda else "on this machine (no CUDA)"
    try:
        liger = resolve_liger(spec.liger, model_type, on_cuda, installed=True if on_cuda else None)
        text = f"liger {'on' if liger.on else 'off'} ({liger.why})"
    except KernelsError as e:
        text = f"liger would fail: {e}"
    c = resolve_compile(spec.compile, on_cuda)
    return f"{where}: {text}; torch.compile {'on' if c.on else 'off'} ({c.why})"
