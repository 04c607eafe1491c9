"""A diverging agent is contained: frozen at its last finite model, out of trading, while
every other agent and every other seed runs on unchanged; only a market whose every agent
diverged fails the run. Every run here shares one spec (numeric knobs differ): one
compilation of the scanned round, one of the stepped round. test_hostile runs this
market too (BASE), so the scanned round compiles once for both modules."""

import json

import jax
import numpy as np
import pandas as pd
import pytest
from shrink import SHRINK

from paramarket_jax import scenario as sc
from paramarket_jax.cli.main import main
from paramarket_jax.engines.mesa import MarketModel
from paramarket_jax.experiment import build
from paramarket_jax.market.types import MARKET
from paramarket_jax.runs import run_scenario

BASE = [
    *SHRINK,
    "agents.n=3",
    "train.rounds=4",
    "trading.start=1",
    "seeds=[0, 1]",
    "baselines.fedavg=true",
    "baselines.centralized=false",
]
# agent 2's SGD blows up in its first round (round 0, before trading starts at round 1)
BAD = "train.learning_rate=[0.05, 0.05, 1e4]"
# what the agents who never diverge see
OTHERS = [
    "loss", "accuracy", "val_accuracy", "siloed_loss", "siloed_accuracy", "fedavg_accuracy",
    "trades", "revenue", "cost", "payment", "receipt", "fees", "cash", "utility",
    "siloed_revenue", "siloed_cash", "siloed_utility", "alive", "diverged",
]  # fmt: skip


def _argv(out, *overrides):
    sets = [a for o in [*BASE, *overrides] for a in ("--set", o)]
    return ["run", "paper_two_agent", "--out", str(out), "--quiet", "--no-report", *sets]


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
    """The run with agent 2 diverging, through the CLI: exit code and what it wrote."""
    out = tmp_path_factory.mktemp("div") / "run"
    code = main(_argv(out, BAD))
    if code != 0:
        return code, None, None, None
    rounds = pd.read_parquet(out / "rounds.parquet")
    trades = pd.read_parquet(out / "trades.parquet")
    return code, rounds, trades, json.loads((out / "summary.json").read_text())


def test_a_diverging_agent_is_frozen_and_never_trades_and_the_run_completes(diverging):
    code, rounds, trades, summary = diverging
    assert code == 0
    bad, good = rounds[rounds["agent"] == 2], rounds[rounds["agent"] != 2]
    # diverged in round 0 in both seeds and both its twins; nobody else did
    assert bad["diverged"].all() and bad["siloed_diverged"].all()
    assert not good["diverged"].any() and not good["siloed_diverged"].any()
    assert rounds["alive"].all()  # diverged is not dead: it stays in the market
    # frozen at its last finite model: finite, and the same every round
    for _, df in bad.groupby("seed"):
        assert np.isfinite(df["loss"]).all() and df["loss"].nunique() == 1
        assert df["accuracy"].nunique() == 1 and (df["trades"] == 0).all()
    # it earns with its frozen model (independent revenue) ...
    assert (bad["revenue"] > 0).all()
    # ... while the others trade on without it
    assert len(trades) > 0 and 2 not in set(trades["buyer"]) | set(trades["seller"])
    assert np.isfinite(rounds[["loss", "siloed_loss", "fedavg_accuracy", "cash"]]).all().all()
    for seed in ("0", "1"):
        assert summary["per_seed"][seed]["diverged"] == 1
        assert summary["per_seed"][seed]["diverged_agents"] == [2]
    assert summary["diverged"] == 1.0
    assert [a["diverged"] for a in summary["agents"]] == [0, 0, 2]


def test_the_others_run_as_if_the_diverged_agent_were_never_in_the_market(diverging):
    """Agent 2 diverges in round 0, before any trade; the same market with agent 2 dead
    from the start (``agents.initial=2``) gives agents 0 and 1 exactly the same numbers.

    The streams line up: every agent's initialisation and training keys are folded from its
    index (independent of the others), the candidate lists and alignment keys depend only
    on N, and a diverged agent is restored to its parameters from before the round, here
    its fresh initialisation, which is also what the dead slot holds. FedAvg gives both
    zero weight, and revenue is independent, so nothing of agent 2 reaches the others. The
    one difference, agent 2 itself, earns in the first run (diverged is not dead) and is
    not in the market in the second."""
    _, rounds, trades, _ = diverging
    dead = run_scenario(sc.load("paper_two_agent", [*BASE, BAD, "agents.initial=2"]))
    assert not dead.rounds["diverged"].any()  # a dead slot never trains, never diverges
    mine, theirs = (r[r["agent"] != 2].reset_index(drop=True) for r in (rounds, dead.rounds))
    for col in OTHERS:
        np.testing.assert_array_equal(mine[col], theirs[col], err_msg=col)
    pd.testing.assert_frame_equal(trades, dead.trades)
    # agent 2 holds the same (fresh) model in both: only its accounts differ
    np.testing.assert_array_equal(
        rounds[rounds["agent"] == 2]["loss"], dead.rounds[dead.rounds["agent"] == 2]["loss"]
    )


def test_a_finite_explosion_is_caught_by_the_loss_ratio(compiles):
    """At learning rate 100 agent 2's loss explodes but stays finite: with the ratio test
    out of reach (diverge_loss 1e30) it keeps training and trading, with a huge loss; with
    diverge_loss 1.5 it is frozen in round 0, in both seeds."""
    explode = "train.learning_rate=[0.05, 0.05, 100]"
    a = run_scenario(sc.load("paper_two_agent", [*BASE, explode, "train.diverge_loss=1e30"]))
    with compiles() as events:
        b = run_scenario(sc.load("paper_two_agent", [*BASE, explode, "train.diverge_loss=1.5"]))
    assert events == []  # diverge_loss is a traced knob: the same compiled call for both
    loss = a.rounds[a.rounds["agent"] == 2]["loss"]
    assert np.isfinite(loss).all() and loss.max() > 50 and not a.rounds["diverged"].any()
    # round 0 trained the same in both: only the ratio can have caught it
    frozen = b.rounds[b.rounds["agent"] == 2]
    assert frozen["diverged"].all() and not b.rounds[b.rounds["agent"] != 2]["diverged"].any()
    assert (frozen.groupby("seed")["loss"].nunique() == 1).all() and frozen["loss"].max() < 3
    assert 2 not in set(b.trades["buyer"]) | set(b.trades["seller"])


def test_every_agent_diverging_fails_the_run_with_the_usual_message(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, "train.learning_rate=1e4")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "every agent's training diverged (loss not finite, or above train.diverge_loss times "
        "its initial loss) by round 0, seed 0; lower train.learning_rate (now 10000.0)"
    ), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_mesa_view_freezes_and_counts_the_diverged_agent(diverging):
    """The stepped round (Mesa view) gives the batch path's tables; the diverged agent's
    parameters stay finite and are its fresh ones, in every twin; the reporters count it."""
    _, rounds, _, _ = diverging
    exp = build(sc.load("paper_two_agent", [*BASE, BAD]))
    market = MarketModel(exp, 1)
    fresh = jax.tree.map(np.asarray, market.state.twins.params)
    market.run()
    params = jax.tree.map(np.asarray, market.state.twins.params)
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(u[:, 2], v[:, 2])  # frozen at its fresh model
        assert not np.array_equal(u[:, 0], v[:, 0])  # the others trained
    assert bool(market.state.diverged[MARKET, 2]) and market.traders[2].diverged
    assert not market.traders[0].diverged
    df = market.datacollector.get_model_vars_dataframe()
    assert df["diverged"].tolist() == [0, 1, 1, 1, 1]
    seed1 = rounds[rounds["seed"] == 1]
    np.testing.assert_array_equal(
        np.asarray(market.records().diverged)[:, MARKET].ravel(), seed1["diverged"]
    )
    np.testing.assert_allclose(
        np.asarray(market.records().test_loss)[:, MARKET].ravel(), seed1["loss"], rtol=2e-5
    )
