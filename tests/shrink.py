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

# open_market at the shapes tests/engines/test_batch.py's every-bundled-scenario test runs it
# (its compiled programs), with knobs that make agents leave and enter: slot 3 earns nothing
# and a round's compute (3 steps x 0.05) is more than the initial cash, so whoever holds it
# goes bankrupt; the others earn, so the market looks profitable and up to 2 free slots enter
OPEN_MARKET = [
    *SHRINK,
    "data.num_samples=600",
    "agents.n=6",
    "agents.initial=4",
    "train.rounds=2",
    "trading.start=1",
    "agents.entry_max=2",
    "economics.initial_cash=0.1",
    "economics.step_cost=0.05",
    "economics.value_per_quality=[1, 1, 1, 0, 1, 1]",
]

# test_mesa's tiny 4-agent market (posted prices, fees), and the knobs of its open variant
# (2 agents at first, the market always looks profitable, one entrant a round)
TINY = [
    *SHRINK,
    "agents.n=4",
    "baselines.centralized=false",
    "trading.start=0",
    "train.rounds=3",
    "mechanism.name=posted_price",
    "mechanism.posted=0.001",
    "economics.query_fee=0.0001",
    "economics.trade_fee=0.0002",
]
ENTRY = [
    "agents.initial=2",
    "agents.entry=true",
    "agents.entry_profit=-1e9",
    "agents.entry_max=1",
]
