"""
The method registry, populated: importing this package registers every method.

The project's own methods live here (`spmoe`, `spmoe_plus`); the re-implemented
baselines live in `baselines/`, one file each. Lookups go through `get_strategy(name)`, which
fails with the list of valid names.
"""

import baselines  # noqa: F401  (the package imports every baseline module, which registers it)
from spmoe.methods import spmoe, spmoe_plus  # noqa: F401
from spmoe.strategy import STRATEGIES, StrategySpec, get_strategy

__all__ = ["STRATEGIES", "StrategySpec", "get_strategy"]
