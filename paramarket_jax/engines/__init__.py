"""Engines: the drivers of market.step (the batch path, the Mesa view, checkpoints)."""
