"""Tidy result tables (Parquet), summary.json and the run folder, written atomically."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pandas as pd

from paramarket_jax.errors import ParamarketError

ROUND_COLUMNS = {
    "accuracy": "accuracy",
    "loss": "loss",
    "val_accuracy": "val_accuracy",
    "siloed_accuracy": "siloed_accuracy",
    "siloed_loss": "siloed_loss",
    "fedavg_accuracy": "fedavg_accuracy",
    "central_accuracy": "central_accuracy",
    "trades": "trades",
}
TRADE_COLUMNS = [
    "seed",
    "round",
    "buyer",
    "seller",
    "alpha",
    "predicted_gain",
    "realized_gain",
    "price",
]


def rounds_table(market) -> pd.DataFrame:
    """One row per round x agent of one seed, from the model's Mesa DataCollector."""
    df = market.datacollector.get_agent_vars_dataframe().reset_index()
    agent = df["AgentID"].map({a.unique_id: a.index for a in market.traders})
    out = pd.DataFrame({"seed": market.seed_value, "round": df["Step"] - 1, "agent": agent})
    for col in ROUND_COLUMNS:
        out[col] = df[col].to_numpy()
    return out.astype({"seed": "int64", "round": "int64", "agent": "int64", "trades": "int64"})


def trades_table(market) -> pd.DataFrame:
    """One row per settled trade of one seed."""
    return pd.DataFrame(market.trade_log, columns=TRADE_COLUMNS).astype(
        {"seed": "int64", "round": "int64", "buyer": "int64", "seller": "int64"}
    )


def summarize(rounds: pd.DataFrame, trades: pd.DataFrame) -> dict:
    """Final accuracy per agent, market against siloed, per seed and averaged over seeds.

    ``mutual_gain`` for a seed: every agent ends with higher test accuracy in the market
    than its siloed twin.
    """
    last = rounds[rounds["round"] == rounds["round"].max()]
    per_seed = {}
    for seed, df in last.groupby("seed"):
        df = df.sort_values("agent")
        gain = df["accuracy"].to_numpy() - df["siloed_accuracy"].to_numpy()
        per_seed[int(seed)] = dict(
            market_accuracy=df["accuracy"].round(6).tolist(),
            siloed_accuracy=df["siloed_accuracy"].round(6).tolist(),
            mutual_gain=bool((gain > 0).all()),
            trades=int((trades["seed"] == seed).sum()),
        )
    agents = []
    for agent, df in last.groupby("agent"):
        agents.append(
            dict(
                agent=int(agent),
                market_accuracy=float(df["accuracy"].mean()),
                siloed_accuracy=float(df["siloed_accuracy"].mean()),
                gain=float((df["accuracy"] - df["siloed_accuracy"]).mean()),
                gain_std=float((df["accuracy"] - df["siloed_accuracy"]).std(ddof=0)),
                fedavg_accuracy=_mean_or_none(df["fedavg_accuracy"]),
                central_accuracy=_mean_or_none(df["central_accuracy"]),
                trades=float(((trades["buyer"] == agent).sum()) / max(len(per_seed), 1)),
            )
        )
    return dict(
        seeds=sorted(per_seed),
        rounds=int(rounds["round"].max()) + 1,
        agents=agents,
        market_accuracy=float(last["accuracy"].mean()),
        siloed_accuracy=float(last["siloed_accuracy"].mean()),
        mutual_gain=all(s["mutual_gain"] for s in per_seed.values()),
        mutual_gain_fraction=float(np.mean([s["mutual_gain"] for s in per_seed.values()])),
        trade_count=int(len(trades)),
        per_seed=per_seed,
    )


def _mean_or_none(col: pd.Series):
    return None if col.isna().all() else float(col.mean())


def check_out_dir(out: str | os.PathLike) -> pathlib.Path:
    """The run folder must not exist yet, or be empty, so nothing earlier is overwritten."""
    path = pathlib.Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ParamarketError(f"--out {path} already exists and is not empty; choose a new folder")
    if not path.resolve().parent.exists():
        raise ParamarketError(f"--out {path}: parent folder {path.resolve().parent} does not exist")
    return path


def write_run(out: str | os.PathLike, files: dict[str, object]) -> pathlib.Path:
    """Write a run folder atomically: everything goes to a temporary sibling, then renames.

    Args:
        out: the run folder (must not exist or be empty).
        files: file name -> a DataFrame (Parquet), dict (JSON), str (text), or a callable
            taking the destination path (plots).
    """
    path = check_out_dir(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.resolve().parent))
    try:
        for name, content in files.items():
            dest = tmp / name
            if isinstance(content, pd.DataFrame):
                content.to_parquet(dest, index=False)
            elif isinstance(content, dict):
                dest.write_text(json.dumps(content, indent=2) + "\n")
            elif isinstance(content, str):
                dest.write_text(content)
            else:
                content(dest)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
