"""``affinage eval``: evaluate, then rebuild the report and model card from the run's files.

The order is the data's: eval writes ``eval/results.json``; provenance reads the run directory
(results, metrics, manifest) and writes ``report.md`` and the card, once. Neither imports the other.
"""

from __future__ import annotations

from pathlib import Path


def evaluate(target, **kwargs) -> dict:
    """:func:`affinage.eval.runner.run_eval` with the same arguments, then the report (and card for a run)."""
    from affinage.eval.runner import run_eval

    results = run_eval(target, **kwargs)
    if not kwargs.get("write", True):
        return results
    progress = kwargs.get("progress", True)
    run_dir = results.get("_run_dir")
    if run_dir is None:
        from affinage.provenance.report import write_report

        write_report(results["_root"], results=results)
        return results
    from affinage.provenance import regenerate

    try:
        regenerate(run_dir)
    except Exception as e:  # the card is refreshed on a best-effort basis; `affinage card` says why
        from affinage.provenance.report import write_report

        write_report(results["_root"], results=results)
        if progress:
            print(f"could not refresh the model card ({type(e).__name__}: {e}); run affinage card {Path(run_dir)}", flush=True)
    return results
