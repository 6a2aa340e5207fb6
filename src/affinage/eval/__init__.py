"""Evaluation: perplexity and bits per byte, multiple-choice accuracy, generation samples and an
lm-evaluation-harness bridge, on a fine-tuned model and its base, with bootstrap intervals and a
readable report (``affinage eval``)."""

from affinage.eval.console import format_results
from affinage.eval.runner import run_eval

__all__ = ["run_eval", "format_results"]
