"""The welfare decomposition's identities, checked on a run's result (every bundled
scenario's tests call :func:`assert_decomposition_adds_up`)."""

import numpy as np

from paramarket_jax.results.tables import WELFARE_COLUMNS

# rival_market at test size: four rivals on digits, a small MLP, three rounds, two seeds
RIVAL_SMALL = [
    "agents.n=4",
    "data.dataset=digits",
    "data.split.eval_size=64",
    "model.widths=[16]",
    "train.local_steps=10",
    "train.rounds=3",
    "trading.start=1",
    "broker.max_sweeps=5",
    "seeds=[0, 1]",
]


def assert_decomposition_adds_up(rounds, summary, tol=1e-4):
    """Over a run's rounds, each agent's parts add up to its final utility less its siloed
    twin's, business stealing sums to zero over the agents every round, and over agents
    plus the broker the parts are the welfare gain of the summary (float32 cash: ``tol``
    relative to the money moved)."""
    assert set(WELFARE_COLUMNS) <= set(rounds.columns)
    parts = rounds[WELFARE_COLUMNS]
    np.testing.assert_allclose(parts.iloc[:, :4].sum(axis=1), parts["utility_gain"], atol=1e-9)
    scale = max(1.0, float(rounds[["revenue", "siloed_revenue"]].abs().sum().max()))
    stolen = rounds.groupby(["seed", "round"])["business_stealing"].sum()
    np.testing.assert_allclose(stolen, 0.0, atol=tol * scale)
    last = rounds[rounds["round"] == rounds["round"].max()].set_index(["seed", "agent"])
    gained = rounds.groupby(["seed", "agent"])["utility_gain"].sum()
    np.testing.assert_allclose(
        gained.loc[last.index], last["utility"] - last["siloed_utility"], atol=tol * scale
    )
    for s in summary["per_seed"].values():
        d = s["decomposition"]
        np.testing.assert_allclose(d["welfare_gain"], s["welfare"] - s["siloed_welfare"],
                                   atol=tol * scale)  # fmt: skip
        np.testing.assert_allclose(d["agent_transfers"], -s["broker_take"], atol=tol * scale)
        assert s["better_off"] == int((np.asarray(s["utility"]) > s["siloed_utility"]).sum())
