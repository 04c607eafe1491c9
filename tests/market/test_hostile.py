"""Hostile sellers, noisy labels and the buyers' guard.

A hostile seller offers the broker something other than its model (random, stale or
poisoned weights) while its own model stays honest; try-before-buy scores what is offered,
so buyers reject it. Noisy labels touch only the noisy agents' training rows. The guard
(``broker.min_gain``, ``broker.confidence``) is a pair of traced knobs: off, they change no
number; on, every settled trade clears the bound. Runs share few specs: the default
market is test_divergence's (its run compiles once for both modules, and again batched
with a guard on), one compilation for the random-kind market, one for the offers of every
hostile kind.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oneline import call, check_one_line
from test_divergence import BASE

from paramarket_jax import scenario as sc
from paramarket_jax.broker.value import all_candidates, merge_settled, value_with_perms
from paramarket_jax.engines import batch
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade
from paramarket_jax.models import make_model
from paramarket_jax.runs import result_of, run_scenario

# BASE: test_divergence's market (three agents, four rounds, two seeds)
# models trained enough that a merge with random weights is a loss, not a lucky shrinkage
# (and no FedAvg twin: a smaller program to compile)
TRAINED = ["train.local_steps=20", "train.rounds=5", "trading.start=2", "baselines.fedavg=false"]
STRICT = ["broker.confidence=0.95", "broker.min_gain=0.02"]


def _cells(overrides_per_cell):
    first = build(sc.load("paper_two_agent", overrides_per_cell[0]))
    rest = [build(sc.load("paper_two_agent", o), first.dataset) for o in overrides_per_cell[1:]]
    out = batch.run_cells([first, *rest])
    assert out.calls == 1  # the guard is traced: one compiled call for every cell
    return [result_of(c, r) for c, r in zip([first, *rest], out.records, strict=True)]


def _lower_bound(trades, confidence):
    z = jax.scipy.special.ndtri(confidence)
    return trades["predicted_gain"] - float(z) * trades["gain_se"]


@pytest.fixture(scope="module")
def random_market():
    """Agent 2 offers fresh random weights: guard off, and guard on at a strict level."""
    hostile = [*BASE, *TRAINED, "agents.hostile=[2]", "agents.hostile_kind=random"]
    return _cells([hostile, [*hostile, *STRICT]])


def test_random_offers_are_rejected_and_marked(random_market):
    off, _ = random_market
    trades = off.trades
    assert len(trades) >= 8  # the honest agents keep trading
    # the hostile column says whose seller was hostile, and buyers (almost) never buy it
    np.testing.assert_array_equal(trades["hostile"], trades["seller"] == 2)
    assert trades["hostile"].sum() <= 1
    # its own model stays honest: it trains and buys like anyone
    rounds = off.rounds
    assert (trades["buyer"] == 2).any()
    for _, df in rounds[rounds["agent"] == 2].groupby("seed"):
        assert df["loss"].iloc[-1] < df["loss"].iloc[0]


def test_a_strict_guard_settles_only_trades_above_its_bound(random_market):
    off, strict = random_market
    assert len(strict.trades) > 0
    lower = _lower_bound(strict.trades, 0.95)
    assert (lower > 0).all() and (lower >= 0.02).all()
    # without the guard some settled trades were below that bound
    assert (_lower_bound(off.trades, 0.95) < 0.02).any()
    assert (strict.trades["gain_se"] > 0).all()


def test_guard_off_and_keys_at_their_defaults_change_no_number():
    """Keys at their off values (no hostile agent whatever the kind, noisy agents with no
    noise, guard 0) give exactly the spec and knobs of a scenario without them, so the
    same compiled run and the same numbers, bit for bit. Batched with a guard-on cell (the
    guard's knobs then get a batch axis, a different program), the guard-off cell makes
    the same trades, its numbers equal up to float32 rounding."""
    plain = build(sc.load("paper_two_agent", BASE))
    off = [*BASE, "agents.hostile=[]", "agents.hostile_kind=stale", "agents.noisy=[1]",
           "agents.noise=0", "broker.min_gain=0", "broker.confidence=0"]  # fmt: skip
    exp = build(sc.load("paper_two_agent", off), plain.dataset)
    assert exp.spec == plain.spec
    for u, v in zip(jax.tree.leaves(exp.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_array_equal(u, v)
    want = run_scenario(plain.scenario)
    got = run_scenario(exp.scenario)
    for a, b in ((got.rounds, want.rounds), (got.trades, want.trades)):
        for col in b.columns:
            np.testing.assert_array_equal(a[col], b[col], err_msg=col)
    assert not got.trades["hostile"].any()
    same, guarded = _cells([off, [*BASE, *STRICT]])
    keys = ["seed", "round", "buyer", "seller", "alpha"]
    np.testing.assert_array_equal(same.trades[keys], want.trades[keys])
    for a, b in ((same.rounds, want.rounds), (same.trades, want.trades)):
        for col in b.select_dtypes("float").columns:
            np.testing.assert_allclose(a[col], b[col], rtol=2e-5, atol=1e-6, err_msg=col)
    assert len(guarded.trades) < len(want.trades)


def test_offers_replace_only_hostile_sellers_and_are_what_buyers_merge():
    """``trade.hostile_offers``: a hostile agent's offer is not its model (random: a fresh draw;
    stale: its initial weights; poisoned: its model plus noise); the others offer their
    own. The valuation scores what is offered, and a settled trade merges it. (Every kind
    in one compiled call, its inputs made by another, so the offers are compared with the
    very arrays they were picked from; the checks read host copies, so indexing compiles
    nothing.)"""
    exp = build(sc.load("paper_two_agent", [*BASE, "agents.hostile=[2]"]))
    kinds = ("random", "stale", "poisoned")
    specs = {kind: dataclasses.replace(exp.spec, hostile=kind) for kind in kinds}

    @jax.jit
    def states_by_kind(params):
        states = {k: market_round.init(s, jax.random.key(0), params) for k, s in specs.items()}
        pop = jax.tree.map(lambda v: v[0] + 0.1, states["random"].twins.params)  # "trained"
        return states, pop

    @jax.jit
    def offered_by_kind(params, key, states, pop):
        return {
            k: (trade.hostile_offers(s, key, states[k], params, pop), states[k].twins.params)
            for k, s in specs.items()
        }

    assert exp.spec.hostile == "random"
    key = jax.random.key(1)
    states, pop = states_by_kind(exp.params)
    by_kind = jax.device_get(offered_by_kind(exp.params, key, states, pop))
    pop = jax.device_get(pop)
    for kind in kinds:
        offered, initial = by_kind[kind]
        for u, v, init in zip(
            jax.tree.leaves(offered),
            jax.tree.leaves(pop),
            jax.tree.leaves(initial),
            strict=True,
        ):
            np.testing.assert_array_equal(u[:2], v[:2])
            assert not np.allclose(u[2], v[2])
            if kind == "stale":
                np.testing.assert_array_equal(u[2], init[0, 2])
    # valuation and settlement see the offer: merged at alpha 1 without alignment, the
    # buyer holds what agent 2 offered (up to rounding: b + 1 * (s - b)), not its model
    model = make_model("mlp", (8,), 4, widths=(12, 6))
    honest = jax.jit(jax.vmap(model.init))(jax.random.split(jax.random.key(2), 3))
    host = jax.device_get(honest)
    fake = jax.tree.map(lambda v: np.concatenate([v[:2], -v[2:] + 1.0]), host)
    x = jax.random.normal(jax.random.key(3), (40, 8))
    y = jax.random.randint(jax.random.key(4), (40,), 0, 4)
    val_idx = jnp.tile(jnp.arange(40, dtype=jnp.int32), (3, 1))
    cands = all_candidates(3)

    @jax.jit
    def scores(offers):
        return value_with_perms(
            model, honest, x, y, val_idx, cands, key, jnp.array([0.5, 1.0]), align="none",
            layers=None, max_sweeps=5, batch_size=None, offers=offers,
        )[0]  # fmt: skip

    a, b = scores(None), scores(fake)
    hostile_pair = np.asarray(a.seller) == 2
    np.testing.assert_array_equal(
        np.asarray(a.gain)[~hostile_pair], np.asarray(b.gain)[~hostile_pair]
    )
    assert not np.allclose(
        np.asarray(a.loss_after)[hostile_pair], np.asarray(b.loss_after)[hostile_pair]
    )
    merged = jax.device_get(jax.jit(
        lambda honest, fake: merge_settled(
            model.spec, honest, jnp.array([2, 0, 0]), jnp.ones(3),
            jnp.array([True, False, False]), {}, offers=fake,
        )
    )(honest, fake))  # fmt: skip
    leaves = (jax.tree.leaves(t) for t in (merged, fake, host))
    for m, f, h in zip(*leaves, strict=True):
        np.testing.assert_allclose(m[0], f[2], rtol=1e-6, atol=1e-6)
        assert not np.allclose(m[0], h[2])
        np.testing.assert_array_equal(m[1:], h[1:])


def test_noisy_labels_touch_only_the_noisy_agents_training_rows():
    clean_exp = build(sc.load("paper_two_agent", BASE))
    exp = build(
        sc.load("paper_two_agent", [*BASE, "agents.noisy=[1]", "agents.noise=0.4"]),
        clean_exp.dataset,
    )
    assert exp.noise.agents == (1,) and exp.noise.fraction == 0.4
    n_train = len(clean_exp.dataset.y_train)
    for seed in (0, 1):
        clean, _ = seed_data(clean_exp, seed)
        noisy, _ = seed_data(exp, seed)
        c, d = clean.agents, noisy.agents
        for name in ("train_start", "train_size", "val_idx", "test_idx", "x_val", "y_val"):
            np.testing.assert_array_equal(getattr(c, name), getattr(d, name), err_msg=name)
        # the training arrays gain a copy with wrong labels; the original rows are kept
        x, y = np.asarray(d.x_train), np.asarray(d.y_train)
        assert len(y) == 2 * n_train
        np.testing.assert_array_equal(x[:n_train], c.x_train)
        np.testing.assert_array_equal(x[n_train:], c.x_train)
        np.testing.assert_array_equal(y[:n_train], c.y_train)
        assert (y[n_train:] != y[:n_train]).all()
        for i in range(3):
            start, size = int(c.train_start[i]), int(c.train_size[i])
            before = np.asarray(c.train_rows)[start : start + size]
            after = np.asarray(d.train_rows)[start : start + size]
            if i != 1:
                np.testing.assert_array_equal(after, before)
                continue
            moved = after != before
            assert moved.sum() == round(0.4 * size)
            np.testing.assert_array_equal(after[moved], before[moved] + n_train)
            # what agent 1 trains on: its own rows, 40% of them with a wrong label
            assert (y[after] != np.asarray(c.y_train)[before]).sum() == round(0.4 * size)
    # each seed draws its own rows
    a, b = (np.asarray(seed_data(exp, s)[0].agents.train_rows) for s in (0, 1))
    assert not np.array_equal(a >= n_train, b >= n_train)


@pytest.fixture
def refuse_compute(monkeypatch):
    """Bad input must fail before anything is compiled or run (as in test_bad_input)."""
    from paramarket_jax.engines import mesa as model

    def reached(*args, **kwargs):
        raise AssertionError("bad input reached the compute step")

    monkeypatch.setattr(batch, "simulate_runs", reached)
    monkeypatch.setattr(model.MarketModel, "run", reached)


@pytest.mark.usefixtures("refuse_compute")
@pytest.mark.parametrize(
    "override, needle",
    [
        ("agents.hostile=[3]", "'agents.hostile' must list agents in [0, 1], got 3"),
        ("agents.hostile=1", "'agents.hostile' must be a list of agent indices"),
        ("agents.hostile_kind=evil", "'agents.hostile_kind' must be one of poisoned, random"),
        ("agents.noisy=[2]", "'agents.noisy' must list agents in [0, 1], got 2"),
        ("agents.noise=1.5", "'agents.noise' must be a number in [0, 1]"),
        ("broker.min_gain=-0.1", "'broker.min_gain' must be a number in [0, 1]"),
        ("broker.confidence=0.3", "'broker.confidence' must be 0 (off) or a number in [0.5, 1)"),
        ("broker.confidence=1", "'broker.confidence' must be 0 (off) or a number in [0.5, 1)"),
    ],
)
def test_bad_values_are_one_line(override, needle, tmp_path, capsys):
    code = call(["run", "--out", str(tmp_path / "run"), "--quiet", "--set", override])
    check_one_line(code, capsys.readouterr(), needle, tmp_path)
