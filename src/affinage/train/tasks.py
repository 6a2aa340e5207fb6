"""``train(recipe, run)`` for every task: SFT/CPT on the HF Trainer (``trainer``), DPO/KTO on TRL's (``preference``).

The entry points (``affinage train``, ``smoke``, SLURM jobs through the CLI) call this; the two
glue modules do not know about each other, except that ``preference`` reuses ``trainer``'s helpers.
"""

from __future__ import annotations

from typing import Any, Sequence

from affinage.recipe.preference import PREFERENCE_TASKS
from affinage.recipe.schema import Recipe
from affinage.run import RunDir


def train(recipe: Recipe, run: RunDir, *, resume: bool = True, world_size: int | None = None, callbacks: Sequence[Any] = ()):
    if recipe.task in PREFERENCE_TASKS:
        from affinage.train.preference import train_preference

        return train_preference(recipe, run, resume=resume, world_size=world_size, callbacks=callbacks)
    from affinage.train.trainer import train as train_lm

    return train_lm(recipe, run, resume=resume, world_size=world_size, callbacks=callbacks)
