"""``--resume`` never continues another run, never touches files paramarket did not write,
and refuses what it cannot do in one line before any compute.

* A checkpoint step records what it is a checkpoint of (the resolved scenario and the
  engine options of ``run.json``, hashed): a ``run.json`` edited since (a traced knob, the
  rounds, the seeds, ``checkpoint_every``, ``batch``) is refused; a step of another run of
  the same shapes is skipped for an older one, like a damaged step.
* ``run.json`` is checked as strictly as a scenario file: every key, of its kind.
* Only what paramarket wrote (its ``run.json``, orbax step folders, the run's own files)
  is removed or replaced; anything else in the way is one line, untouched.
* Damaged orbax metadata falls back without orbax's own log lines; a folder that cannot
  be written and ``--devices`` with checkpoints are one line.

Every test shares one interrupted run (``pristine``: the market of test_checkpoint, four
rounds, checkpointed every 2, steps 2 and 4 on disk) and copies it: one program shape
(a chunk of 2 rounds, beside test_checkpoint's initial states), and a resume computes
at most two chunks.
"""

import errno
import gc
import json
import logging
import os
import shutil
import sys
import tomllib

import pytest
from oneline import call, check_one_line
from same_run import assert_same_run
from shrink import SMALL

from paramarket_jax import scenario as sc
from paramarket_jax.cli import main as cli
from paramarket_jax.engines import batch, checkpoint

SETS = ["train.rounds=4", "broker.align=false", "data.dataset=gaussian", "data.n_train=1000",
        "data.n_test=300", "data.dim=16"]  # fmt: skip
ARGS = [*SMALL, *(a for o in SETS for a in ("--set", o)), "--no-report", "--seeds", "0,1"]
# checkpoints every 2 rounds (test_checkpoint's runs chunk 1 round at a time: its compile
# count must not depend on whether these tests ran first in its process)
EVERY = "2"


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def interrupted_run(out, *extra):
    """A run checkpointed every 2 rounds, interrupted once its files are computed
    (before they are written): ``run.json`` and steps 2 and 4."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "finish", interrupt)
        argv = ["run", "--out", str(out), "--checkpoint-every", EVERY, *ARGS, *extra]
        assert cli.main(argv) == 130
    assert listing(out / checkpoint.FOLDER) == ["2", "4"]
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return interrupted_run(tmp_path_factory.mktemp("pristine") / "run")


@pytest.fixture(scope="module")
def other(tmp_path_factory, pristine):
    """Another run of the same shapes (a traced knob differs): its steps fit ours."""
    return interrupted_run(tmp_path_factory.mktemp("other") / "run", "--set",
                           "economics.step_cost=0.01")  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pristine):
    """The pristine run resumed (from its last step: nothing to compute), complete."""
    out = copy(pristine, tmp_path_factory.mktemp("reference") / "run")
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    assert checkpoint.is_complete(out) and listing(out) == sorted(TABLES)
    return out


TABLES = {"scenario.toml", "rounds.parquet", "trades.parquet", "summary.json"}


@pytest.fixture
def no_compute(monkeypatch):
    """What is refused must be refused before anything is computed."""

    def reached(*args, **kwargs):
        raise AssertionError("a refused resume reached the compute step")

    monkeypatch.setattr(batch, "run_cells_chunked", reached)
    monkeypatch.setattr(batch, "run_cells", reached)


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(folder) -> dict:
    """Every path under ``folder`` with its kind and bytes: equal snapshots, nothing
    changed."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", None)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def edit_run_json(out, **changes):
    path = out / checkpoint.RUN_FILE
    info = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DROP:
            del info[key]
        else:
            info[key] = value(info[key]) if callable(value) else value
    path.write_text(json.dumps(info))


DROP = object()


def resume(out, capsys) -> str:
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    return capsys.readouterr().err


def refused(out, capsys, needle, folder=None) -> tuple[str, bool]:
    """``--resume out``: exit 2 and one line naming ``needle`` (checked here), returned
    with whether everything under ``folder`` (default: out's parent) is unchanged, byte
    for byte (for the test to assert)."""
    folder = out.parent if folder is None else folder
    before = snapshot(folder)
    code = call(["run", "--resume", str(out), "--quiet"])
    captured = capsys.readouterr()
    check_one_line(code, captured, needle, folder, keep=set(listing(folder)))
    return captured.err.strip(), snapshot(folder) == before


def step_meta(out, step) -> dict:
    return json.loads((out / checkpoint.FOLDER / str(step) / "meta" / "metadata").read_text())


# ---- what a checkpoint is of ----


def test_a_new_run_records_its_options_and_each_step_what_run_it_is_of(pristine):
    """run.json holds every key (devices and shard too); each step holds the hash of the
    run (resolved scenario and engine options) that run.json describes, and the run."""
    info = json.loads((pristine / "run.json").read_text())
    assert list(info) == list(checkpoint.RUN_KEYS)
    assert info["format"] == checkpoint.FORMAT and info["about"] == checkpoint.ABOUT
    assert (info["devices"], info["shard"], info["checkpoint_every"]) == (1, "auto", 2)
    saved = checkpoint.load(pristine)
    ident = saved.identity()
    assert ident["scenario"] == info["scenario"] and ident["shard"] is None
    for step in (2, 4):
        meta = step_meta(pristine, step)
        assert meta["digest"] == checkpoint.digest(ident) and meta["run"] == ident


def _set_toml(key, value):
    """An edit of run.json's scenario: ``key`` (dotted) set to ``value``."""
    *sections, name = key.split(".")

    def edit(text):
        table = tomllib.loads(text)
        inner = table
        for section in sections:
            inner = inner[section]
        inner[name] = value
        return sc.dumps(sc.from_dict(table))

    return edit


def _set_seeds(seeds):
    return _set_toml("seeds", seeds)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"scenario": _set_toml("economics.step_cost", 0.01)}, "economics.step_cost"),
        ({"scenario": _set_toml("train.rounds", 5)}, "train.rounds"),
        ({"scenario": _set_toml("trading.start", 2)}, "trading.start"),
        ({"scenario": _set_seeds([0, 2])}, "seeds"),
        ({"checkpoint_every": 1}, "checkpoint_every"),
        ({"batch": 1}, "batch"),
    ],
    ids=["traced-knob", "rounds", "static-knob", "seeds", "checkpoint_every", "batch"],
)  # fmt: skip
def test_an_edited_run_json_is_refused_before_any_compute(
    changes, needle, pristine, tmp_path, capsys, no_compute
):
    """A valid edit of run.json makes it another run than its checkpoints are of: one
    line naming what differs, nothing changed (no step is removed, nothing is run)."""
    out = copy(pristine, tmp_path / "run")
    edit_run_json(out, **changes)
    line, unchanged = refused(out, capsys, needle, tmp_path)
    assert needle in line and unchanged


def test_edits_that_are_no_other_run_resume(pristine, reference, tmp_path, capsys):
    """A comment in the scenario's TOML, or a shard on one device, changes nothing the run
    computes: it resumes (from its last step: nothing to compute)."""
    out = copy(pristine, tmp_path / "run")
    edit_run_json(out, scenario=lambda t: "# my note\n" + t, shard="runs", command="edited")
    assert "after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)


def test_a_step_of_another_run_is_skipped_for_an_older_one(
    pristine, other, reference, tmp_path, capsys
):
    """Step 4 replaced by the other run's (same shapes and keys: the old checks took it):
    skipped and removed, on from step 2, the same tables as the run itself; the other
    run's tables do differ, so taking its step would show."""
    out = copy(pristine, tmp_path / "run")
    shutil.rmtree(out / ".checkpoints" / "4")
    shutil.copytree(other / ".checkpoints" / "4", out / ".checkpoints" / "4")
    err = resume(out, capsys)
    assert "after round 2 of 4" in err, err
    assert "step 4: another run's checkpoint" in err and "economics.step_cost" in err, err
    assert_same_run(out, reference)
    theirs = copy(other, tmp_path / "other")
    resume(theirs, capsys)
    assert (theirs / "summary.json").read_text() != (reference / "summary.json").read_text()


def test_steps_that_are_all_another_runs_are_refused(pristine, other, tmp_path, capsys, no_compute):
    """No step of this run, one of another: refused (not started over), nothing changed."""
    out = copy(pristine, tmp_path / "run")
    shutil.rmtree(out / ".checkpoints")
    shutil.copytree(other / ".checkpoints", out / ".checkpoints")
    needle = "another run's checkpoint, differing from run.json in economics.step_cost"
    line, unchanged = refused(out, capsys, needle, tmp_path)
    assert needle in line and unchanged


# ---- run.json checked as strictly as a scenario ----

RUN_JSON_CASES = [
    ({"checkpoint_every": True}, "'checkpoint_every' must be an integer >= 1, got true"),
    ({"checkpoint_every": 2.5}, "'checkpoint_every' must be an integer >= 1, got 2.5"),
    ({"checkpoint_every": 0}, "'checkpoint_every' must be an integer >= 1, got 0"),
    ({"checkpoint_every": -1}, "'checkpoint_every' must be an integer >= 1"),
    ({"checkpoint_every": "1"}, "'checkpoint_every' must be an integer >= 1, got \"1\""),
    ({"checkpoint_every": None}, "'checkpoint_every' must be an integer >= 1, got null"),
    ({"batch": 2.5}, "'batch' must be null or an integer >= 1, got 2.5"),
    ({"batch": True}, "'batch' must be null or an integer >= 1, got true"),
    ({"batch": 0}, "'batch' must be null or an integer >= 1, got 0"),
    ({"batch": -3}, "'batch' must be null or an integer >= 1, got -3"),
    ({"devices": False}, "'devices' must be an integer >= 1, got false"),
    ({"devices": 1.0}, "'devices' must be an integer >= 1, got 1.0"),
    ({"devices": 2}, "'devices' must be 1 (a run with checkpoints runs on one device), got 2"),
    ({"shard": "rows"}, "'shard' must be one of 'auto', 'agents', 'runs', got \"rows\""),
    ({"engine": "mesa"}, "'engine' must be 'batch' (the only engine with checkpoints)"),
    ({"engine": "auto"}, "'engine' must be 'batch'"),
    ({"report": "yes"}, "'report' must be true or false, got \"yes\""),
    ({"report": 1}, "'report' must be true or false, got 1"),
    ({"command": 5}, "'command' must be a string, got 5"),
    ({"scenario": 5}, "'scenario' must be a string"),
    ({"scenario": "name = "}, "run.json is unreadable ('scenario' is not TOML"),
    ({"scenario": 'name = "x"\nrounds = 3\n'}, "unknown scenario key 'rounds'"),
    ({"format": 1}, "run.json is unreadable (format 1; this version of paramarket reads format"),
    ({"format": DROP}, "run.json is unreadable (format null"),
    ({"about": "my notes"}, "run.json is unreadable (not written by paramarket"),
    ({"devices": DROP}, "run.json has no 'devices' (it needs format, about"),
    ({"report": DROP}, "run.json has no 'report'"),
    ({"scenario": DROP}, "run.json has no 'scenario'"),
    ({"extra": 1}, "run.json has an unknown key 'extra'; allowed: format, about, command"),
]


@pytest.mark.parametrize("changes, needle", RUN_JSON_CASES)
def test_run_json_is_checked_as_strictly_as_a_scenario(
    changes, needle, pristine, tmp_path, capsys, no_compute
):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(pristine / "run.json", out / "run.json")
    edit_run_json(out, **changes)
    line, unchanged = refused(out, capsys, needle, tmp_path)
    assert needle in line and unchanged


@pytest.mark.parametrize(
    "text, needle",
    [("[1, 2]", "run.json is unreadable (not a JSON object but list)"),
     ('{"format": 2,', "run.json is unreadable (Expecting"),
     (b"\xff\xfe", "run.json is unreadable")],
)  # fmt: skip
def test_a_run_json_that_is_no_object_is_refused(text, needle, tmp_path, capsys, no_compute):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "run.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    line, unchanged = refused(out, capsys, needle, tmp_path)
    assert needle in line and unchanged


# ---- only what paramarket wrote is removed or replaced ----


def test_a_complete_folder_keeps_files_paramarket_did_not_write(reference, tmp_path, capsys):
    """--resume on a complete run holding the user's own run.json and .checkpoints/notes:
    "already complete", both untouched (they were deleted before)."""
    out = copy(reference, tmp_path / "run")
    (out / "run.json").write_text('{"my": "own run.json"}')
    (out / ".checkpoints").mkdir()
    (out / ".checkpoints" / "notes").write_text("mine")
    before = snapshot(out)
    code = call(["run", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "already complete" in err, err
    assert ".checkpoints/notes, run.json left as they are" in err, err
    assert snapshot(out) == before


def test_a_complete_folder_loses_only_the_leftovers_of_its_own_clean_up(
    pristine, reference, tmp_path, capsys
):
    """A run killed while removing its checkpoints: its run.json and steps are removed,
    the user's note beside them is kept (and so is .checkpoints, not empty)."""
    out = copy(reference, tmp_path / "run")
    shutil.copy(pristine / "run.json", out / "run.json")
    copy(pristine / ".checkpoints", out / ".checkpoints")
    (out / ".checkpoints" / "notes").write_text("mine")
    assert call(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already complete" in err and ".checkpoints/notes left as they are" in err, err
    assert listing(out) == sorted(TABLES | {".checkpoints"})
    assert listing(out / ".checkpoints") == ["notes"]
    assert (out / ".checkpoints" / "notes").read_text() == "mine"


def _note_in_checkpoints(out):
    (out / ".checkpoints" / "notes").write_text("mine")


def _file_in_a_step(out):
    (out / ".checkpoints" / "2" / "notes.txt").write_text("mine")


def _empty_step_like_folder(out):
    (out / ".checkpoints" / "7").mkdir()


def _checkpoints_is_a_file(out):
    shutil.rmtree(out / ".checkpoints")
    (out / ".checkpoints").write_text("mine")


def _checkpoints_is_a_link(out):
    target = out.parent / "elsewhere"
    shutil.move(out / ".checkpoints", target)
    (out / ".checkpoints").symlink_to(target)


def _users_report(out):
    (out / "report.html").write_text("<p>my report</p>")


def _users_figure(out):
    (out / "welfare.png").write_bytes(b"mine")


def _tables_without_scenario(out):
    (out / "rounds.parquet").write_text("mine")


def _another_scenario_toml(out):
    (out / "scenario.toml").write_text('name = "mine"\n')


def _a_folder_named_like_a_table(out):
    (out / "scenario.toml").write_text(json.loads((out / "run.json").read_text())["scenario"])
    (out / "trades.parquet").mkdir()


@pytest.mark.parametrize(
    "make, needle",
    [
        (_note_in_checkpoints, ".checkpoints/notes is not a checkpoint paramarket wrote"),
        (_file_in_a_step, ".checkpoints/2 is not a checkpoint paramarket wrote (or holds"),
        (_empty_step_like_folder, ".checkpoints/7 is not a checkpoint paramarket wrote"),
        (_checkpoints_is_a_file, ".checkpoints is not a folder of checkpoints paramarket"),
        (_checkpoints_is_a_link, ".checkpoints is not a folder of checkpoints paramarket"),
        (_users_report, "report.html is in the way of the run's files"),
        (_users_figure, "welfare.png is in the way of the run's files"),
        (_tables_without_scenario, "rounds.parquet is in the way of the run's files"),
        (_another_scenario_toml, "scenario.toml is in the way of the run's files"),
        (_a_folder_named_like_a_table, "trades.parquet is in the way of the run's files"),
    ],
)
def test_what_paramarket_did_not_write_stops_a_resume_untouched(
    make, needle, pristine, tmp_path, capsys, no_compute
):
    out = copy(pristine, tmp_path / "run")
    make(out)
    line, unchanged = refused(out, capsys, needle, tmp_path)
    assert needle in line and unchanged


def test_the_leftovers_of_a_killed_finish_are_replaced(pristine, reference, tmp_path, capsys):
    """Killed while renaming its files in (scenario.toml first, then a table): resumed,
    they are replaced; a file of the user's with another name is left alone."""
    out = copy(pristine, tmp_path / "run")
    (out / "scenario.toml").write_text(json.loads((out / "run.json").read_text())["scenario"])
    (out / "rounds.parquet").write_bytes(b"half a table")
    (out / "notes.txt").write_text("mine")
    assert "after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)
    assert (out / "notes.txt").read_text() == "mine"
    assert listing(out) == sorted(TABLES | {"notes.txt"})


def test_remove_and_discard_touch_only_what_paramarket_wrote(pristine, tmp_path):
    """The clean-ups after a run (finish) or a failed one (discard): steps and run.json
    removed, another's files in .checkpoints and in OUT kept (so OUT is kept too); a
    run.json without paramarket's marker is not removed."""
    out = copy(pristine, tmp_path / "run")
    (out / ".checkpoints" / "notes").write_text("mine")
    (out / "notes.txt").write_text("mine")
    checkpoint.discard(out, keep_folder=False)
    assert listing(out) == [".checkpoints", "notes.txt"]
    assert listing(out / ".checkpoints") == ["notes"]
    mine = copy(pristine, tmp_path / "mine")
    (mine / "run.json").write_text('{"format": 2}')
    assert checkpoint.remove(mine) == ["run.json"]
    assert listing(mine) == ["run.json"] and (mine / "run.json").read_text() == '{"format": 2}'
    checkpoint.discard(mine, keep_folder=False)  # run.json is the user's: the folder stays
    assert mine.is_dir()


def test_a_file_put_in_the_way_during_a_run_keeps_its_checkpoints(
    reference, tmp_path, capsys, monkeypatch
):
    """A new checkpointed run whose folder gets a file of the user's in the way while it
    runs: at the end one line, the user's file untouched and the checkpoints kept (not
    discarded as a failed run's); moved away, --resume writes the run."""
    out = tmp_path / "run"
    real = checkpoint.Checkpoints.save

    def save(self, b, carry):
        real(self, b, carry)
        if carry.done == 4:
            (out / "trades.parquet").write_text("mine")

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    code = call(["run", "--out", str(out), "--checkpoint-every", EVERY, *ARGS])
    captured = capsys.readouterr()
    assert code == 2 and "trades.parquet is in the way" in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert listing(out) == [".checkpoints", "run.json", "trades.parquet"]
    assert (out / "trades.parquet").read_text() == "mine"
    assert listing(out / ".checkpoints") == ["2", "4"]
    monkeypatch.undo()
    (out / "trades.parquet").unlink()
    assert "after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)


# ---- damaged steps, quietly ----


def _truncate(path):
    path.write_bytes(path.read_bytes()[:25])


def _replace_json(value):
    return lambda path: path.write_text(json.dumps(value))


def _other_handlers(path):
    meta = json.loads(path.read_text())
    meta["item_handlers"] = {"arrays": "orbax.checkpoint.SomeFutureHandler", "meta": "x.Y"}
    path.write_text(json.dumps(meta))


def _older_format(path):
    meta = json.loads(path.read_text())
    meta["format"] = 1  # as the previous version wrote
    path.write_text(json.dumps(meta))


def _remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    "name, damage, resumed",
    [
        # orbax's own bookkeeping of the step: the data, checked on restore, are whole
        ("_CHECKPOINT_METADATA", _truncate, 4),
        ("_CHECKPOINT_METADATA", _other_handlers, 4),
        ("arrays/_METADATA", _truncate, 2),
        ("arrays/_METADATA", _replace_json({"tree_metadata": 5}), 2),
        ("arrays/manifest.ocdbt", _replace_json("not a manifest"), 2),
        ("meta/metadata", _truncate, 2),
        ("meta/metadata", _older_format, 2),
        ("meta", _remove, 2),
        ("arrays", _remove, 2),
    ],
)
def test_damaged_orbax_metadata_falls_back_in_one_note_without_orbax_logs(
    name, damage, resumed, pristine, reference, tmp_path, capsys, caplog, monkeypatch
):
    """Step 4's files truncated, replaced or of another version: on from step 2 (or from
    4 where only orbax's bookkeeping is hurt), one note, no log line of orbax's own (it
    logged ``ERROR:absl:...``, and its failed reads printed tracebacks), its loggers' levels
    and the unraisable-exception hook as they were; the same tables."""
    out = copy(pristine, tmp_path / "run")
    damage(out / ".checkpoints" / "4" / name)
    levels = [logging.getLogger(n).level for n in checkpoint.QUIET]
    unraisable = []  # tracebacks of the reads of a failed restore ("Event loop is closed")
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    err = resume(out, capsys)
    gc.collect()
    assert unraisable == [] and sys.unraisablehook == unraisable.append
    assert f"after round {resumed} of 4" in err, err
    assert ("step 4" in err) == (resumed == 2), err
    assert len(err.strip().splitlines()) == 1, err
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING
             and r.name.split(".")[0] in checkpoint.QUIET]  # fmt: skip
    assert noise == [], [r.getMessage()[:200] for r in noise]
    assert [logging.getLogger(n).level for n in checkpoint.QUIET] == levels
    assert_same_run(out, reference)


def test_after_a_fallback_the_resumed_rounds_are_saved_again(pristine, reference, tmp_path, capsys):
    """Step 4 damaged, on from 3: the damaged step is removed, so round 4 is saved again
    (orbax saves no step at or below its newest one: it would have kept the damaged one
    and silently saved nothing); a run killed then goes on from the new step 4."""
    out = copy(pristine, tmp_path / "run")
    _truncate(out / ".checkpoints" / "4" / "meta" / "metadata")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "finish", interrupt)
        assert cli.main(["run", "--resume", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "after round 2 of 4 (skipped and removed step 4" in err, err
    assert listing(out / ".checkpoints") == ["2", "4"]
    assert step_meta(out, 4)["digest"] == step_meta(out, 2)["digest"]
    assert "after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)


def test_every_step_damaged_starts_over_from_round_0(pristine, reference, tmp_path, capsys):
    """No step restores and none is another run's: round 0, said in one note, the damaged
    steps removed; the same tables."""
    out = copy(pristine, tmp_path / "run")
    for step in ("2", "4"):
        _truncate(out / ".checkpoints" / step / "meta" / "metadata")
    err = resume(out, capsys)
    assert "no usable checkpoint" in err and "starting from round 0" in err, err
    assert "step 2" in err and "step 4" in err and "removed" in err, err
    assert_same_run(out, reference)


# ---- folders that cannot be written; devices ----


@pytest.mark.parametrize("where", ["out", ".checkpoints", "parent"])
def test_a_folder_that_cannot_be_written_is_refused_before_any_compute(
    where, pristine, tmp_path, capsys, monkeypatch, no_compute
):
    """Orbax waited 300 s for a save into a read-only folder, then printed a long
    TimeoutError: now one line, up front. Run by root (who writes anyway) the folder is
    made read-only by refusing every new folder in it, as a read-only file system does."""
    out = copy(pristine, tmp_path / "run")
    folder = {"out": out, ".checkpoints": out / ".checkpoints", "parent": tmp_path}[where]
    if os.geteuid() == 0:
        real = os.mkdir

        def mkdir(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(folder.resolve()):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        os.chmod(folder, 0o555)
    try:
        needle = f"cannot write in {folder.resolve() if where == 'parent' else folder}"
        line, unchanged = refused(out, capsys, needle, tmp_path)
        assert needle in line and unchanged
    finally:
        os.chmod(folder, 0o755)


def test_devices_with_checkpoints_is_one_line(pristine, tmp_path, capsys, monkeypatch, no_compute):
    """The chunked rounds run on one device: --devices D > 1 with --checkpoint-every is
    one line before anything is written (as run.json 'devices' > 1 is, above); --resume
    takes the devices from run.json, so --devices and --shard beside it are refused."""
    monkeypatch.setattr(cli, "device_count", lambda args: 2)  # as if 2 devices were asked
    code = call(["run", "--out", str(tmp_path / "new"), "--checkpoint-every", "1", "--devices",
                 "2", *ARGS])  # fmt: skip
    check_one_line(code, capsys.readouterr(), "--checkpoint-every runs on one device", tmp_path)
    monkeypatch.undo()
    out = copy(pristine, tmp_path / "run")
    cases = [(["--devices", "1"], "drop --devices"), (["--shard", "runs"], "drop --shard"),
             (["--devices", "0", "--shard", "agents"], "drop --devices, --shard")]  # fmt: skip
    for extra, needle in cases:
        before = snapshot(tmp_path)
        code = call(["run", "--resume", str(out), *extra])
        check_one_line(code, capsys.readouterr(), needle, tmp_path, keep={"run"})
        assert snapshot(tmp_path) == before
