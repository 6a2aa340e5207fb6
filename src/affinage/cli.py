"""`affinage` command line: thin commands, the logic lives in the modules they call.

One cohesive thing (over 400 lines): the argument parser and one thin function per command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


def _quiet_libraries() -> None:
    """Offline and quiet by default: no hub calls, no telemetry, no noise from optional kernels."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # DeepSpeed still calls the torch.distributed collectives torch 2.13 renamed (one warning per call)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated.*")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars; affinage shows its own progress


def _at_least(low: int):
    """argparse type: a whole number >= ``low`` (a clear usage error otherwise, never a traceback later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    return parse


def _load(args, world_size: int | None = None):
    from affinage.recipe.loader import load_recipe

    return load_recipe(args.recipe, overrides=args.set or (), world_size=world_size)


def _human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def format_summary(result) -> str:
    r = result
    loss = "n/a"
    if r.loss_first is not None:
        loss = f"{r.loss_first:.4f} → {r.loss_last:.4f}"
    if getattr(r, "already_complete", False):
        status = "complete before this start: nothing trained, nothing rewritten"
    elif r.completed:
        status = "complete"
    elif getattr(r, "stopped_by", None) == "SIGTERM":
        status = "stopped by SIGTERM (checkpoint written; rerun to resume)"
    elif getattr(r, "stopped_by", None) == "STOP file before training":
        status = "not started: the STOP file existed before training (remove it and rerun)"
    else:
        status = "stopped early (checkpoint written; rerun to resume)"
    session_steps = getattr(r, "steps_this_session", r.steps)
    session_tokens = getattr(r, "tokens_this_session", r.tokens_seen)
    lines = [
        "",
        "── affinage summary " + "─" * 40,
        f"status          {status}",
        f"steps           {r.steps}/{r.max_steps} in the run, {session_steps} in this session  (world size {r.world_size}, accumulation {r.gradient_accumulation})",
        f"samples         {r.train_samples} train, {r.heldout_samples} held out",
        f"tokens          {(r.tokens_seen or 0):,} in the run, {(session_tokens or 0):,} in this session (non-padding)",
        f"loss            {loss}" + (f"   held-out loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""),
        f"time            {_human_seconds(r.seconds or 0)} this session" + (f"   resumed from {r.resumed_from}" if r.resumed_from else ""),
    ]
    for k, v in r.outputs.items():
        lines.append(f"{k:<15} {v}")
    for note in getattr(r, "notes", None) or ():
        lines.append(f"note            {note}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from affinage.recipe.loader import dump_resolved
    from affinage.run import RunDir, apply_sharing
    from affinage.train.tasks import train
    from affinage.train.trainer import world_size_from_env

    from affinage.recipe.loader import load_recipe_with_sources

    from affinage.distributed.process import finish_distributed, launched

    if args.nproc is not None and args.nproc < 1:
        raise _usage_error("--nproc must be at least 1")
    if launched() and args.nproc is not None and args.nproc != world_size_from_env():
        raise _usage_error(f"--nproc {args.nproc} under a launcher that started {world_size_from_env()} processes: drop --nproc")
    from affinage.runlock import RunLock, check_run_dir, check_run_dir_path

    if not launched():
        nproc = args.nproc or 1
        loaded = load_recipe_with_sources(args.recipe, overrides=args.set or (), world_size=nproc)
        if nproc > 1 or loaded.recipe.distributed.sharded:
            root = check_run_dir_path(args.run_dir or loaded.recipe.run_dir())
            check_run_dir(root, loaded.recipe.name)
            RunLock(root).check_free()
            return _relaunch_train(args, loaded.recipe, nproc)
    loaded = load_recipe_with_sources(args.recipe, overrides=args.set or (), world_size=world_size_from_env())
    recipe = loaded.recipe
    apply_sharing(recipe.output.sharing)
    root = check_run_dir_path(args.run_dir or recipe.run_dir())
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run directory, held by rank 0 until it exits
        check_run_dir(root, recipe.name)
        args._run_lock = RunLock(root).acquire("train")
    run = RunDir.create(root)
    same_file = Path(args.recipe).resolve() == run.recipe.resolve()
    text = None if (same_file and not args.set) else dump_resolved(loaded)  # keep the submit-time copy a job trains from
    result = train(recipe, run, resume=not args.fresh, allow_change=args.allow_change or (), recipe_text=text)
    if result.already_complete:
        print(format_summary(result))
        finish_distributed()
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        from affinage.provenance import write_run_provenance

        for what, path in write_run_provenance(recipe, run, result).items():
            result.outputs[what] = str(path)
        print(format_summary(result))
    finish_distributed()  # every rank reaches this barrier before the process group goes away
    return result.exit_code


def _usage_error(message: str):
    from affinage.errors import UserError

    return UserError(message)


def _relaunch_train(args, recipe, nproc: int) -> int:
    """``affinage train --nproc N`` (or a sharded strategy on one process): check once, then torchrun."""
    import torch

    from affinage.distributed.configs import model_hidden_size, render
    from affinage.distributed.launch import relaunch_train

    # the strategy's config is rendered and checked (DeepSpeed's own parser) before any process starts
    render(recipe, world_size=nproc, accumulation=recipe.training.gradient_accumulation(nproc),
           on_gpu=torch.cuda.is_available(), hidden_size=model_hidden_size(recipe))
    run_dir = os.path.abspath(args.run_dir or recipe.run_dir())
    extra = ([a for s in (args.set or ()) for a in ("--set", s)] + (["--fresh"] if args.fresh else [])
             + [a for k in (args.allow_change or ()) for a in ("--allow-change", k)])
    return relaunch_train(args.recipe, nproc, run_dir=run_dir, extra_args=extra)


def cmd_plan(args) -> int:
    from affinage.plan import check_fits, format_plan, make_plan

    profile = None
    if args.cluster:  # the job chain on a cluster: its GPUs per job set the world size (affinage.slurm.budget)
        from affinage.slurm.profiles import load_profile

        profile = load_profile(args.cluster)
        args.world_size = profile.allocate(args.nodes, args.gpus_per_node, args.time, args.qos, account="plan").world_size
        args.gpu = args.gpu or profile.gpu_kind
    elif args.budget_hours is not None:
        raise _usage_error("--budget-hours needs --cluster PROFILE (GPU-hours depend on the GPUs per job and the time limit)")
    recipe = _load(args, world_size=args.world_size)
    plan = make_plan(recipe, world_size=args.world_size, gpu=args.gpu)
    check_fits(plan)
    chain = None
    if profile is not None:
        from affinage.slurm.budget import format_chain, plan_chain

        chain = plan_chain(plan, profile, time=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node, qos=args.qos,
                           budget_hours=args.budget_hours, timing_from=args.timing_from)
    if recipe.distributed.sharded:
        from affinage.distributed.configs import config_path, model_hidden_size, render

        # the strategy's file, filled from the recipe and checked (DeepSpeed's own parser) as a GPU run would
        render(recipe, world_size=args.world_size, accumulation=plan.gradient_accumulation, on_gpu=True,
               hidden_size=model_hidden_size(recipe))
        plan.notes.append(f"distributed config {config_path(recipe)}: filled from the recipe and checked")
    if args.json:
        print(json.dumps({**plan.as_dict(), "jobs": chain.as_dict() if chain else None}, indent=2, default=str))
        return 0
    from affinage.recipe.loader import dump_resolved

    if args.show_recipe:
        print(dump_resolved(recipe))
    print(format_plan(plan))
    if chain is not None:
        print(format_chain(chain, profile.name))
    return 0 if chain is None or chain.fits_budget is not False else 4


def cmd_smoke(args) -> int:
    from affinage.smoke import run_smoke

    from affinage.runlock import check_run_dir_path

    recipe = _load(args)
    if args.run_dir:
        check_run_dir_path(args.run_dir)
    result = run_smoke(recipe, steps=args.steps, run_dir=args.run_dir)
    print(format_summary(result))
    return 0 if result.completed else 1


def cmd_prepare(args) -> int:
    from affinage.data.console import format_prepare_summary
    from affinage.data.prepare import prepare
    from affinage.run import RunDir, apply_sharing, write_json

    from affinage.runlock import check_run_dir_path

    recipe = _load(args)
    apply_sharing(recipe.output.sharing)
    root = check_run_dir_path(args.run_dir or recipe.run_dir())
    cache = prepare(recipe, num_proc=args.num_proc, force=args.force)
    run = RunDir.create(root)
    write_json(run.data_stats, {**cache.stats, "cache": str(cache.path)})
    print(format_prepare_summary(cache))
    print(f"statistics      {run.data_stats}")
    return 0


def cmd_inspect(args) -> int:
    from affinage.inspect_data import run_inspect

    return run_inspect(_load(args), samples=args.samples, as_json=args.json, split=args.split)


def cmd_merge(args) -> int:
    from affinage.model.merge import merge_run

    r = merge_run(Path(args.run_dir), out_dir=args.out)
    print(f"merged {r.adapter_dir} into {r.base} → {r.out_dir} ({r.dtype}, {r.total_parameters:,} parameters)")
    print(f"parity: max |logit difference| merged vs adapter model = {r.max_abs_logit_diff:.2e} "
          f"(tolerance {r.tolerance:.2e} in {r.dtype}, max |logit| {r.logit_scale:.3g}; "
          f"{100 * r.max_abs_logit_diff / r.tolerance:.0f}% of it used; {r.check_tokens} tokens)")
    if r.base_was_quantized:
        print("note: the run trained on a 4-bit base; the merge uses the unquantised base, as it should")
    if args.out is None:
        from affinage.provenance import regenerate

        regenerate(args.run_dir)  # merged/ gets its own model card
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="affinage", description="Cultural fine-tuning of open LLMs from strict YAML recipes.")
    p.add_argument("--version", action="version", version=f"affinage {__import__('affinage').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_cmd(name: str, help: str):
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("recipe", help="recipe YAML file (recipes/<model>/<method>/<variant>.yaml)")
        c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)")
        return c

    c = recipe_cmd("train", "train a recipe here (CPU or one GPU; under torchrun for several)")
    c.add_argument("--run-dir", help="run directory (default: the recipe's output.dir)")
    c.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    c.add_argument("--allow-change", action="append", metavar="KEY", help="resume although KEY (e.g. training.learning_rate) "
                   "differs from what the run trained so far; recorded in identity.json and the provenance (repeatable)")
    c.add_argument("--nproc", type=_at_least(1), help="processes (GPUs) on this machine: re-runs itself under torchrun "
                   "(default 1; fsdp2/zero* recipes always run under torchrun)")
    c.set_defaults(func=cmd_train)

    c = recipe_cmd("plan", "check a recipe and print what it will do, without loading weights")
    c.add_argument("--world-size", type=_at_least(1), default=1, help="number of GPUs/processes to plan for")
    from affinage.distributed.memory import GPU_MEMORY_GIB

    c.add_argument("--gpu", choices=sorted(GPU_MEMORY_GIB), help="GPU kind: say whether each strategy fits its memory")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--show-recipe", action="store_true", help="print the resolved recipe too")
    c.add_argument("--cluster", help="cluster profile: also estimate the requeued jobs and GPU-hours the run takes there")
    c.add_argument("--budget-hours", type=float, help="GPU-hours allocated (Jean Zay counts them per partition): exit 4 when the run does not fit")
    c.add_argument("--time", help="with --cluster: time limit per job HH:MM:SS (default: the longest the QoS allows)")
    c.add_argument("--qos", help="with --cluster: QoS or partition")
    c.add_argument("--nodes", type=int, default=1, help="with --cluster: nodes per job (default 1)")
    c.add_argument("--gpus-per-node", type=int, help="with --cluster: GPUs per node (default: the whole node)")
    c.add_argument("--timing-from", metavar="RUN_DIR", help="with --cluster: read measured step/save times from this run's "
                   "timing.json (default: the recipe's own run directory)")
    c.set_defaults(func=cmd_plan)

    c = recipe_cmd("smoke", "run the recipe's whole pipeline on CPU with a tiny model of the same architecture")
    c.add_argument("--steps", type=_at_least(1), default=4, help="optimizer steps (default 4)")
    c.add_argument("--run-dir", help="run directory (default: <recipe run dir>-smoke)")
    c.set_defaults(func=cmd_smoke)

    c = recipe_cmd("prepare", "read, filter, tokenize and pack the recipe's data into the cache train reads (CPU, once)")
    c.add_argument("--num-proc", type=_at_least(1), help="tokenization processes (default: data.num_proc, else all cores)")
    c.add_argument("--force", action="store_true", help="rebuild even if the cache already holds this data")
    c.add_argument("--run-dir", help="run directory for data_stats.json (default: the recipe's output.dir)")
    c.set_defaults(func=cmd_prepare)

    c = recipe_cmd("inspect", "show what the model is trained on: samples of the prepared data with loss-bearing text marked")
    c.add_argument("--samples", type=_at_least(1), default=3, help="how many samples (default 3)")
    c.add_argument("--json", action="store_true", help="one JSON object per sample: segments [{text, loss}] covering it")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.set_defaults(func=cmd_inspect)

    c = sub.add_parser("merge", help="merge a run's LoRA adapter into its base model (safetensors)")
    c.add_argument("run_dir", help="run directory of a finished LoRA/QLoRA run")
    c.add_argument("--out", help="output folder (default: RUN_DIR/merged)")
    c.set_defaults(func=cmd_merge)
    from affinage.slurm.cli import add_commands

    add_commands(sub)

    c = sub.add_parser("eval", help="evaluate a run (fine-tuned vs base) or a model folder; writes eval/ and report.md")
    c.add_argument("target", help="run directory, model folder, or a model id found offline")
    c.add_argument("--tasks", help="comma-separated kinds (perplexity,mcq,extractive,generation,lm_eval) or set names (default: all)")
    c.add_argument("--spec", help="YAML file with an eval section: its sets are added to the recipe's (with --replace it is the whole spec)")
    c.add_argument("--ppl", action="append", default=[], metavar="NAME=PATH[,k=v]",
                   help="held-out text to score, added to the recipe's sets (repeatable; options: text_field, role, group_field, max_records)")
    c.add_argument("--forgetting", action="append", default=[], metavar="NAME=PATH[,k=v]", help="general text that should not get worse (repeatable)")
    c.add_argument("--mcq", action="append", default=[], metavar="NAME=PATH[,k=v]",
                   help="multiple-choice JSONL items (repeatable; options: role, template, num_fewshot, question_field, "
                   "choices_field, answer_field, group_field, max_items)")
    c.add_argument("--qa", action="append", default=[], metavar="NAME=PATH[,k=v]",
                   help="extractive QA JSONL items scored by exact match and F1 (repeatable; options: role, template, "
                   "context_field, question_field, answers_field, group_field, max_new_tokens, max_items)")
    c.add_argument("--replace", action="store_true", help="the command line's sets replace the recipe's instead of adding to them")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the run's recipe, e.g. --set eval.bootstrap=5000 (repeatable)")
    c.add_argument("--prompts", metavar="PATH", help="prompts to complete (.txt, one per line, or .jsonl with 'prompt')")
    c.add_argument("--base", help="model to compare with (default: the run's base model)")
    c.add_argument("--no-base", action="store_true", help="evaluate only the fine-tuned model")
    c.add_argument("--out", help="output folder (default: the run directory, or ./eval-<model> for a model folder)")
    c.add_argument("--limit", type=_at_least(1), help="only the first N records/items/prompts of each set (quick check)")
    c.add_argument("--batch-size", type=_at_least(1))
    c.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    c.set_defaults(func=cmd_eval)

    c = sub.add_parser("card", help="rewrite a run's provenance.json, model card, AI Act summary and report.md")
    c.add_argument("run_dir", help="run directory")
    c.set_defaults(func=cmd_card)

    c = sub.add_parser("recipes", help="list the shipped recipes, or copy one (with its data) to edit and run it")
    what = c.add_subparsers(dest="recipes_command", required=True)
    w = what.add_parser("list", help="name, task, method, model and description of every shipped recipe")
    w.set_defaults(func=cmd_recipes_list)
    w = what.add_parser("copy", help="copy a shipped recipe and the files it names (base, data, eval sets, model config)")
    w.add_argument("name", help="recipe as listed (demo/full/cpt) or its name: (demo-cpt)")
    w.add_argument("dest", help="folder to copy into, keeping the tree's layout (created; existing files are never overwritten)")
    w.set_defaults(func=cmd_recipes_copy)

    c = recipe_cmd("stage", "copy everything a recipe reads (model, data, eval sets, templates) into one folder, "
                   "with a manifest, and write a recipe pointing there (run where the network is)")
    c.add_argument("--to", required=True, metavar="DIR", help="folder to stage into (re-running copies nothing twice)")
    c.add_argument("--download", action="store_true", help="fetch a model that is not on this machine with huggingface_hub")
    c.add_argument("--write-recipe", metavar="PATH", help="also write the staged recipe here (submit --pipeline: RUN_DIR/recipe.yaml)")
    c.set_defaults(func=cmd_stage)

    c = recipe_cmd("check-offline", "prove a (staged) recipe needs no network: plan and smoke it in a process with no network")
    c.add_argument("--steps", type=int, default=2, help="smoke steps (default 2)")
    c.add_argument("--python-guard-only", action="store_true", help="no network namespace (unshare): only the Python socket guard")
    c.set_defaults(func=cmd_check_offline)
    return p


def cmd_stage(args) -> int:
    from affinage.stage import format_stage, stage

    result = stage(args.recipe, args.to, overrides=args.set or (), download=args.download)
    if args.write_recipe:
        import shutil

        shutil.copyfile(result.recipe, args.write_recipe)
    print(format_stage(result))
    return 0


def cmd_check_offline(args) -> int:
    from affinage.offline import check_offline, format_report

    report = check_offline(args.recipe, steps=args.steps, overrides=args.set or (), isolate=not args.python_guard_only)
    print(format_report(args.recipe, report))
    return 0


def cmd_eval(args) -> int:
    from affinage.eval.console import format_results
    from affinage.eval.specs import adhoc_spec, combine, load_spec_file
    from affinage.evaluate import evaluate

    # --spec's sets and the --ppl/--mcq ones are added to the recipe's (--replace: they are the whole spec)
    extra = combine(load_spec_file(args.spec) if args.spec else None, adhoc_spec(args.ppl, args.forgetting, args.mcq, args.prompts,
                                                                                          qa_sets=args.qa))
    results = evaluate(args.target, extra=extra, replace=args.replace, overrides=args.set or (), tasks=args.tasks.split(",") if args.tasks else None, base=args.base,
                       compare_base=False if args.no_base else None, out_dir=args.out, limit=args.limit,
                       batch_size=args.batch_size, device=args.device)
    print(format_results(results))
    return 0


def cmd_card(args) -> int:
    from affinage.provenance import regenerate

    for what, path in regenerate(args.run_dir).items():
        print(f"{what:<15} {path}")
    return 0


def cmd_recipes_list(args) -> int:
    from affinage.recipes_catalog import catalog, format_catalog

    print(format_catalog(catalog()))
    return 0


def cmd_recipes_copy(args) -> int:
    from affinage.recipes_catalog import copy_recipe, find_recipe, prerequisite

    copied = copy_recipe(args.name, args.dest)
    print(f"copied {len(copied.files)} files into {args.dest}; the recipe is {copied.recipe}")
    first = prerequisite(find_recipe(args.name))
    if first is not None:
        print(f"it starts from the model {first.key} trains ({first.output}/final): copy and train that one first")
    print(f"next: affinage plan {copied.recipe}   then   affinage train {copied.recipe}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from affinage.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        from affinage.scrub import scrub

        print(f"affinage: error: {scrub(str(e))}", file=sys.stderr)  # job logs are read and shared too
        return 2
    except Exception as e:
        from affinage.errors import is_disk_full

        from affinage.data.cache import cache_root

        places = [os.environ.get("AFFINAGE_CACHE"), getattr(args, "run_dir", None)]
        try:
            places.append(cache_root())
        except Exception:
            pass
        if not is_disk_full(e, *[p for p in places if p and Path(p).exists()]):
            raise
        where = getattr(e, "filename", None)
        print(f"affinage: error: no space left on device{f' writing {where}' if where else ''}: free space (or "
              "point data.cache_dir / --run-dir at a larger file system) and rerun; what was complete is kept, "
              "half-written temporary files are removed at the next start", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("affinage: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
