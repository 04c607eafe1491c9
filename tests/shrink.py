"""Overrides that shrink a bundled scenario to test size (few steps, tiny model, few rows)."""

SHRINK = [
    "train.local_steps=3",
    "data.split.eval_size=32",
    "model.widths=[16, 8]",
    "broker.max_sweeps=5",
    "broker.alphas=[0.25, 0.5, 0.75]",
    "train.learning_rate=0.05",
]
