"""A buyer's parameters change only through its own training or a settled trade.

A short market (4 agents, trading every round) is stepped round by round with the keys
``round.simulate`` uses. After each round the test recomputes, from the state before it,
what local training alone gives (``round._train`` with the round's train key, split as
``round.step`` splits it) and the broker's valuation of that trained market (``round.value``
with the trade keys, split as ``round._trade`` splits them): its permutations are the ones
settlement merges with. Then, every round:

1. every market agent that did not buy holds exactly its trained parameters;
2. every buyer holds ``(1 - alpha) * its trained parameters + alpha * its seller's trained
   parameters`` permuted into the buyer's basis, with the seller and alpha the round
   recorded (sellers that bought in the same round count with their pre-trade weights:
   settlement is simultaneous);
3. every siloed twin holds exactly its trained parameters (it never merges).

The check is one host-side function; the last test shows that it fails when any of the
three is broken.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shrink import SHRINK

from paramarket_jax import scenario as sc
from paramarket_jax.broker.align import aligned
from paramarket_jax.broker.value import Valuation
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade
from paramarket_jax.market.types import MARKET, Trades

ROUNDS = 4
SCENARIO = [
    *SHRINK,
    "agents.n=4",
    f"train.rounds={ROUNDS}",
    "trading.start=0",
    "trading.every=1",
    "baselines.centralized=false",
]
# a merge is recomputed as (1 - alpha) * own + alpha * seller, the round computes
# own + alpha * (seller - own): equal up to float32 rounding
RTOL, ATOL = 1e-5, 1e-6


class Round(NamedTuple):
    """One round, as host arrays: parameters after it and after training alone (leaves
    (T, N, ...)), its trades, and the valuation of the trained market (candidates (N, K),
    scores, permutations name -> (N, K, size))."""

    r: int
    after: Any
    trained: Any
    trades: Trades
    cands: np.ndarray
    val: Valuation
    perms: dict


@pytest.fixture(scope="module")
def market():
    exp = build(sc.load("paper_two_agent", SCENARIO))
    spec, params = exp.spec, exp.params
    data, key = seed_data(exp, 0)
    trainer = spec.make_trainer()

    @jax.jit
    def one_round(state, key, r):
        new, record = market_round.step(spec, key, state, params, data, r)
        k_train, k_trade = jax.random.split(key)  # as step splits it
        trained, _ = market_round.train(spec, k_train, state, params, data)
        pop = trained.twins.params
        mine = jax.tree.map(lambda v: v[MARKET], pop)
        agents = data.agents
        loss_v, _ = trainer.evaluate(mine, agents.x_val, agents.y_val, agents.val_idx)
        trading = trained.alive[MARKET] & ~trained.diverged[MARKET]
        keys = trade.TradeKeys.of(k_trade)  # as trade splits it
        cands, val, perms = trade.value(spec, keys, params, data, mine, trading, loss_v)
        return new, record, pop, cands, val, perms

    k_init, k_rounds = jax.random.split(key)  # as simulate splits it
    state = market_round.init(spec, k_init, params, data)
    rounds = []
    for r in range(ROUNDS):
        key_r = jax.random.fold_in(k_rounds, r)
        state, record, trained, cands, val, perms = one_round(state, key_r, jnp.int32(r))
        assert bool(record.traded)
        host = jax.device_get((state.twins.params, trained, record.trades, cands, val, perms))
        rounds.append(Round(r, *host))
    return spec, rounds


def _member(tree, twin: int, agent: int):
    return jax.tree.map(lambda v: np.asarray(v)[twin, agent], tree)


def _equal(a, b) -> bool:
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _close(a, b) -> bool:
    return all(
        np.allclose(u, v, rtol=RTOL, atol=ATOL)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def violations(spec, rnd: Round) -> list[str]:
    """Each agent whose parameters after round ``rnd.r`` are not its trained parameters,
    or (a buyer) the recorded merge of them, one line each."""
    model = spec.make_model()
    siloed = spec.twin_names.index("siloed")
    t, out = rnd.trades, []
    for i in range(spec.n):
        got, own = _member(rnd.after, MARKET, i), _member(rnd.trained, MARKET, i)
        if not t.mask[i]:
            if not _equal(got, own):
                out.append(f"round {rnd.r}: agent {i} did not buy, yet its parameters changed")
            continue
        seller, alpha = int(t.seller[i]), np.float32(t.alpha[i])
        slot = np.flatnonzero(rnd.cands[i] == seller)
        if len(slot) != 1:
            out.append(f"round {rnd.r}: agent {i} bought from {seller}, not a candidate")
            continue
        perm = {name: p[i, slot[0]] for name, p in rnd.perms.items()}
        theirs = aligned(model.spec, perm, _member(rnd.trained, MARKET, seller))
        want = jax.tree.map(lambda o, s, a=alpha: (1 - a) * o + a * np.asarray(s), own, theirs)
        if not _close(got, want):
            out.append(
                f"round {rnd.r}: buyer {i} does not hold its merge with seller {seller} "
                f"at alpha {alpha}"
            )
    for i in range(spec.n):
        if not _equal(_member(rnd.after, siloed, i), _member(rnd.trained, siloed, i)):
            out.append(f"round {rnd.r}: siloed twin {i} is not its trained self")
    return out


def test_a_buyers_parameters_change_only_through_training_or_a_settled_trade(market):
    spec, rounds = market
    for rnd in rounds:
        assert violations(spec, rnd) == [], rnd.r
        # the valuation recomputed here is the one the round settled: same scores, same
        # weights, so its permutations are the ones the merge used
        t = rnd.trades
        buyer, seller = np.asarray(rnd.val.buyer), np.asarray(rnd.val.seller)
        for i in np.flatnonzero(t.mask):
            (pair,) = np.flatnonzero((buyer == i) & (seller == t.seller[i]))
            assert rnd.val.gain[pair] == t.predicted_gain[i]
            assert rnd.val.best_alpha[pair] == t.alpha[i]
    # every case was exercised: buyers, agents that bought nothing, agents that bought and
    # sold in one round, and merges that the alignment changed
    masks = np.array([rnd.trades.mask for rnd in rounds])
    assert masks.any() and not masks.all()
    assert any(
        set(np.flatnonzero(rnd.trades.mask)) & set(rnd.trades.seller[rnd.trades.mask])
        for rnd in rounds
    )
    assert any(v.size and (v != np.arange(v.shape[-1])).any() for v in rounds[0].perms.values())


def test_the_check_fails_when_parameters_change_outside_training_and_trades(market):
    """One weight of an agent that bought nothing, of a siloed twin or of a buyer moved by
    1e-3, a buyer's recorded alpha off by 0.1, or the merge without the broker's
    permutation: each is reported, naming the agent."""
    spec, rounds = market
    rnd = next(rnd for rnd in rounds if not rnd.trades.mask.all())
    t = rnd.trades
    idle = int(np.flatnonzero(~t.mask)[0])
    siloed = spec.twin_names.index("siloed")

    def permuted(i):  # the broker's permutation of buyer i's seller is not the identity
        slot = np.flatnonzero(rnd.cands[i] == t.seller[i])[0]
        return any((p[i, slot] != np.arange(p.shape[-1])).any() for p in rnd.perms.values())

    buyer = next(int(i) for i in np.flatnonzero(t.mask) if permuted(i))
    alpha = t.alpha.copy()
    alpha[buyer] += 0.1

    def nudge(tree, twin, agent):  # one weight of one agent, by 1e-3
        first, *rest = jax.tree.leaves(tree)
        nudged = first.copy()
        nudged[(twin, agent) + (0,) * (first.ndim - 2)] += 1e-3
        return jax.tree.unflatten(jax.tree.structure(tree), [nudged, *rest])

    identity = {k: np.broadcast_to(np.arange(v.shape[-1]), v.shape) for k, v in rnd.perms.items()}
    merge = f"buyer {buyer} does not hold its merge"
    cases = [
        (f"agent {idle} did not buy", rnd._replace(after=nudge(rnd.after, MARKET, idle))),
        (f"siloed twin {buyer} is not", rnd._replace(after=nudge(rnd.after, siloed, buyer))),
        (merge, rnd._replace(after=nudge(rnd.after, MARKET, buyer))),
        # another weight than the recorded one, or no permutation, is not the merge
        (merge, rnd._replace(trades=t._replace(alpha=alpha))),
    ]
    for needle, broken in cases:
        found = violations(spec, broken)
        assert len(found) == 1 and needle in found[0], (needle, found)  # that agent alone
    found = violations(spec, rnd._replace(perms=identity))
    assert any(merge in line for line in found), found
