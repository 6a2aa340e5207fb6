"""Starting N processes that really run the chosen strategy: ``torchrun``, never ``accelerate launch``.

Measured on CPU (STACK-NOTES): ``accelerate launch --cpu --num_processes 2`` starts one process;
``--use_deepspeed`` asserts or runs DDP; torchrun without CPU mode starts unsynchronised copies. So
every multi-process path here is ``python -m torch.distributed.run`` running ``affinage train``,
and the strategy itself is chosen inside each process from the recipe (``affinage.distributed.strategies``).

- ``affinage train RECIPE --nproc N`` (one machine) re-executes itself as
  ``torchrun --standalone --nproc_per_node N -m affinage.cli train RECIPE ...`` with :func:`launch_env`.
- SLURM jobs (``slurm/job.sbatch.j2``) run one torchrun per node with a c10d rendezvous, the same
  command as :func:`launch_command` with ``nnodes`` > 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence
from affinage.hardware import usable_cpus


def launch_command(
    recipe_path: str | os.PathLike,
    nprocs: int,
    *,
    nnodes: int = 1,
    run_dir: Optional[str | os.PathLike] = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: Optional[str] = None,
) -> list[str]:
    """The command that runs ``affinage train`` on ``nprocs`` processes per node (``nnodes`` nodes).

    One node: ``--standalone`` (a private rendezvous on a free port). Several: a c10d rendezvous at
    ``rdzv_endpoint`` (``host:port`` of the first node), the same on every node.
    """
    if nprocs < 1 or nnodes < 1:
        raise ValueError("nprocs and nnodes must be at least 1")
    cmd = [python, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        if not rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint='host:port' (the first node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if rdzv_id:
            cmd.append(f"--rdzv_id={rdzv_id}")
    cmd += [f"--nproc_per_node={nprocs}", "-m", "affinage.cli", "train", str(recipe_path)]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    return cmd + list(extra_args)


def launch_env(nprocs: int, *, gpu: Optional[bool] = None, base: Optional[dict] = None) -> dict:
    """Environment for the launched processes: CPU mode when there is no GPU, threads split between processes."""
    import torch

    env = dict(os.environ if base is None else base)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        env["ACCELERATE_USE_CPU"] = "1"  # DDP/FSDP on gloo (DeepSpeed strategies unset it inside the process)
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nprocs)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def relaunch_train(recipe_path: str, nprocs: int, *, run_dir: str, extra_args: Sequence[str] = ()) -> int:
    """Run ``affinage train`` under torchrun on this machine and return an ``affinage train`` exit code.

    torchrun reports any failing process as 1; a run that stopped early on request (exit 3 in every
    process, a checkpoint written) is recognised from ``RUN_DIR/summary.json`` and returned as 3.
    """
    cmd = launch_command(recipe_path, nprocs, run_dir=run_dir, extra_args=extra_args)
    started = time.time()
    print(f"affinage: launching {nprocs} process(es): {' '.join(cmd[1:4])} … {' '.join(cmd[-len(extra_args) - 4:]) if extra_args else ''}".rstrip(),
          file=sys.stderr)
    rc = subprocess.call(cmd, env=launch_env(nprocs))
    if rc == 0:
        return 0
    summary = Path(run_dir) / "summary.json"
    try:
        if summary.stat().st_mtime >= started and not json.loads(summary.read_text()).get("completed", True):
            return 3
    except (OSError, ValueError):
        pass
    return rc
