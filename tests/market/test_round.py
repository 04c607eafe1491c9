"""Fixes carried by the pure round: fees as charged, buyers pay queries, NaN candidates drop
out alone, settlement reuses the valuation's permutations."""

import jax
import jax.numpy as jnp
import numpy as np
from shrink import SHRINK as BASE_SHRINK

from paramarket_jax import scenario as sc
from paramarket_jax.broker.value import (
    all_candidates,
    merge_settled,
    merge_trades,
    value_with_perms,
)
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade
from paramarket_jax.mechanisms import Market, default_knobs, make_mechanism
from paramarket_jax.models import make_model
from paramarket_jax.runs import run_scenario

SHRINK = [*BASE_SHRINK, "baselines.centralized=false"]


def test_fee_column_is_what_settle_charged_and_only_buyers_pay_queries():
    """Under mcafee_double receipts differ from prices; the fee column must still add up."""
    s = sc.load(
        "paper_two_agent",
        [*SHRINK, "agents.n=4", "data.split.name=iid", "train.rounds=4", "trading.start=1",
         "mechanism.name=mcafee_double", "broker.sellers=[2, 3]", "economics.fee_share=0.25",
         "economics.trade_fee=0.0001", "economics.query_fee=0.0002",
         "economics.value_per_quality=100", "seeds=[0, 1]"],
    )  # fmt: skip
    result = run_scenario(s)
    rounds, trades = result.rounds, result.trades
    assert len(trades) > 0
    assert set(trades["seller"]) <= {2, 3} and set(trades["buyer"]) <= {0, 1}
    query = 0.0002 * 2  # each buyer is offered both sellers
    for (seed, r), df in rounds[rounds["round"] >= 1].groupby(["seed", "round"]):
        t = trades[(trades["seed"] == seed) & (trades["round"] == r)]
        by_agent = df.set_index("agent")
        # sellers-only pay no query fees: their fees are exactly their trades' fees
        for seller in (2, 3):
            sold = t[t["seller"] == seller]["fee"].sum()
            np.testing.assert_allclose(by_agent.loc[seller, "fees"], sold, rtol=1e-5, atol=1e-7)
        for buyer in (0, 1):
            np.testing.assert_allclose(by_agent.loc[buyer, "fees"], query, rtol=1e-5)
        # a seller's receipt this round (what mcafee pays it, not the buyer's price) sets
        # its share fee; the per-trade fee adds up to it
        for seller in (2, 3):
            sold = t[t["seller"] == seller]
            expected = 0.25 * by_agent.loc[seller, "receipt"] + 0.0001 * len(sold)
            np.testing.assert_allclose(sold["fee"].sum(), expected, rtol=1e-5, atol=1e-7)


def test_a_nan_candidate_drops_out_alone():
    """Agent 2's weights are NaN: buyers 0 and 1 still trade with each other."""
    s = sc.load("paper_two_agent", [*SHRINK, "agents.n=3", "train.rounds=3", "trading.start=99"])
    exp = build(s)
    data, key = seed_data(exp, 0)
    _, k_rounds = jax.random.split(key)
    state = market_round.init_jit(exp.spec, key, exp.params, data)
    for r in range(2):  # train without trading
        state, _ = market_round.step_jit(
            exp.spec, jax.random.fold_in(k_rounds, r), state, exp.params, data, r
        )
    poisoned = jax.tree.map(lambda v: v.at[0, 2].set(jnp.nan), state.twins.params)
    state = state._replace(twins=state.twins._replace(params=poisoned))
    params = exp.params._replace(trade_start=jnp.asarray(0, jnp.int32))
    _, rec = market_round.step_jit(exp.spec, k_rounds, state, params, data, 2)
    trades = jax.device_get(rec.trades)
    assert bool(rec.traded)
    assert not trades.mask[2] and 2 not in trades.seller[trades.mask]
    assert trades.mask[:2].any()  # without the fix the NaN candidate swallowed the trade


def test_best_seller_ignores_non_finite_scores():
    take_it = make_mechanism("take_it")
    bids = jnp.array([[0.0, 0.3, jnp.nan], [0.2, 0.0, 0.1], [0.0, 0.0, 0.0]])
    mask = jnp.array([[False, True, True], [True, False, True], [False, False, False]])
    out = take_it.run(Market(bids, jnp.zeros((3, 3)), mask), default_knobs(3))
    np.testing.assert_array_equal(out.alloc[0], [False, True, False])
    np.testing.assert_array_equal(out.alloc[1], [True, False, False])


def test_settlement_reuses_the_valuations_permutations():
    """merge_settled with the perms found while valuing equals aligning again."""
    model = make_model("mlp", (8,), 4, widths=(12, 6))
    key = jax.random.key(0)
    n = 3
    pop = jax.vmap(model.init)(jax.random.split(key, n))
    x = jax.random.normal(jax.random.key(1), (40, 8))
    y = jax.random.randint(jax.random.key(2), (40,), 0, 4)
    val_idx = jnp.tile(jnp.arange(40, dtype=jnp.int32), (n, 1))
    cands = all_candidates(n)
    alphas = jnp.array([0.3, 0.6])
    val, perms = jax.jit(
        lambda p: value_with_perms(
            model, p, x, y, val_idx, cands, key, alphas,
            align=True, layers=None, max_sweeps=20, batch_size=None,
        )
    )(pop)  # fmt: skip
    sellers = jnp.array([2, 0, 1])
    slot = jnp.argmax(cands == sellers[:, None], axis=1)
    chosen = jax.tree.map(lambda p: p[jnp.arange(n), slot], perms)
    trade_alpha = jnp.array([0.3, 0.6, 0.3])
    mask = jnp.array([True, True, False])
    reused = merge_settled(model.spec, pop, sellers, trade_alpha, mask, chosen)
    again = merge_trades(model.spec, pop, sellers, trade_alpha, mask, key, max_sweeps=20)
    for u, v in zip(jax.tree.leaves(reused), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
    # buyer 2 did not trade: its weights are untouched
    for u, v in zip(jax.tree.leaves(reused), jax.tree.leaves(pop), strict=True):
        np.testing.assert_array_equal(u[2], v[2])
    assert val.gain.shape == (n * (n - 1),)


def test_bankrupt_agents_leave_frozen_and_never_trade_again():
    """Sellers 2 and 3 earn nothing, pay for compute and go broke in round 0: from then on
    they are dead in every twin, their cash and models stay as they were, and buyers (who
    may only buy from them) trade nothing. Same spec as the fee test: numeric knobs only."""
    s = sc.load(
        "paper_two_agent",
        [*SHRINK, "agents.n=4", "data.split.name=iid", "train.rounds=4", "trading.start=1",
         "mechanism.name=mcafee_double", "broker.sellers=[2, 3]", "economics.fee_share=0.25",
         "economics.trade_fee=0.0001", "economics.query_fee=0.0002",
         "economics.value_per_quality=[100, 100, 0, 0]", "economics.step_cost=0.05",
         "economics.initial_cash=0.1", "economics.bankruptcy=true", "seeds=[0, 1]"],
    )  # fmt: skip
    result = run_scenario(s)
    rounds = result.rounds
    broke = rounds[rounds["agent"].isin([2, 3])]
    assert not broke["alive"].any() and not broke["siloed_alive"].any()
    assert rounds[rounds["agent"].isin([0, 1])]["alive"].all()
    assert len(result.trades) == 0
    for _, df in broke.groupby(["seed", "agent"]):
        np.testing.assert_allclose(df["cash"], -0.05, rtol=1e-5)  # 0.1 - 3 steps x 0.05
        assert df["accuracy"].nunique() == 1 and df["loss"].nunique() == 1  # frozen model
        np.testing.assert_allclose(df["utility"], df["cash"] - 0.1, rtol=1e-6)
    assert result.summary["alive"] == 2


def test_top_candidates_are_the_best_alive_others():
    """Each buyer gets the k alive agents other than itself with the lowest score, in order."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        n, k = 9, 3
        score = rng.normal(size=n).astype(np.float32)
        score[trial] = np.nan  # a diverged model is nobody's candidate
        alive = rng.random(n) > 0.3
        got = np.asarray(jax.jit(trade.top_candidates, static_argnums=2)(score, alive, k))
        for i in range(n):
            others = [j for j in np.argsort(score) if j != i and alive[j] and np.isfinite(score[j])]
            assert got[i].tolist()[: len(others[:k])] == others[:k]
            assert i not in got[i] and len(set(got[i].tolist())) == k
