"""The broker's vocabulary: alignment modes, restart choices, the paper's merge weights.

Light on purpose (no JAX, not even NumPy): the scenario layer validates against these
names without importing a kernel.
"""

from __future__ import annotations

import sys

from paramarket_jax.errors import unknown

# ``none``: merge raw seller weights; ``pairwise``: weight matching of every (buyer,
# candidate) pair; ``reference``: every agent matched once to a reference agent, pairs by
# composition (N alignments instead of N * K).
ALIGN_MODES = ("none", "pairwise", "reference")
# How one of R alignment restarts is kept: best matching objective, or lowest validation
# loss of the merges (scored at every alpha, so alignment is part of try-before-buy).
CHOICES = ("objective", "validation")
# What a seller sells (``broker.goods``): its whole model, its task vector (fine-tuned minus
# the shared base) or its LoRA adapter (the base frozen).
GOODS = ("model", "delta", "adapter")
# The broker's merge methods (``broker.merge``, names as mergekit uses them; the kernels are
# :data:`paramarket_jax.broker.methods.METHODS`) and those that need the shared base.
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties", "fisher")
BASE_METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")
# How try-before-buy picks a merge's weights: the best of the grid (``none``), or one weight
# per layer fitted by gradient steps on the buyer's validation rows from the grid's best
# (``layerwise``, AdaMerging-style).
FITS = ("none", "layerwise")
# How a buyer values a purchase (``broker.valuation``): with its rivals standing still
# (``myopic``, the paper's), or against the purchases the round's other buyers make
# (``anticipating``: passes over the tentative allocation, ``market.trade.anticipate``).
VALUATIONS = ("myopic", "anticipating")
# The paper's alpha grid: 0.05, 0.15, ..., 0.95.
PAPER_ALPHAS: tuple[float, ...] = tuple(round(0.05 + 0.1 * k, 2) for k in range(10))


def align_mode(align) -> str:
    """An alignment mode of :data:`ALIGN_MODES`; True is ``pairwise``, False ``none``."""
    numpy = sys.modules.get("numpy")  # a NumPy bool exists only once NumPy is imported
    if isinstance(align, bool) or (numpy is not None and isinstance(align, numpy.bool_)):
        return "pairwise" if align else "none"
    if isinstance(align, str) and align in ALIGN_MODES:
        return align
    raise unknown("alignment mode", str(align), ALIGN_MODES)
