"""``affinage submit`` and ``affinage status``: thin commands over :mod:`affinage.slurm`.

Wire them into the main parser with :func:`add_commands`; ``python -m affinage.slurm.cli`` runs
them on their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys

from affinage.slurm.profiles import ProfileError, profile_names


def cmd_submit(args) -> int:
    from affinage.slurm.submit import SubmitError, submit

    try:
        result = submit(
            args.recipe,
            args.cluster,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            qos=args.qos,
            account=args.account,
            overrides=args.set or (),
            sweep=args.sweep or (),
            pipeline=[s.strip() for s in args.pipeline.split(",") if s.strip()],
            run_dir=args.run_dir,
            dry_run=args.dry_run,
            grace_s=args.grace,
            after=args.after or (),
            from_recipe=args.from_recipe,
        )
    except (ProfileError, SubmitError) as e:
        print(f"affinage: error: {e}", file=sys.stderr)
        return 2
    print(f"run dir   {result.run_dir}")
    if result.sft_run_dir is not None:
        print(f"sft run   {result.sft_run_dir}  (trained first; its jobs are recorded there too)")
    if len(result.run_dirs) > 1:
        print(f"sweep     {len(result.run_dirs)} members: {result.run_dir}/sweep-<i>")
    width = max(9, *(len(stage) for stage in result.scripts))
    for stage, script in result.scripts.items():
        job = result.job_ids.get(stage, "not submitted (--dry-run)")
        print(f"{stage:<{width}} {script}  job {job}")
    if args.dry_run:
        chained = result.sft_run_dir is not None
        print("would run (in RUN_DIR/slurm):" if not chained else "would run (each in the slurm/ folder of its run dir):")
        for command, folder in zip(result.commands, result.command_dirs):
            print("  " + " ".join(command) + (f"    # in {folder}" if chained else ""))
    else:
        print(f"follow    affinage status {result.run_dir}")
    return 0


def cmd_status(args) -> int:
    from affinage.slurm.status import format_status, run_status

    from affinage.errors import UserError
    from affinage.slurm.status import jobs_file

    root = Path(args.run_dir)
    if not root.is_dir():
        raise UserError(f"{root} does not exist" if not root.exists() else f"{root} is a file, not a run directory")
    if not jobs_file(root).is_file() and any((root / "slurm").glob("*.sbatch")):
        print(f"{root}: no jobs recorded: its job scripts were rendered with --dry-run (see {root / 'slurm'}); "
              "submit without --dry-run to run them")
        return 0
    if not jobs_file(root).is_file():
        local = (root / "recipe.yaml").is_file() or (root / "summary.json").is_file()
        raise UserError(f"{root}: no SLURM jobs recorded (no {jobs_file(root).relative_to(root)}): "
                        + ("this run was not submitted with affinage submit; see its summary.json and metrics.jsonl"
                           if local else "this is not an affinage run directory; give the folder affinage submit printed"))
    rows = run_status(args.run_dir)
    print(json.dumps(rows, indent=2) if args.json else format_status(args.run_dir, rows))
    return 0


def add_commands(subparsers) -> None:
    """Add ``submit`` and ``status`` to ``affinage``'s subparsers (``build_parser`` in cli.py)."""
    c = subparsers.add_parser(
        "submit",
        help="submit a recipe to a SLURM cluster (pipeline of sbatch jobs, sweeps as job arrays)",
        description="Render sbatch scripts into RUN_DIR/slurm/ and submit them. The job trains from the "
        "resolved copy RUN_DIR/recipe.yaml, stops cleanly before its time limit and requeues itself.",
    )
    c.add_argument("recipe", help="recipe YAML file")
    c.add_argument("--cluster", required=True, help=f"cluster profile: {', '.join(profile_names())}, or a YAML file")
    c.add_argument("--nodes", type=int, default=1, help="nodes for training (default 1)")
    c.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the whole node; processes on a CPU cluster)")
    c.add_argument("--time", help="time limit HH:MM:SS (default: the longest the QoS allows)")
    c.add_argument("--qos", help="QoS (or partition, per profile); a unique suffix such as t4 is enough")
    c.add_argument("--account", help="project or account to charge (Jean Zay: PROJECT, charged PROJECT@h100)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    c.add_argument("--sweep", action="append", metavar="KEY=V1,V2", help="one job per value, as a job array (repeatable: grid)")
    c.add_argument("--pipeline", default="train", help="stages, in order, e.g. prepare,train,eval (default: train); "
                   "a DPO/KTO recipe after its SFT run: prepare,sft,dpo,eval with --from-recipe")
    c.add_argument("--run-dir", help="run directory (default: the recipe's output.dir)")
    c.add_argument("--after", action="append", metavar="JOBID", help="the first job waits (afterok) for this job of an "
                   "earlier submission: 123 or an array task 123_4 (repeatable)")
    c.add_argument("--from-recipe", metavar="SFT_RECIPE", help="with --pipeline ...,sft,dpo (or kto): the SFT recipe trained "
                   "first; its output.dir must be the DPO/KTO recipe's preference.from_run")
    c.add_argument("--grace", type=int, help="seconds between the USR1 stop warning and the time limit (default: profile's; 0: no signal). An upper bound: the trainer also stops on its own clock, from measured step and save times")
    c.add_argument("--dry-run", action="store_true", help="write the scripts and resolved recipes, submit nothing")
    c.set_defaults(func=cmd_submit)

    c = subparsers.add_parser("status", help="jobs of a run: states, restarts, last logged step")
    c.add_argument("run_dir", help="run directory of a submitted run")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    from affinage.errors import UserError

    parser = argparse.ArgumentParser(prog="affinage", description="SLURM commands of affinage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"affinage: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
