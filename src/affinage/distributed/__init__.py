"""Sharding strategies (``distributed.strategy``), their config files, launch and memory per strategy.

The names and what each shards are in the one table, ``affinage.sharding``.

- ``strategies``: the hook ``train()`` calls before the model loads (process group, DeepSpeed/FSDP2
  settings, universal-checkpoint conversion) and the Trainer subclass (FSDP2 on CPU, gathered final save).
- ``process``: rank, launch detection, process group start/finish, resident memory.
- ``checkpoints``: which family of strategy wrote a checkpoint; DeepSpeed universal conversion.
- ``runtime``: ``RUN_DIR/distributed/runtime.json``, what really ran, per rank.
- ``configs``: the shipped DeepSpeed JSON and accelerate FSDP2 YAML (:mod:`affinage.resources`,
  ``configs/`` in a checkout) or the recipe's own file, filled from the recipe and checked (DeepSpeed's own parser).
- ``launch``: ``affinage train --nproc N`` → torchrun; ``launch_command`` for one or several nodes.
- ``memory``: peak memory per GPU by component, per strategy (``affinage plan``).
- ``measure``: step time and memory of every strategy on this machine (``python -m affinage.distributed.measure``).
"""
