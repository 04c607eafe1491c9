"""The economics' vocabulary: quality measures, revenue models, strategies (DESIGN.md s4).

Light on purpose (no JAX): the scenario layer validates against these names without
importing a kernel.
"""

# what a model's quality is: exp(-cross-entropy) or accuracy (revenue.quality)
QUALITIES = ("likelihood", "accuracy")
# how quality becomes revenue: on its own, or Tullock contest shares (revenue.revenue)
REVENUES = ("independent", "competitive")
# bidding and asking strategies; a strategy's index here is its code (strategies.StrategyParams)
STRATEGIES = ("truthful", "shade", "markup", "adaptive")
