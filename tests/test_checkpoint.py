"""Checkpoints inside a run: chunked rounds equal the scanned run bit for bit; a run killed
with ``kill -9`` (after a checkpoint, in the middle of one, after the last) and resumed
with ``--resume`` writes the same tables as a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pandas as pd
import pytest
from test_cli import SMALL

from paramarket_jax import batch, checkpoint
from paramarket_jax import scenario as sc
from paramarket_jax.cli import main
from paramarket_jax.experiment import build

# test_cli's tiny market, four rounds, two seeds
ARGS = [*SMALL, "--set", "train.rounds=4", "--seeds", "0,1", "--no-report"]
OVERRIDES = [SMALL[i + 1] for i, a in enumerate(SMALL) if a == "--set"]
OVERRIDES += ["train.rounds=4", "seeds=[0, 1]"]
TABLES = {"scenario.toml", "rounds.parquet", "trades.parquet", "summary.json"}

# Runs `paramarket run` and holds it at a chosen moment (STALL): "after:K" once checkpoint K
# is committed, "commit:K" inside orbax's commit of checkpoint K (its temporary folder is
# written, not yet renamed). It writes STALL_MARKER and sleeps; the test then kills it -9.
DRIVER = r"""
import os, pathlib, sys, time

kind, k = os.environ["STALL"].split(":")
k = int(k)
marker = pathlib.Path(os.environ["STALL_MARKER"])


def hold():
    marker.write_text(str(os.getpid()))
    time.sleep(600)


if kind == "after":
    from paramarket_jax import checkpoint

    real = checkpoint.Checkpoints.save

    def save(self, b, carry):
        real(self, b, carry)
        if carry.done == k:
            self.manager.wait_until_finished()
            hold()

    checkpoint.Checkpoints.save = save
else:
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(k):
            hold()
        return await real(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize

from paramarket_jax.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def experiment():
    return build(sc.load("paper_two_agent", OVERRIDES))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run without checkpoints (its compiled call is the one
    test_chunked_rounds_equal_the_scanned_run compiles)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "--out", str(out), *ARGS]) == 0
    return out


def assert_same_run(out, ref):
    for name in ("rounds.parquet", "trades.parquet"):
        a, b = pd.read_parquet(out / name), pd.read_parquet(ref / name)
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=True)
    for name in ("summary.json", "scenario.toml"):
        assert (out / name).read_text() == (ref / name).read_text(), name


def test_chunked_rounds_equal_the_scanned_run(experiment, compiles):
    """Rounds one chunk at a time, the state carried from one to the next: the same
    records as one scan of 4 rounds, bit for bit; one compilation per chunk length (a
    remainder chunk is tested end to end in test_resume_falls_back_past_a_bad_checkpoint)."""
    whole = batch.run_cells([experiment]).records[0]
    saved = []
    with compiles() as events:
        chunked = batch.run_cells_chunked(
            [experiment], 1, save=lambda b, carry: saved.append(carry)
        ).records[0]
    assert len(events) == 2  # the initial states and a chunk of 1 round
    leaves = jax.tree.leaves(whole)
    assert len(leaves) == len(jax.tree.leaves(chunked))
    for a, b in zip(leaves, jax.tree.leaves(chunked), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    # the carries are what a checkpoint holds; going on from one compiles nothing again
    assert [c.done for c in saved] == [1, 2, 3, 4]
    assert {x.shape[:2] for x in jax.tree.leaves(saved[1].records)} == {(2, 2)}
    assert {x.shape[0] for x in jax.tree.leaves(saved[1].states)} == {2}
    with compiles() as events:
        again = batch.run_cells_chunked([experiment], 1, start=lambda b: saved[1]).records[0]
    assert events == []
    for a, b in zip(leaves, jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def killed_run(out, tmp_path, stall: str, *extra):
    """Start a checkpointed `paramarket run` in a subprocess, wait until it stalls where
    ``stall`` says, and kill it with SIGKILL."""
    marker = tmp_path / "stalled"
    env = {**os.environ, "STALL": stall, "STALL_MARKER": str(marker)}
    argv = ["run", "--out", str(out), "--checkpoint-every", "1", *ARGS, *extra]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *argv], env=env, stdout=log, stderr=log, text=True
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.seek(0)
                pytest.fail(f"the run never stalled at {stall}:\n{log.read()[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    marker.unlink()
    assert not (out / "summary.json").exists()
    assert json.loads((out / "run.json").read_text())["checkpoint_every"] == 1
    return sorted(p.name for p in (out / ".checkpoints").iterdir())


def resume(out, capsys) -> str:
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    return capsys.readouterr().err


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_tables(reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert killed_run(out, tmp_path, "after:1") == ["1"]
    assert sorted(p.name for p in out.iterdir()) == [".checkpoints", "run.json"]
    assert "from its checkpoint after round 1 of 4" in resume(out, capsys)
    assert_same_run(out, reference)
    # the complete folder as a run without checkpoints writes it, nothing left beside it
    assert {p.name for p in out.iterdir()} == TABLES
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    # a complete run has nothing to resume
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already complete" in err


def test_a_run_killed_inside_a_save_resumes_from_the_one_before(reference, tmp_path, capsys):
    """Killed while orbax commits checkpoint 2 (written to its temporary folder, not yet
    renamed): checkpoint 1 is the newest complete one."""
    out = tmp_path / "run"
    names = killed_run(out, tmp_path, "commit:2")
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.") and "tmp" in n for n in names), names
    assert "from its checkpoint after round 1 of 4" in resume(out, capsys)
    assert_same_run(out, reference)
    assert {p.name for p in out.iterdir()} == TABLES
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_run_killed_after_its_last_checkpoint_writes_its_folder(reference, tmp_path, capsys):
    """Killed after the last round's checkpoint, before the folder was written: the resume
    computes nothing and writes everything, the report too (run.json says so)."""
    out = tmp_path / "run"
    assert killed_run(out, tmp_path, "after:4") == ["3", "4"]  # the newest two are kept
    info = json.loads((out / "run.json").read_text())
    assert info["report"] is False
    info["report"] = True  # as if started without --no-report
    (out / "run.json").write_text(json.dumps(info))
    assert "from its checkpoint after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)
    names = {p.name for p in out.iterdir()}
    assert TABLES | {"report.html", "welfare.png"} <= names
    assert "run.json" not in names and ".checkpoints" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_resume_falls_back_past_a_bad_checkpoint_or_starts_over(
    reference, tmp_path, capsys, monkeypatch
):
    """Checkpoints in-process (an interrupt before the folder is written keeps them): a
    damaged newest checkpoint is skipped for the one before; without any, round 0."""
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "finish", interrupt)
    assert main(["run", "--out", str(out), "--checkpoint-every", "1", *ARGS]) == 130
    err = capsys.readouterr().err
    assert "kept in" in err and "--resume" in err
    monkeypatch.undo()
    assert sorted(p.name for p in (out / ".checkpoints").iterdir()) == ["3", "4"]
    (out / ".checkpoints" / "4" / "meta" / "metadata").write_text("{not json")
    err = resume(out, capsys)
    assert "step 4" in err and "from its checkpoint after round 3 of 4" in err
    assert_same_run(out, reference)
    # killed before its first checkpoint: only run.json; chunks of 3 rounds, then 1
    fresh = tmp_path / "fresh"
    scenario = sc.load("paper_two_agent", OVERRIDES)
    checkpoint.start(fresh, scenario, engine="batch", every=3, max_batch=None, report=False,
                     command="paramarket run ...")  # fmt: skip
    assert "no usable checkpoint" in resume(fresh, capsys)
    assert_same_run(fresh, reference)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--checkpoint-every", "0"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "x"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "2", "--engine", "mesa"], "batch engine only"),
        (["open_market", "--checkpoint-every", "2"], "batch engine only"),
        (["--resume", "NOWHERE"], "no such folder"),
        (["--resume", "EMPTY"], "not a run started with --checkpoint-every"),
        (["--resume", "RUN", "--set", "agents.n=3"], "drop --set"),
        (["--resume", "RUN", "duopoly_bargaining", "--seeds", "2"], "drop SCENARIO, --seeds"),
        (["--resume", "RUN", "--checkpoint-every", "3"], "drop --checkpoint-every"),
        (["--resume", "BROKEN"], "run.json is unreadable"),
        (["--resume", "LOCKED"], "in use by another paramarket run"),
    ],
)
def test_checkpoint_options_refuse_bad_input_in_one_line(argv, needle, tmp_path, capsys):
    scenario = sc.load("paper_two_agent", OVERRIDES)
    (tmp_path / "EMPTY").mkdir()
    for name in ("RUN", "BROKEN", "LOCKED"):
        checkpoint.start(tmp_path / name, scenario, engine="batch", every=1, max_batch=None,
                         report=False, command="")  # fmt: skip
    (tmp_path / "BROKEN" / "run.json").write_text('{"format": 1, "scenario": "name = "}')
    argv = [str(tmp_path / a) if a in ("NOWHERE", "EMPTY", "RUN", "BROKEN", "LOCKED") else a
            for a in argv]  # fmt: skip
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with checkpoint.lock(tmp_path / "LOCKED"):
        try:
            code = main(["run", "--out", str(tmp_path / "new"), "--quiet", *argv]
                        if "--resume" not in argv else ["run", "--quiet", *argv])  # fmt: skip
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
