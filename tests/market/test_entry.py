"""Entry inside the round: the rule is pure (jit equals no-jit, the key decides), takes only
free real slots, at most ``entry_max``, only while the market looks profitable; its knobs
are traced (no recompile); entrants get fresh accounts in every twin."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shrink import ENTRY, TINY

from paramarket_jax import scenario as sc
from paramarket_jax.experiment import build, params_of, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market.types import MARKET, MarketSpec, MarketState

N, PAD = 8, 2  # the last two slots pad the devices: never alive, never entered
SPEC = MarketSpec(n=N, input_shape=(1,), num_classes=2, pad=PAD)
ALIVE = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)  # free real slots: 1, 3, 4
WAS_IN = np.array([1, 1, 1, 0, 0, 1, 0, 0], bool)  # slot 1 was in and left this round
entrants_jit = jax.jit(market_round.entrants, static_argnums=0)


def knobs(entry=True, entry_profit=0.0, entry_max=2):
    params = params_of(sc.load("paper_two_agent", [f"agents.n={N}"]))
    return params._replace(
        entry=jnp.asarray(entry),
        entry_profit=jnp.float32(entry_profit),
        entry_max=jnp.int32(entry_max),
    )


def state_with(alive):
    """A state with only the accounts the rule reads (alive, T = 2 twins)."""
    none = dict.fromkeys(MarketState._fields, None)
    return MarketState(**none | {"alive": jnp.asarray(np.stack([alive, alive]))})


def pick(key=0, profit=1.0, spec=SPEC, alive=ALIVE, **kw):
    profit = jnp.broadcast_to(jnp.float32(profit), (N,))
    key = jax.random.key(key)
    out = entrants_jit(spec, key, state_with(alive), knobs(**kw), jnp.asarray(WAS_IN), profit)
    return np.asarray(out)


def test_the_entry_rule_is_pure_and_keeps_to_its_knobs(compiles):
    free = ~ALIVE & (np.arange(N) < N - PAD)
    profit = jnp.asarray([1, 2, 3, 0, 0, -3, 99, 99], jnp.float32)  # in: mean 0.75
    args = (SPEC, jax.random.key(3), state_with(ALIVE), knobs(), jnp.asarray(WAS_IN), profit)
    jitted = np.asarray(entrants_jit(*args))
    with jax.disable_jit():
        eager = np.asarray(market_round.entrants(*args))
    np.testing.assert_array_equal(jitted, eager)
    assert jitted.sum() == 2 and not (jitted & ~free).any()  # only free real slots
    # the same key gives the same entrants; the key decides which free slots go first
    assert all((pick(k) == pick(k)).all() for k in range(3))
    seen = {tuple(np.flatnonzero(pick(k))) for k in range(12)}
    assert len(seen) > 1 and set().union(*seen) == {1, 3, 4}
    # at most entry_max (all the free real slots when there are fewer); never a padded slot
    with compiles() as events:
        for most in range(5):
            got = pick(1, entry_max=most)
            assert got.sum() == min(most, 3) and not (got & ~free).any()
        # the market must look profitable: the mean over the agents in it this round
        # (slot 6's 99 was out of the market: it does not count) beats entry_profit
        assert pick(entry_profit=0.75, profit=profit).sum() == 0
        assert pick(entry_profit=0.74, profit=profit).sum() == 2
        assert pick(profit=0.0).sum() == 0  # 0 does not beat 0
        assert pick(entry=False, entry_profit=-1e9).sum() == 0
        assert pick(alive=np.ones(N, bool)).sum() == 0  # no free slot
    assert events == []  # the knobs are traced: none of this recompiled
    # without the padding the real slots' draws are the same: the same entrants
    unpadded = dataclasses.replace(SPEC, pad=0)
    np.testing.assert_array_equal(pick(5, spec=unpadded, entry_max=1), pick(5, entry_max=1))


@pytest.fixture(scope="module")
def market():
    exp = build(sc.load("paper_two_agent", [*TINY, *ENTRY]))  # test_mesa's: its compiled init
    data, key = seed_data(exp, 0)
    return exp, market_round.init_jit(exp.spec, key, exp.params, data)


def test_admit_gives_entrants_fresh_accounts_and_is_off_without_entry(market):
    exp, state = market
    spec, params = exp.spec, exp.params
    state = state._replace(cash=state.cash - 30.0)  # someone's losses, to see them kept
    was_in = state.alive[MARKET]
    profit = jnp.zeros(spec.n, jnp.float32)
    admit = jax.jit(market_round.admit, static_argnums=0)
    key = jax.random.key(7)
    after, slots = admit(spec, key, state, params, was_in, profit)
    again, same = admit(spec, key, state, params, was_in, profit)
    for u, v in zip(jax.tree.leaves((after, slots)), jax.tree.leaves((again, same)), strict=True):
        np.testing.assert_array_equal(u, v)  # the same key, the same entrants and models
    (slot,) = np.flatnonzero(slots)
    assert slot in (2, 3)
    alive, cash = np.asarray(after.alive), np.asarray(after.cash)
    assert alive[:, slot].all() and alive.sum(1).tolist() == [3] * spec.twins
    np.testing.assert_array_equal(cash[:, slot], 100.0)
    # the slot's earlier utility stays (cash - endowment), the others are untouched
    utility = lambda s: np.asarray(s.cash - s.endowment)  # noqa: E731
    np.testing.assert_array_equal(utility(after), utility(state))
    np.testing.assert_array_equal(cash[:, :2], np.asarray(state.cash)[:, :2])
    # without entry the state comes back as it was, bit for bit
    closed, none = admit(spec, key, state, params._replace(entry=jnp.asarray(False)), was_in,
                         profit)  # fmt: skip
    assert not np.asarray(none).any()
    for u, v in zip(jax.tree.leaves(closed), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(u, v)
