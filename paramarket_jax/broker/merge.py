"""Merging aligned weights: alpha grid, layer subsets, many sellers (Git Re-Basin, ICLR 2023).

Consistency of partial trades: the aligned seller is permuted *entirely* into the buyer's
basis (every permutation group, on every parameter), so a merge that mixes only some
layers and keeps the buyer's other layers still connects unit k of one layer to unit k of
the next in the same (the buyer's) basis. Permuting only the traded layers would not.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# the layer patterns live with the models (a LoRA model names its targets with them); the
# broker's names stay importable from here
from paramarket_jax.models.spec import _matches, flatten, select_layers, unflatten

__all__ = ["_matches", "merge", "merge_alphas", "merge_many", "select_layers"]


def merge(buyer_params, seller_params, alpha, layers: Sequence[str] | None = None):
    """Linear interpolation ``(1 - alpha) * buyer + alpha * seller`` on the chosen layers.

    Computed as ``buyer + alpha * (seller - buyer)``: exactly the buyer at ``alpha = 0``
    and exactly ``buyer`` when the two are equal. Layers not chosen stay the buyer's.

    Args:
        buyer_params: the buyer's parameter pytree.
        seller_params: the seller's, already aligned to the buyer (see module docstring).
        alpha: scalar float (traced is fine), the seller's weight.
        layers: prefix or glob patterns of the traded layers; None trades all of them.

    Returns:
        A parameter pytree like ``buyer_params``.
    """
    chosen = select_layers(buyer_params, layers)
    b, s = flatten(buyer_params), flatten(seller_params)
    out = {}
    for path, x in b.items():
        if path in chosen:
            a = jnp.asarray(alpha, x.dtype)
            out[path] = x + a * (s[path] - x)
        else:
            out[path] = x
    return unflatten(out)


def merge_many(buyer_params, sellers_params, weights, layers: Sequence[str] | None = None):
    """Weighted average of the buyer and K aligned sellers on the chosen layers.

    Args:
        buyer_params: the buyer's parameter pytree.
        sellers_params: K aligned sellers stacked on a leading axis (every leaf (K, ...)).
        weights: (K + 1,) float; ``weights[0]`` is the buyer's, ``weights[1:]`` the
            sellers'. They are divided by their sum, so they need not be normalised.
        layers: prefix or glob patterns of the traded layers; None trades all of them.

    Returns:
        ``buyer + sum_k w_k (seller_k - buyer)`` with normalised ``w``; ``merge`` for K = 1.
    """
    chosen = select_layers(buyer_params, layers)
    w = jnp.asarray(weights)
    w = w / w.sum()
    b, s = flatten(buyer_params), flatten(sellers_params)
    out = {}
    for path, x in b.items():
        if path in chosen:
            ws = w[1:].astype(x.dtype).reshape((-1,) + (1,) * x.ndim)
            out[path] = x + (ws * (s[path] - x)).sum(axis=0)
        else:
            out[path] = x
    return unflatten(out)


def merge_alphas(buyer_params, seller_params, alphas, layers: Sequence[str] | None = None):
    """:func:`merge` at every alpha of a grid: every leaf gets a leading axis (A,).

    Args:
        buyer_params: the buyer's parameter pytree.
        seller_params: the aligned seller's.
        alphas: (A,) float grid, e.g. the paper's
            :data:`~paramarket_jax.broker.modes.PAPER_ALPHAS`.
        layers: prefix or glob patterns of the traded layers; None trades all of them.
    """
    return jax.vmap(lambda a: merge(buyer_params, seller_params, a, layers))(jnp.asarray(alphas))
