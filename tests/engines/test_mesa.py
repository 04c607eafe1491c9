"""The Mesa view: entry and exits read off the round, the BrokerAgent, reporters,
batch_run, a sweep through the Mesa engine.

Every test runs one tiny 4-agent market (one MarketSpec: the round compiles once); the
variants differ only in numeric knobs and the data seed.
"""

import jax
import mesa
import numpy as np
import pandas as pd
import pytest
from packaging.version import Version
from shrink import ENTRY, TINY

from paramarket_jax import experiment
from paramarket_jax import scenario as sc
from paramarket_jax.engines.mesa import BrokerAgent, MarketModel, TraderAgent, gini
from paramarket_jax.experiment import build, toml_value
from paramarket_jax.market.types import MARKET
from paramarket_jax.results.tables import trades_table
from paramarket_jax.sweep import run_sweep

# Mesa's batch_run gives agent-type rows from 3.4.1 on (mesa#2804); Mesa 3.3 (Python 3.11)
# gives one row per run, the model's
AGENT_ROWS = Version(mesa.__version__) >= Version("3.4.1")


@pytest.fixture(scope="module")
def base():
    return build(sc.load("paper_two_agent", TINY))


def variant(base, *overrides):
    """The tiny market with other knobs: same spec, same dataset, nothing recompiles."""
    exp = build(sc.load("paper_two_agent", [*TINY, *overrides]), base.dataset)
    assert exp.spec == base.spec
    return exp


@pytest.fixture(scope="module")
def entry(base):
    """The tiny market with the entry stage (a spec of its own), entry knobs as ENTRY."""
    return build(sc.load("paper_two_agent", [*TINY, *ENTRY]), base.dataset)


def trades_of(market):
    return trades_table(jax.tree.map(lambda x: x[None], market.records()), [0])


def test_entry_fills_free_slots_from_the_seed(entry, compiles):
    exp = entry
    market = MarketModel(exp, 0)
    assert [t.alive for t in market.traders] == [True, True, False, False]
    market.step()
    # the market looks profitable (threshold -1e9): one free slot (quota 1) enters, inside
    # the round; the model reads it off the record
    assert market.entered == [1] and market.exited == [0]
    (slot,) = market.entrants[0]
    assert slot in (2, 3) and np.flatnonzero(market.record.entered).tolist() == [slot]
    entrant = list(market.traders)[slot]
    assert list(market.entered_traders) == [entrant] and len(market.exited_traders) == 0
    assert len(market.alive_traders) == 3 and entrant in market.alive_traders
    # the accounts are the market after the entry: the entrant's fresh cash at once
    assert entrant.alive and not market.record.alive[MARKET, slot]
    assert entrant.cash == 100.0 and entrant.utility == 0.0 and entrant.trades == 0
    assert market.datacollector.get_model_vars_dataframe()["alive"].tolist() == [2, 3]
    rows = market.datacollector.get_agenttype_vars_dataframe(TraderAgent).xs(1, level="Step")
    assert rows.set_index("slot")["entered"].tolist() == [i == slot for i in range(4)]
    # next round the entrant is in the market: it earns and pays like everyone else
    market.step()
    r = market.record
    flows = r.revenue[MARKET] - r.cost[MARKET] + r.flows.receipt - r.flows.payment - r.flows.fees
    assert r.alive[MARKET, slot] and r.revenue[MARKET, slot] > 0
    np.testing.assert_allclose(entrant.cash, 100.0 + flows[slot], rtol=1e-6)
    assert market.entrants[1] == (5 - slot,)  # the other free slot, the round after
    assert list(market.entered_traders) == [list(market.traders)[5 - slot]]
    # same seed, same entrants and numbers; which slot goes first is the seed's draw
    again = MarketModel(exp, 0)
    again.step()
    again.step()
    assert again.entrants == market.entrants
    np.testing.assert_array_equal(again.records().cash, market.records().cash)
    first = set()
    for seed in range(1, 7):
        m = MarketModel(exp, seed)
        m.step()
        first |= set(m.entrants[0])
    assert first == {2, 3}
    # an unprofitable-looking market admits no one (a traced knob: nothing recompiles)
    knobs = [*TINY, *ENTRY[:-2], "agents.entry_profit=1e9"]
    closed = MarketModel(build(sc.load("paper_two_agent", knobs), exp.dataset), 0)
    with compiles() as events:
        closed.step()
    assert events == [] and closed.entered == [0] and sum(t.alive for t in closed.traders) == 2


def test_bankrupt_agents_leave_and_stop_trading(base):
    exp = variant(
        base,
        "economics.bankruptcy=true",
        "economics.step_cost=40",  # 3 local steps: 120 a round, against 100 initial cash
        "economics.value_per_quality=[2000, 2000, 0, 0]",
    )
    market = MarketModel(exp, 0)
    market.step()
    assert [t.index for t in market.exited_traders] == [2, 3] and market.leavers == [(2, 3)]
    assert [t.index for t in market.alive_traders] == [0, 1]
    market.run()
    assert len(market.exited_traders) == 0  # none left in the last round
    rec = market.records()
    alive = np.asarray(rec.alive[:, MARKET])
    np.testing.assert_array_equal(alive, [[True, True, False, False]] * 3)
    assert market.exited == [2, 0, 0] and market.entered == [0, 0, 0]
    assert [t.alive for t in market.traders] == [True, True, False, False]
    # the leavers' accounts freeze: no revenue, no cost, no trades
    cash = np.asarray(rec.cash[:, MARKET])
    assert (cash[0, 2:] < 0).all()
    np.testing.assert_array_equal(cash[1:, 2:], np.broadcast_to(cash[0, 2:], (2, 2)))
    trades = trades_of(market)
    later = trades[trades["round"] >= 1]
    assert len(later) > 0  # the survivors still trade ...
    assert not (later[["buyer", "seller"]].isin([2, 3])).any().any()  # ... only together
    df = market.datacollector.get_model_vars_dataframe()
    assert df["alive"].tolist() == [4, 2, 2, 2] and df["exited"].tolist() == [0, 2, 0, 0]


def test_broker_agent_and_model_reporters(base):
    market = MarketModel(base, 0)
    market.run()
    rec = market.records()
    broker = market.broker
    # the broker is an agent, not a trader
    assert len(market.traders) == 4 and len(market.agents) == 5
    assert broker not in market.traders and isinstance(broker, mesa.Agent)
    np.testing.assert_allclose(broker.take, np.asarray(rec.flows.broker, np.float64).sum())
    assert broker.take > 0 and broker.trades == int(rec.trades.mask.sum()) > 0
    df = market.datacollector.get_model_vars_dataframe()
    assert len(df) == 1 + 3  # step 0 (before any round), then one row a round
    first = df.iloc[0]
    assert first["welfare"] == 0 and first["trades"] == 0 and np.isnan(first["mean_price"])
    assert np.isnan(first["market_accuracy"]) and first["alive"] == 4
    mask, price = np.asarray(rec.trades.mask), np.asarray(rec.trades.price)
    assert df["trades"].tolist()[1:] == mask.sum(1).tolist()
    for r in range(3):
        got = df["mean_price"].iloc[r + 1]
        want = price[r][mask[r]].mean() if mask[r].any() else np.nan
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(df["broker_take"].iloc[1:], np.cumsum(rec.flows.broker), rtol=1e-6)
    last = df.iloc[-1]
    utility = (rec.cash[-1, MARKET].astype(np.float64) - rec.endowment[-1, MARKET]).sum()
    np.testing.assert_allclose(last["welfare"], utility + broker.take, rtol=1e-9)
    assert df["gini"].between(0, 1).all() and last["gini"] > 0
    np.testing.assert_allclose(last["gini"], gini(rec.cash[-1, MARKET]), rtol=1e-12)
    np.testing.assert_allclose(last["mean_accuracy"], rec.test_acc[-1, MARKET].mean(), rtol=1e-6)
    # agent-type reporters: one table per type, one row per agent a step; the broker's rows
    # hold its own columns, not NaN trader views
    agents = market.datacollector.get_agenttype_vars_dataframe(TraderAgent)
    brokers = market.datacollector.get_agenttype_vars_dataframe(BrokerAgent)
    assert len(agents) == 4 * 4 and len(brokers) == 4
    assert "cash" not in brokers and "kind" not in agents and agents["cash"].notna().all()
    np.testing.assert_allclose(brokers["take"].iloc[1:], np.cumsum(rec.flows.broker), rtol=1e-6)
    assert brokers["pairs"].tolist()[1:] == mask.sum(1).tolist()
    end = agents.xs(3, level="Step").set_index("slot")
    np.testing.assert_allclose(
        end.loc[[0, 1, 2, 3], "utility"], rec.cash[-1, MARKET] - rec.endowment[-1, MARKET]
    )


def test_gini_and_toml_values():
    assert gini([3.0, 3.0, 3.0]) == 0.0 and gini([]) != gini([])  # NaN for no one
    np.testing.assert_allclose(gini([0.0, 0.0, 1.0]), 2 / 3)
    assert gini([-5.0, 1.0]) == gini([0.0, 1.0]) == 0.5  # debts count as nothing
    assert toml_value("posted_price") == '"posted_price"'
    assert toml_value([16, 8]) == "[16, 8]" and toml_value(np.float32(0.5)) == "0.5"
    assert toml_value(True) == "true"


def test_batch_run_rows_are_the_final_round(base):
    knobs = {
        ".".join(key): value for key, value in map(sc.parse_override, [*TINY, "train.rounds=2"])
    }
    parameters = {
        "scenario": "paper_two_agent",
        "seed": 0,
        **{k: [v] for k, v in knobs.items()},  # lists would be swept: wrap each value
        "economics.step_cost": [0.0, 0.01],
    }
    rows = pd.DataFrame(
        mesa.batch_run(
            MarketModel,
            parameters=parameters,
            iterations=1,
            number_processes=1,
            max_steps=10,
            display_progress=False,
        )
    )
    # two runs, one row per agent (4 traders and the broker), or the model's row where
    # Mesa's batch_run leaves agent-type rows out
    assert len(rows) == 2 * (5 if AGENT_ROWS else 1)
    assert (rows["Step"] == 2).all()  # the market after its 2 rounds
    welfare = []
    for cost, run in rows.groupby("economics.step_cost"):
        # an Experiment with keyword overrides: rebuilt, same spec and dataset
        by_hand = MarketModel(base, 0, **{"train.rounds": 2, "economics.step_cost": cost})
        assert by_hand.spec == base.spec and by_hand.experiment.dataset is base.dataset
        by_hand.run()
        assert by_hand.round == 2 and by_hand.running  # batch_run's extra step stops it
        by_hand.step()
        assert not by_hand.running and by_hand.round == 2
        assert run["welfare"].nunique() == 1
        np.testing.assert_allclose(run["welfare"].iloc[0], by_hand.welfare, rtol=1e-9)
        cash = [t.cash for t in by_hand.traders]
        if AGENT_ROWS:
            traders = run[run["slot"].notna()].sort_values("slot")
            np.testing.assert_allclose(traders["cash"], cash)
        # the collector's trader rows of the last collection are the traders now
        last = by_hand.datacollector.get_agenttype_vars_dataframe(TraderAgent).xs(2, level="Step")
        np.testing.assert_allclose(last.sort_values("slot")["cash"], cash)
        welfare.append(by_hand.welfare)
    assert welfare[1] < welfare[0]  # compute costs money


def test_a_mesa_sweep_loads_each_cells_dataset_once(base, tmp_path, monkeypatch):
    """The sweep builds every cell (loading its dataset) before any runs, and runs the built
    experiments through the Mesa view: no cell loads its dataset a second time."""
    loads = []
    real = experiment.load_dataset

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "load_dataset", counting)
    grid = [("data.seed", [0, 1])]  # two cells, two datasets
    table = run_sweep(
        "paper_two_agent",
        grid,
        [*TINY, "train.rounds=1"],
        tmp_path / "sweep",
        engine="mesa",
        report=False,
    )
    assert loads == ["digits", "digits"]
    assert sorted(table["data.seed"]) == [0, 1] and set(table["seed"]) == {0}
    assert (tmp_path / "sweep" / "data.seed=1" / "rounds.parquet").exists()
