"""The bit-for-bit claims at the XLA flags users get (the rest of the suite compiles at
level 0 with XLA's loop emitters, see tests/levels.py): one process at the default flags
runs a small market without checkpoints (through the saved, exported program),
checkpointed every round, and checkpointed every 3 of its 4 rounds, interrupted after its
first checkpoint and resumed (a chunk of 3 rounds, then a remainder of 1); every folder
holds the same tables, bit for bit.
"""

import subprocess
import sys

import pandas as pd
from levels import TEST_FLAGS, user_env
from shrink import SMALL

# a small market that aligns (optax's assignment solver) and merges, on Gaussian data
SETS = ["train.rounds=4", "data.dataset=gaussian", "data.n_train=1000", "data.n_test=300",
        "data.dim=16"]  # fmt: skip
ARGS = [*SMALL, *(a for o in SETS for a in ("--set", o)), "--no-report", "--seeds", "0,1"]

DRIVER = r"""
import os, pathlib, sys
from paramarket_jax.cli.main import main
from paramarket_jax.engines import checkpoint

flags = os.environ.get("XLA_FLAGS", "")
assert not any(f in flags for f in sys.argv[2].split(",")), flags
root, args = pathlib.Path(sys.argv[1]), sys.argv[3:]
assert main(["run", "--out", str(root / "plain"), *args]) == 0
assert main(["run", "--out", str(root / "every_round"), "--checkpoint-every", "1", *args]) == 0
real = checkpoint.Checkpoints.save


def save(self, b, carry):  # interrupted once its first checkpoint (round 3) is on disk
    real(self, b, carry)
    if carry.done == 3:
        self.manager.wait_until_finished()
        raise KeyboardInterrupt


checkpoint.Checkpoints.save = save
assert main(["run", "--out", str(root / "resumed"), "--checkpoint-every", "3", *args]) == 130
checkpoint.Checkpoints.save = real
assert main(["run", "--resume", str(root / "resumed"), "--quiet"]) == 0
"""


def test_checkpointed_and_resumed_runs_equal_the_plain_run_at_the_users_flags(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), ",".join(TEST_FLAGS), *ARGS],
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "after round 3 of 4" in proc.stderr, proc.stderr
    plain = tmp_path / "plain"
    trades = pd.read_parquet(plain / "trades.parquet")
    assert len(trades) > 0  # the market traded: the comparison covers merges
    for other in ("every_round", "resumed"):
        folder = tmp_path / other
        assert not (folder / ".checkpoints").exists() and (folder / "summary.json").is_file()
        for name in ("rounds.parquet", "trades.parquet"):
            a, b = pd.read_parquet(folder / name), pd.read_parquet(plain / name)
            pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=True)
        assert (folder / "summary.json").read_text() == (plain / "summary.json").read_text()
