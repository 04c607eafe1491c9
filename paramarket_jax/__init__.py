"""paramarket_jax: simulate parameter markets of Flax models with JAX and Mesa."""

from paramarket_jax.errors import ParamarketError

__all__ = ["ParamarketError"]
__version__ = "0.1.0"
