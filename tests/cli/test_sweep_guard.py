"""Sweeps that refuse what they cannot do well: repeated values and keys, grid values that
no table or folder name can hold, weak messages, and files the tool did not write.

Most cases compile nothing: the ``fake`` fixture replaces the sweep's compute with made-up
tables (and makes any compile fail), so they test parsing and files only. One tiny real
sweep (``real``, module-scoped) is shared by the cases that need the tool's own tables,
report and figures.
"""

import hashlib
import json
import os
import shutil
import types

import pandas as pd
import pytest
from oneline import call, check_one_line
from shrink import SMALL

from paramarket_jax import scenario as sc
from paramarket_jax.errors import ParamarketError

STEP = "economics.step_cost"


def snapshot(folder) -> dict:
    """Every path under ``folder``: its bytes (files), its target (links), None (folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            out[key] = None
    return out


class FakeResult:
    """What a cell's run returns, made up: tables and a summary of the tool's own shape."""

    def __init__(self, scenario):
        self.scenario = scenario

    def files(self, report=False):
        assert not report
        per_seed = {
            str(seed): {
                "market_accuracy": [0.5, 0.6],
                "siloed_accuracy": [0.4, 0.5],
                "utility": [1.0, 2.0],
                "siloed_utility": [0.5, 1.0],
                "welfare": 3.0,
            }
            for seed in self.scenario.seeds
        }
        return {
            "scenario.toml": sc.dumps(self.scenario),
            "rounds.parquet": pd.DataFrame({"seed": [0], "round": [0]}),
            "trades.parquet": pd.DataFrame({"seed": [0]}),
            "summary.json": {"per_seed": per_seed},
        }


@pytest.fixture
def fake(monkeypatch):
    """The sweep runs without compute (its groups and runs made up); nothing may compile.
    Returns the names of the cells it ran, in order."""
    from paramarket_jax import sweep
    from paramarket_jax.engines import batch
    from paramarket_jax.engines import mesa as model

    def reached(*args, **kwargs):
        raise AssertionError("a sweep check reached the compute step")

    monkeypatch.setattr(batch, "simulate_runs", reached)
    monkeypatch.setattr(model.MarketModel, "run", reached)
    ran = []

    def groups(scenarios):
        if scenarios:
            yield [(i, types.SimpleNamespace(scenario=s)) for i, s in enumerate(scenarios)]

    def run_group(root, names, cells, options, tick, note=None):
        ran.extend(names)
        return [FakeResult(c.scenario) for c in cells], None

    monkeypatch.setattr(sweep, "groups", groups)
    monkeypatch.setattr(sweep, "run_group", run_group)
    return ran


def fake_argv(out, *grid, extra=()):
    """A sweep command (``--no-report`` unless ``extra`` holds the made-up ``--report``)."""
    grid = grid or (f"{STEP}=0,0.5",)
    report = "--report" in extra
    argv = ["sweep", "paper_two_agent", "--seeds", "0", "--quiet", "--out", str(out)]
    for g in grid:
        argv += ["--grid", g]
    return [*argv, *([] if report else ["--no-report"]), *(a for a in extra if a != "--report")]


CELLS = [f"{STEP}=0", f"{STEP}=0.5"]
# how a figure drawn by matplotlib begins (its signature, then its Software chunk)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00:tEXtSoftware\x00Matplotlib"


# ---- grids: every problem is one line naming the real one, before anything is written ----


@pytest.mark.parametrize(
    "grid, needle",
    [
        (f"{STEP}=,0.001", "value 1 is empty"),
        (f"{STEP}=0.001,", "value 2 is empty"),
        (f"{STEP}=0.001,,0.002", "value 2 is empty"),
        (f"{STEP}= , 0.001", "value 1 is empty"),
        (f"{STEP}=   ", "names no values"),
        (f"{STEP}=", "names no values"),
        ("=1", "names no key"),
        (" =0.1,0.2", "names no key"),
        ("economics..step_cost=1", "bad key 'economics..step_cost'"),
        ("economics.=1", "bad key 'economics.'"),
        ("train.learning_rate=[0.01,0.02", "value 1 '[0.01,0.02' has an unclosed '['"),
        ("train.learning_rate=0.01,[0.02", "value 2 '[0.02' has an unclosed '['"),
        ("train.learning_rate=0.01]", "value 1 '0.01]' has a ']' that closes nothing"),
        ("model.widths=[8}", "has a '}' that closes nothing"),
        ('description="abc,d', 'has an unclosed " quote'),
        ("model.widths=[a,b]", "value 1 '[a,b]' is not a valid value"),
        ("description=[1979-05-27]", "holds a TOML date or time"),
        # what TOML would read past: a comment sign or a line break is part of the word
        (f"{STEP}=1 # 2", "'economics.step_cost' must be a number >= 0, got '1 # 2'"),
        (f"{STEP}=0.1\nx = 1", "must be a number >= 0, got '0.1\\nx = 1'"),
        # the value at fault is the one named, not its neighbour
        (f"{STEP}=0.1,abc", "got 'abc'"),
        (f"{STEP}=inf", "must be a number >= 0, got inf"),
    ],
)
def test_grid_values_name_the_real_problem(grid, needle, tmp_path, capsys, fake):
    code = call(fake_argv(tmp_path / "sweep", grid))
    check_one_line(code, capsys.readouterr(), needle, tmp_path)
    assert fake == []


@pytest.mark.parametrize(
    "grids, needle",
    [
        ([f"{STEP}=0.001,0.001"], "'0.001' and '0.001' (values 1 and 2) are the same value"),
        ([f"{STEP}=0.001,1e-3"], "'0.001' and '1e-3' (values 1 and 2) are the same value"),
        ([f"{STEP}=0.5,0.2,5e-1"], "'0.5' and '5e-1' (values 1 and 3)"),
        (["baselines.siloed=true,true"], "'true' and 'true'"),
        (["model.widths=[8],[8]"], "'[8]' and '[8]'"),
        (["model.widths=[8, 4],[8,4]"], "'[8, 4]' and '[8,4]'"),
        (['description=a,"a"'], "'a' and '\"a\"'"),
        # equal once the scenario reads them: an integer for a number key, one value for
        # every agent against a list of it
        ([f"{STEP}=0,0.0"], f"--grid {STEP}: 0 and 0.0 give the same cell"),
        (["mechanism.beta=1,0.5,1.0"], "--grid mechanism.beta: 1 and 1.0 give the same cell"),
        (["train.learning_rate=0.05,[0.05]"], "0.05 and [0.05] give the same cell"),
        (["train.learning_rate=0.05,[0.05,0.05]"], "0.05 and [0.05, 0.05] give the same cell"),
        (["strategies.shade=[0.2],0.2"], "[0.2] and 0.2 give the same cell"),
        # the same in a product of two keys
        (["mechanism.beta=0.5", f"{STEP}=0,0.0"], "0 and 0.0 give the same cell"),
    ],
)
def test_repeated_values_are_one_line_before_anything_runs(grids, needle, tmp_path, capsys, fake):
    code = call(fake_argv(tmp_path / "sweep", *grids))
    captured = capsys.readouterr()
    check_one_line(code, captured, needle, tmp_path)
    assert "give each value once" in captured.err
    assert fake == []


@pytest.mark.parametrize(
    "grids, extra, needle",
    [
        ([f"{STEP}=0", f"{STEP}=0.5"], (), f"--grid {STEP} is given twice"),
        ([f"{STEP}=0,1", "mechanism.beta=0", f"{STEP}=2"], (), "given twice"),
        (['data.split={name="iid"}', "data.split.d=0.1"], (), "overlap"),
        (["data.split.d=0.1", 'data.split={name="iid"}'], (), "overlap"),
        ([f"{STEP}=0,1"], ("--set", f"{STEP}=0.2"), f"--set {STEP} is swept by --grid {STEP}"),
        (['data.split={name="iid"}'], ("--set", "data.split.d=0.2"), "swept by --grid data.split"),
        (["seeds=[0],[1]"], (), "--seeds and --grid seeds=... both set the seeds"),
    ],
)
def test_a_key_given_twice_is_one_line(grids, extra, needle, tmp_path, capsys, fake):
    code = call(fake_argv(tmp_path / "sweep", *grids, extra=extra))
    check_one_line(code, capsys.readouterr(), needle, tmp_path)
    assert fake == []


def test_the_library_refuses_a_key_twice_too(tmp_path, fake):
    from paramarket_jax.sweep import run_sweep

    with pytest.raises(ParamarketError, match="given twice"):
        run_sweep("paper_two_agent", [(STEP, [0]), (STEP, [1])], [], tmp_path / "s")
    with pytest.raises(ParamarketError, match="has no values"):
        run_sweep("paper_two_agent", [(STEP, [])], [], tmp_path / "s")
    assert list(tmp_path.iterdir()) == [] and fake == []


def test_grid_values_are_read_as_toml_and_reach_the_cell_unchanged():
    from paramarket_jax.sweep import parse_grid, plan

    assert parse_grid('mechanism.name=first_price,"second_price"')[1] == [
        "first_price",
        "second_price",
    ]
    assert parse_grid('description="a, b",c')[1] == ["a, b", "c"]
    assert parse_grid("x=[1,2],[3],{a=1, b='x,y'}")[1] == [[1, 2], [3], {"a": 1, "b": "x,y"}]
    assert parse_grid("data.path=2024-01-01, /tmp/a b")[1] == ["2024-01-01", "/tmp/a b"]
    # a value with quotes, a backslash and a comma survives the override text of its cell
    text = 'a "q" \\ b, c'
    planned = plan("paper_two_agent", [("description", [text, "x"])], [])
    assert [s.description for _, s in planned] == [text, "x"]
    planned = plan("paper_two_agent", [("data.split", [{"name": "dirichlet", "alpha": 0.3}])], [])
    assert planned[0][1].data.split.options == {"alpha": 0.3}


# ---- cell folder names: bounded, unique, stable ----


def test_cell_names_are_bounded_unique_and_stable():
    from paramarket_jax.sweep import MAX_CELL_NAME, cell_name

    long_a, long_b = "a" * 300, "a" * 299 + "b"
    names = [cell_name({"description": v}) for v in (long_a, long_b)]
    assert all(len(n.encode()) <= MAX_CELL_NAME for n in names) and names[0] != names[1]
    assert cell_name({"description": long_a}) == names[0]  # the same cell, the same name
    assert len(cell_name({"name": "n" * 5000, "description": long_b})) <= MAX_CELL_NAME
    # a string that reads as another value never shares the other's folder
    pairs = [("1", 1), ("true", True), ("[1]", [1]), ("0.001", 0.001), ("[8, 8]", [8, 8])]
    for text, value in pairs:
        assert cell_name({"k": text}) != cell_name({"k": value}), text
    # names of earlier versions stay (complete cells of an earlier sweep are found again)
    assert cell_name({"mechanism.beta": 0.5}) == "mechanism.beta=0.5"
    assert cell_name({"model.widths": [8, 4]}) == (
        "model.widths=8,4~" + hashlib.sha1(b"model.widths=[8, 4]").hexdigest()[:8]
    )
    assert cell_name({"data.path": "2024-01-01"}) == "data.path=2024-01-01"


@pytest.mark.parametrize("key", ["description", "name"])
def test_long_grid_values_get_bounded_folders(key, tmp_path, capsys, fake):
    from paramarket_jax.sweep import MAX_CELL_NAME

    out = tmp_path / "sweep"
    argv = fake_argv(out, f"{key}={'x' * 300},{'x' * 299}y")
    assert call(argv) == 0, capsys.readouterr().err
    cells = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(cells) == 2 and all(len(c.encode()) <= MAX_CELL_NAME for c in cells)
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["cell"]) == cells and len(table) == 2
    ran = list(fake)
    assert call(argv) == 0  # the same names again: both cells kept
    assert fake == ran


def test_a_cell_name_the_file_system_cannot_hold_leaves_nothing(
    tmp_path, capsys, fake, monkeypatch
):
    from paramarket_jax import sweep

    monkeypatch.setattr(sweep, "MAX_CELL_NAME", 10_000)
    code = call(fake_argv(tmp_path / "deep" / "sweep", f"description={'x' * 300},y"))
    check_one_line(code, capsys.readouterr(), "longer than this file system allows", tmp_path)
    assert fake == []


# ---- the table: values of mixed kinds ----


def test_values_of_mixed_kinds_make_a_text_column(tmp_path, capsys, fake):
    from paramarket_jax.sweep import _text_knobs

    out = tmp_path / "sweep"
    assert call(fake_argv(out, "train.learning_rate=[0.01,0.02],0.01")) == 0
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["train.learning_rate"]) == ["0.01", "[0.01, 0.02]"]
    assert len(table) == 2 and fake and len(set(fake)) == 2
    # what else one Parquet column cannot hold
    planned = lambda values: [({"k": v}, None) for v in values]  # noqa: E731
    assert _text_knobs(planned([True, 1])) == {"k"}
    assert _text_knobs(planned([1, "a"])) == {"k"}
    assert _text_knobs(planned([[1], ["a"]])) == {"k"}
    assert _text_knobs(planned([0, 0.5])) == set()  # numbers: one float column
    assert _text_knobs(planned([[8], [6, 4]])) == set()  # lists: one list column


# ---- files the tool did not write are never replaced or removed ----


@pytest.fixture
def done(tmp_path, fake):
    """A complete (made-up) sweep folder of two cells, and its command."""
    out = tmp_path / "sweep"
    argv = fake_argv(out)
    assert call(argv) == 0
    assert sorted(fake) == CELLS
    fake.clear()
    return out, argv


def _user_file(path, text="mine"):
    path.write_text(text)


def _cell_replaced_by(kind):
    def setup(out, other):
        cell = out / CELLS[0]
        shutil.rmtree(cell)
        if kind == "file":
            _user_file(cell)
        else:
            other.mkdir()
            cell.symlink_to(other)

    return setup


IN_THE_WAY = {
    "sweep.json of the user's": (
        lambda out, other: _user_file(out / "sweep.json", '{"mine": 1}'),
        "sweep.json is not a sweep description of paramarket",
        (),
    ),
    "sweep.json that is a list": (
        lambda out, other: _user_file(out / "sweep.json", "[1, 2]"),
        "sweep.json is not a sweep description",
        (),
    ),
    "sweep.json that is not JSON": (
        lambda out, other: _user_file(out / "sweep.json", "{"),
        "sweep.json is not a sweep description",
        (),
    ),
    "a file named like a cell": (_cell_replaced_by("file"), "is a file where a cell", ()),
    "a link named like a cell": (_cell_replaced_by("link"), "is a symbolic link where a cell", ()),
    "a file of the user's in a cell, --force": (
        lambda out, other: _user_file(out / CELLS[0] / "notes.txt"),
        "notes.txt is in a cell folder that --force would replace",
        ("--force", "--set", "economics.gamma=3"),
    ),
    "a folder of the user's in a cell, --force": (
        lambda out, other: (out / CELLS[1] / "mine").mkdir(),
        "mine is in a cell folder that --force would replace",
        ("--force", "--set", "economics.gamma=3"),
    ),
    "a summary.json of the user's, --force": (
        lambda out, other: _user_file(out / CELLS[0] / "summary.json", "{}"),
        "summary.json is not a run summary of paramarket (no per_seed table)",
        ("--force",),
    ),
    "a summary.json that is a list": (
        lambda out, other: _user_file(out / CELLS[0] / "summary.json", "[]"),
        "summary.json is not a run summary of paramarket",
        (),
    ),
    "a summary.json with a bad seed": (
        lambda out, other: _user_file(
            out / CELLS[0] / "summary.json", '{"per_seed": {"0": {"utility": [1]}}}'
        ),
        "seed '0' is not a seed's summary",
        (),
    ),
    "a cell without its summary.json": (
        lambda out, other: (out / CELLS[0] / "summary.json").unlink(),
        "not a complete run folder of paramarket (no summary.json)",
        ("--force",),
    ),
    "a figure of the user's in a cell, --force": (
        lambda out, other: (out / CELLS[0] / "mine.png").write_bytes(PNG),  # not our name
        "mine.png is in a cell folder that --force would replace",
        ("--force", "--set", "economics.gamma=3"),
    ),
    "a rounds.parquet of the user's": (
        lambda out, other: _user_file(out / CELLS[0] / "rounds.parquet", "not a table"),
        "rounds.parquet is not a table of paramarket",
        (),
    ),
    "sweep.parquet of the user's": (
        lambda out, other: _user_file(out / "sweep.parquet", "my table"),
        "sweep.parquet would be replaced by the sweep's own sweep.parquet",
        (),
    ),
    "a folder named sweep.parquet": (
        lambda out, other: ((out / "sweep.parquet").unlink(), (out / "sweep.parquet").mkdir()),
        "sweep.parquet would be replaced",
        (),
    ),
    "a report.html of the user's (with the report)": (
        lambda out, other: _user_file(out / "report.html", "<html>mine</html>"),
        "report.html would be replaced by the sweep's own report.html",
        ("--report",),
    ),
    "a figure of the user's (with the report)": (
        lambda out, other: (out / "sweep_gains.png").write_bytes(b"\x89PNG\r\n\x1a\nmine"),
        "sweep_gains.png would be replaced",
        ("--report",),
    ),
    "a file named .checkpoints": (
        lambda out, other: _user_file(out / ".checkpoints"),
        ".checkpoints is not a folder, where the sweep keeps its checkpoints",
        (),
    ),
}


@pytest.mark.parametrize("case", list(IN_THE_WAY))
def test_anything_in_the_way_is_one_line_and_untouched(case, done, tmp_path, capsys, fake):
    out, argv = done
    setup, needle, extra = IN_THE_WAY[case]
    setup(out, tmp_path / "other")
    before = snapshot(tmp_path)
    if "--report" in extra:
        argv = [a for a in argv if a != "--no-report"]
    code = call([*argv, *(a for a in extra if a != "--report")])
    check_one_line(code, capsys.readouterr(), needle, tmp_path, keep=("sweep", "other"))
    assert snapshot(tmp_path) == before
    assert fake == []


@pytest.mark.parametrize(
    "files",
    [
        # a run folder: its tables, report and figures
        {
            "rounds.parquet": "PAR1",
            "summary.json": "{}",
            "report.html": "<!DOCTYPE html>",
            "welfare.png": "png",
        },  # fmt: skip
        {"notes.txt": "my notes"},
        {"sweep.parquet": "PAR1 a table without its sweep.json"},
    ],
)
def test_a_folder_that_is_not_a_sweep_is_refused(files, tmp_path, capsys, fake):
    out = tmp_path / "folder"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    before = snapshot(tmp_path)
    code = call(fake_argv(out, extra=("--report",)))
    check_one_line(code, capsys.readouterr(), "is not a sweep folder of paramarket", tmp_path,
                   keep=("folder",))  # fmt: skip
    assert snapshot(tmp_path) == before and fake == []


def test_the_tools_own_cells_are_replaced_and_nothing_else(done, capsys, fake):
    """``--force`` reruns cells of another scenario, replacing their folders (with the
    report ``paramarket report`` drew in one); the user's files beside them stay."""
    out, argv = done
    (out / "notes.txt").write_text("my notes")
    page = "<!DOCTYPE html>\n<html><head><title>paramarket run: x</title></head></html>\n"
    (out / CELLS[0] / "report.html").write_text(page)
    (out / CELLS[1] / "welfare.png").write_bytes(PNG)  # as `paramarket plot` draws
    assert call([*argv, "--force", "--set", "economics.gamma=3"]) == 0, capsys.readouterr().err
    assert sorted(fake) == CELLS
    assert not (out / CELLS[0] / "report.html").exists()
    assert not (out / CELLS[1] / "welfare.png").exists()
    assert "gamma = 3" in (out / CELLS[0] / "scenario.toml").read_text()
    assert (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_kept_cell_keeps_the_users_files(done, capsys, fake):
    """A complete cell is never touched: the user's notes in it do not stop a sweep that
    keeps it (only one that would run it again)."""
    out, argv = done
    (out / CELLS[0] / "notes.txt").write_text("my notes")
    (out / CELLS[0] / "figures").mkdir()
    shutil.rmtree(out / CELLS[1])
    assert call(argv) == 0, capsys.readouterr().err
    assert fake == [CELLS[1]]
    assert (out / CELLS[0] / "notes.txt").read_text() == "my notes"
    assert (out / CELLS[0] / "figures").is_dir()


def test_a_sweep_json_of_an_earlier_version_is_the_tools(done, capsys, fake):
    out, argv = done
    meta = json.loads((out / "sweep.json").read_text())
    assert meta.pop("format") == "paramarket-sweep"
    (out / "sweep.json").write_text(json.dumps(meta))
    assert call(argv) == 0
    assert json.loads((out / "sweep.json").read_text())["format"] == "paramarket-sweep"
    assert fake == []


def test_only_the_groups_checkpoints_are_removed(done, capsys, fake):
    out, argv = done
    group = out / ".checkpoints" / "0123456789abcdef"
    (group / "1").mkdir(parents=True)
    (out / ".checkpoints" / "notes").write_text("mine")
    (out / ".checkpoints" / "mine").mkdir()
    (out / ".checkpoints" / "mine" / "0123456789abcdef").mkdir()  # not a group's: not at the top
    shutil.rmtree(out / CELLS[1])  # one cell to run
    assert call(argv) == 0
    assert fake == [CELLS[1]]
    assert not group.exists()
    assert sorted(p.name for p in (out / ".checkpoints").iterdir()) == ["mine", "notes"]
    assert (out / ".checkpoints" / "mine" / "0123456789abcdef").is_dir()


def test_the_users_report_is_no_concern_of_a_sweep_without_one(done, capsys, fake):
    out, argv = done
    (out / "report.html").write_text("mine")
    assert call(argv) == 0
    assert (out / "report.html").read_text() == "mine"


def test_a_fresh_folder_is_removed_again_when_the_sweep_fails(tmp_path, capsys, monkeypatch, fake):
    from paramarket_jax import sweep

    def diverged(*args, **kwargs):
        raise ParamarketError("every agent diverged")

    monkeypatch.setattr(sweep, "run_group", diverged)
    code = call(fake_argv(tmp_path / "new" / "deep" / "sweep"))
    check_one_line(code, capsys.readouterr(), "every agent diverged", tmp_path)
    (tmp_path / "mine").mkdir()  # a folder that was there stays, even empty
    code = call(fake_argv(tmp_path / "mine" / "sweep"))
    check_one_line(code, capsys.readouterr(), "every agent diverged", tmp_path, keep=("mine",))
    assert list((tmp_path / "mine").iterdir()) == []


def test_a_rerun_with_nothing_to_run_writes_nothing_made_up(done, capsys, fake):
    out, argv = done
    before = snapshot(out)
    for extra in ((), ("--force",), ("--force", "--batch", "8")):
        assert call([*argv, *extra]) == 0
        assert "nothing to run" in capsys.readouterr().out
    assert snapshot(out) == before and fake == []


# ---- one real sweep: the tool's own table, report and figures ----


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny real sweep: a list and a number for one per-agent key (one batched call)."""
    out = tmp_path_factory.mktemp("real") / "sweep"
    argv = ["sweep", "paper_two_agent", "--grid", "train.learning_rate=[0.05,0.06],0.05",
            "--seeds", "0", "--out", str(out), *SMALL]  # fmt: skip
    assert call(argv) == 0
    return out, argv


@pytest.fixture
def no_run(monkeypatch):
    from paramarket_jax import sweep

    def reached(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(sweep, "run_group", reached)


def test_a_real_sweep_of_mixed_values_writes_its_table(real):
    out, _ = real
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["train.learning_rate"]) == ["0.05", "[0.05, 0.06]"]
    assert sorted(table["cell"]) == sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(table) == 2 and table["market_accuracy"].notna().all()
    assert json.loads((out / "sweep.json").read_text())["format"] == "paramarket-sweep"


def test_a_real_rerun_with_nothing_to_run_rewrites_nothing(real, capsys, no_run):
    out, argv = real
    before = snapshot(out)
    for extra in ((), ("--force",), ("--force", "--batch", "8")):
        assert call([*argv, *extra]) == 0
        assert "nothing to run" in capsys.readouterr().out
    assert snapshot(out) == before


def test_the_tools_own_report_is_redrawn_and_nobody_elses(real, tmp_path, capsys, no_run):
    out, argv = real
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    for name, content in (("report.html", b"<html>mine</html>"), ("sweep_gains.png", b"mine")):
        saved = (copy / name).read_bytes()
        (copy / name).write_bytes(content)
        code = call(argv)
        check_one_line(code, capsys.readouterr(), f"{name} would be replaced", copy,
                       keep=os.listdir(copy))  # fmt: skip
        assert (copy / name).read_bytes() == content
        (copy / name).write_bytes(saved)
    # the table gone: written again, and the report (the tool's) drawn again from it
    (copy / "sweep.parquet").unlink()
    (copy / "report.html").write_bytes((copy / "report.html").read_bytes() + b"<!-- old -->")
    assert call(argv) == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(copy / "sweep.parquet"), pd.read_parquet(out / "sweep.parquet")
    )
    assert b"<!-- old -->" not in (copy / "report.html").read_bytes()
