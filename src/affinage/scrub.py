"""Scrubbing: keep secrets out of every file affinage writes.

Run directories, job scripts, reports, manifests and cards are read and shared by other people, so
nothing that looks like a credential may reach them. The writers of :mod:`affinage.run` call
:func:`scrub` on everything they write. Two nets:

1. the *values* of environment variables that hold credentials (``HF_TOKEN``, ``WANDB_API_KEY``,
   any name containing TOKEN, SECRET, PASSWORD, API_KEY, ACCESS_KEY or CREDENTIAL) are replaced
   wherever they appear, whatever the text around them;
2. strings shaped like well-known tokens (Hugging Face ``hf_…``, GitHub ``ghp_…``, OpenAI-style
   ``sk-…``, AWS access key ids) are replaced even when no variable holds them.

The environment is read when :func:`scrub` is called, not at import, so a token exported after
start-up is covered too. Nothing here ever writes the environment anywhere.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "[redacted]"

#: variables always treated as secret, whatever their value looks like
SECRET_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY", "WANDB_KEY",
    "OPENAI_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "COMET_API_KEY",
    "NEPTUNE_API_TOKEN", "MLFLOW_TRACKING_PASSWORD",
)
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
_TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}\b"            # Hugging Face user access tokens
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"      # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}\b"
    r"|\bsk-[A-Za-z0-9_-]{20,}\b"           # OpenAI-style keys
    r"|\bAKIA[0-9A-Z]{16}\b"                # AWS access key ids
)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary words


def secret_values(environ: dict | None = None) -> list[str]:
    """Values of the credential-holding variables set now, longest first."""
    env = os.environ if environ is None else environ
    values = set()
    for name, value in env.items():
        if not value or len(value) < MIN_SECRET_LENGTH:
            continue
        if name in SECRET_VARS or _SECRET_NAME.search(name):
            values.add(value)
    return sorted(values, key=len, reverse=True)


def scrub(text: str, environ: dict | None = None) -> str:
    """``text`` with every secret value and token-shaped string replaced by ``[redacted]``."""
    return _scrub(text, secret_values(environ))


def _scrub(text: str, values: list[str]) -> str:
    for value in values:
        if value in text:
            text = text.replace(value, REDACTED)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def scrub_data(data: Any, environ: dict | None = None) -> Any:
    """A copy of a JSON-like structure with every string scrubbed (keys too); the environment is read once."""
    return _scrub_data(data, secret_values(environ))


def _scrub_data(data: Any, values: list[str]) -> Any:
    if isinstance(data, str):
        return _scrub(data, values)
    if isinstance(data, dict):
        return {_scrub(str(k), values): _scrub_data(v, values) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_scrub_data(v, values) for v in data]
    return data
