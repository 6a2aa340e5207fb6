"""Errors raised by the model modules.

A cluster job that cannot find or load its model should stop at once with a message that says what
was tried and what to do (stage the model, change one recipe key), not with a traceback from deep
inside ``transformers`` after minutes in the queue.
"""

from __future__ import annotations

from affinage.errors import UserError
from typing import Sequence


class ModelError(UserError, RuntimeError):
    """Base class: a model, tokenizer or adapter that cannot be used as the recipe asks."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model (or tokenizer) is in none of the offline places looked at.

    ``places`` keeps each place looked at with what was found there, so callers and tests can
    read them without parsing the message.
    """

    def __init__(self, message: str, places: Sequence[str] = ()):
        super().__init__(message)
        self.places = list(places)

    def __str__(self) -> str:  # FileNotFoundError would otherwise print "[Errno ...]"-style tuples
        return self.args[0] if self.args else ""


class ModelFolderError(ModelError):
    """A folder was found but is not a usable model (no config.json, no tokenizer files, ...)."""


class ModelLoadError(ModelError):
    """The recipe asks for something this machine cannot do (flash-attention on CPU, 4-bit without bitsandbytes...)."""


class MergeParityError(ModelError):
    """The merged model does not reproduce the adapter model's logits within tolerance."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
