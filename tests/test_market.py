"""The market round: bookkeeping, siloed twins, schedule, Mesa views, no recompiles."""

import jax
import numpy as np
import pytest

from paramarket_jax import scenario as sc
from paramarket_jax.market.model import MarketModel, prepare
from paramarket_jax.market.run import run_scenario
from paramarket_jax.results import rounds_table, trades_table

SHRINK = [
    "train.local_steps=3",
    "data.split.eval_size=32",
    "model.widths=[16, 8]",
    "broker.max_sweeps=5",
    "broker.alphas=[0.25, 0.5, 0.75]",
    "train.learning_rate=0.05",
]


@pytest.fixture(scope="module")
def prepared():
    """One compiled 3-agent scenario shared by the tests (rounds and seeds vary freely)."""
    s = sc.load(
        "paper_two_agent",
        [
            *SHRINK,
            "agents.n=3",
            "trading.start=1",
            "trading.every=2",
            "train.rounds=5",
            "baselines.fedavg=true",
            "baselines.centralized=false",
        ],
    )
    return prepare(s)


def test_round_bookkeeping(prepared):
    market = MarketModel(prepared, seed=0)
    market.run()
    rounds, trades = rounds_table(market), trades_table(market)
    n = prepared.scenario.agents.n
    assert len(rounds) == 5 * n and sorted(rounds["agent"].unique()) == list(range(n))
    # trades happen only on the schedule (start 1, every 2), never with oneself
    assert set(trades["round"]) <= {2, 4}
    assert (trades["buyer"] != trades["seller"]).all()
    assert (trades["predicted_gain"] > 0).all()  # take_it buys iff the gain is positive
    assert (trades["price"] == 0).all()  # and pays nothing
    assert trades["alpha"].isin([0.25, 0.5, 0.75]).all()
    # each agent's cumulative trade count matches the trade log
    last = rounds[rounds["round"] == 4].set_index("agent")["trades"]
    for agent in range(n):
        assert last[agent] == (trades["buyer"] == agent).sum()
    # before any trade the market and its siloed twin are the same models
    first = rounds[rounds["round"] < 2]
    np.testing.assert_array_equal(first["accuracy"], first["siloed_accuracy"])
    assert rounds["fedavg_accuracy"].notna().all() and rounds["central_accuracy"].isna().all()
    # Mesa agents are views of the population's arrays
    agent = market.traders[1]
    assert agent.accuracy == float(market.metrics.test_acc[0, 1])
    assert agent.siloed_accuracy == float(market.metrics.test_acc[1, 1])
    assert market.datacollector.get_model_vars_dataframe().shape[0] == 5


def test_without_trades_the_market_is_its_siloed_twin():
    s = sc.load("paper_two_agent", [*SHRINK, "trading.start=99", "train.rounds=2"])
    result = run_scenario(s)
    assert len(result.trades) == 0
    np.testing.assert_array_equal(result.rounds["accuracy"], result.rounds["siloed_accuracy"])
    np.testing.assert_array_equal(result.rounds["loss"], result.rounds["siloed_loss"])
    assert not result.summary["mutual_gain"]


def test_same_seed_same_numbers_and_seeds_differ(prepared):
    a, b, c = (MarketModel(prepared, seed) for seed in (3, 3, 4))
    for m in (a, b, c):
        for _ in range(3):
            m.step()
    ta, tb, tc = (rounds_table(m) for m in (a, b, c))
    np.testing.assert_array_equal(ta["accuracy"], tb["accuracy"])
    assert trades_table(a).drop(columns="seed").equals(trades_table(b).drop(columns="seed"))
    assert not np.array_equal(ta["loss"], tc["loss"])


def test_no_recompilation_after_the_first_rounds(prepared, compiles):
    market = MarketModel(prepared, seed=1)
    market.step()  # round 0: train + evaluate compile
    market.step()  # round 1 is not a trading round (every=2)
    market.step()  # round 2 trades: the trade kernel compiles
    with compiles() as events:
        market.step()
        market.step()
        jax.block_until_ready(market.twins)
    assert events == []
    # a new seed reuses every compiled kernel (shards are padded to one width)
    with compiles() as events:
        other = MarketModel(prepared, seed=2)
        for _ in range(3):
            other.step()
    assert events == [], events


def test_centralized_baseline_and_alignment_off():
    s = sc.load(
        "paper_no_alignment",
        [*SHRINK, "train.rounds=2", "trading.start=1", "baselines.centralized=true"],
    )
    result = run_scenario(s)
    assert result.rounds["central_accuracy"].between(0, 1).all()
    assert set(result.trades["round"]) <= {1}


@pytest.mark.parametrize("name", sorted(sc.bundled()))
def test_every_bundled_scenario_runs_a_shrunk_round(name):
    base = sc.load(name)
    extra = ["data.num_samples=600"] if base.data.dataset == "mnist1d" else []
    s = sc.load(name, [*SHRINK, *extra, "train.rounds=2", "trading.start=1",
                       "baselines.centralized=false"])  # fmt: skip
    result = run_scenario(s)
    assert len(result.rounds) == 2 * s.agents.n
    assert result.rounds["accuracy"].between(0, 1).all()
    assert set(result.trades["round"]) <= {1}
    assert result.summary["rounds"] == 2


def test_chunked_valuation_gives_the_same_market():
    """broker.batch_size bounds memory; numbers change by float rounding at most."""
    base = [*SHRINK, "agents.n=3", "train.rounds=2", "trading.start=1",
            "baselines.centralized=false"]  # fmt: skip
    whole = run_scenario(sc.load("paper_two_agent", base))
    chunked = run_scenario(sc.load("paper_two_agent", [*base, "broker.batch_size=2"]))
    assert len(whole.trades) > 0
    np.testing.assert_allclose(whole.trades["predicted_gain"], chunked.trades["predicted_gain"],
                               atol=1e-6,
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(whole.rounds["accuracy"], chunked.rounds["accuracy"])
