"""
The method registry, populated: importing this package registers every method.

The project's own methods live here (`spmoe`, `spmoe_plus`); the re-implemented
baselines live in `baselines/`, one file each. Lookups go through `get_strategy(name)`, which
fails with the list of valid names.
"""

from baselines import (  # noqa: F401  (registers the baselines)
    accelerate_offload,
    adapmoe,
    gpu_resident,
    lru,
    mixtral_offloading,
    moe_infinity,
)
from spmoe.methods import spmoe, spmoe_plus  # noqa: F401
from spmoe.strategy import STRATEGIES, StrategySpec, get_strategy

__all__ = ["STRATEGIES", "StrategySpec", "get_strategy"]
