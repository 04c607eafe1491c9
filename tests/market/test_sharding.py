"""Beyond one device: the agents or the runs split over 4 fake CPU devices, and one market
run by two processes (gloo collectives over 127.0.0.1), all on CPU.

The 4-device runs happen in one subprocess (``tests/sharded_run.py``; a process fixes its
device count when JAX starts). The multi-process runs start two ``paramarket run``
processes with 2 CPU devices each, which JAX joins into one 4-device mesh.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from paramarket_jax.cli.main import main
from paramarket_jax.market import sharding

TESTS = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = TESTS / "sharded_run.py"
from sharded_run import OVERRIDES  # noqa: E402  (tests/ is on pytest's pythonpath)


def env_with(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(TESTS.parent))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The 4-device subprocess's results and its unsharded summary."""
    out = tmp_path_factory.mktemp("sharded")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        env=env_with(XLA_FLAGS=flags.strip()),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "results.npz") as npz:
        found = dict(npz)
    return found, json.loads((out / "summary.json").read_text())


def layout(found: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix + "[")
            or k.startswith(prefix + ".")}  # fmt: skip


def assert_same_records(found: dict, prefix: str) -> None:
    base, other = layout(found, "base"), layout(found, prefix)
    assert base.keys() == other.keys() and len(base) > 10
    for name, want in base.items():
        got = other[name]
        assert got.shape == want.shape, name
        if want.dtype.kind in "biu":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_market_trades_so_the_comparisons_mean_something(sharded):
    found, _ = sharded
    assert found["base.trades.mask"].sum() >= 2
    assert np.isfinite(found["base.test_loss"]).all()


def test_agents_split_over_devices_equal_the_unsharded_run(sharded):
    found, _ = sharded
    assert int(found["agents_pad"]) == 1  # 3 agents padded to 4 with one dead agent
    assert_same_records(found, "agents")


def test_state_keeps_the_population_split(sharded):
    """After the rounds, the population (runs, twins, N, ...) is split on its agent axis:
    each of the 4 devices holds 1 of the 4 (padded) agents; cash (runs, twins, N) too."""
    found, _ = sharded
    assert found["agents_spec"].tolist()[:3] == ["None", "None", "devices"]
    assert found["agents_shards"].tolist() == [1, 1, 1, 1]
    assert found["cash_spec"].tolist() == ["None", "None", "devices"]


def test_runs_split_over_devices_equal_the_unsharded_run(sharded):
    found, _ = sharded
    assert int(found["runs_chunk"]) == 4  # 2 runs padded to one call of 4, one per device
    assert_same_records(found, "runs")
    assert found["auto"].tolist() == ["agents", "runs", "runs"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paramarket(args, pid: int, port: int, out: pathlib.Path, **popen):
    sets = [x for o in OVERRIDES if not o.startswith("seeds") for x in ("--set", o)]
    argv = ["run", "paper_two_agent", *sets, "--seeds", "0,1", "--out", str(out / f"p{pid}"),
            "--no-report", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(pid), "--heartbeat", "3", "--connect-timeout", "60",
            *args]  # fmt: skip
    code = "import sys; from paramarket_jax.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env=env_with(JAX_NUM_CPU_DEVICES="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def test_two_processes_give_the_one_process_summary(sharded, tmp_path):
    """Two processes x 2 CPU devices = one 4-device run; process 0 alone writes, and its
    summary is the single-process, single-device run's."""
    _, want = sharded
    port = free_port()
    procs = [paramarket([], pid, port, tmp_path) for pid in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "[Gloo]" not in out + err
    assert "process 1 of 2: done (process 0 writes)" in outs[1][0]
    assert not (tmp_path / "p1").exists()
    got = json.loads((tmp_path / "p0" / "summary.json").read_text())
    w, g = dict(flat(want)), dict(flat(got))
    assert w.keys() == g.keys()
    for key, value in w.items():
        if isinstance(value, float):
            assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        else:
            assert g[key] == value, key


def test_a_killed_process_ends_the_other_with_one_line(tmp_path):
    """Process 1 is killed (with its whole process group) once both have joined; process 0
    stops within seconds with one clear line and exit code 2, and writes nothing."""
    port = free_port()
    p0 = paramarket([], 0, port, tmp_path)
    p1 = paramarket([], 1, port, tmp_path, start_new_session=True)
    # process 0 draws its progress bar once every process has joined (initialize returned)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: p0.stderr.read(1), "")))
    reader.start()
    deadline = time.monotonic() + 300
    while "rounds:" not in "".join(seen) and time.monotonic() < deadline and p0.poll() is None:
        time.sleep(0.2)
    assert "rounds:" in "".join(seen), "".join(seen)
    os.killpg(p1.pid, signal.SIGKILL)
    p1.communicate()
    start = time.monotonic()
    p0.wait(timeout=120)
    waited = time.monotonic() - start
    reader.join()
    p0.stdout.read()
    err = "".join(seen).replace("\r", "\n")
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("rounds:")]
    assert p0.returncode == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("paramarket: error: process 0: process 1 stopped answering")
    assert "nothing was written" in lines[0]
    assert waited < 60
    assert not (tmp_path / "p0").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--devices", "64"], "--devices must be between 1 and"),
        (["--devices", "-1"], "--devices: must be an integer >= 0"),
        (["--shard", "rows"], "invalid choice: 'rows'"),
        (["--coordinator", "127.0.0.1:1234"], "needs all of --coordinator"),
        (["--num-processes", "2", "--process-id", "0"], "needs all of --coordinator"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator must be HOST:PORT"),
        (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"],
         "--coordinator must be HOST:PORT"),
        (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be between 0 and 1"),
        (["--num-processes", "0"], "--num-processes: must be a positive integer"),
        (["--engine", "mesa", "--devices", "2"], None),
    ],
)  # fmt: skip
def test_bad_device_options_are_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if needle is None:  # needs 2 devices to get past --devices: only the mesa refusal
        if jax.device_count() < 2:
            needle = "--devices must be between 1 and"
        else:
            needle = "--devices above 1 needs the batch engine"
    try:
        code = main(["run", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_padding_adds_dead_agents_in_no_role():
    from paramarket_jax import scenario as sc
    from paramarket_jax.experiment import build, seed_data

    exp = build(sc.load("paper_two_agent", OVERRIDES))
    p = sharding.pad_params(exp.params, 2)
    assert p.learning_rate.shape == (5,) and p.alphas.shape == exp.params.alphas.shape
    assert p.initial_alive.tolist() == [True] * 3 + [False] * 2
    assert not p.seller_only[3:].any() and not p.hostile[3:].any() and not p.knobs.roles[3:].any()
    assert p.strategy.grid.shape == exp.params.strategy.grid.shape
    data, _ = seed_data(exp, 0)
    d = sharding.pad_data(data, 2)
    assert d.agents.val_idx.shape[0] == 5 and d.agents.x_train is data.agents.x_train
    spec = sharding.with_padding(exp.spec, 4, "agents")
    assert (spec.n, spec.pad, spec.real, spec.devices) == (4, 1, 3, 4)
    assert sharding.with_padding(exp.spec, 4, "runs").pad == 0
    assert sharding.padded(8, 4) == 8 and sharding.padded(9, 4) == 12
