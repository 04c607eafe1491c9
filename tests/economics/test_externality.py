"""The competition externality: purchase effects on everyone's revenue, compensation of the
third parties a trade hurts (its claims on random markets), trade effects against the
round's other trades."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paramarket_jax.economics.revenue import (
    Economy,
    compensate,
    compensated_values,
    purchase_effects,
    purchase_values,
    revenue,
    trade_effects,
)
from paramarket_jax.mechanisms import MECHANISMS, Market, default_knobs, make_mechanism

N = 5
BATCH = 100
TOL = 1e-4


def economy(n=N, outside=0.4, gamma=1.5, horizon=3.0):
    return Economy(
        value_per_quality=jnp.linspace(1.0, 2.0, n), market_size=jnp.float32(2.0),
        gamma=jnp.float32(gamma), outside=jnp.float32(outside), horizon=jnp.float32(horizon),
        step_cost=0.0, query_fee=0.0, trade_fee=0.0, fee_share=0.0,
    )  # fmt: skip


def qualities(key, n=N, batch=None):
    shape = (n,) if batch is None else (batch, n)
    k1, k2 = jax.random.split(key)
    q = jax.random.uniform(k1, shape, minval=0.2, maxval=0.8)
    q_new = jnp.clip(q[..., :, None] + jax.random.uniform(k2, (*shape, n), minval=-0.1,
                                                          maxval=0.2), 0.01, 1.0)  # fmt: skip
    return q, q_new


@pytest.mark.parametrize("world", [False, True])
@pytest.mark.parametrize("outside", [0.0, 0.5])
def test_effects_equal_recomputed_revenues(outside, world):
    """Every part of a purchase's effect equals recomputing every agent's revenue, in
    today's world and in a world where the others have other qualities."""
    econ = economy(outside=outside)
    q, q_new = qualities(jax.random.key(0))
    w = jax.random.uniform(jax.random.key(1), (N,), minval=0.2, maxval=0.9) if world else None
    e = purchase_effects(q, q_new, econ, "competitive", w)
    h = float(econ.horizon)
    for i in range(N):
        here = (q if w is None else w).at[i].set(q[i])  # buyer i's world: itself at q[i]
        before = np.asarray(revenue(here, econ, "competitive"))
        for j in range(N):
            if i == j:
                continue
            after = np.asarray(revenue(here.at[i].set(q_new[i, j]), econ, "competitive"))
            loss = h * (before - after)
            np.testing.assert_allclose(e.values[i, j], h * (after[i] - before[i]), atol=TOL)
            np.testing.assert_allclose(e.reservations[i, j], max(loss[j], 0), atol=TOL)
            np.testing.assert_allclose(e.social[i, j], h * (after.sum() - before.sum()), atol=TOL)
            third = [k for k in range(N) if k not in (i, j)]
            np.testing.assert_allclose(e.harm[i, j], max(loss[third].sum(), 0), atol=TOL)
            if q_new[i, j] > q[i]:  # rival k's loss is factor * its weight
                k = third[0]
                np.testing.assert_allclose(e.factor[i, j] * e.rivals[k], loss[k], atol=TOL)
    if w is None:  # the effects' values are purchase_values', bit for bit
        values, reservations = purchase_values(q, q_new, econ, "competitive")
        assert (values == e.values).all() and (reservations == e.reservations).all()


def test_value_less_losses_is_the_change_of_total_revenue():
    econ = economy(outside=0.3)
    q, q_new = qualities(jax.random.key(2))
    e = purchase_effects(q, q_new, econ, "competitive")
    better = (q_new > q[:, None]) & ~jnp.eye(N, dtype=bool)
    gap = jnp.where(better, e.values - e.reservations - e.harm - e.social, 0.0)
    np.testing.assert_allclose(gap, 0.0, atol=TOL)
    assert (jnp.where(better, e.social, 0.0) >= 0).all()  # a better model grows the market
    fixed = purchase_effects(q, q_new, economy(outside=0.0), "competitive")
    assert (fixed.social == 0).all()  # a fixed-size market: every gain is someone's loss


def test_independent_markets_have_no_externality():
    econ = economy()
    q, q_new = qualities(jax.random.key(3))
    e = purchase_effects(q, q_new, econ, "independent")
    assert (e.harm == 0).all() and (e.reservations == 0).all() and (e.social == e.values).all()
    values, owed = compensated_values(e, jnp.float32(1.0))
    assert (values == e.values).all() and (owed == 0).all()
    world = purchase_effects(q, q_new, econ, "independent", q_new[:, 0])
    assert (world.values == e.values).all()  # a rival's purchase changes nobody's value


def test_compensated_values_at_share_0_and_1():
    q, q_new = qualities(jax.random.key(4))
    e = purchase_effects(q, q_new, economy(outside=0.0), "competitive")
    values, owed = compensated_values(e, jnp.float32(0.0))
    assert (values == e.values).all() and (owed == 0).all()  # off: bit for bit
    values, owed = compensated_values(e, jnp.float32(1.0))
    hurts = e.harm > 0
    # fully compensated in a fixed-size market: worth exactly the seller's reservation
    assert (jnp.where(hurts, values == e.reservations, True)).all()
    np.testing.assert_allclose(jnp.where(hurts, e.values - owed, values), values, atol=TOL)
    half, owed_half = compensated_values(e, jnp.float32(0.5))
    np.testing.assert_allclose(half, e.values - 0.5 * e.harm, atol=TOL)
    np.testing.assert_allclose(owed_half, 0.5 * e.harm, atol=1e-6)


@functools.cache
def compensated_market(name, outside, share):
    """BATCH random competitive markets: truthful reports of the compensated values, the
    mechanism's outcome and the compensation settled."""
    mech = make_mechanism(name)
    econ = economy(outside=outside)

    @jax.jit
    @jax.vmap
    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        q, q_new = qualities(k1)
        e = purchase_effects(q, q_new, econ, "competitive")
        values, owed = compensated_values(e, jnp.float32(share))
        mask = jax.random.bernoulli(k2, 0.8, (N, N)) & ~jnp.eye(N, dtype=bool)
        knobs = default_knobs(N)._replace(
            beta=jax.random.uniform(k3), posted=jax.random.uniform(k3, (N,), maxval=0.3)
        )
        out = mech.run(Market(values, e.reservations, mask), knobs)
        bought = out.alloc.any(1)
        pick = jnp.argmax(out.alloc, 1)
        paid, comp = compensate(share * e.factor, e.rivals, bought, pick)
        return e, values, owed, out, bought, pick, paid, comp

    return one(jax.random.split(jax.random.key(5), BATCH))


IR = [n for n in MECHANISMS if "individually_rational" in make_mechanism(n).claims]


@pytest.mark.parametrize("name", sorted(MECHANISMS))
@pytest.mark.parametrize("outside", [0.0, 0.5])
def test_compensation_keeps_budget_balance_and_pays_the_third_parties(name, outside):
    """Compensation only moves money between agents (it sums to zero, the mechanism's
    own budget is untouched), and every third party of every trade gets exactly the share
    of the loss the trade's estimate says it causes."""
    share = 0.7
    e, values, owed, out, bought, pick, paid, comp = compensated_market(name, outside, share)
    np.testing.assert_allclose(comp.sum(-1), 0.0, atol=TOL)
    rows = jnp.arange(N)
    owed_pick = jax.vmap(lambda o, p: o[rows, p])(owed, pick)
    np.testing.assert_allclose(paid, jnp.where(bought, owed_pick, 0.0), rtol=1e-4, atol=1e-6)
    # the third parties' receipts, trade by trade, from recomputed revenues
    econ = economy(outside=outside)
    h = float(econ.horizon)
    b = int(np.argmax(np.asarray(bought).sum(-1)))  # a market with several trades
    assert int(bought[b].sum()) >= 1
    k1 = jax.random.split(jax.random.split(jax.random.key(5), BATCH)[b], 3)[0]
    q, q_new = (np.asarray(a) for a in qualities(k1))
    expect = np.zeros(N)
    base = np.asarray(revenue(jnp.asarray(q), econ, "competitive"))
    for i in np.nonzero(np.asarray(bought[b]))[0]:
        j = int(pick[b, i])
        after = np.asarray(revenue(jnp.asarray(q).at[i].set(q_new[i, j]), econ, "competitive"))
        loss = np.where(np.isin(np.arange(N), [i, j]), 0.0, h * (base - after))
        if q_new[i, j] > q[i]:
            expect += share * loss
            expect[i] -= share * loss.sum()
    np.testing.assert_allclose(comp[b], expect, atol=TOL)


@pytest.mark.parametrize("name", IR)
@pytest.mark.parametrize("outside", [0.0, 0.5])
def test_compensating_buyers_stay_individually_rational(name, outside):
    """Under truthful reports of the compensated values, what a buyer pays its seller plus
    what it pays the third parties never exceeds its (uncompensated) value."""
    e, values, owed, out, bought, pick, paid, comp = compensated_market(name, outside, 1.0)
    gross = jax.vmap(lambda v, p: v[jnp.arange(N), p])(e.values, pick)
    surplus = jnp.where(bought, gross - out.payment - paid, 0.0)
    assert (surplus >= -TOL).all()


@pytest.mark.parametrize("name", IR)
def test_full_compensation_in_a_fixed_size_market_clears_no_trade(name):
    """With the whole market's revenue fixed, every gain is a rival's loss: a buyer that
    makes the rivals whole values a purchase at exactly the seller's reservation, and no
    individually rational mechanism clears a trade that leaves nobody better off."""
    e, values, owed, out, bought, pick, paid, comp = compensated_market(name, 0.0, 1.0)
    surplus = jnp.where(out.alloc, values - e.reservations, 0.0)
    assert (surplus <= 0).all()
    assert int(compensated_market(name, 0.0, 0.0)[4].sum()) > 0  # without it they trade


@pytest.mark.parametrize("outside", [0.0, 0.6])
def test_trade_effects_equal_undoing_each_trade(outside):
    """A trade's social value is total revenue with every trade less with its own undone,
    the private part the buyer's own revenue; both from recomputed revenues."""
    econ = economy(outside=outside)
    q_b = jax.random.uniform(jax.random.key(6), (N,), minval=0.2, maxval=0.7)
    bought = jnp.array([True, False, True, True, False])
    q_a = jnp.where(bought, q_b + 0.15, q_b)
    social, private = trade_effects(q_b, q_a, econ, "competitive")
    with_all = np.asarray(revenue(q_a, econ, "competitive"))
    h = float(econ.horizon)
    for i in np.nonzero(np.asarray(bought))[0]:
        undone = np.asarray(revenue(q_a.at[i].set(q_b[i]), econ, "competitive"))
        np.testing.assert_allclose(social[i], h * (with_all.sum() - undone.sum()), atol=TOL)
        np.testing.assert_allclose(private[i], h * (with_all[i] - undone[i]), atol=TOL)
        assert private[i] > 0 and social[i] < private[i]  # the rivals paid for part of it
    if outside == 0:
        np.testing.assert_allclose(social, 0.0, atol=1e-6)
    s_ind, p_ind = trade_effects(q_b, q_a, econ, "independent")
    assert (s_ind == p_ind).all()
