"""The `paramarket` command: runs write a complete folder; bad input exits 2, writes nothing."""

import json

import pandas as pd
import pytest
from pages import check_report
from shrink import OPEN_MARKET, SMALL
from test_scenario import heavy_modules

from paramarket_jax.cli.main import main
from paramarket_jax.cli.parser import parse_seeds


def test_run_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--seeds", "0,1", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "market_acc" in text and "siloed_acc" in text
    names = {p.name for p in out.iterdir()}
    tables = {"scenario.toml", "rounds.parquet", "trades.parquet", "summary.json"}
    figures = {"welfare.png", "accuracy.png", "accuracy_per_agent.png", "utility_gain.png",
               "prices_volume.png", "trade_matrix.png", "value_scatter.png",
               "who_gained.png"}  # fmt: skip
    assert names == tables | figures | {"report.html"}
    check_report(out / "report.html", min_images=len(figures))
    # --no-report: the tables only (the same compiled call, so this costs no compile)
    assert main(["run", "--out", str(tmp_path / "bare"), "--no-report", "--check", "--seeds",
                 "0,1", *SMALL]) == 0  # fmt: skip
    assert {p.name for p in (tmp_path / "bare").iterdir()} == tables
    capsys.readouterr()
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert set(rounds["seed"]) == {0, 1} and len(rounds) == 2 * 2 * 2
    assert {"seed", "round", "agent", "loss", "accuracy", "siloed_loss", "siloed_accuracy"} <= set(
        rounds.columns
    )
    trades = pd.read_parquet(out / "trades.parquet")
    assert {
        "seed",
        "round",
        "buyer",
        "seller",
        "alpha",
        "predicted_gain",
        "realized_gain",
        "price",
    } <= set(trades.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["agents"]) == 2
    assert summary["trade_count"] == len(trades)
    assert "train.rounds" not in (out / "scenario.toml").read_text()
    assert "rounds = 2" in (out / "scenario.toml").read_text()


def test_scenarios_lists_every_bundled_scenario(capsys):
    assert main(["scenarios"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "duopoly_bargaining",
        "foundation_market",
        "license_auction",
        "many_agents_assignment",
        "open_market",
        "paper_mnist1d",
        "paper_no_alignment",
        "paper_two_agent",
        "rival_market",
        "transformer_arithmetic",
        "vit_digits",
    ]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["no_such_scenario"], "bundled scenarios are"),
        (["--set", "agents.n=0"], "'agents.n' must be an integer >= 2"),
        (["--set", "data.dataset=imagenet"], "must be one of arithmetic, cifar10"),
        (["--set", "data.split.d=2"], "'d'"),
        (["--set", "mechanism.name=dutch"], "'mechanism.name' must be one of"),
        (["--set", "data.dataset=mnist", "--set", "data.path=/no/such/dir"], "/no/such/dir"),
        (["--set", "data.dataset=cifar10"], "'path'"),
        (["--set", "model.widths"], "key=value"),
        (["--seeds", "a,b"], "--seeds"),
        (["--set", "broker.align=refrence"], "one of none, pairwise, reference"),
        (
            ["--set", "train.learning_rate=1e6", "--seeds", "0,1", *SMALL],
            "diverged",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary leftovers either


def test_an_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert main(["run", "--out", str(out), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "earlier results"


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("5,7") == [5, 7]


def test_sweep_runs_every_cell_once_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "duopoly_bargaining", "--grid", "mechanism.beta=0,1", "--seeds", "0",
            "--out", str(out), *[a for a in SMALL if a != "--quiet"]]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.err.count("ran ") == 2
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["mechanism.beta"]) == [0, 1] and set(table["seed"]) == {0}
    assert {"welfare", "siloed_welfare", "mutual_gain", "utility_0", "siloed_utility_1"} <= set(
        table.columns
    )
    (out / "mechanism.beta=1" / "summary.json").unlink()  # as if interrupted in that cell
    for p in (out / "mechanism.beta=1").iterdir():
        p.unlink()
    (out / "mechanism.beta=1").rmdir()
    assert main(argv) == 0
    second = capsys.readouterr().err
    assert "kept mechanism.beta=0" in second and "ran  mechanism.beta=1" in second
    assert len(pd.read_parquet(out / "sweep.parquet")) == 2
    # the same folder with another setting: finished cells are not "kept" as if they fit
    before = (out / "mechanism.beta=0" / "summary.json").read_text()
    changed = [*argv, "--set", "economics.gamma=3"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "differs in economics.gamma" in err and "--force" in err and "kept" not in err
    assert (out / "mechanism.beta=0" / "summary.json").read_text() == before
    assert main([*changed, "--force"]) == 0
    assert capsys.readouterr().err.count("ran ") == 2
    assert "gamma = 3" in (out / "mechanism.beta=0" / "scenario.toml").read_text()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # the sweep's report and figures; cells hold tables only
    assert json.loads((out / "sweep.json").read_text())["grid"] == [["mechanism.beta", [0, 1]]]
    check_report(out / "report.html", min_images=2)
    assert not list(out.glob("*/*.png")) and not list(out.glob("*/report.html"))


def test_sweep_rejects_a_bad_cell_before_running(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "duopoly_bargaining", "--grid", "mechanism.beta=0.5,2", "--out",
                 str(out)])  # fmt: skip
    assert code == 2 and "'mechanism.beta' must be a number in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_run_creates_missing_parent_folders(tmp_path, capsys):
    out = tmp_path / "results" / "deep" / "run"
    assert main(["run", "--out", str(out), "--seeds", "0,1", *SMALL]) == 0
    assert (out / "summary.json").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--out", str(blocker / "run"), *SMALL]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.fixture
def calls(monkeypatch):
    """Runs per call of the batch path's whole-run program, in the order of the calls."""
    from paramarket_jax.engines import batch

    seen = []
    real = batch.simulate_runs

    def counting(*args):
        seen.append(args[5].shape[0])  # keys: one per run
        return real(*args)

    monkeypatch.setattr(batch, "simulate_runs", counting)
    return seen


def test_run_goes_through_one_compiled_call_for_every_seed(tmp_path, capsys, calls):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--seeds", "0-1", *SMALL]) == 0
    assert calls == [2]
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert sorted(rounds["seed"].unique()) == [0, 1]


def test_the_progress_bar_says_when_the_runs_take_several_calls(tmp_path, capsys, calls,
                                                               monkeypatch):  # fmt: skip
    """Runs held to fewer per call (by --batch, or by the memory budget) go through several
    compiled calls of one shape, and the progress bar says how they are split."""
    from paramarket_jax.engines import batch

    loud = [x for x in SMALL if x != "--quiet"]
    argv = ["run", "--seeds", "0-1", "--no-report", *loud]
    assert main([*argv, "--out", str(tmp_path / "a"), "--batch", "1"]) == 0
    assert "runs split into 2 calls of 1 (--batch 1)" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "c"), "--batch", "2"]) == 0
    assert "runs split" not in capsys.readouterr().err  # one call: nothing to say
    monkeypatch.setattr(batch, "memory_budget", lambda: 1)  # one run fits at a time
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "runs split into 2 calls of 1 (memory budget)" in capsys.readouterr().err
    assert calls == [1, 1, 2, 1, 1]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "rounds.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "rounds.parquet"))  # fmt: skip


def test_a_market_with_entry_runs_through_the_batch_engine(tmp_path, capsys, calls):
    """Entry is part of the pure round: open_market (agents.entry) runs through the batch
    engine, auto's choice too, every seed in one compiled call, the invariants checked."""
    sets = [x for o in OPEN_MARKET for x in ("--set", o)]
    for engine, out in (("batch", tmp_path / "batch"), ("auto", tmp_path / "auto")):
        argv = ["run", "open_market", "--out", str(out), "--engine", engine, "--seeds", "0,1",
                "--no-report", "--check", "--quiet", *sets]  # fmt: skip
        assert main(argv) == 0
    assert calls == [2, 2]
    rounds = pd.read_parquet(tmp_path / "batch" / "rounds.parquet")
    entries = rounds[rounds["entered"]].groupby("seed").size()
    assert entries.index.tolist() == [0, 1] and (entries >= 2).all()
    assert not rounds[rounds["round"] == 0]["alive"].all()  # and agents left
    pd.testing.assert_frame_equal(rounds, pd.read_parquet(tmp_path / "auto" / "rounds.parquet"))


def test_mesa_engine_writes_the_same_tables(tmp_path, capsys):
    a, b = tmp_path / "batch", tmp_path / "mesa"
    assert main(["run", "--out", str(a), "--seeds", "0,1", *SMALL]) == 0
    assert main(["run", "--out", str(b), "--seeds", "0,1", "--engine", "mesa", *SMALL]) == 0
    for name in ("rounds.parquet", "trades.parquet"):
        x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
        assert list(x.columns) == list(y.columns) and len(x) == len(y)
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=2e-5, atol=2e-6)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--out", str(tmp_path / "c"), "--engine", "gpu", *SMALL])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "--engine" in err
    assert "batch" in err and "mesa" in err and not (tmp_path / "c").exists()


def test_cell_names_never_collide():
    from paramarket_jax.sweep import cell_name

    names = {cell_name({"data.path": p}) for p in ("a/b", "ab", "a b", "a\\b")}
    assert len(names) == 4
    assert cell_name({"mechanism.beta": 0.5}) == "mechanism.beta=0.5"  # clean names stay


def test_sweep_checks_every_cell_before_running_any(tmp_path, capsys):
    """A mechanism option that only the mechanism itself rejects, in the middle of a grid:
    nothing runs and nothing is written."""
    out = tmp_path / "sweep"
    argv = ["sweep", "license_auction", "--grid", "mechanism.name=k_vickrey", "--grid",
            "mechanism.k=1,0,2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "option k must be an integer" in err and "got 0" in err and "ran" not in err
    assert not out.exists()


def test_an_interrupt_says_what_it_kept(tmp_path, capsys, monkeypatch):
    import paramarket_jax.runs
    import paramarket_jax.sweep

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paramarket_jax.sweep, "run_sweep", stop)
    out = tmp_path / "sweep"
    argv = ["sweep", "duopoly_bargaining", "--grid", "mechanism.beta=0,1", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 130
    assert "no cell had finished" in capsys.readouterr().err
    (out / "mechanism.beta=0").mkdir(parents=True)
    (out / "mechanism.beta=0" / "summary.json").write_text("{}")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "1 finished cell(s) are kept" in err and "nothing was written" not in err
    monkeypatch.setattr(paramarket_jax.runs, "run_scenario", stop)
    assert main(["run", "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bad_sweep_prints_its_error_and_nothing_else(tmp_path, capsys):
    """No progress bar before the check (without --quiet): the error is the only line."""
    out = tmp_path / "sweep"
    assert main(["sweep", "paper_two_agent", "--grid", "data.split.d=0.1,0,0.2", "--out",
                 str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("paramarket: error:") and "\r" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["--help"], 0, "usage: paramarket"),
        (["scenarios"], 0, "paper_two_agent"),
        (["run", "--set", "no.such=1"], 2, "unknown scenario key 'no'"),
        (["run", "--set", "agents.n=0"], 2, "'agents.n' must be an integer >= 2"),
        (["sweep", "paper_two_agent", "--grid", "agents.nn=2,3", "--out", "x"], 2, "'agents.nn'"),
    ],
)
def test_fast_commands_import_no_jax(argv, code, needle, tmp_path):
    """``--help``, ``scenarios`` and a bad scenario key answer in a fresh interpreter without
    importing JAX (or pandas, matplotlib, orbax): modules counted, not time."""
    probe = f"""
import contextlib, io, os
from paramarket_jax.cli.main import main
os.chdir({str(tmp_path)!r})
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main({argv!r})
    except SystemExit as exit_:
        code = exit_.code
assert code == {code!r} and {needle!r} in out.getvalue() + err.getvalue(), (code, err.getvalue())
"""
    assert heavy_modules(probe) == []
    assert not (tmp_path / "x").exists()
