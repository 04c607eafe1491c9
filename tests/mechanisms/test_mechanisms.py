"""Mechanism claims checked on random markets: feasibility, IR, budget, truthfulness, efficiency."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paramarket_jax.errors import ParamarketError
from paramarket_jax.mechanisms import (
    CLAIMS,
    DOMAINS,
    MECHANISMS,
    Knobs,
    Market,
    cap_bids,
    default_knobs,
    make_mechanism,
    settle,
)

N = 5
BATCH = 200
TOL = 1e-4

# Every registered mechanism with its default options, plus other static options worth testing.
CASES = [(name, ()) for name in MECHANISMS] + [
    ("k_vickrey", (("k", 1),)),
    ("k_vickrey", (("k", 3),)),
    ("vcg_assignment", (("capacity", 2),)),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts) for name, opts in CASES]


@functools.cache
def mechanism(name, opts):
    return make_mechanism(name, **dict(opts))


@functools.cache
def batched(name, opts):
    """One jitted, vmapped ``run`` per case: compiled once per batch shape for the whole file."""
    return jax.jit(jax.vmap(mechanism(name, opts).run))


def cases_claiming(*claims):
    chosen = [
        pytest.param(case, id=i)
        for case, i in zip(CASES, IDS, strict=True)
        if set(claims) & mechanism(*case).claims
    ]
    assert chosen, claims
    return chosen


@functools.partial(jax.jit, static_argnames=("domain", "batch", "n"))
def draw(key, domain="any", batch=BATCH, n=N):
    """Random markets and knobs with continuous values (ties have probability 0).

    Args:
      key: PRNG key.
      domain: one of ``DOMAINS``.
      batch: number of markets B.
      n: agents N.

    Returns:
      (Market, Knobs) with a leading batch axis B; asks, reserves and posted prices > 0.
    """
    ks = jax.random.split(key, 9)
    bids = jax.random.uniform(ks[0], (batch, n, n))
    asks = jax.random.uniform(ks[1], (batch, n, n), minval=0.02, maxval=0.5)
    off_diag = ~jnp.eye(n, dtype=bool)
    mask = jax.random.bernoulli(ks[2], 0.85, (batch, n, n)) & off_diag
    if domain == "single_seller":
        seller = jax.random.randint(ks[3], (batch,), 0, n)
        mask = (jnp.arange(n)[None, None, :] == seller[:, None, None]) & off_diag
    elif domain == "homogeneous":
        bids = jnp.broadcast_to(bids[:, :, :1], bids.shape)
        asks = jnp.broadcast_to(asks[:, :1, :], asks.shape)
        mask = jnp.broadcast_to(off_diag, mask.shape)
    knobs = Knobs(
        reserve=jax.random.uniform(ks[4], (batch,), minval=0.02, maxval=0.3),
        beta=jax.random.uniform(ks[5], (batch,)),
        posted=jax.random.uniform(ks[6], (batch, n), minval=0.05, maxval=0.9),
        roles=jax.random.bernoulli(ks[7], 0.5, (batch, n)),
    )
    return Market(bids, asks, mask), knobs


@jax.jit
def utility(outcome, values, costs):
    """Each agent's utility under true values: (B, N) = value bought - paid + received - cost."""
    alloc = outcome.alloc
    bought = jnp.where(alloc, values, 0.0).sum(-1)
    sold_cost = jnp.where(alloc, costs, 0.0).sum(-2)
    return bought - outcome.payment + outcome.receipt - sold_cost


@functools.cache
def outcomes_on_any(case):
    market, knobs = draw(jax.random.key(0))
    return market, knobs, batched(*case)(market, knobs)


def test_registry_entries_are_well_formed():
    for name in MECHANISMS:
        mech = make_mechanism(name)
        assert mech.name == name
        assert mech.claims <= CLAIMS, mech.claims - CLAIMS
        assert mech.domain in DOMAINS
        assert "feasible" in mech.claims
        assert (mech.capacity is not None) == mech.exclusive
        if "strongly_budget_balanced" in mech.claims:
            assert "weakly_budget_balanced" in mech.claims


@pytest.mark.parametrize("case", cases_claiming("feasible"))
def test_feasible(case):
    market, _, out = outcomes_on_any(case)
    mech = mechanism(*case)
    assert out.alloc.shape == (BATCH, N, N) and out.alloc.dtype == jnp.bool_
    assert out.price.shape == (BATCH, N, N) and out.price.dtype == jnp.float32
    assert out.payment.shape == out.receipt.shape == (BATCH, N)
    assert out.alloc.any(), "no trade at all: the test has no power"
    assert not (out.alloc & ~market.mask).any()
    assert not jnp.diagonal(out.alloc, axis1=1, axis2=2).any()
    assert (out.alloc.sum(-1) <= 1).all()
    if mech.exclusive:
        assert (out.alloc.sum(-2) <= mech.capacity).all()


@pytest.mark.parametrize("case", cases_claiming("individually_rational"))
def test_individually_rational(case):
    market, _, out = outcomes_on_any(case)
    paid_per_pair = jnp.where(out.alloc, out.price, 0.0)
    assert (paid_per_pair <= jnp.where(out.alloc, market.bids, 0.0) + TOL).all()
    value = jnp.where(out.alloc, market.bids, 0.0).sum(-1)
    cost = jnp.where(out.alloc, market.asks, 0.0).sum(-2)
    assert (out.payment <= value + TOL).all()
    assert (out.receipt >= cost - TOL).all()
    assert (utility(out, market.bids, market.asks) >= -TOL).all()


@pytest.mark.parametrize("case", cases_claiming("weakly_budget_balanced"))
def test_weakly_budget_balanced(case):
    _, _, out = outcomes_on_any(case)
    surplus = out.payment.sum(-1) - out.receipt.sum(-1)
    assert (surplus >= -TOL).all()
    if "strongly_budget_balanced" in mechanism(*case).claims:
        assert jnp.abs(surplus).max() <= TOL


def test_vcg_runs_the_documented_deficit_even_with_zero_asks():
    market, knobs = draw(jax.random.key(1))
    market = market._replace(asks=jnp.zeros_like(market.asks))
    out = batched("vcg_assignment", ())(market, knobs)
    surplus = out.payment.sum(-1) - out.receipt.sum(-1)
    assert (surplus < -1e-3).any()
    assert "weakly_budget_balanced" not in mechanism("vcg_assignment", ()).claims


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for c, i in zip(CASES, IDS, strict=True)])
def test_every_trade_pays_its_price_and_no_payment_without_trade(case):
    _, _, out = outcomes_on_any(case)
    mech = mechanism(*case)
    assert (jnp.where(out.alloc, 0.0, out.price) == 0).all()
    np.testing.assert_allclose(out.payment, out.price.sum(-1), atol=1e-6)
    assert (jnp.where(out.alloc.any(-1), 0.0, out.payment) == 0).all()
    assert (jnp.where(out.alloc.any(-2), 0.0, out.receipt) == 0).all()
    if "strongly_budget_balanced" in mech.claims:
        np.testing.assert_allclose(out.receipt, out.price.sum(-2), atol=1e-5)
    traded = out.price[out.alloc]
    assert traded.size > 0
    if mech.name == "take_it":
        assert (traded == 0).all()
    else:
        assert (traded > 0).all()


@functools.partial(jax.jit, static_argnames=("domain", "sellers_too"))
def deviate(key, market, domain, sellers_too):
    """One random agent per market replaces its bid row (and maybe its ask column)."""
    b, n = market.bids.shape[:2]
    ks = jax.random.split(key, 6)
    if domain == "single_seller":
        seller = market.mask.any(-2).argmax(-1)
        agent = (seller + jax.random.randint(ks[0], (b,), 1, n)) % n
    else:
        agent = jax.random.randint(ks[0], (b,), 0, n)
    # Half fresh random reports, half scaled true reports (shading or inflating).
    fresh = jax.random.bernoulli(ks[1], 0.5, (b, 1))
    bid_row = jnp.where(
        fresh,
        jax.random.uniform(ks[2], (b, n), maxval=1.2),
        market.bids[jnp.arange(b), agent] * jax.random.uniform(ks[3], (b, 1), maxval=2.0),
    )
    ask_col = jnp.where(
        fresh,
        jax.random.uniform(ks[4], (b, n), maxval=0.8),
        market.asks[jnp.arange(b), :, agent] * jax.random.uniform(ks[5], (b, 1), maxval=2.0),
    )
    rows = jnp.arange(n)[None, :] == agent[:, None]  # (B, N)
    bids = jnp.where(rows[:, :, None], bid_row[:, None, :], market.bids)
    asks = market.asks
    if sellers_too:
        asks = jnp.where(rows[:, None, :], ask_col[:, :, None], asks)
    return market._replace(bids=bids, asks=asks), agent


def best_gain_from_deviation(case, domain, sellers_too, draws=3):
    """Largest utility gain of a deviating agent over truthful reporting, and how often the
    deviation changed the outcome."""
    run = batched(*case)
    market, knobs = draw(jax.random.key(2), domain)
    truth = run(market, knobs)
    u_truth = utility(truth, market.bids, market.asks)
    gains, changed = [], []
    for d in range(draws):
        lie, agent = deviate(jax.random.key(100 + d), market, domain, sellers_too)
        out = run(lie, knobs)
        u_lie = utility(out, market.bids, market.asks)
        idx = jnp.arange(BATCH)
        gains.append(u_lie[idx, agent] - u_truth[idx, agent])
        changed.append((out.alloc != truth.alloc).any((-1, -2)))
    return jnp.concatenate(gains).max(), jnp.concatenate(changed).mean()


@pytest.mark.parametrize("case", cases_claiming("truthful", "truthful_buyers"))
def test_truthful(case):
    mech = mechanism(*case)
    sellers_too = "truthful" in mech.claims
    gain, changed = best_gain_from_deviation(case, mech.domain, sellers_too)
    assert changed > 0.05, "deviations never mattered: the test has no power"
    assert gain <= TOL, f"{mech.name}: a deviation gained {gain}"


@pytest.mark.parametrize(
    "case, domain",
    [(("first_price", ()), "single_seller"), (("nash_bargaining", ()), "any")],
)
def test_deviation_sampler_catches_untruthful_mechanisms(case, domain):
    gain, _ = best_gain_from_deviation(case, domain, sellers_too=True)
    assert gain > 1e-2


def brute_force_welfare(surplus, mask, capacity):
    """Max of sum(surplus) over allocations: each buyer <= 1 seller, sellers <= capacity."""
    b, n = surplus.shape[:2]
    choices = np.array(list(itertools.product(range(n + 1), repeat=n)))  # n = no trade
    ok = np.ones(len(choices), bool)
    for j in range(n):
        ok &= (choices == j).sum(1) <= capacity
    choices = choices[ok]
    padded = np.concatenate([np.where(mask, surplus, -np.inf), np.zeros((b, n, 1))], axis=2)
    welfare = padded[:, np.arange(n), choices].sum(-1)  # (B, choices)
    return welfare.max(-1)


@pytest.mark.parametrize("case", cases_claiming("efficient"))
def test_efficient_against_brute_force(case):
    market, _, out = outcomes_on_any(case)  # N = 5: 6**5 candidate allocations per market
    surplus = np.asarray(market.bids - market.asks)
    welfare = np.where(out.alloc, surplus, 0.0).sum((-1, -2))
    best = brute_force_welfare(surplus, np.asarray(market.mask), mechanism(*case).capacity or N)
    np.testing.assert_allclose(welfare, best, atol=1e-5)
    assert (best > 0).all()


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for c, i in zip(CASES, IDS, strict=True)])
def test_relabelling_agents_relabels_the_outcome(case):
    market, knobs, out = outcomes_on_any(case)
    perm = jax.vmap(lambda k: jax.random.permutation(k, N))(
        jax.random.split(jax.random.key(4), BATCH)
    )
    both = jax.vmap(lambda x, p: x[p][:, p])
    one = jax.vmap(lambda x, p: x[p])
    relabelled = Market(*(both(x, perm) for x in market))
    knobs_p = knobs._replace(posted=one(knobs.posted, perm), roles=one(knobs.roles, perm))
    got = batched(*case)(relabelled, knobs_p)
    assert (got.alloc == both(out.alloc, perm)).all()
    np.testing.assert_allclose(got.price, both(out.price, perm), atol=TOL)
    np.testing.assert_allclose(got.payment, one(out.payment, perm), atol=TOL)
    np.testing.assert_allclose(got.receipt, one(out.receipt, perm), atol=TOL)


def test_single_seller_auctions_are_textbook():
    market, knobs = draw(jax.random.key(5), "single_seller")
    market = market._replace(asks=jnp.zeros_like(market.asks))  # the reserve alone binds
    bids = np.where(market.mask, market.bids, -np.inf).max(-1)  # (B, N) bid for the seller
    order = np.argsort(-bids, axis=1)
    top = np.take_along_axis(bids, order, axis=1)
    reserve = np.asarray(knobs.reserve)
    rows = np.arange(BATCH)
    for name, k in [("first_price", 1), ("second_price", 1), ("k_vickrey", 2)]:
        opts = (("k", k),) if name == "k_vickrey" else ()
        out = batched(name, opts)(market, knobs)
        bought = np.asarray(out.alloc.any(-1))
        expected = np.zeros_like(bought)
        for r in range(k):
            expected[rows, order[:, r]] = top[:, r] >= reserve
        np.testing.assert_array_equal(bought, expected)
        uniform = np.maximum(top[:, k], reserve)[:, None]
        want = bids if name == "first_price" else np.broadcast_to(uniform, bids.shape)
        np.testing.assert_allclose(out.payment, np.where(bought, want, 0.0), atol=1e-6)
        assert bought.any()


def test_nash_bargaining_price_maximises_the_nash_product():
    market, knobs, out = outcomes_on_any(("nash_bargaining", ()))
    idx = np.nonzero(np.asarray(out.alloc))
    v = np.asarray(market.bids)[idx]
    c = np.asarray(market.asks)[idx]
    beta = np.asarray(knobs.beta)[idx[0]]
    assert len(v) > 100 and (v > c).all()
    t = np.linspace(0.0, 1.0, 20001)[1:-1]
    p = c[:, None] + t[None, :] * (v - c)[:, None]
    log_nash = beta[:, None] * np.log(v[:, None] - p) + (1 - beta[:, None]) * np.log(p - c[:, None])
    best = p[np.arange(len(v)), log_nash.argmax(1)]
    np.testing.assert_allclose(np.asarray(out.price)[idx], best, atol=1e-4)
    # The endpoints: all power to the buyer pays the ask, none pays the bid.
    run = batched("nash_bargaining", ())
    for beta_value, side in [(1.0, market.asks), (0.0, market.bids)]:
        edge = run(market, knobs._replace(beta=jnp.full_like(knobs.beta, beta_value)))
        np.testing.assert_allclose(edge.price, jnp.where(edge.alloc, side, 0.0), atol=1e-6)


def homogeneous_market(values, costs):
    """Buyers (values) then sellers (costs) in one homogeneous market with roles."""
    nb, ns = len(values), len(costs)
    n = nb + ns
    bids = jnp.zeros((n, n)).at[:nb].set(jnp.asarray(values, jnp.float32)[:, None])
    asks = jnp.zeros((n, n)).at[:, nb:].set(jnp.asarray(costs, jnp.float32)[None, :])
    roles = jnp.arange(n) < nb
    mask = roles[:, None] & ~roles[None, :]
    return Market(bids, asks, mask), default_knobs(n)._replace(roles=roles)


@pytest.mark.parametrize(
    "values, costs, trades, buy, sell",
    [
        ([10, 8, 6, 4], [1, 3, 5, 7], 3, 5.5, 5.5),  # p0 = (4 + 7) / 2 in [5, 6]
        ([10, 8, 6, 1], [1, 3, 5, 6.5], 2, 6.0, 5.0),  # p0 = 3.75 < 5: trade reduction
        ([10, 8, 6, 0.5], [1, 3, 5, 20], 2, 6.0, 5.0),  # p0 = 10.25 > 6: trade reduction
        ([10, 8, 6], [1, 3, 5], 2, 6.0, 5.0),  # no (k+1)-th pair: trade reduction
        ([4, 9, 6, 3], [8, 2, 5, 7], 2, 5.5, 5.5),  # unsorted input; p0 = (4 + 7) / 2
    ],
)
def test_mcafee_double_worked_examples(values, costs, trades, buy, sell):
    market, knobs = homogeneous_market(values, costs)
    out = jax.jit(mechanism("mcafee_double", ()).run)(market, knobs)
    nb = len(values)
    assert int(out.alloc.sum()) == trades
    buyers = np.argsort(-np.asarray(values))[:trades]
    sellers = nb + np.argsort(np.asarray(costs))[:trades]
    np.testing.assert_array_equal(np.asarray(out.alloc)[buyers, sellers], True)
    np.testing.assert_allclose(out.payment[buyers], buy)
    np.testing.assert_allclose(out.receipt[sellers], sell)
    np.testing.assert_allclose(out.payment.sum() - out.receipt.sum(), trades * (buy - sell))


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for c, i in zip(CASES, IDS, strict=True)])
def test_settlement_conserves_cash_plus_fees(case):
    _, _, out = outcomes_on_any(case)
    ks = jax.random.split(jax.random.key(6), 3)
    cash = jax.random.uniform(ks[0], (BATCH, N), maxval=5.0)
    per_trade = jax.random.uniform(ks[1], (BATCH,), maxval=0.05)
    share = jax.random.uniform(ks[2], (BATCH,), maxval=0.2)
    new = jax.vmap(settle)(cash, out, per_trade, share)
    np.testing.assert_allclose(new.cash.sum(-1) + new.broker, cash.sum(-1), rtol=1e-5)
    want_fees = share[:, None] * out.receipt + per_trade[:, None] * out.alloc.sum(-2)
    np.testing.assert_allclose(new.fees, want_fees, atol=1e-6)
    np.testing.assert_allclose(
        new.cash, cash - out.payment + out.receipt - want_fees, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("case", cases_claiming("individually_rational"))
def test_capped_bids_keep_buyers_within_budget(case):
    market, knobs = draw(jax.random.key(7))
    cash = jax.random.uniform(jax.random.key(8), (BATCH, N), minval=-0.2, maxval=0.6)
    capped = market._replace(bids=jax.vmap(cap_bids)(market.bids, cash))
    assert (capped.bids < market.bids).any()
    out = batched(*case)(capped, knobs)
    assert (out.payment <= jnp.maximum(cash, 0.0) + TOL).all()
    new = jax.vmap(settle)(cash, out)
    assert (new.cash >= jnp.minimum(cash, 0.0) - TOL).all()


def test_jit_equals_no_jit():
    market, knobs = draw(jax.random.key(9), batch=1)
    market = Market(*(x[0] for x in market))
    knobs = Knobs(*(x[0] for x in knobs))
    run = make_mechanism("k_vickrey").run
    jitted = jax.jit(run)(market, knobs)
    with jax.disable_jit():
        eager = run(market, knobs)
    assert jitted.alloc.any()
    for a, b in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_knob_sweep_does_not_recompile(compiles):
    market, knobs = draw(jax.random.key(10))
    run = batched("nash_bargaining", ())
    first = run(market, knobs)
    swept = knobs._replace(beta=jax.block_until_ready(1.0 - knobs.beta))
    with compiles() as events:
        second = run(market, swept)
        second.price.block_until_ready()
    assert events == []
    assert not np.allclose(first.price, second.price)


def test_default_knobs_shapes():
    knobs = default_knobs(7)
    assert knobs.reserve.shape == knobs.beta.shape == ()
    assert knobs.posted.shape == knobs.roles.shape == (7,)
    assert int(knobs.roles.sum()) == 4


def test_unknown_names_and_bad_options_are_user_errors():
    with pytest.raises(ParamarketError, match="second_price") as err:
        make_mechanism("third_price")
    assert "vcg_assignment" in str(err.value)
    with pytest.raises(ParamarketError, match="capacity"):
        make_mechanism("vcg_assignment", capcity=2)
    with pytest.raises(ParamarketError, match="no options"):
        make_mechanism("take_it", k=2)
    with pytest.raises(ParamarketError, match="k must be"):
        make_mechanism("k_vickrey", k=0)
    with pytest.raises(ParamarketError, match="capacity must be"):
        make_mechanism("vcg_assignment", capacity=1.5)
