"""Stands in for `affinage train` in tests of the time-limit protocol, in seconds instead of minutes.

First run: log a step, then wait for RUN_DIR/STOP and exit 3 like the trainer ("stopped after a
checkpoint"). After a requeue (SLURM_RESTART_COUNT >= 1): log the next step and finish (exit 0).
"""

import json
import os
import sys
import time
from pathlib import Path

run = Path(sys.argv[1])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if int(os.environ.get("RANK", "0")) == 0:
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": restart + 1, "loss": 2.0 / (restart + 1)}) + "\n")
    (run / f"trainer-started-{restart}").touch()
if restart >= 1:
    sys.exit(0)
deadline = time.monotonic() + 120
while not (run / "STOP").exists():
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
sys.exit(3)
