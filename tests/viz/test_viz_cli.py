"""``paramarket viz`` without a browser (and without Solara where it is missing): bad input
is one line and exit 2, the missing extra says how to install it, and the live page's
model rebuilds with another knob value without recompiling."""

import socket

import numpy as np
import pytest

from paramarket_jax.cli.main import main
from paramarket_jax.engines.mesa import MarketModel
from paramarket_jax.viz import INSTALL, has_solara, live, panels, replay

SMALL = {"train.rounds": 3, "train.local_steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paramarket: error: "), err
    return lines[0]


def test_unknown_scenario(capsys):
    line = one_error(capsys, ["viz", "no_such_scenario", "--port", str(free_port())])
    assert "no_such_scenario" in line


def test_bad_override(capsys):
    line = one_error(capsys, ["viz", "paper_two_agent", "--set", "train.nope=1"])
    assert "train.nope" in line


def test_empty_folder(capsys, tmp_path):
    line = one_error(capsys, ["viz", str(tmp_path), "--port", str(free_port())])
    assert "no rounds.parquet" in line


def test_foreign_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    line = one_error(capsys, ["viz", str(tmp_path)])
    assert "neither a run folder" in line


def test_set_with_folder(capsys, tmp_path):
    (tmp_path / "rounds.parquet").write_text("x")
    line = one_error(capsys, ["viz", str(tmp_path), "--set", "train.rounds=3"])
    assert "drop --set" in line


def test_bad_port(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["viz", "--port", "70000"])
    assert exit.value.code == 2
    assert "port number 1 to 65535" in capsys.readouterr().err


def test_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_error(capsys, ["viz", "paper_two_agent", "--port", str(port)])
    assert f"port {port}" in line and "in use" in line


def test_without_the_extra(capsys, monkeypatch):
    """Solara missing: one line saying how to install the viz extra, exit 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "solara" else real(name, *a)
    )
    assert not has_solara()
    line = one_error(capsys, ["viz", "paper_two_agent", "--port", str(free_port())])
    assert line == f"paramarket: error: {INSTALL}"
    assert 'pip install "paramarket_jax[viz]"' in line and 'pip install ".[viz]"' in line


@pytest.fixture(scope="module")
def experiment():
    from paramarket_jax.experiment import experiment_of

    return experiment_of("paper_two_agent", SMALL)


def test_knob_rebuild_does_not_recompile(experiment, compiles):
    """A rebuild with another learning rate (what Reset does with the slider's value) runs
    the step already compiled; one jitted step per round."""
    params = live.model_params(experiment)
    assert {"seed", "train.learning_rate", "broker.max_alpha", "broker.min_gain"} <= set(params)
    first = MarketModel(experiment=experiment)
    first.step()
    lr = params["train.learning_rate"]
    again = {"experiment": experiment, "seed": 1, "train.learning_rate": lr["value"] * 2}
    with compiles() as events:
        model = MarketModel(**again)
        model.step()
        model.step()
    assert events == []
    assert model.round == 2
    assert np.allclose(model.params.learning_rate, lr["value"] * 2)
    if has_solara():  # Mesa's own check of the parameters it passes on Reset
        from mesa.visualization.solara_viz import _check_model_params

        _check_model_params(MarketModel.__init__, params)


def test_panels_and_replay(experiment, tmp_path):
    """The live tables, the per-agent table, and a folder of the same tables replayed."""
    model = MarketModel(experiment=experiment)
    assert not panels.figures(*live.tables(model), 2)
    for _ in range(3):
        model.step()
    rounds, trades = live.tables(model)
    assert sorted(rounds["round"].unique()) == [0, 1, 2]
    table = panels.agents(rounds, trades, 2)
    assert list(table.columns) == list(panels.AGENT_COLUMNS)
    assert table["bought"].sum() == table["sold"].sum() == len(trades)
    assert np.allclose(table["cash"], model.accounts.cash[0])
    assert set(panels.figures(rounds, trades, 2)) == set(panels.FIGURES)
    rounds.to_parquet(tmp_path / "rounds.parquet")
    trades.to_parquet(tmp_path / "trades.parquet")
    (tmp_path / "scenario.toml").write_text("")
    r = replay.load(tmp_path)
    assert (r.n, r.seeds, r.total) == (2, (0,), 3)
    one, _ = r.at(0, 1)
    assert list(one["round"].unique()) == [0]
    assert panels.headline(*r.at(0, 3))["welfare"] == pytest.approx(model.welfare)


@pytest.mark.skipif(
    not has_solara(), reason="the tables are read after the check for the viz extra"
)
def test_damaged_folder(capsys, tmp_path):
    (tmp_path / "rounds.parquet").write_text("not parquet")
    line = one_error(capsys, ["viz", str(tmp_path), "--port", str(free_port())])
    assert "rounds.parquet cannot be read" in line
