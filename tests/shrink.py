"""Overrides that shrink a bundled scenario to test size (few steps, tiny model, few rows)."""

SHRINK = [
    "train.local_steps=3",
    "data.split.eval_size=32",
    "model.widths=[16, 8]",
    "broker.max_sweeps=5",
    "broker.alphas=[0.25, 0.5, 0.75]",
    "train.learning_rate=0.05",
]

# command-line options of a tiny market run (two rounds, small model, no progress bar)
SMALL = [
    "--set",
    "train.rounds=2",
    "--set",
    "train.local_steps=2",
    "--set",
    "trading.start=1",
    "--set",
    "data.split.eval_size=16",
    "--set",
    "model.widths=[8, 8]",
    "--set",
    "broker.max_sweeps=3",
    "--set",
    "baselines.centralized=false",
    "--quiet",
]
