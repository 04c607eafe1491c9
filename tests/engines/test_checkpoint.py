"""Checkpoints inside a run and inside a sweep: chunked rounds equal the scanned run bit for
bit; a run killed with ``kill -9`` (after its first checkpoint, in the middle of the second,
after the last), each time resumed with ``--resume`` by the next process, and a sweep
killed after its first checkpoint and run again, write the same tables as ones never
interrupted.

The killed processes run one after the other in a background thread, started by the first
test, so they compile while this process does. The market merges without alignment: its
compiled calls then hold no host callback (scipy's assignment solver), so JAX's persistent
compilation cache can share them between those processes. Its data are small synthetic
Gaussians (no scikit-learn to import in each process).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pandas as pd
import pytest
from same_run import assert_same_run
from shrink import OPEN_MARKET, SMALL

from paramarket_jax import scenario as sc
from paramarket_jax.cli.main import main
from paramarket_jax.engines import batch, checkpoint
from paramarket_jax.experiment import build

# test_cli's tiny market, four rounds, merges without alignment, Gaussian data (see above)
SETS = ["train.rounds=4", "broker.align=false", "data.dataset=gaussian", "data.n_train=1000",
        "data.n_test=300", "data.dim=16"]  # fmt: skip
MARKET = [*SMALL, *(a for o in SETS for a in ("--set", o)), "--no-report"]
ARGS = [*MARKET, "--seeds", "0,1"]
OVERRIDES = [MARKET[i + 1] for i, a in enumerate(MARKET) if a == "--set"] + ["seeds=[0, 1]"]
TABLES = {"scenario.toml", "rounds.parquet", "trades.parquet", "summary.json"}
# two cells of one batched call (they differ in their partition only), one seed each: the
# same compiled calls as the run's two seeds
SWEEP = ["sweep", "paper_two_agent", "--grid", "data.split.d=0.1,0.3", *MARKET, "--seeds", "0"]
CELLS = ["data.split.d=0.1", "data.split.d=0.3"]

# Runs `paramarket` and holds it at a chosen moment (STALL): "after:K" once checkpoint K is
# committed, "commit:K" inside orbax's commit of checkpoint K (its temporary folder is
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
    from paramarket_jax.engines import checkpoint

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

from paramarket_jax.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


class Killed(threading.Thread):
    """`paramarket` commands run one after the other, each in a subprocess held where its
    stall says and killed there with SIGKILL; after each kill, what its folder holds and
    what it printed (``result(name)`` waits for them; a failure is raised there). They
    start once ``after`` (another Killed and a step name) is done, if given. The processes
    share JAX's persistent compilation cache in ``cache``: only the first compiles."""

    def __init__(self, folder, cache, steps, after=None):
        super().__init__(daemon=True)
        self.folder, self.cache, self.steps, self.after = folder, cache, steps, after
        self.done, self.error, self.proc, self.stopped = {}, None, None, False
        self.start()

    def run(self):
        try:
            if self.after is not None:
                self.after[0].result(self.after[1])
            for name, argv, stall, out in self.steps:
                if not self.stopped:
                    self.done[name] = self.kill(argv, stall, out)
        except BaseException as err:  # raised again by result()
            self.error = err

    def kill(self, argv, stall, out):
        marker = self.folder / "stalled"
        env = {
            **os.environ,
            "STALL": stall,
            "STALL_MARKER": str(marker),
            "JAX_COMPILATION_CACHE_DIR": str(self.cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        with tempfile.TemporaryFile("w+") as log:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, *argv], env=env, stdout=log, stderr=log, text=True
            )
            deadline = time.monotonic() + 600
            while not marker.exists():
                if proc.poll() is not None or time.monotonic() > deadline or self.stopped:
                    proc.kill()
                    proc.wait()
                    log.seek(0)
                    raise AssertionError(
                        f"{argv[0]} never stalled at {stall}:\n{log.read()[-3000:]}"
                    )
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            code = proc.wait()
            log.seek(0)
            text = log.read()
        marker.unlink()
        saved = out / checkpoint.FOLDER
        return {
            "code": code,
            "log": text,
            "folder": listing(out),
            # a run's steps, or a sweep's group folders and their steps
            "steps": {p.name: listing(p) for p in saved.iterdir()} if saved.is_dir() else {},
        }

    def result(self, name):
        while name not in self.done:
            if not self.is_alive():
                raise self.error or AssertionError(f"no result for {name}")
            time.sleep(0.1)
        return self.done[name]

    def stop(self):
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.join()


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Killed processes in background threads: a run checkpointed every round, killed
    after checkpoint 1, resumed and killed inside the commit of checkpoint 2, resumed and
    killed after the last (4); beside its resumes (the compiled calls cached by then), a
    sweep checkpointed every round, killed after its first checkpoint."""
    run = tmp_path_factory.mktemp("killed_run") / "run"
    sweep = tmp_path_factory.mktemp("killed_sweep") / "sweep"
    cache = tmp_path_factory.mktemp("jax_cache")
    new = ["run", "--out", str(run), "--checkpoint-every", "1", *ARGS]
    again = ["run", "--resume", str(run), "--quiet"]
    runs = [("first", new, "after:1", run), ("inside", again, "commit:2", run),
            ("last", again, "after:4", run)]  # fmt: skip
    sweeps = [("sweep", [*SWEEP, "--out", str(sweep), "--checkpoint-every", "1"], "after:1", sweep)]
    chains = [Killed(tmp_path_factory.mktemp("killing"), cache, runs)]
    chains.append(Killed(tmp_path_factory.mktemp("killing"), cache, sweeps, (chains[0], "first")))
    yield {name: (argv, out, chain) for chain in chains for name, argv, _, out in chain.steps}
    for chain in chains:
        chain.stop()


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


def test_chunked_rounds_equal_the_scanned_run(experiment, compiles, killed):
    """Rounds one chunk at a time, the state carried from one to the next: the same
    records as one scan of 4 rounds, bit for bit; one compilation per chunk length (a
    remainder chunk is tested end to end in test_resume_falls_back_past_a_bad_checkpoint).
    It asks for ``killed`` only to start the killed processes early."""
    whole = batch.run_cells([experiment]).records[0]
    saved = []
    with compiles() as events:
        chunked = batch.run_cells_chunked(
            [experiment], 1, save=lambda b, carry: saved.append(carry)
        ).records[0]
    assert len(events) == 1  # a chunk of 1 round (the initial states are the whole run's)
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


def resume(out, capsys) -> str:
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    return capsys.readouterr().err


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


def test_a_run_killed_three_times_resumes_to_the_same_tables(reference, killed, capsys):
    """Killed after checkpoint 1; resumed and killed while orbax commits checkpoint 2
    (written to its temporary folder, not yet renamed: checkpoint 1 is the newest complete
    one); resumed and killed after the last round's checkpoint, before the folder was
    written. The last resume computes nothing and writes everything, the report too
    (run.json says so): the same tables as a run never interrupted."""
    first, inside, last = (killed[n][2].result(n) for n in ("first", "inside", "last"))
    out = killed["first"][1]
    for step in (first, inside, last):
        assert step["code"] == -signal.SIGKILL and "summary.json" not in step["folder"]
    assert first["folder"] == [".checkpoints", "run.json"] and list(first["steps"]) == ["1"]
    names = list(inside["steps"])
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.") and "tmp" in n for n in names), names
    assert "from its checkpoint after round 1 of 4" in inside["log"]
    # the temporary folder of the killed commit is no obstacle: on from 1 again
    assert "from its checkpoint after round 1 of 4" in last["log"]
    assert sorted(last["steps"]) == ["3", "4"]  # the newest two are kept
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint_every"] == 1 and info["report"] is False
    info["report"] = True  # as if started without --no-report
    (out / "run.json").write_text(json.dumps(info))
    assert "from its checkpoint after round 4 of 4" in resume(out, capsys)
    assert_same_run(out, reference)
    # the complete folder as a run without checkpoints writes it, nothing left beside it
    names = {p.name for p in out.iterdir()}
    assert TABLES | {"report.html", "welfare.png"} <= names
    assert {n for n in names if n != "report.html" and not n.endswith(".png")} == TABLES
    assert listing(out.parent) == ["run"]
    # a complete run has nothing to resume
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already complete" in err


def test_a_sweep_killed_after_a_checkpoint_goes_on_to_the_same_tables(killed, tmp_path, capsys):
    """``paramarket sweep --checkpoint-every 1`` killed after the first checkpoint of its
    one batch of cells (no cell written yet); the same command again goes on from round 1
    and writes the tables of a sweep never interrupted (without checkpoints), bit for bit,
    and removes the checkpoints."""
    argv, out, chain = killed["sweep"]
    step = chain.result("sweep")
    assert step["code"] == -signal.SIGKILL
    assert step["folder"] == [".checkpoints", "sweep.json"]  # no cell written yet
    ((group, steps),) = step["steps"].items()
    assert steps == ["1"] and len(group) == 16
    ref = tmp_path / "reference"
    assert main([*SWEEP, "--out", str(ref)]) == 0
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (
        f"resuming the group of cell(s) {', '.join(CELLS)} from its checkpoint after round 1 "
        "of 4" in err
    ), err
    assert listing(out) == listing(ref) == sorted([*CELLS, "sweep.json", "sweep.parquet"])
    a, b = pd.read_parquet(out / "sweep.parquet"), pd.read_parquet(ref / "sweep.parquet")
    assert len(a) == 2
    pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=True)
    for cell in CELLS:
        assert_same_run(out / cell, ref / cell)
    # the cells differ (their partitions do): a mix-up of cells would show
    rounds = [pd.read_parquet(out / cell / "rounds.parquet") for cell in CELLS]
    assert not rounds[0]["loss"].equals(rounds[1]["loss"])


def test_a_market_with_entry_checkpoints(tmp_path, capsys):
    """open_market (agents.entry) runs with --checkpoint-every through the batch engine,
    the state (entrants and leavers too) carried from chunk to chunk: the tables of the run
    without checkpoints, bit for bit."""
    sets = [x for o in OPEN_MARKET for x in ("--set", o)]
    argv = ["run", "open_market", "--seeds", "0,1", "--no-report", "--quiet", *sets]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert main([*argv, "--out", str(tmp_path / "saved"), "--checkpoint-every", "1"]) == 0
    assert_same_run(tmp_path / "saved", tmp_path / "plain")
    assert pd.read_parquet(tmp_path / "saved" / "rounds.parquet")["entered"].sum() >= 4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--checkpoint-every", "0"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "x"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "2", "--engine", "mesa"], "batch engine only"),
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


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--checkpoint-every", "0"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every=-2"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "1.5"], "--checkpoint-every: must be a positive integer"),
        (["--checkpoint-every", "1", "--engine", "mesa"], "batch engine only"),
    ],
)
def test_sweep_checkpoint_options_refuse_bad_input_in_one_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "sweep"
    try:
        code = main([*SWEEP, "--out", str(out), *argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert listing(tmp_path) == []  # nothing written
