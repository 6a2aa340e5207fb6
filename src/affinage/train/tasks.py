"""``train(recipe, run)`` for every task: SFT/CPT on the HF Trainer (``trainer``), DPO/KTO on TRL's (``preference``).

The entry points (``affinage train``, ``smoke``, SLURM jobs through the CLI) call this; the two
glue modules do not know about each other, except that ``preference`` reuses ``trainer``'s helpers.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from affinage.recipe.preference import PREFERENCE_TASKS
from affinage.recipe.schema import Recipe
from affinage.run import RunDir


def train(recipe: Recipe, run: RunDir, *, resume: bool = True, world_size: int | None = None, callbacks: Sequence[Any] = (),
          allow_change: Sequence[str] = (), recipe_text: str | None = None):
    """Train ``recipe`` into ``run``; see :func:`affinage.train.trainer.train` for ``allow_change``/``recipe_text``."""
    if recipe.task in PREFERENCE_TASKS:
        from affinage.train.preference import train_preference

        if int(os.environ.get("RANK", "0")) == 0 and (recipe_text is not None or not run.recipe.is_file()):
            from affinage.recipe.loader import dump_resolved
            from affinage.run import write_text

            write_text(run.recipe, recipe_text if recipe_text is not None else dump_resolved(recipe))
        return train_preference(recipe, run, resume=resume, world_size=world_size, callbacks=callbacks)
    from affinage.train.trainer import train as train_lm

    return train_lm(recipe, run, resume=resume, world_size=world_size, callbacks=callbacks, allow_change=allow_change,
                    recipe_text=recipe_text)
