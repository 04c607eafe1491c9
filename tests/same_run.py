"""One check shared by the checkpoint tests: two run folders hold the same run."""

import pandas as pd


def assert_same_run(out, ref):
    """The tables exactly (dtypes too), ``summary.json`` and ``scenario.toml`` byte for byte."""
    for name in ("rounds.parquet", "trades.parquet"):
        a, b = pd.read_parquet(out / name), pd.read_parquet(ref / name)
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=True)
    for name in ("summary.json", "scenario.toml"):
        assert (out / name).read_text() == (ref / name).read_text(), name
