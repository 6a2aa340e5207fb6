"""Checkpoint families: which strategy wrote a checkpoint, and what resuming it under another needs.

Plain (single/ddp) and FSDP2 (DCP shards) checkpoints resume on any world size; DeepSpeed ZeRO
partitions are converted once to DeepSpeed's universal format when the world size changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from affinage.distributed.configs import StrategyError
from affinage.sharding import strategy as strategy_entry

def checkpoint_kind(path: Path) -> str:
    """``deepspeed``, ``fsdp``, ``plain`` (single/ddp) or ``unknown``: what wrote a checkpoint folder."""
    if any(path.glob("global_step*")):
        return "deepspeed"
    if any(path.glob("pytorch_model_fsdp_*")) or (path / "model.safetensors").exists() and any(path.glob("optimizer_*")):
        return "fsdp"
    if (path / "optimizer.pt").exists() or (path / "model.safetensors").exists() or (path / "adapter_model.safetensors").exists():
        return "plain"
    return "unknown"


def check_resume_compatible(strategy: str, checkpoint: Path) -> None:
    """A checkpoint resumes only under the family of strategy that wrote it (plain, FSDP, DeepSpeed)."""
    kind = checkpoint_kind(checkpoint)
    want = strategy_entry(strategy).checkpoint_family
    if kind not in (want, "unknown"):
        raise StrategyError(
            f"{checkpoint} was written by a {kind} run, and this recipe uses distributed.strategy {strategy}: resume "
            "with the strategy that wrote it, or start over with --fresh"
        )


def deepspeed_saved_world_size(path: Path) -> Optional[int]:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (one optimizer shard each)."""
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    folder = path / tag if tag else next(iter(sorted(path.glob("global_step*"))), None)
    if folder is None or not folder.is_dir():
        return None
    shards = list(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(shards) or None


def convert_to_universal(path: Path) -> Path:
    """Turn ``checkpoint-N/global_stepN`` into ``global_stepN_universal`` (+ ``latest_universal``), once.

    Runs DeepSpeed's ``ds_to_universal`` in this process (one worker). ``latest_universal`` is
    written last: a half-done conversion is redone on the next attempt.
    """
    import argparse
    import contextlib
    import io
    import shutil

    tag = (path / "latest").read_text().strip()
    out = path / f"{tag}_universal"
    marker = path / "latest_universal"
    if marker.is_file() and marker.read_text().strip() == out.name and out.is_dir():
        return out
    if out.exists():
        shutil.rmtree(out)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(path / tag), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(args)
    from affinage.run import atomic_write_text

    atomic_write_text(marker, out.name)
    return out


