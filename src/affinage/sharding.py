"""The one table of sharding strategies: what each name means, written once and imported.

The recipe schema (which names exist), the memory estimate (what is sharded or offloaded), the
config renderer (which DeepSpeed stage, which shipped file), checkpoint resume (which family of
checkpoint a strategy writes) and the CLI all read this table. It sits at the bottom of the
package (no affinage imports) so that ``recipe/`` may use it without importing ``distributed/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    #: DeepSpeed ZeRO stage (None: not DeepSpeed)
    zero_stage: Optional[int] = None
    #: parameters sharded across processes (FSDP2, ZeRO-3)
    shards_params: bool = False
    #: gradients and optimizer states sharded (everything but single/ddp)
    shards_states: bool = False
    #: optimizer and parameters in CPU RAM unless the recipe says otherwise
    offload_by_default: bool = False
    #: the shipped config file this strategy starts from (resources), None for ddp/single
    config_file: Optional[str] = None
    #: which family of checkpoint folder it writes: plain, fsdp or deepspeed
    checkpoint_family: str = "plain"

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def sharded(self) -> bool:
        """Needs a process group even on one process (FSDP2 and DeepSpeed)."""
        return self.shards_states


STRATEGY_TABLE: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("single", "one process, refused under several"),
        Strategy("ddp", "a full replica per GPU (gradients averaged)"),
        Strategy("fsdp2", "PyTorch FSDP2, parameters, gradients and optimizer states sharded", shards_params=True,
                 shards_states=True, config_file="accelerate/fsdp2.yaml", checkpoint_family="fsdp"),
        Strategy("zero2", "DeepSpeed ZeRO-2, gradients and optimizer states sharded", zero_stage=2, shards_states=True,
                 config_file="deepspeed/zero2.json", checkpoint_family="deepspeed"),
        Strategy("zero3", "DeepSpeed ZeRO-3, everything sharded", zero_stage=3, shards_params=True, shards_states=True,
                 config_file="deepspeed/zero3.json", checkpoint_family="deepspeed"),
        Strategy("zero3_offload", "ZeRO-3 with optimizer states and parameters in CPU RAM", zero_stage=3,
                 shards_params=True, shards_states=True, offload_by_default=True,
                 config_file="deepspeed/zero3_offload.json", checkpoint_family="deepspeed"),
    )
}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)
StrategyName = Literal["single", "ddp", "fsdp2", "zero2", "zero3", "zero3_offload"]
assert set(StrategyName.__args__) == set(STRATEGIES)  # the Literal the schema validates with is the table


def strategy(name: str) -> Strategy:
    return STRATEGY_TABLE[name]


def describe() -> str:
    """One line per strategy, for the schema's field description and error messages."""
    return "; ".join(f"{s.name}: {s.summary}" for s in STRATEGY_TABLE.values())
