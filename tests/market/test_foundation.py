"""The foundation regime: one pretrained base inside ``init``, goods (model, task vector,
LoRA adapter), the broker's merge methods in the market, the layer-wise fit, shipping
costs, the leakage audit, and the bundled ``foundation_market`` scenario."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from pages import check_report
from welfare import assert_decomposition_adds_up

from paramarket_jax import scenario as sc
from paramarket_jax.broker import methods, modes
from paramarket_jax.broker.align import align
from paramarket_jax.cli.main import main
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade
from paramarket_jax.market.types import MARKET
from paramarket_jax.models.spec import flatten
from paramarket_jax.results.tables import invariant_violations

# a small market on digits: 4 MLP agents fine-tuning one base pretrained on 128 public rows
SMALL = [
    "agents.n=4",
    "model.widths=[16]",
    "train.optimizer=adam",
    "train.learning_rate=0.01",
    "train.local_steps=20",
    "data.split.eval_size=32",
    "train.rounds=3",
    "trading.start=1",
    "baselines.centralized=false",
    "pretrain.steps=50",
    "pretrain.rows=128",
    "pretrain.learning_rate=0.05",
    "broker.align=none",
    "broker.alphas=[0.25, 0.5, 1.0]",
]


@functools.cache
def experiment(*extra):
    return build(sc.load("paper_two_agent", [*SMALL, *extra]))


@functools.partial(jax.jit, static_argnums=0)
def _trading_round(spec, key, params, data):
    """Round 0 (train), round 1's training, then its trade split into its pieces."""
    k_init, k_rounds = jax.random.split(key)
    state = market_round.init(spec, k_init, params, data)
    state, _ = market_round.step(spec, jax.random.fold_in(k_rounds, 0), state, params, data, 0)
    k = jax.random.fold_in(k_rounds, 1)
    state, _ = market_round.train(spec, jax.random.fold_in(k, 7), state, params, data)
    keys = trade.TradeKeys.of(k)
    offers = trade.value_offers(spec, k, state, params, data)
    quotes, _ = trade.quote(spec, keys.strategy, state, params, offers)
    deals = trade.clear(spec, keys.roles, state, params, offers, quotes)
    new, *_ = trade.apply_trades(spec, state, data, offers, deals)
    return state, offers, deals, new


def trading_round(exp, data):
    """(state before the trade, offers, deals, the market twin after it) of round 1."""
    return _trading_round(exp.spec, seed_data(exp, 0)[1], exp.params, data)


def val_loss(exp, params, data):
    a = data.agents
    return exp.spec.make_trainer().evaluate(params, a.x_val, a.y_val, a.val_idx)[0]


def test_every_agent_and_twin_starts_from_the_pretrained_base():
    exp = experiment("broker.goods=delta", "broker.merge=ties")
    data, key = seed_data(exp, 0)
    state = market_round.init_jit(exp.spec, key, exp.params, data)
    assert state.base is not None
    for leaf, base in zip(
        jax.tree.leaves(state.twins.params), jax.tree.leaves(state.base), strict=True
    ):
        assert leaf.shape[:2] == (exp.spec.twins, exp.spec.n)
        np.testing.assert_array_equal(leaf, np.broadcast_to(base, leaf.shape))
    # the base learned from its public rows: below a fresh model's loss on them
    trainer = exp.spec.make_base_trainer()
    rows = data.public_rows[None]
    fresh = trainer.init(jax.random.key(3), 1, 0.1).params
    a = data.agents
    stacked = jax.tree.map(lambda v: v[None], state.base)
    assert trainer.evaluate(stacked, a.x_train, a.y_train, rows)[0][0] < (
        0.7 * trainer.evaluate(fresh, a.x_train, a.y_train, rows)[0][0]
    )
    # without pretraining there is no base and no public rows
    plain = build(sc.load("paper_two_agent", [s for s in SMALL if "pretrain" not in s]))
    assert plain.spec.pretrain == 0 and seed_data(plain, 0)[0].public_rows is None


def test_weight_matching_two_fine_tunes_of_one_base_returns_the_identity():
    """With a shared base alignment is unnecessary: fine-tunes stay in the base's basis."""
    exp = experiment("broker.goods=delta", "broker.merge=ties")
    data, key = seed_data(exp, 0)
    state = market_round.init_jit(exp.spec, key, exp.params, data)
    trainer = exp.spec.make_trainer()
    pop = jax.tree.map(lambda v: v[MARKET], state.twins)
    tuned, _ = trainer.train(pop, jax.random.key(5), data.agents, 60)
    a, b = (jax.tree.map(lambda v, i=i: v[i], tuned.params) for i in (0, 1))
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])  # they moved apart
    perms = align(exp.spec.make_model().spec, a, b, jax.random.key(1), max_sweeps=20)
    assert perms
    for g, p in perms.items():
        np.testing.assert_array_equal(p, np.arange(p.shape[0]), err_msg=g)


SETTLES = {
    "delta-dare_ties": ("broker.goods=delta", "broker.merge=dare_ties", "broker.drop=[0.3, 0.6]"),
    "adapter-task_arithmetic": ("broker.goods=adapter", "broker.merge=task_arithmetic"),
    "model-fisher": ("broker.merge=fisher", "broker.alphas=[0.25, 0.5, 0.75]"),
    "delta-ties-layerwise": ("broker.goods=delta", "broker.merge=ties", "broker.fit=layerwise"),
}


@pytest.mark.parametrize("case", sorted(SETTLES))
def test_a_settled_trade_merges_exactly_what_was_scored(case):
    """The buyer's validation loss after settling is the valued merge's (DARE's drops come
    from the round's key, the Fisher and the fitted layer weights travel with the offer)."""
    exp = experiment(*SETTLES[case])
    data, _ = seed_data(exp, 0)
    state, offers, deals, new = trading_round(exp, data)
    bought = np.asarray(deals.bought)
    assert bought.any()
    rows, pick = np.arange(exp.spec.n), np.asarray(deals.pick)
    old = jax.tree.map(lambda v: v[MARKET], state.twins.params)
    before = val_loss(exp, old, data)
    after = val_loss(exp, new.params, data)
    actual = np.asarray((before - after) / before)
    np.testing.assert_allclose(actual[bought], np.asarray(offers.gain)[rows, pick][bought],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    for u, v in zip(jax.tree.leaves(new.params), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(u)[~bought], np.asarray(v)[~bought])
    if exp.spec.goods == "adapter":  # the buyers' own adapters are untouched, shapes kept
        for u, v in zip(jax.tree.leaves(new.params["lora"]), jax.tree.leaves(old["lora"]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(u, v)
        moved = [
            not np.array_equal(np.asarray(u)[bought], np.asarray(v)[bought])
            for u, v in zip(
                jax.tree.leaves(new.params["frozen"]), jax.tree.leaves(old["frozen"]), strict=True
            )  # fmt: skip
        ]
        assert any(moved)
    if exp.spec.second:
        kept = np.asarray(offers.second)[rows, pick][bought]
        assert np.isin(kept, np.float32([0.3, 0.6, 0.2])).all()


def test_the_layerwise_fit_never_raises_the_buyers_validation_loss():
    grid = experiment("broker.goods=delta", "broker.merge=ties")
    fitted = experiment("broker.goods=delta", "broker.merge=ties", "broker.fit=layerwise")
    data, _ = seed_data(grid, 0)
    _, g, _, _ = trading_round(grid, data)
    _, f, _, _ = trading_round(fitted, data)
    mask = np.asarray(g.mask)
    q_grid, q_fit = np.asarray(g.q_new)[mask], np.asarray(f.q_new)[mask]
    # likelihood quality rises as the loss falls: the fit's merges are never worse
    assert (q_fit >= q_grid - 1e-6).all() and (q_fit > q_grid + 1e-6).any()
    w = np.asarray(f.weights)
    assert w.ndim == 3 and not np.allclose(w, w[..., :1])  # per-layer weights, not one alpha


def test_the_valuation_never_reads_test_rows_and_buyers_see_only_their_own_rows():
    """The leakage audit of the data-aware merges (Fisher, the layer-wise fit): no test row
    is read; a buyer's offers read only its own validation rows; a seller's Fisher only
    its own training rows."""
    exp = experiment("broker.merge=fisher", "broker.fit=layerwise")
    data, _ = seed_data(exp, 0)
    _, offers, _, _ = trading_round(exp, data)
    a = data.agents
    blind = data._replace(agents=a._replace(x_test=jnp.full_like(a.x_test, jnp.nan)))
    _, same, _, _ = trading_round(exp, blind)
    for field in ("gain", "alpha", "mask", "weights"):
        np.testing.assert_array_equal(getattr(offers, field), getattr(same, field), field)
    # buyer 0's validation rows kept, every other validation row poisoned
    own = np.zeros(len(a.y_val), bool)
    own[np.asarray(a.val_idx[0])] = True
    x_val = jnp.where(own.reshape(-1, *(1,) * (a.x_val.ndim - 1)), a.x_val, jnp.nan)
    _, other = trading_round(exp, data._replace(agents=a._replace(x_val=x_val)))[:2]
    for field in ("gain", "alpha", "weights"):
        np.testing.assert_array_equal(getattr(offers, field)[0], getattr(other, field)[0])
    # seller 1's training shard kept, every other training row poisoned: its Fisher is the same
    start, size = int(a.train_start[1]), int(a.train_size[1])
    mine = np.zeros(len(a.y_train), bool)
    mine[np.asarray(a.train_rows[start : start + size])] = True
    x_train = jnp.where(mine.reshape(-1, *(1,) * (a.x_train.ndim - 1)), a.x_train, jnp.nan)
    pop = jax.tree.map(lambda v: v[MARKET], market_round.init_jit(
        exp.spec, seed_data(exp, 0)[1], exp.params, data).twins.params)  # fmt: skip
    key = jax.random.key(2)
    clean = trade.fishers(exp.spec, key, pop, data)
    dirty = trade.fishers(exp.spec, key, pop, data._replace(agents=a._replace(x_train=x_train)))
    for u, v in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
        np.testing.assert_array_equal(u[1], v[1])
    # (shards overlap under class_split: some other agent's Fisher did read poisoned rows)
    others = [np.isfinite(np.asarray(v)[[0, 2, 3]]).all() for v in jax.tree.leaves(dirty)]
    assert not all(others)


def test_every_method_of_the_scenario_vocabulary_is_registered():
    assert set(modes.MERGE_METHODS) == set(methods.METHODS)
    assert {m for m in methods.METHODS if methods.METHODS[m].needs_base} == set(modes.BASE_METHODS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["broker.goods=delta"], "needs a shared base: set pretrain.steps > 0"),
        (["broker.merge=ties"], "merges task vectors and needs a shared base"),
        (["pretrain.steps=5", "broker.goods=adapter", "broker.align=true"], "must be 'none'"),
        (["broker.alphas=[1.5]"], "must be numbers in [0, 1] for broker.merge = 'linear'"),
        (["broker.merge=slerp"], "one of linear, task_arithmetic, ties"),
        (["broker.goods=lora"], "one of model, delta, adapter"),
        (["broker.density=[0]"], "(0, 1]"),
        (["broker.drop=[1.0]"], "[0, 1)"),
        (["pretrain.stepz=5"], "pretrain.stepz"),
        (["broker.fit=adamerging"], "one of none, layerwise"),
    ],
)
def test_inconsistent_foundation_keys_are_refused_by_name(overrides, message):
    with pytest.raises(ParamarketError, match=None) as err:
        sc.load("paper_two_agent", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_shared_base_makes_no_alignment_the_default():
    s = sc.load("duopoly_bargaining", ["pretrain.steps=5"])  # the file says align = true
    assert s.broker.align is True
    table = sc.read_table("duopoly_bargaining")
    del table["broker"]["align"]
    table["pretrain"] = {"steps": 5}
    assert sc.from_dict(table).broker.align == "none"


def test_a_bad_rank_is_a_one_line_cli_error(tmp_path, capsys):
    argv = ["run", "foundation_market", "--out", str(tmp_path / "r"), "--quiet",
            "--set", "broker.goods=adapter", "--set", "broker.rank=100000"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "broker.rank" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


TINY = [
    "agents.n=4",
    "model.layers=1",
    "model.heads=2",
    "model.d_model=8",
    "model.d_head=4",
    "model.d_mlp=16",
    "data.num_samples=800",
    "data.num_chains=2",
    "data.length=8",
    "pretrain.steps=20",
    "pretrain.rows=64",
    "train.rounds=4",
    "train.local_steps=5",
    "train.learning_rate=0.01",
    "data.split.eval_size=16",
    "broker.alphas=[0.5, 1.0]",
    "broker.candidates=2",
    "economics.transfer_cost=1e-6",
]


def test_the_foundation_market_runs_ships_task_vectors_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["run", "foundation_market", "--out", str(out), "--quiet", *sets]) == 0
    assert "market_acc" in capsys.readouterr().out
    rounds = pd.read_parquet(out / "rounds.parquet")
    trades = pd.read_parquet(out / "trades.parquet")
    assert len(rounds) == 4 * 4 and invariant_violations(rounds, trades) == []
    assert_decomposition_adds_up(rounds, json.loads((out / "summary.json").read_text()))
    # before trading starts (round 2) the market twin is its siloed twin, from one base
    early = rounds[rounds["round"] < 2]
    np.testing.assert_array_equal(early["accuracy"], early["siloed_accuracy"])
    assert len(trades) > 0
    exp = build(sc.load("foundation_market", TINY))
    shapes = flatten(jax.eval_shape(exp.spec.make_base_model().init, jax.random.key(0)))
    sizes = [int(np.prod(v.shape)) for v in shapes.values()]
    for density, shipped in zip(trades["second"], trades["shipped"], strict=True):
        assert density in (np.float32(0.2), np.float32(0.5))
        assert shipped == sum(min(max(np.ceil(np.float32(density) * n), 1), n) for n in sizes)
        assert shipped < sum(sizes)
    np.testing.assert_allclose(trades["transfer"], 1e-6 * trades["shipped"], rtol=1e-5)
    page = check_report(out / "report.html", min_images=3)
    assert "What the goods shipped" in page and "value / 1M parameters" in page
