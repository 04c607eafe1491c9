"""docs/mesa_behaviour.md, run as written: Python behaviour between compiled rounds changes
the market (sellers' posted prices follow their demand) without recompiling."""

import pathlib
import re

import numpy as np
import pytest

from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import build
from paramarket_jax.runs import run_mesa

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "mesa_behaviour.md"


@pytest.fixture(scope="module")
def example():
    """The page's Python blocks, run in order in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert blocks, "no Python example in the page"
    namespace: dict = {"__name__": "mesa_behaviour"}
    exec(compile("\n".join(blocks), str(PAGE), "exec"), namespace)
    return namespace


def test_the_pages_example_prices_by_demand(example, capsys, compiles):
    trades = example["result"].trades
    rounds = example["scenario"].train.rounds
    assert (trades["round"] == 0).any() and (trades["round"] > 0).any()
    # each seller's price: 0.001, times 1.5 after each round it sold, 0.8 after each it did not
    sold = {(r, s) for r, s in zip(trades["round"], trades["seller"], strict=True)}
    for r, seller, price in zip(trades["round"], trades["seller"], trades["price"], strict=True):
        want = 0.001 * np.prod([1.5 if (q, seller) in sold else 0.8 for q in range(r)])
        np.testing.assert_allclose(price, want, rtol=1e-5)
    assert trades["price"].nunique() > 1
    # the plain model's sellers keep the scenario's price: the behaviour made the difference
    plain = run_mesa(build(example["scenario"])).trades
    np.testing.assert_allclose(plain["price"], 0.001, rtol=1e-6)
    # changed knobs are traced values: stepping on after them compiles nothing
    market = example["DemandPricedMarket"](build(example["scenario"]), 0)
    market.step()
    with compiles() as events:
        market.run()
    assert events == [] and market.knob("knobs.posted").tolist() != [np.float32(0.001)] * 4
    # the traders' table is kept for the subclass
    rows = market.datacollector.get_agenttype_vars_dataframe(example["DemandPricedTrader"])
    assert len(rows) == 4 * (1 + rounds)


def test_knobs_are_named_as_marketparams_fields(example):
    market = example["DemandPricedMarket"](build(example["scenario"]), 0)
    with pytest.raises(ParamarketError, match="no knob 'knobs.price'"):
        market.set_knob("knobs.price", 1.0)
    with pytest.raises(ParamarketError, match="a group of knobs"):
        market.set_knob("economy", 1.0)
    with pytest.raises(ParamarketError, match="not a per-agent knob"):
        market.set_knob("economy.gamma", 2.0, agent=1)
    market.set_knob("economy.gamma", 2.0)
    market.traders[1].set_knob("learning_rate", 0.5)
    market.step()  # sent to the device before the round
    assert float(market.params.economy.gamma) == 2.0
    np.testing.assert_allclose(np.asarray(market.params.learning_rate), [0.05, 0.5, 0.05, 0.05])
    assert market.params.learning_rate.dtype == np.float32
