"""VCG from one assignment: the Hungarian solve with potentials, and the leave-one-out optima
from it, against optax's solver and the 2N + 1 full solves they replaced."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paramarket_jax.mechanisms import Market
from paramarket_jax.mechanisms.assignment import leave_one_out, reference_leave_one_out, solve
from paramarket_jax.mechanisms.vcg import vcg_outcome

MARKETS = 1000  # per shape, half with tied values


def random_markets(key, n, batch=MARKETS):
    """Markets with ties (values on a grid of 3 in half of them), zero-surplus pairs (bids
    equal to asks), non-candidate pairs, and every agent free to buy and to sell."""
    ks = jax.random.split(key, 4)
    bids = jax.random.uniform(ks[0], (batch, n, n))
    tied = (jnp.arange(batch) % 2 == 0)[:, None, None]
    bids = jnp.where(tied, jnp.floor(3 * bids) / 3, bids)
    asks = jnp.where(tied, 1 / 3, 0.3 * jax.random.uniform(ks[1], (batch, n, n)))
    asks = jnp.where(jax.random.bernoulli(ks[2], 0.15, (batch, n, n)), bids, asks)
    mask = jax.random.bernoulli(ks[3], 0.7, (batch, n, n)) & ~jnp.eye(n, dtype=bool)
    return Market(bids.astype(jnp.float32), asks.astype(jnp.float32), mask)


@pytest.mark.parametrize("n, capacity", [(2, 1), (6, 1), (5, 2), (4, 3)])
def test_payments_equal_the_full_solves(n, capacity):
    markets = random_markets(jax.random.PRNGKey(10 * n + capacity), n)
    run = functools.partial(vcg_outcome, capacity=capacity)
    fast = jax.jit(jax.vmap(run))(markets)
    full = jax.jit(jax.vmap(functools.partial(run, optima=reference_leave_one_out)))(markets)
    np.testing.assert_array_equal(fast.alloc, full.alloc)
    for name in ("payment", "receipt", "price"):
        np.testing.assert_allclose(getattr(fast, name), getattr(full, name), atol=2e-6)
    trades = np.asarray(fast.alloc).sum((1, 2))
    assert trades.max() >= 2 and (np.asarray(fast.payment) > 0).any()  # markets that trade
    if capacity > 1:  # a seller selling several licences happens
        assert (np.asarray(fast.alloc).sum(1) > 1).any()


def test_solve_matches_optax_and_its_potentials_certify_the_optimum():
    key = jax.random.PRNGKey(3)
    shapes = [(4, 4), (5, 9), (7, 7)]
    for i, (rows, cols) in enumerate(shapes):
        cost = -jnp.floor(4 * jax.random.uniform(jax.random.fold_in(key, i), (200, rows, cols)))
        sol = jax.jit(jax.vmap(solve))(cost)
        r, c = jax.jit(jax.vmap(optax.assignment.hungarian_algorithm))(cost)
        assigned = np.zeros(cost.shape, bool)
        b = np.arange(cost.shape[0])[:, None]
        assigned[b, np.asarray(r), np.asarray(c)] = True
        ours = np.asarray(sol.parent[:, 1:])[:, None, :] == np.arange(1, rows + 1)[None, :, None]
        np.testing.assert_array_equal(ours, assigned)  # the same assignment under ties
        reduced = cost - sol.u[:, 1 : rows + 1, None] - sol.v[:, None, 1:]
        assert float(reduced.min()) >= -1e-5  # feasible potentials
        assert float(np.abs(np.where(ours, reduced, 0.0)).max()) <= 1e-5  # tight on the pairs
        free = np.asarray(sol.parent[:, 1:]) == 0
        assert (np.asarray(sol.v[:, 1:])[free] == 0).all() and float(sol.v[:, 1:].max()) <= 0


def test_planted_assignment_and_its_leave_one_out_values():
    """A planted unique optimum (the diagonal of a shifted matrix) and the leave-one-out
    optima worked out by hand: without agent k, buyer k's seller is unused."""
    n = 6
    perm = np.array([3, 0, 5, 1, 2, 4])
    profit = np.full((n, n), 0.1, np.float32)
    profit[np.arange(n), perm] = 1.0
    _, _, without_agent, without_buying = jax.jit(reference_leave_one_out, static_argnums=1)(
        jnp.asarray(profit), 1
    )
    s, w, wa, wb = jax.jit(leave_one_out, static_argnums=1)(jnp.asarray(profit), 1)
    np.testing.assert_array_equal(np.argmax(np.asarray(s), 1), perm)
    assert float(w) == pytest.approx(6.0)
    # without k's bids, k's seller stays unsold (every other buyer keeps its best): W - 1
    np.testing.assert_allclose(wb, 5.0, rtol=1e-6)
    np.testing.assert_allclose(wb, without_buying, rtol=1e-6)
    # without agent k: k's seller unused and k's buyer loses its match, but that buyer
    # may take k's freed seller at 0.1: W - 2 + 0.1
    np.testing.assert_allclose(wa, 4.1, rtol=1e-6)
    np.testing.assert_allclose(wa, without_agent, rtol=1e-6)
