"""Competition in the market: the anticipating valuation (its fixed point, on random
markets), compensation of the third parties a trade hurts (through whole runs), the trades'
social values and the welfare decomposition of a competitive run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from welfare import RIVAL_SMALL, assert_decomposition_adds_up

from paramarket_jax import scenario as sc
from paramarket_jax.economics.revenue import purchase_values
from paramarket_jax.economics.strategies import init_state
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import build
from paramarket_jax.market import trade
from paramarket_jax.market.types import MarketState
from paramarket_jax.results.tables import invariant_violations
from paramarket_jax.runs import run_scenario

SMALL = RIVAL_SMALL
N = 6


def offers_of(key, n=N):
    """Random try-before-buy results: qualities now and after each candidate merge."""
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.uniform(k1, (n,), minval=0.2, maxval=0.8)
    q_new = jnp.clip(q[:, None] + jax.random.uniform(k2, (n, n), minval=-0.05, maxval=0.3), 0, 1)
    mask = jax.random.bernoulli(k3, 0.8, (n, n)) & ~jnp.eye(n, dtype=bool)
    zero = jnp.zeros((n, n))
    return trade.Offers(
        mask=mask, gain=zero + 1, alpha=zero + 0.5, gain_se=zero, acc_gain=zero + 1,
        acc_gain_se=zero, q_own=q, q_new=q_new, candidates=None, perms={}, second=zero,
        shipped=zero, weights=None, buyers=None, sellers=None, inputs=None,
    )  # fmt: skip


@functools.cache
def market(*extra):
    """(spec, params, state) of a small competitive market: one seed's knobs, and what
    quoting and clearing read from the state (cash, bandits); nothing is trained."""
    exp = build(sc.load("rival_market", [*SMALL, f"agents.n={N}", *extra]))
    params = exp.params
    state = MarketState(
        twins=None, central=None, cash=jnp.full((2, N), 10.0),
        strategy=init_state(N, exp.spec.strategy_grid), trade_count=None,
        alive=jnp.ones((2, N), bool), endowment=None, diverged=None, initial_loss=None,
    )  # fmt: skip
    return exp.spec, params, state


def settle_both(spec, params, state, offers):
    keys = trade.TradeKeys.of(jax.random.key(1))
    quotes, strategy = trade.quote(spec, keys.strategy, state, params, offers)
    deals = trade.clear(spec, keys.roles, state, params, offers, quotes)
    after = trade.anticipate(spec, keys, state, params, offers, quotes, strategy, deals)
    return (quotes, deals), after


@pytest.mark.parametrize("revenue", ["independent", "competitive"])
def test_the_anticipating_valuation_is_a_fixed_point_on_random_markets(revenue):
    """Where it converges, the settled values are exactly the values against the world the
    settled allocation makes (every other buyer at its purchase's predicted quality), and
    clearing them reproduces that allocation. In an independent market no rival changes a
    buyer's value, so it is the myopic valuation, bit for bit."""
    spec, params, state = market(f'economics.revenue="{revenue}"', "broker.valuation=anticipating")
    rows, converged, moved = jnp.arange(N), 0, 0
    for s in range(40):
        offers = offers_of(jax.random.key(s))
        (quotes0, deals0), (quotes, _, deals) = settle_both(spec, params, state, offers)
        if revenue == "independent":
            assert (quotes.values == quotes0.values).all() and (deals.seller == deals0.seller).all()
            continue
        world = jnp.where(deals.bought, offers.q_new[rows, deals.pick], offers.q_own)
        expect, _ = purchase_values(offers.q_own, offers.q_new, params.economy, revenue, world)
        again = trade.clear(spec, trade.TradeKeys.of(jax.random.key(1)).roles, state, params,
                            offers, quotes)  # fmt: skip
        if (again.seller == deals.seller).all() and (quotes.world == world).all():
            converged += 1
            np.testing.assert_allclose(quotes.values, expect, rtol=1e-6, atol=1e-7)
        moved += int((deals.seller != deals0.seller).any())
    if revenue == "competitive":
        assert converged >= 30  # most random markets reach the fixed point in 3 passes
        assert moved > 0  # ... and anticipating the rivals changes some allocations


def test_one_pass_values_against_the_myopic_allocation():
    spec, params, state = market("broker.valuation=anticipating", "broker.passes=1")
    rows = jnp.arange(N)
    offers = offers_of(jax.random.key(3))
    (quotes0, deals0), (quotes, _, deals) = settle_both(spec, params, state, offers)
    world = jnp.where(deals0.bought, offers.q_new[rows, deals0.pick], offers.q_own)
    assert (quotes.world == world).all()
    expect, _ = purchase_values(offers.q_own, offers.q_new, params.economy, "competitive", world)
    np.testing.assert_allclose(quotes.values, expect, rtol=1e-6, atol=1e-7)


@functools.cache
def run(*extra):
    return run_scenario(sc.load("rival_market", [*SMALL, *extra]), check=True)


def test_a_competitive_run_decomposes_its_welfare_and_values_each_trade_socially():
    result = run()
    assert_decomposition_adds_up(result.rounds, result.summary)
    trades = result.trades
    assert len(trades) > 0
    # with an outside option, total revenue grows with quality: the social value of a
    # trade is positive but, with the rivals paying for part of it, below the private one
    d = result.summary["decomposition"]
    assert d["stolen"] > 0  # revenue moved between the rivals
    assert set(result.summary["agents"][0]) >= {"market_expansion", "business_stealing", "paid"}
    fixed = run("economics.outside_option=0.0")
    assert_decomposition_adds_up(fixed.rounds, fixed.summary)
    # a fixed-size market: a trade's gain is all its rivals' loss
    np.testing.assert_allclose(fixed.trades["social_value"], 0.0, atol=1e-5)
    np.testing.assert_allclose(fixed.rounds["market_expansion"], 0.0, atol=1e-5)
    t = fixed.trades[fixed.trades["realized_value"].abs() > 1e-6]
    assert len(t) and (np.sign(t["external_value"]) == -np.sign(t["realized_value"])).all()


def test_full_compensation_clears_no_zero_sum_trade_and_pays_the_rivals():
    none = run("economics.outside_option=0.0", "economics.compensation=1.0")
    assert len(none.trades) == 0  # every gain would be a rival's loss: nothing is worth it
    paid = run("economics.compensation=1.0")
    plain = run()
    assert len(paid.trades) > 0 and (paid.trades["compensation"] > 0).any()
    assert invariant_violations(paid.rounds, paid.trades) == []
    assert_decomposition_adds_up(paid.rounds, paid.summary)
    # compensation only moves money between the agents, every round
    per_round = paid.rounds.groupby(["seed", "round"])["compensation"].sum()
    np.testing.assert_allclose(per_round, 0.0, atol=1e-5)
    received = paid.rounds["compensation"] > 0
    assert received.any() and (paid.rounds.loc[received, "payment"] == 0).any()  # bystanders
    # in the first trading round (the same models in both runs) a buyer values a pair at
    # its value without compensation less what it pays the third parties
    keys = ["seed", "round", "buyer", "seller"]
    first = paid.trades[paid.trades["round"] == 1].merge(plain.trades, on=keys)
    assert len(first) > 0
    np.testing.assert_allclose(
        first["value_x"], first["value_y"] - first["compensation_x"], rtol=1e-4, atol=1e-6
    )
    # a share of 0 is the plain market, bit for bit
    off = run("economics.compensation=0.0")
    assert off.rounds.equals(plain.rounds) and off.trades.equals(plain.trades)


def test_the_anticipating_market_runs_and_adds_up():
    result = run("broker.valuation=anticipating")
    assert invariant_violations(result.rounds, result.trades) == []
    assert_decomposition_adds_up(result.rounds, result.summary)
    assert len(result.trades) > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["broker.valuation=rational"], "one of myopic, anticipating"),
        (["broker.passes=0"], "broker.passes"),
        (["economics.compensation=1.5"], "a number in [0, 1]"),
        (["economics.compensation=-0.1"], "economics.compensation"),
    ],
)
def test_bad_competition_keys_are_refused_by_name(overrides, message):
    with pytest.raises(ParamarketError) as err:
        sc.load("rival_market", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
