"""Run on two SLURM nodes through the train launch template: a gloo all_reduce with real ranks."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
report = {"rank": rank, "world_size": world, "sum": value.item(), "node_id": os.environ.get("SLURM_NODEID")}
(Path(sys.argv[1]) / f"rank-{rank}.json").write_text(json.dumps(report))
dist.barrier()  # gloo may abort at exit without it (STACK-NOTES)
dist.destroy_process_group()
