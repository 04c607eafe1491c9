"""Reliability at the edges: Ctrl-C and SIGTERM end a run cleanly; ``report`` and ``plot`` on
damaged or edited folders, JAX's multi-process variables set wrong, and lists too long to
run in bounded memory are each one line ``paramarket: error: ...``, exit code 2, nothing
written.

One tiny run (in-process, module fixture) gives the folder every damaged copy starts from;
the signals go to two short subprocesses, signalled while XLA compiles.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from oneline import call, check_one_line
from shrink import SMALL

from paramarket_jax.cli import processes
from paramarket_jax.cli.main import TERMINATED, Terminated, main
from paramarket_jax.sweep import cell_name, sweep_table

# a run that is still running for a while when signalled
LONG_RUN = [a for a in SMALL if a != "--quiet"] + ["--set", "train.rounds=1000", "--no-report"]
KNOB = "economics.step_cost"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A real run folder (tables only, no report), made once."""
    out = tmp_path_factory.mktemp("fixture") / "run"
    assert main(["run", *SMALL, "--no-report", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "rounds.parquet", "scenario.toml", "summary.json", "trades.parquet",
    ]  # fmt: skip
    return out


def copy_run(run_folder, where):
    return shutil.copytree(run_folder, where / "run")


def make_sweep(run_folder, where):
    """A sweep folder as ``paramarket sweep`` lays it out: two cells (copies of the run),
    their table and sweep.json."""
    root = where / "sweep"
    root.mkdir()
    planned = []
    for value in (0.0, 0.001):
        assignment = {KNOB: value}
        shutil.copytree(run_folder, root / cell_name(assignment))
        planned.append((assignment, None))
    sweep_table(root, planned).to_parquet(root / "sweep.parquet", index=False)
    meta = {"scenario": "paper_two_agent", "grid": [[KNOB, [0.0, 0.001]]], "overrides": [],
            "command": f"paramarket sweep paper_two_agent --grid {KNOB}=0,0.001"}  # fmt: skip
    (root / "sweep.json").write_text(json.dumps(meta))
    return root


def state(folder) -> dict:
    """Every file under ``folder`` (size, modification time) and what lies beside it."""
    files = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in folder.rglob("*") if p.is_file()}  # fmt: skip
    return {"files": files, "beside": sorted(p.name for p in folder.parent.iterdir())}


def edit_table(path, change):
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def table(name, change, cell=False):
    """Damage: ``change`` the table ``name`` (of the sweep's first cell, with ``cell``)."""
    return lambda d: edit_table((first_cell(d) if cell else d) / name, change)


def drop(name, column, cell=False):
    return table(name, lambda t: t.drop(columns=[column]), cell)


def write(name, content):
    """Damage: replace the file ``name`` by ``content`` (bytes, text, or a function of the
    file's bytes)."""

    def damage(d):
        data = content((d / name).read_bytes()) if callable(content) else content
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return damage


def summary(**changes):
    def damage(d):
        path = d / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return damage


def first_cell(root):
    return sorted(p for p in root.iterdir() if p.is_dir())[0]


def into_folder(name):
    def damage(d):
        (d / name).unlink()
        (d / name).mkdir()

    return damage


# case -> (damage, the file the line names, what it says)
RUN_DAMAGE = {
    # rounds.parquet: a column gone, values of another kind, agents that are not 0..N-1,
    # no rows, truncated
    "rounds-no-payment": (drop("rounds.parquet", "payment"), "rounds.parquet", "'payment'"),
    "rounds-no-accuracy": (drop("rounds.parquet", "accuracy"), "rounds.parquet", "'accuracy'"),
    "rounds-text-utility": (table("rounds.parquet", lambda t: t.assign(utility="x")),
                            "rounds.parquet", "must hold numbers"),
    "rounds-half-agent": (table("rounds.parquet", lambda t: t.assign(agent=t.agent + 0.5)),
                          "rounds.parquet", "whole numbers"),
    "rounds-huge-agent": (table("rounds.parquet", lambda t: t.assign(agent=t.agent * 10**9)),
                          "rounds.parquet", "0 to N-1"),
    "rounds-nan-round": (table("rounds.parquet", lambda t: t.assign(round=np.nan)),
                         "rounds.parquet", "'round'"),
    "rounds-no-rows": (table("rounds.parquet", lambda t: t.iloc[:0]), "rounds.parquet",
                       "no rows"),
    "rounds-truncated": (write("rounds.parquet", lambda b: b[:-100]), "rounds.parquet",
                         "cannot be read"),
    # trades.parquet
    "trades-no-price": (drop("trades.parquet", "price"), "trades.parquet", "'price'"),
    "trades-no-columns": (lambda d: pd.DataFrame().to_parquet(d / "trades.parquet"),
                          "trades.parquet", "no column 'seed'"),
    "trades-unknown-buyer": (table("trades.parquet", lambda t: t.assign(buyer=7)),
                             "trades.parquet", "agent 7"),
    "trades-negative-seller": (table("trades.parquet", lambda t: t.assign(seller=-1)),
                               "trades.parquet", "'seller'"),
    "trades-truncated": (write("trades.parquet", b"PAR1\0\0"), "trades.parquet",
                         "cannot be read"),
    # summary.json
    "summary-list": (write("summary.json", "[1, 2]"), "summary.json", "a JSON list"),
    "summary-not-json": (write("summary.json", "{oops"), "summary.json", "not JSON"),
    "summary-empty-object": (write("summary.json", "{}"), "summary.json",
                             "'market_accuracy' must be a number"),
    "summary-text-welfare": (summary(welfare="high"), "summary.json",
                             "'welfare' must be a number"),
    "summary-per-seed-list": (summary(per_seed=[1]), "summary.json", "'per_seed'"),
    "summary-binary": (write("summary.json", b"\xff\xfe\0"), "summary.json", "not UTF-8"),
    # scenario.toml
    "scenario-a-folder": (into_folder("scenario.toml"), "scenario.toml", "a folder"),
    # not a run folder at all
    "no-rounds": (lambda d: (d / "rounds.parquet").unlink(), "run", "neither a run folder"),
}  # fmt: skip

SWEEP_DAMAGE = {
    "sweep-json-list": (write("sweep.json", "[1]"), "sweep.json", "a JSON list"),
    "sweep-json-corrupt": (write("sweep.json", '{"grid": [['), "sweep.json", "not JSON"),
    "sweep-json-grid-text": (write("sweep.json", '{"grid": "x"}'), "sweep.json",
                             "'grid' must be a list"),
    "sweep-json-other-knob": (write("sweep.json", '{"grid": [["mechanism.beta", [0, 1]]]}'),
                              "sweep.json", "'mechanism.beta'"),
    "sweep-table-truncated": (write("sweep.parquet", lambda b: b[:100]), "sweep.parquet",
                              "cannot be read"),
    "sweep-table-no-welfare": (drop("sweep.parquet", "welfare"), "sweep.parquet", "'welfare'"),
    "sweep-table-no-knob": (drop("sweep.parquet", KNOB), "sweep.parquet", KNOB),
    "sweep-table-cell-outside": (table("sweep.parquet", lambda t: t.assign(cell="../run")),
                                 "sweep.parquet", "'cell'"),
    "sweep-cell-no-price": (drop("trades.parquet", "price", cell=True), "trades.parquet",
                            "'price'"),
    "sweep-cell-rounds-text": (table("rounds.parquet", lambda t: t.assign(fees="x"), cell=True),
                               "rounds.parquet", "'fees'"),
}  # fmt: skip


@pytest.mark.parametrize("command", ["report", "plot"])
@pytest.mark.parametrize("case", [*RUN_DAMAGE, *SWEEP_DAMAGE])
def test_damaged_folders_are_one_line_and_nothing_is_written(
    case, command, run_folder, tmp_path, capsys
):
    damage, file, needle = {**RUN_DAMAGE, **SWEEP_DAMAGE}[case]
    folder = (make_sweep if case in SWEEP_DAMAGE else copy_run)(run_folder, tmp_path)
    damage(folder)
    before = state(folder)
    code = call([command, str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("paramarket: error: "), err
    assert file in err and needle in err, err
    assert "Traceback" not in err
    assert state(folder) == before  # nothing written, no temporary left beside it


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_the_undamaged_copies_report(kind, run_folder, tmp_path, capsys):
    """The control for the damaged copies: the same folders, undamaged, draw."""
    folder = (make_sweep if kind == "sweep" else copy_run)(run_folder, tmp_path)
    before = {p.name for p in folder.iterdir()}
    assert call(["report", str(folder)]) == 0, capsys.readouterr().err
    assert {p.name for p in folder.iterdir()} - before == {"report.html"}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left


def _read_only(folder):
    """Make ``folder`` take no new file, even for root (immutable); None if impossible."""
    if os.geteuid() == 0:  # root writes into a mode-555 folder: make it immutable
        if shutil.which("chattr") is None:
            return None
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode != 0:
            return None
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)


@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_read_only_folder_is_one_line_before_drawing(command, run_folder, tmp_path, capsys):
    folder = copy_run(run_folder, tmp_path)
    undo = _read_only(folder)
    if undo is None:
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        before = state(folder)
        code = call([command, str(folder)])
        after = state(folder)
    finally:
        undo()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write into {folder.resolve()}" in err and "nothing was written" in err, err
    assert after == before


def test_a_folder_named_like_the_report_is_one_line(run_folder, tmp_path, capsys):
    folder = copy_run(run_folder, tmp_path)
    (folder / "report.html").mkdir()
    before = state(folder)
    check_one_line(call(["report", str(folder)]), capsys.readouterr(), "report.html is a folder",
                   tmp_path, keep=("run",))  # fmt: skip
    assert state(folder) == before


# ---- Ctrl-C and SIGTERM: one line, 128 + the signal, nothing left (the segfault: 139) ----


def _watch(proc, seen: list) -> threading.Thread:
    def read():
        for char in iter(lambda: proc.stderr.read(1), ""):
            seen.append(char)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def user_env() -> dict:
    """This process's environment without the suite's XLA flags (optimisation level 0):
    the crash this guards against shows at the level users compile at."""
    suite = ("--xla_backend_optimization_level", "--xla_cpu_use_fusion")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(suite)]
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_LOG_COMPILES="1")


def test_ctrl_c_and_sigterm_end_a_run_cleanly_while_xla_compiles(tmp_path):
    """Signalled while XLA compiles its first program (``--no-cache``: it always compiles;
    JAX's compile log says when), a run says what was kept in one line and exits 130
    (SIGINT) or 143 (SIGTERM) at once, writing nothing. Before, the interpreter's shutdown
    waited for the compilation and crashed under it (exit 139)."""
    code = "import sys; from paramarket_jax.cli.main import main; sys.exit(main())"
    argv = [*LONG_RUN, "--no-cache"]
    started = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # both at once: half the wall time
        out = ["--out", str(tmp_path / sig.name)]
        proc = subprocess.Popen([sys.executable, "-c", code, "run", *argv, *out], text=True,
                                env=user_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        seen: list[str] = []
        started[sig] = (proc, seen, _watch(proc, seen))
    compiling = re.compile(r"Compiling (jit\()?init_runs")
    due, sent = {}, set()
    deadline = time.monotonic() + 120
    while len(sent) < len(started):
        now = time.monotonic()
        assert now < deadline, {s.name: "".join(p[1])[-2000:] for s, p in started.items()}
        for sig, (proc, seen, _) in started.items():
            if sig not in due and (compiling.search("".join(seen)) or proc.poll() is not None):
                due[sig] = now + 0.5  # well inside the compilation (seconds at this level)
            if sig not in sent and due.get(sig, now + 1) <= now:
                assert proc.poll() is None, "no 'Compiling init_runs' in JAX's compile log"
                proc.send_signal(sig)
                sent.add(sig)
        time.sleep(0.02)
    for sig, (proc, seen, reader) in started.items():
        proc.wait(timeout=60)
        reader.join(timeout=10)
        proc.stdout.read()
        err = "".join(seen)
        ours = [x for x in re.split(r"[\r\n]", err) if x.startswith("paramarket")]
        what = "interrupted" if sig == signal.SIGINT else "terminated"
        assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
        assert ours == [f"paramarket: {what}; nothing was written"], err[-3000:]
        assert "Traceback" not in err and "Fatal Python error" not in err
    assert list(tmp_path.iterdir()) == []  # neither folder, nor a temporary of one


def test_sigterm_in_process_is_terminated_and_the_handler_restored(monkeypatch, tmp_path, capsys):
    """In-process (a test, a notebook) main maps SIGTERM to 143 and one line, and leaves
    the caller's SIGTERM handler as it found it."""
    from paramarket_jax.cli import main as cli

    def terminated(args):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
        raise Terminated

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(cli, "cmd_report", terminated)
        code = main(["report", str(tmp_path)])
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip()
    assert code == TERMINATED == 143
    assert err == "paramarket: terminated; nothing was written"


# ---- JAX's multi-process variables: checked before anything starts ----


@pytest.fixture
def no_compute(monkeypatch):
    """These must fail before anything is compiled, started or joined."""
    from paramarket_jax.engines import batch

    def reached(*args, **kwargs):
        raise AssertionError("bad input reached the compute step")

    monkeypatch.setattr(batch, "simulate_runs", reached)
    monkeypatch.setattr(processes, "supervise", reached)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"JAX_COORDINATOR_ADDRESS": "garbage"}, "JAX_COORDINATOR_ADDRESS must be HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "host:99999"}, "JAX_COORDINATOR_ADDRESS must be HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "host 1:80"}, "JAX_COORDINATOR_ADDRESS must be HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be a positive integer"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "0",
          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be a positive integer"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID must be an integer >= 0"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID must be between 0 and 1 (JAX_NUM_PROCESSES 2)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_multi_process_variables_are_one_line(
    env, needle, command, no_compute, monkeypatch, tmp_path, capsys
):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [command, "paper_two_agent", "--out", str(tmp_path / "out"), "--quiet"]
    argv += ["--grid", "mechanism.beta=0,1"] if command == "sweep" else []
    check_one_line(call(argv), capsys.readouterr(), needle, tmp_path)


@pytest.mark.parametrize("given", [{}, {"JAX_NUM_PROCESSES": "2"}])
def test_missing_multi_process_variables_are_one_line(given, monkeypatch, tmp_path, capsys):
    """The address alone (or with one of the two): JAX finds no cluster launcher to tell it
    the rest; the supervised worker (here in-process) says so before joining anything."""
    launchers = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST")
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", *launchers):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(processes.WORKER, "1")  # the worker's side, without a child process
    # a worker starts JAX here; this test process has, so jax.distributed would refuse
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    code = call(["run", "--out", str(tmp_path / "out"), "--quiet"])
    missing = "JAX_PROCESS_ID is not" if given else "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"
    check_one_line(code, capsys.readouterr(), missing, tmp_path)


def test_the_relay_keeps_our_line_after_the_runtime_log():
    """A lost peer's runtime log arrives glued to the progress bar, with a lone process
    number among its lines; the relay drops all of it and keeps the bar and our line."""
    import io

    sink = io.BytesIO()
    relay = processes._Relay(None, sink)
    relay.feed(
        b"\rrounds:   0%|          | 0/400 [00:03<?, ?it/s]E1203 14:55:53.509648   14164 "
        b"coordination_service.cc:1549] Use error polling to propagate the following error: "
        b"UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
        b"The tasks have crashed. Check the task logs for an earlier error.\n"
        b"E1203 14:55:53.510205   14175 coordination_service_agent.cc:289] Polled an error\n"
        b"paramarket: terminated; nothing was written\n"
    )
    shown = sink.getvalue().decode()
    assert shown.replace("\r", "\n").split("\n")[1:] == [
        "rounds:   0%|          | 0/400 [00:03<?, ?it/s]",
        "paramarket: terminated; nothing was written",
        "",
    ], shown
    assert b"tasks are unhealthy" in relay.log and b"The tasks have crashed" in relay.log
    # the bar's last refresh, then (another read) the newline that ends it and our line
    sink = io.BytesIO()
    relay = processes._Relay(None, sink)
    relay.feed(b"\rrounds:   0%|          | 0/400 [00:03<?, ?it/s]")
    relay.feed(b"\nparamarket: interrupted; nothing was written\n")
    assert sink.getvalue().endswith(b"it/s]\nparamarket: interrupted; nothing was written\n")


# ---- lists too long to run in bounded memory: refused, naming the key and the limit ----


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", f"broker.alphas={[0.5] * 1025}"],
         "'broker.alphas' takes at most 1024 entries"),
        (["--set", f"strategies.grid={[0.5] * 1025}"],
         "'strategies.grid' takes at most 1024 entries"),
        (["--set", f"seeds={list(range(10_001))}"], "'seeds' takes at most 10000 entries"),
        (["--seeds", "0-99999999"], "--seeds '0-99999999' names 100000000 seeds; a run takes "
         "at most 10000"),
        (["--set", f"economics.value_per_quality={[1.0] * 20_000}"],
         "must have 1 or agents.n = 2 entries, got 20000"),
        (["--set", f"model.widths={[4] * 20_000}"],
         "'model.widths' takes at most 64 layers for model 'mlp'"),
        (["--set", "model.name=cnn", "--set", f"model.channels={[4] * 65}"],
         "'model.channels' takes at most 64 layers for model 'cnn'"),
    ],
)  # fmt: skip
def test_huge_lists_are_refused_in_one_line(argv, needle, no_compute, tmp_path, capsys):
    start = time.monotonic()
    code = call(["run", "--out", str(tmp_path / "out"), "--quiet", *argv])
    check_one_line(code, capsys.readouterr(), needle, tmp_path)
    assert time.monotonic() - start < 30


def test_a_scenario_file_of_twenty_thousand_alphas_is_one_line(
    no_compute, tmp_path_factory, tmp_path, capsys
):
    path = tmp_path_factory.mktemp("inputs") / "big.toml"
    alphas = ", ".join(f"{(i + 1) / 20_001:.6f}" for i in range(20_000))
    path.write_text(f'name = "big"\n[broker]\nalphas = [{alphas}]\n')
    code = call(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    check_one_line(code, capsys.readouterr(), "at most 1024 entries", tmp_path)
    code = call(["sweep", str(path), "--grid", "mechanism.beta=0,1", "--out",
                 str(tmp_path / "sweep"), "--quiet"])  # fmt: skip
    check_one_line(code, capsys.readouterr(), "at most 1024 entries", tmp_path)
