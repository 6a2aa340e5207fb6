"""Provenance of a run: manifest (``provenance.json``), model card (``README.md`` in ``final/`` and
``merged/``), EU AI Act training-content summary draft (``ai_act_summary.md``), energy estimate,
and the run report (``report.md``).

:func:`write_run_provenance` writes them all; ``affinage train`` calls it at the end of a run and
``affinage card RUN_DIR`` (or ``affinage eval``) regenerates them from the run's files.
"""

from __future__ import annotations

from pathlib import Path

from affinage.provenance.secrets import scrub, write_json, write_text

__all__ = ["write_run_provenance", "regenerate", "scrub"]


def write_run_provenance(recipe, run, result=None, *, training_process: bool = True) -> dict[str, Path]:
    """Write manifest, card(s), AI Act summary and report for ``run``; returns what was written.

    Call it on the main process after training (``result`` is the ``TrainResult``); with
    ``training_process=False`` (``affinage card``/``eval``) the hardware recorded by the training
    process is kept from the previous manifest.
    """
    from affinage.eval.results import read_results
    from affinage.provenance import aiact, card
    from affinage.provenance.report import write_report
    from affinage.provenance.lineage import PROVENANCE_FILE
    from affinage.provenance.manifest import build_manifest

    manifest = build_manifest(recipe, run, result, training_process=training_process)
    written: dict[str, Path] = {"manifest": write_json(run.root / PROVENANCE_FILE, manifest)}
    results = read_results(run.root)
    for label, folder in (("card", run.final), ("card_merged", run.merged)):
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            written[label] = write_text(folder / "README.md", card.render(manifest, results, folder=folder.name))
    written["ai_act_summary"] = write_text(run.root / aiact.AI_ACT_FILE, aiact.render(manifest))
    written["report"] = write_report(run.root, run=run, results=results, manifest=manifest)
    return written


def regenerate(run_dir: str | Path) -> dict[str, Path]:
    """``affinage card RUN_DIR``: rebuild everything from the run directory's files."""
    from affinage.errors import UserError
    from affinage.recipe.loader import load_recipe
    from affinage.run import RunDir

    root = Path(run_dir)
    if not (root / "recipe.yaml").is_file():
        raise UserError(f"{root} is not a run directory (no recipe.yaml): give the folder `affinage train` wrote")
    run = RunDir(root.resolve())
    return write_run_provenance(load_recipe(run.recipe), run, training_process=False)
