"""Evaluation: perplexity and bits per byte, multiple-choice accuracy, generation samples and an
lm-evaluation-harness bridge, on a fine-tuned model and its base, with bootstrap intervals and a
readable report (``affinage eval``)."""

from affinage.eval.runner import format_results, run_eval

__all__ = ["run_eval", "format_results"]
