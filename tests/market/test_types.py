"""The market's types: every leaf declares its axes once, and market/ reads like gymnax."""

import ast
import pathlib

import jax
import numpy as np
import pytest

from paramarket_jax import scenario as sc
from paramarket_jax.experiment import build, experiment_of, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import sharding
from paramarket_jax.market.types import (
    DATA_AXES,
    PARAM_AXES,
    STATE_AXES,
    Axes,
    Trades,
    over_axes,
)

MARKET_DIR = pathlib.Path(market_round.__file__).parent


@pytest.fixture(scope="module")
def experiment():
    # hostile "stale" keeps initial_params in the state; centralized adds its population
    s = sc.load(
        "paper_two_agent",
        ["agents.n=3", "agents.hostile=[2]", "agents.hostile_kind=stale",
         "baselines.centralized=true", "model.widths=[8]"],
    )  # fmt: skip
    return build(s)


def _declared(axes, tree):
    """Every leaf of ``tree`` with its declared Axes (raises on an undeclared leaf)."""
    pairs = []
    over_axes(lambda a, leaf: pairs.append((a, leaf)), axes, tree)
    return pairs


def test_every_params_and_data_leaf_declares_its_axes(experiment):
    """One declared Axes per leaf (no label covers a subtree), agent axes of length N."""
    n = experiment.spec.n
    data, _ = seed_data(experiment, 0)
    # without a shared base there are no public rows (None); with one, they are declared
    assert data.public_rows is None
    based, _ = seed_data(experiment_of(experiment, {"pretrain.steps": 1}), 0)
    assert based.public_rows.shape == (min(256, len(data.agents.y_train)),)
    plain = DATA_AXES._replace(public_rows=None)
    for axes, tree in ((PARAM_AXES, experiment.params), (plain, data), (DATA_AXES, based)):
        assert jax.tree.structure(axes) == jax.tree.structure(tree)
        for a, leaf in _declared(axes, tree):
            assert isinstance(a, Axes)
            if a.agent is not None:
                assert np.shape(leaf)[a.agent] == n, (a, np.shape(leaf))


def test_every_state_leaf_declares_its_axes(experiment):
    spec = experiment.spec
    init = lambda k, p: market_round.init(spec, k, p)  # noqa: E731
    state = jax.eval_shape(init, jax.random.key(0), experiment.params)
    assert state.initial_params is not None and state.central is not None
    for a, leaf in _declared(STATE_AXES, state):
        if a.agent is not None:
            assert leaf.shape[a.agent] == experiment.spec.n


def test_an_undeclared_leaf_fails(experiment):
    params = experiment.params
    with pytest.raises(ValueError, match="declared"):
        _declared(PARAM_AXES, params._replace(knobs=(*params.knobs, params.alphas)))
    with pytest.raises(ValueError, match="declared"):
        _declared(DATA_AXES, (params, params))
    # a new leaf under a declared one changes the structure the first test compares
    grown = params._replace(alphas={"new": params.alphas, "x": params.alphas})
    assert jax.tree.structure(PARAM_AXES) != jax.tree.structure(grown)


def test_padding_follows_the_declaration(experiment):
    padded = sharding.pad_params(experiment.params, 2)
    for a, leaf in _declared(PARAM_AXES, padded):
        if a.agent is None:
            continue
        leaf = np.asarray(leaf)
        assert leaf.shape[0] == experiment.spec.n + 2
        if leaf.dtype == bool:  # a padded agent: never alive, in no role, not hostile
            assert not leaf[-2:].any()
    data, _ = seed_data(experiment, 0)
    for a, leaf in _declared(DATA_AXES, sharding.pad_data(data, 2)):
        expected = experiment.spec.n + 2 if a.agent is not None else None
        if expected is not None:
            assert np.shape(leaf)[0] == expected


def test_trades_empty_is_no_trade():
    t = jax.device_get(Trades.empty(4))
    assert not t.mask.any() and not t.hostile.any()
    np.testing.assert_array_equal(t.seller, [-1] * 4)
    for name in Trades._fields:
        assert np.shape(getattr(t, name)) == (4,)
        if name not in ("mask", "seller", "hostile"):
            np.testing.assert_array_equal(getattr(t, name), 0.0)


ORDER = ("spec", "key", "state", "params", "data")


def _functions():
    for path in sorted(MARKET_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                yield path.name, node


def test_market_functions_are_short_and_take_one_argument_order():
    """No function of market/ over 60 lines; where a function takes some of the spec, a
    key, the state, the knobs and the data, it takes them in that order (gymnax's)."""
    for name, fn in _functions():
        assert fn.end_lineno - fn.lineno + 1 <= 60, f"{name}:{fn.name} is over 60 lines"
        args = [a.arg for a in fn.args.args]
        keyish = ["key" if a in ("key", "keys", "k_rounds") else a for a in args]
        seen = [a for a in keyish if a in ORDER]
        assert seen == sorted(seen, key=ORDER.index), f"{name}:{fn.name}({', '.join(args)})"
