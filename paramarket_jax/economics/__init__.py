"""Economics of the market: revenue from quality, purchase values, strategies (DESIGN.md s4).

The kernels live in :mod:`~paramarket_jax.economics.revenue` and
:mod:`~paramarket_jax.economics.strategies` (import them from there); the package itself
holds only the light vocabulary of :mod:`~paramarket_jax.economics.kinds`, so importing it
(as the scenario layer does) imports no JAX.
"""

from paramarket_jax.economics.kinds import QUALITIES, REVENUES, STRATEGIES

__all__ = ["QUALITIES", "REVENUES", "STRATEGIES"]
