"""Facts about the machine that several stages need, decided once: usable CPU cores, the bf16 rule."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPU cores this process may use (its affinity mask under SLURM/cgroups, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def use_bf16(model_dtype: str, on_gpu: bool) -> bool:
    """bf16 mixed precision: on a GPU that supports it when the recipe's dtype allows it; never on CPU.

    bf16 on CPU is slower and uses more memory than fp32 on the machines measured (STACK-NOTES). When
    planning on a laptop for a GPU run (``on_gpu`` with no CUDA here) the recipe's wish is taken.
    """
    if not on_gpu:
        return False
    wants = model_dtype in ("auto", "bfloat16")
    import torch

    if not torch.cuda.is_available():
        return wants
    return bool(wants and torch.cuda.is_bf16_supported())
