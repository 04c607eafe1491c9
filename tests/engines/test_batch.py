"""The pure market round: bookkeeping, siloed twins, schedule, the Mesa view, the batch path,
no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from pages import check_report
from shrink import OPEN_MARKET, SHRINK
from welfare import assert_decomposition_adds_up

from paramarket_jax import scenario as sc
from paramarket_jax.engines import batch
from paramarket_jax.engines.mesa import BrokerAgent, MarketModel, TraderAgent
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.results.folders import write_run
from paramarket_jax.results.tables import invariant_violations
from paramarket_jax.runs import result_of, run_scenario

THREE = [
    *SHRINK,
    "agents.n=3",
    "trading.start=1",
    "trading.every=2",
    "train.rounds=5",
    "baselines.fedavg=true",
    "baselines.centralized=false",
]


@pytest.fixture(scope="module")
def experiment():
    """One 3-agent scenario shared by the tests (one spec: compiled once)."""
    return build(sc.load("paper_two_agent", [*THREE, "seeds=[0, 1]"]))


@pytest.fixture(scope="module")
def batch_result(experiment):
    return result_of(experiment, batch.run_cells([experiment]).records[0])


def test_round_bookkeeping(experiment, batch_result):
    rounds, trades = batch_result.rounds, batch_result.trades
    n = experiment.spec.n
    assert len(rounds) == 2 * 5 * n and sorted(rounds["agent"].unique()) == list(range(n))
    # trades happen only on the schedule (start 1, every 2), never with oneself
    assert set(trades["round"]) <= {2, 4} and len(trades) > 0
    assert (trades["buyer"] != trades["seller"]).all()
    assert (trades["predicted_gain"] > 0).all()  # take_it buys iff the gain is positive
    assert (trades["price"] == 0).all()  # and pays nothing
    assert trades["alpha"].isin([0.25, 0.5, 0.75]).all()
    # each agent's cumulative trade count matches the trade log
    last = rounds[rounds["round"] == 4].set_index(["seed", "agent"])["trades"]
    for (seed, agent), count in last.items():
        t = trades[trades["seed"] == seed]
        assert count == (t["buyer"] == agent).sum()
    # before any trade the market and its siloed twin are the same models
    first = rounds[rounds["round"] < 2]
    np.testing.assert_array_equal(first["accuracy"], first["siloed_accuracy"])
    assert rounds["fedavg_accuracy"].notna().all() and rounds["central_accuracy"].isna().all()


def test_mesa_view_and_batch_path_give_the_same_tables(experiment, batch_result):
    """The Mesa model steps the same jitted round the batch path scans and vmaps."""
    records = []
    for seed in experiment.scenario.seeds:
        market = MarketModel(experiment, seed)
        market.run()
        records.append(market.records())
        # the Mesa agents are views of the round's record
        agent = market.traders[1]
        assert agent.accuracy == float(market.record.test_acc[0, 1])
        assert agent.siloed_accuracy == float(market.record.test_acc[1, 1])
        # one row before round 0, then one per round; three traders and the broker
        assert market.datacollector.get_model_vars_dataframe().shape[0] == 1 + 5
        dc = market.datacollector
        assert len(dc.get_agenttype_vars_dataframe(TraderAgent)) == (1 + 5) * 3
        assert len(dc.get_agenttype_vars_dataframe(BrokerAgent)) == 1 + 5
    mesa = result_of(experiment, jax.tree.map(lambda *x: np.stack(x), *records))
    assert_same_tables(mesa.rounds, batch_result.rounds)
    assert_same_tables(mesa.trades, batch_result.trades)


def test_with_entry_and_exits_the_mesa_view_and_the_batch_path_agree(compiles):
    """Entry is part of the pure round: the batch path (scanned, vmapped) and the Mesa view
    (stepped) give the same tables, and the Mesa view reads the entrants off the record;
    the entry knobs are traced."""
    exp = build(sc.load("open_market", OPEN_MARKET))
    batch_result = result_of(exp, batch.run_cells([exp]).records[0])
    market = MarketModel(exp, 0)
    market.run()
    mesa = result_of(exp, jax.tree.map(lambda x: x[None], market.records()))
    assert_same_tables(mesa.rounds, batch_result.rounds)
    assert_same_tables(mesa.trades, batch_result.trades)
    rounds = batch_result.rounds
    entered = rounds[rounds["entered"]]
    # agents left and entered (the test means something), as the Mesa view counted them
    assert market.exited[0] >= 1 and len(entered) >= 2 and len(batch_result.trades) > 0
    assert sum(market.entered) == len(entered) == batch_result.summary["entered"]
    want = [tuple(entered.loc[entered["round"] == r, "agent"]) for r in range(2)]
    assert market.entrants == want
    assert not entered["alive"].any()  # only free slots take entrants
    assert invariant_violations(rounds, batch_result.trades) == []
    # other entry knobs: the same compiled programs, and they are obeyed
    for knob, most in (("agents.entry_max=1", 1), ("agents.entry_profit=1e9", 0)):
        other = build(sc.load("open_market", [*OPEN_MARKET, knob]), exp.dataset)
        with compiles() as events:
            again = batch.run_cells([other]).records[0]
        assert events == [] and again.entered.sum(-1).max() == most, knob


def assert_same_tables(a: pd.DataFrame, b: pd.DataFrame):
    """Same rows, columns and discrete values; floats equal up to float32 rounding (XLA
    fuses the scanned, vmapped round differently from the stepped one)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if a[col].dtype.kind in "iub":
            np.testing.assert_array_equal(a[col], b[col], err_msg=col)
        else:
            np.testing.assert_allclose(a[col], b[col], rtol=2e-5, atol=2e-6, err_msg=col)


def knobs(experiment, *overrides):
    """The fixture's market with other numeric knobs: same spec, so nothing recompiles."""
    scenario = sc.load("paper_two_agent", [*THREE, "seeds=[0, 1]", *overrides])
    return build(scenario, experiment.dataset)


def test_without_trades_the_market_is_its_siloed_twin(experiment, batch_result, compiles):
    quiet = knobs(experiment, "trading.start=99")
    assert quiet.spec == experiment.spec
    with compiles() as events:
        result = result_of(quiet, batch.run_cells([quiet]).records[0])
    assert events == []
    assert len(result.trades) == 0
    np.testing.assert_array_equal(result.rounds["accuracy"], result.rounds["siloed_accuracy"])
    np.testing.assert_array_equal(result.rounds["loss"], result.rounds["siloed_loss"])
    assert not result.summary["mutual_gain"]
    # the siloed twin never changes through the market: with or without trades, the same
    traded = batch_result.rounds
    assert len(batch_result.trades) > 0
    for col in ("siloed_loss", "siloed_accuracy", "siloed_cash", "siloed_utility"):
        np.testing.assert_array_equal(result.rounds[col], traded[col], err_msg=col)


def test_same_seed_same_numbers_and_seeds_differ(experiment, batch_result):
    """Seeds in the other order (duplicate seeds are refused): each seed gives the same
    numbers wherever it sits in the batch, and the two seeds differ."""
    swapped = batch.run_cells([knobs(experiment, "seeds=[1, 0]")]).records[0]
    again = batch.run_cells([experiment]).records[0]
    for new, old in zip(jax.tree.leaves(swapped), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(new[0], old[1])
        np.testing.assert_array_equal(new[1], old[0])
    rounds = batch_result.rounds
    market_loss = np.asarray(swapped.test_loss[0][:, 0, :], np.float64).ravel()
    np.testing.assert_array_equal(rounds[rounds["seed"] == 1]["loss"], market_loss)
    assert not np.array_equal(rounds[rounds["seed"] == 0]["loss"], market_loss)


def test_jit_equals_no_jit(experiment):
    data, key = seed_data(experiment, 0)
    spec, params = experiment.spec, experiment.params
    state = market_round.init_jit(spec, key, params, data)
    # round 0 (train, schedule, evaluate, earn); the trading branch's kernels (valuation,
    # alignment, mechanisms) have their own jit-equals-no-jit tests, and run eagerly here
    # they take most of a minute
    r = jnp.asarray(0, jnp.int32)
    _, jitted = market_round.step_jit(spec, key, state, params, data, r)
    with jax.disable_jit():
        _, eager = market_round.step(spec, key, state, params, data, r)
    assert not bool(jitted.traded) and not bool(eager.traded)
    for u, v in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_no_recompilation_after_the_first_round(experiment, compiles):
    market = MarketModel(experiment, seed=1)
    market.step()  # round 0 compiles the round (both branches of the schedule's cond)
    with compiles() as events:
        for _ in range(4):  # a trading round among them
            market.step()
        jax.block_until_ready(market.state)
    assert events == []
    # a new seed reuses the compiled round (training rows are padded to one length)
    with compiles() as events:
        other = MarketModel(experiment, seed=2)
        for _ in range(3):
            other.step()
    assert events == [], events


def test_a_second_cell_of_numeric_knobs_compiles_nothing(experiment, batch_result, compiles):
    """Learning rate, prices, powers, fees, schedule, d and seeds are all traced (after the
    first cell, ``batch_result``, compiled the programs in this process)."""
    second = knobs(
        experiment,
        "train.learning_rate=0.03",
        "mechanism.beta=0.9",
        "mechanism.reserve=0.01",
        "mechanism.posted=0.2",
        "economics.gamma=3.0",
        "economics.trade_fee=0.001",
        "economics.value_per_quality=[1, 2, 3]",
        "trading.start=0",
        "data.split.d=0.3",
        "seeds=[5, 6]",
    )
    with compiles() as events:
        out = batch.run_cells([second])
    assert events == [], events
    assert out.calls == 1 and out.records[0].test_acc.shape == (2, 5, 3, 3)
    assert bool(out.records[0].traded[0, 0])  # trading now starts at round 0


def test_every_seed_runs_in_one_compiled_call(experiment, compiles):
    out = batch.run_cells([experiment])
    assert out.calls == 1 and out.chunk == 2
    # three seeds at two runs a call: two calls, the last one padded, one compilation
    three = knobs(experiment, "seeds=[0, 1, 2]")
    with compiles() as events:
        chunked = batch.run_cells([three], max_batch=2)
    assert events == [] and chunked.calls == 2 and chunked.records[0].test_acc.shape[0] == 3
    leaves = zip(jax.tree.leaves(out.records[0]), jax.tree.leaves(chunked.records[0]), strict=True)
    for u, v in leaves:
        np.testing.assert_array_equal(u, v[:2])


def test_cells_with_different_knobs_differ_and_match_their_own_runs(experiment):
    a = knobs(experiment, "seeds=[0]")
    b = knobs(experiment, "seeds=[0]", "train.learning_rate=0.02")
    together = batch.run_cells([a, b]).records  # the learning rate gets a batch axis
    alone = batch.run_cells([experiment]).records[0]
    np.testing.assert_allclose(together[0].test_loss[0], alone.test_loss[0], rtol=2e-5)
    assert not np.allclose(together[1].test_loss[0], alone.test_loss[0])
    # cells that differ in the split (d) partition with their own d, not the first cell's
    c = knobs(experiment, "seeds=[0]", "data.split.d=0.5")
    mixed = batch.run_cells([a, c]).records
    own = batch.run_cells([knobs(experiment, "data.split.d=0.5")]).records[0]
    np.testing.assert_allclose(mixed[1].test_loss[0], own.test_loss[0], rtol=2e-5)
    np.testing.assert_allclose(mixed[0].test_loss[0], alone.test_loss[0], rtol=2e-5)
    assert not np.allclose(mixed[1].test_loss[0], mixed[0].test_loss[0])


def test_siloed_twin_off_leaves_its_columns_empty():
    s = sc.load(
        "paper_two_agent",
        [*SHRINK, "train.rounds=2", "trading.start=1", "baselines.siloed=false",
         "baselines.fedavg=true", "baselines.centralized=false"],
    )  # fmt: skip
    result = run_scenario(s)
    assert result.rounds["siloed_accuracy"].isna().all()
    assert result.rounds["fedavg_accuracy"].between(0, 1).all()
    assert result.rounds["accuracy"].between(0, 1).all()


# the transformer scenarios run at their own small shapes, with the report, in
# tests/market/test_transformer_market.py (foundation_market in tests/market/test_foundation.py)
TRANSFORMERS = {"foundation_market", "transformer_arithmetic", "vit_digits"}


def test_the_transformer_scenarios_are_all_run_elsewhere():
    assert {n for n in sc.bundled() if sc.load(n).model.name in ("gpt", "vit")} == TRANSFORMERS


@pytest.mark.parametrize("name", sorted(set(sc.bundled()) - TRANSFORMERS))
def test_every_bundled_scenario_runs_a_shrunk_round(name, tmp_path):
    base = sc.load(name)
    extra = ["data.num_samples=600"] if base.data.dataset == "mnist1d" else []
    if base.agents.n > 6:  # the many-agent scenarios at small N
        extra += ["agents.n=6"] + (["agents.initial=4"] if base.agents.initial else [])
    s = sc.load(name, [*SHRINK, *extra, "train.rounds=2", "trading.start=1"])
    result = run_scenario(s)
    assert len(result.rounds) == 2 * s.agents.n * len(s.seeds)
    assert result.rounds["accuracy"].between(0, 1).all()
    # the centralized baseline (on in the paper scenarios) trains on the pooled rows
    central = result.rounds["central_accuracy"]
    assert central.between(0, 1).all() if s.baselines.centralized else central.isna().all()
    assert set(result.trades["round"]) <= {1}
    assert result.summary["rounds"] == 2
    assert invariant_violations(result.rounds, result.trades) == []
    assert_decomposition_adds_up(result.rounds, result.summary)
    # every bundled scenario gets its figures and its one-file report
    out = write_run(tmp_path / name, result.files())
    check_report(out / "report.html", min_images=6)


def test_chunked_valuation_gives_the_same_market(experiment, batch_result):
    """broker.batch_size bounds memory; numbers change by float rounding at most."""
    chunked = knobs(experiment, "broker.batch_size=2")
    result = result_of(chunked, batch.run_cells([chunked]).records[0])
    assert len(batch_result.trades) > 0
    assert_same_tables(result.trades, batch_result.trades)
    assert_same_tables(result.rounds, batch_result.rounds)


def test_the_round_and_the_batch_path_import_no_mesa():
    import subprocess
    import sys

    code = (
        "import sys; import paramarket_jax.engines.batch, paramarket_jax.runs;"
        "import paramarket_jax.sweep;"
        "assert 'mesa' not in sys.modules, 'mesa imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_market_invariants_hold_every_round_and_the_check_can_fail(batch_result):
    rounds, trades = batch_result.rounds, batch_result.trades
    assert len(trades) > 0 and invariant_violations(rounds, trades) == []
    # money that appears from nowhere
    leak = rounds.copy()
    leak.loc[leak.index[5], "utility"] += 0.01
    assert invariant_violations(leak, trades)[0].startswith("money not conserved")
    # a payment in a round the agent did not buy (and the money moved with it)
    quiet = rounds.index[(rounds["payment"] == 0) & (rounds["round"] > 1)][0]
    ghost = rounds.copy()
    ghost.loc[quiet, ["payment", "utility"]] = [0.5, ghost.loc[quiet, "utility"]]
    later = (
        (ghost["seed"] == ghost.loc[quiet, "seed"])
        & (ghost["agent"] == ghost.loc[quiet, "agent"])
        & (ghost["round"] >= ghost.loc[quiet, "round"])
    )
    ghost.loc[later, "utility"] -= 0.5
    assert any(v.startswith("payment without a trade") for v in invariant_violations(ghost, trades))
    # a trade the rounds table does not count
    assert invariant_violations(rounds, trades.iloc[1:]) == [
        "purchase counts in the rounds table differ from the trades table"
    ]


def test_the_host_solver_gives_the_same_market(experiment, batch_result):
    """``broker.solver = "callback"`` (scipy on the host) and the default ``optax`` (inside
    the program) find the same permutations, so the same market, table for table."""
    host = knobs(experiment, "broker.solver=callback")
    assert host.spec.solver == "callback" and experiment.spec.solver == "optax"
    result = result_of(host, batch.run_cells([host]).records[0])
    assert len(batch_result.trades) > 0  # trades happened: the alignments were used
    pd.testing.assert_frame_equal(result.rounds, batch_result.rounds)
    pd.testing.assert_frame_equal(result.trades, batch_result.trades)
