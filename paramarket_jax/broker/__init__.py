"""The broker: align (weight matching), merge, and try-before-buy valuation of weights.

The kernels live in :mod:`~paramarket_jax.broker.align`, :mod:`~paramarket_jax.broker.merge`
and :mod:`~paramarket_jax.broker.value` (import them from there); the package itself holds
only the light vocabulary of :mod:`~paramarket_jax.broker.modes`, so importing it (as the
scenario layer does) imports no JAX.
"""

from paramarket_jax.broker.modes import ALIGN_MODES, CHOICES, PAPER_ALPHAS, align_mode

__all__ = ["ALIGN_MODES", "CHOICES", "PAPER_ALPHAS", "align_mode"]
