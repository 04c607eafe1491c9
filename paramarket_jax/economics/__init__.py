"""Economics of the market: revenue from quality, purchase values, strategies (DESIGN.md s4)."""

from paramarket_jax.economics.revenue import (
    QUALITIES,
    REVENUES,
    Economy,
    purchase_values,
    quality,
    revenue,
)
from paramarket_jax.economics.strategies import (
    STRATEGIES,
    StrategyParams,
    StrategyState,
    init_state,
    learn,
    reports,
)

__all__ = [
    "QUALITIES",
    "REVENUES",
    "STRATEGIES",
    "Economy",
    "StrategyParams",
    "StrategyState",
    "init_state",
    "learn",
    "purchase_values",
    "quality",
    "reports",
    "revenue",
]
