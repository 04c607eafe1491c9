"""The bundled transformer scenarios run the whole market at small shapes: trades, twins,
the report, checkpoints, and the flat-heads ablation."""

import json

import numpy as np
import pandas as pd
import pytest
from pages import check_report
from welfare import assert_decomposition_adds_up

from paramarket_jax.cli.main import main
from paramarket_jax.results.tables import invariant_violations

TINY = [
    "model.layers=1",
    "model.heads=2",
    "model.d_model=8",
    "model.d_head=4",
    "model.d_mlp=8",
    "train.rounds=3",
    "train.local_steps=3",
    "trading.start=1",
    "data.split.eval_size=16",
    "broker.max_sweeps=3",
    "broker.alphas=[0.3, 0.7]",
    "train.learning_rate=0.01",
]
DATA = {"transformer_arithmetic": ["data.modulus=7"], "vit_digits": []}


def argv(name, out, *extra):
    sets = [a for s in (*TINY, *DATA[name], *extra) for a in ("--set", s)]
    return ["run", name, "--out", str(out), "--quiet", *sets]


def tables(folder):
    return (
        pd.read_parquet(folder / "rounds.parquet"),
        pd.read_parquet(folder / "trades.parquet"),
        json.loads((folder / "summary.json").read_text()),
    )


@pytest.mark.parametrize("name", sorted(DATA))
def test_transformer_scenario_runs_the_market(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(name, out)) == 0
    assert "market_acc" in capsys.readouterr().out
    rounds, trades, summary = tables(out)
    assert len(rounds) == 3 * 4 and len(summary["agents"]) == 4
    for column in ("accuracy", "siloed_accuracy"):
        assert rounds[column].between(0, 1).all()
    assert np.isfinite(rounds["loss"]).all() and np.isfinite(rounds["siloed_loss"]).all()
    assert len(trades) > 0 and np.isin(trades["alpha"], np.float32([0.3, 0.7])).all()
    assert (trades["buyer"] != trades["seller"]).all()
    assert invariant_violations(rounds, trades) == []
    assert_decomposition_adds_up(rounds, summary)
    check_report(out / "report.html", min_images=3)
    # same seed, same numbers (the compiled program is reused: no second compile)
    again = tmp_path / "again"
    assert main(argv(name, again, "broker.heads=grouped") + ["--no-report"]) == 0
    for a, b in zip(tables(out)[:2], tables(again)[:2], strict=True):
        assert a.equals(b)


def test_a_checkpointed_transformer_run_equals_the_plain_one(tmp_path, capsys):
    """Checkpointed every round (the chunk program chained three times) equals the plain
    run bit for bit. (That flat heads are not function-preserving is tested at the
    matching level: tests/broker/test_heads.py.)"""
    plain, chunked = tmp_path / "plain", tmp_path / "chunked"
    name = "transformer_arithmetic"
    assert main(argv(name, plain) + ["--no-report"]) == 0
    assert main(argv(name, chunked) + ["--no-report", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    for a, b in zip(tables(plain)[:2], tables(chunked)[:2], strict=True):
        assert a.equals(b)
    assert len(tables(plain)[1]) > 0


def test_a_markov_run_reports_each_agents_loss_floor(tmp_path, capsys):
    """One Markov language per agent (the groups partitioner, eval_mix shard): each agent's
    loss floor is its own chain's exact entropy rate."""
    import jax

    from paramarket_jax.data import markov_entropy_rates

    out = tmp_path / "markov"
    options = ["data.dataset=markov", "data.num_chains=4", "data.length=8", "data.num_samples=800"]
    sets = [a for s in (*TINY, *options, "data.split.eval_mix=shard") for a in ("--set", s)]
    argv_ = ["run", "transformer_arithmetic", "--out", str(out), "--quiet", "--no-report", *sets]
    assert main(argv_) == 0
    assert "floor" in capsys.readouterr().out
    rounds, _, summary = tables(out)
    key = jax.random.split(jax.random.key(0), 3)[0]  # data.seed 0's dataset key
    rates = markov_entropy_rates(key, num_chains=4, length=8, num_samples=800)
    floors = rounds.groupby("agent")["loss_floor"].agg(["min", "max"])
    np.testing.assert_allclose(floors["min"], rates, rtol=1e-6)
    np.testing.assert_allclose(floors["max"], rates, rtol=1e-6)
    assert [a["loss_floor"] for a in summary["agents"]] == pytest.approx(list(rates))
    assert all(a["market_loss"] > 0 for a in summary["agents"])
