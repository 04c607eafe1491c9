"""The persistent compilation cache: a second run in a fresh process compiles nothing and
gives the same tables; a corrupt entry is compiled again with one warning; bad folders
are one line (exit 2)."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from shrink import SHRINK

from paramarket_jax.cli.main import main
from paramarket_jax.engines import cache

# a fresh process: counts XLA compilations and how many the persistent cache answered
CHILD = r"""
import json, sys
from paramarket_jax.cli.main import main
from paramarket_jax.engines.cache import counted
with counted() as counts:
    rc = main(sys.argv[1:])
print("COUNTS " + json.dumps(counts), flush=True)
sys.exit(rc)
"""
ARGS = ["run", "paper_two_agent", "--no-report", "--quiet", "--seeds", "0",
        *(f"--set={o}" for o in [*SHRINK, "train.rounds=2", "trading.start=1"])]  # fmt: skip


def run(out, *extra):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *ARGS, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("COUNTS "))
    return json.loads(line[7:]), proc.stderr


def tables(out):
    return [pd.read_parquet(out / name) for name in ("rounds.parquet", "trades.parquet")]


def test_a_second_run_compiles_nothing_and_a_corrupt_entry_is_compiled_again(tmp_path):
    folder = tmp_path / "cache"
    first, _ = run(tmp_path / "a", "--cache-dir", str(folder))
    assert first["compiles"] > 0 and first["hits"] == 0
    entries = sorted(p for p in folder.rglob("*") if p.is_file())
    assert any("simulate_runs" in p.name for p in entries)  # the market's own program
    # and its traced program (engines/programs): the next process does not trace it again
    assert any(p.parent.name == "programs" for p in entries)
    second, err = run(tmp_path / "b", "--cache-dir", str(folder))
    assert second["compiles"] == second["hits"] == first["compiles"]  # nothing compiled
    assert "warning" not in err
    for u, v in zip(tables(tmp_path / "a"), tables(tmp_path / "b"), strict=True):
        pd.testing.assert_frame_equal(u, v)
    # every entry (executables and traced programs) overwritten with garbage: traced and
    # compiled again, one warning line, the same tables
    garbage = b"not a compiled program" * 3
    for p in entries:
        p.write_bytes(garbage)
    third, err = run(tmp_path / "c", "--cache-dir", str(folder))
    assert third["hits"] < third["compiles"]
    warned = [line for line in err.splitlines() if "cache" in line]
    assert len(warned) == 1 and warned[0].startswith("paramarket: warning: "), err[-2000:]
    assert "could not be read" in warned[0] and "Traceback" not in err
    # and the unreadable files are gone or replaced (JAX never overwrites an entry): the
    # next run writes them anew instead of warning again
    # (the traced programs are checked by name and bytes: deserialising one here would need
    # this process to have registered the market's types, which depends on the tests before)
    from jax._src import compilation_cache

    for path in folder.glob("*-cache"):
        compilation_cache.decompress_executable(path.read_bytes())
    saved = [p for p in entries if p.parent.name == "programs"]
    assert saved and all(p.is_file() and p.read_bytes() != garbage for p in saved)
    for u, v in zip(tables(tmp_path / "a"), tables(tmp_path / "c"), strict=True):
        pd.testing.assert_frame_equal(u, v)


def test_no_cache_writes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV, str(folder))
    counts, _ = run(tmp_path / "a", "--no-cache")
    assert counts["hits"] == 0
    assert not folder.exists() or not any(folder.iterdir())


def test_the_default_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "x"))
    assert cache.default_folder() == tmp_path / "x"
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.default_folder() is None
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_folder() == tmp_path / "xdg" / "paramarket"


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--cache-dir", "/proc/no/such"], "cannot use /proc/no/such as the compilation cache"),
        (["--cache-dir", "x", "--no-cache"], "not allowed with argument"),
    ],
)
def test_a_bad_cache_folder_is_one_line(tmp_path, capsys, extra, says):
    before = cache.folder()
    try:
        with pytest.raises(SystemExit) if "--no-cache" in extra else contextlib.nullcontext():
            code = main([*ARGS, "--out", str(tmp_path / "run"), *extra])
            assert code == 2
    finally:
        cache.enable(before) if before else cache.disable()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_saved_program_is_keyed_by_the_source_and_the_shapes(monkeypatch):
    from paramarket_jax.engines import programs

    args = (np.zeros((2, 3), np.float32),)
    key = programs._key("f", ("spec",), args)
    assert key == programs._key("f", ("spec",), (np.ones((2, 3), np.float32),))  # values
    assert key != programs._key("f", ("spec",), (np.zeros((2, 4), np.float32),))
    assert key != programs._key("f", ("other spec",), args)
    monkeypatch.setattr(programs, "source_hash", lambda: "edited")
    assert key != programs._key("f", ("spec",), args)  # a changed line of code
