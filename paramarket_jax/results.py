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

ROUND_COLUMNS = [
    "loss", "accuracy", "val_accuracy", "siloed_loss", "siloed_accuracy", "fedavg_accuracy",
    "central_accuracy", "trades", "revenue", "cost", "payment", "receipt", "fees", "cash",
    "utility", "siloed_revenue", "siloed_cash", "siloed_utility", "alive", "siloed_alive",
]  # fmt: skip
TRADE_COLUMNS = [
    "seed", "round", "buyer", "seller", "alpha", "predicted_gain", "realized_gain", "value",
    "realized_value", "estimation_error", "reservation", "bid", "ask", "price", "fee",
]  # fmt: skip


def rounds_table(records, seeds, twin_names=("market", "siloed")) -> pd.DataFrame:
    """One row per seed x round x agent, built from round records in bulk.

    Args:
        records: a :class:`~paramarket_jax.round.RoundRecord` of host arrays, every leaf
            with leading axes (S seeds, R rounds).
        seeds: the S seed values.
        twin_names: what each index of the records' twin axis holds
            (``MarketSpec.twin_names``); columns of a missing twin are NaN.
    """
    r = records
    s_n, r_n, _, n = np.shape(r.test_acc)
    f64 = lambda a: np.asarray(a, np.float64).reshape(-1)  # noqa: E731
    nan = np.full(s_n * r_n * n, np.nan)

    def twin(a, name):
        if name not in twin_names:
            return nan
        return f64(np.asarray(a)[:, :, list(twin_names).index(name)])

    cash, siloed_cash = twin(r.cash, "market"), twin(r.cash, "siloed")
    endowment, siloed_endowment = twin(r.endowment, "market"), twin(r.endowment, "siloed")
    columns = {
        "seed": np.repeat(np.asarray(seeds, np.int64), r_n * n),
        "round": np.tile(np.repeat(np.arange(r_n, dtype=np.int64), n), s_n),
        "agent": np.tile(np.arange(n, dtype=np.int64), s_n * r_n),
        "loss": twin(r.test_loss, "market"),
        "accuracy": twin(r.test_acc, "market"),
        "val_accuracy": twin(r.val_acc, "market"),
        "siloed_loss": twin(r.test_loss, "siloed"),
        "siloed_accuracy": twin(r.test_acc, "siloed"),
        "fedavg_accuracy": twin(r.test_acc, "fedavg"),
        "central_accuracy": f64(r.central_acc),
        "trades": np.asarray(r.trade_count, np.int64).reshape(-1),
        "revenue": twin(r.revenue, "market"),
        "cost": twin(r.cost, "market"),
        "payment": f64(r.flows.payment),
        "receipt": f64(r.flows.receipt),
        "fees": f64(r.flows.fees),
        "cash": cash,
        "utility": cash - endowment,
        "siloed_revenue": twin(r.revenue, "siloed"),
        "siloed_cash": siloed_cash,
        "siloed_utility": siloed_cash - siloed_endowment,
        "alive": twin(r.alive, "market") > 0,
        "siloed_alive": twin(r.alive, "siloed") > 0,
    }
    assert list(columns)[3:] == ROUND_COLUMNS
    return pd.DataFrame(columns)


def trades_table(records, seeds) -> pd.DataFrame:
    """One row per settled trade, ordered by seed, round and buyer.

    Args:
        records: round records of host arrays with leading axes (S seeds, R rounds).
        seeds: the S seed values.
    """
    t = records.trades
    mask = np.asarray(t.mask, bool)
    s_idx, r_idx, buyer = np.nonzero(mask)
    df = pd.DataFrame(
        {
            "seed": np.asarray(seeds, np.int64)[s_idx],
            "round": r_idx.astype(np.int64),
            "buyer": buyer.astype(np.int64),
            "seller": np.asarray(t.seller)[mask].astype(np.int64),
        }
    )
    for col in ("alpha", "predicted_gain", "realized_gain", "value", "realized_value"):
        df[col] = np.asarray(getattr(t, col), np.float64)[mask]
    df["estimation_error"] = df["value"] - df["realized_value"]
    for col in ("reservation", "bid", "ask", "price", "fee"):
        df[col] = np.asarray(getattr(t, col), np.float64)[mask]
    return df[TRADE_COLUMNS]


def check_finite_losses(records, seeds, learning_rate) -> None:
    """Raise ParamarketError naming the first round and seed whose loss is not finite."""
    bad = ~np.isfinite(np.asarray(records.test_loss)).reshape(*np.shape(records.test_loss)[:2], -1)
    if bad.any():
        s, r = (int(v[0]) for v in np.nonzero(bad.any(-1)))
        raise diverged(r, seeds[s], learning_rate)


def diverged(round_index: int, seed: int, learning_rate) -> ParamarketError:
    """The error for a run whose loss stopped being finite."""
    return ParamarketError(
        f"training diverged (non-finite loss) at round {round_index}, seed {seed}; "
        f"lower train.learning_rate (now {learning_rate})"
    )


def summarize(rounds: pd.DataFrame, trades: pd.DataFrame) -> dict:
    """Per-agent outcomes against the siloed twins, per seed and averaged over seeds.

    ``mutual_gain`` for a seed (DESIGN.md s4): every agent's utility (revenue - costs -
    payments + receipts - fees, summed over rounds) exceeds its siloed twin's.
    ``accuracy_gain_all``: every agent ends with higher test accuracy than its twin.
    Welfare is the agents' total utility plus the broker's take.
    """
    last = rounds[rounds["round"] == rounds["round"].max()]
    per_seed = {}
    for seed, df in last.groupby("seed"):
        df = df.sort_values("agent")
        every = rounds[rounds["seed"] == seed]
        broker = float(every["payment"].sum() - every["receipt"].sum() + every["fees"].sum())
        t = trades[trades["seed"] == seed]
        acc_gain = df["accuracy"].to_numpy() - df["siloed_accuracy"].to_numpy()
        util_gain = df["utility"].to_numpy() - df["siloed_utility"].to_numpy()
        per_seed[int(seed)] = dict(
            market_accuracy=df["accuracy"].round(6).tolist(),
            siloed_accuracy=df["siloed_accuracy"].round(6).tolist(),
            utility=df["utility"].round(6).tolist(),
            siloed_utility=df["siloed_utility"].round(6).tolist(),
            accuracy_gain_all=bool((acc_gain > 0).all()),
            mutual_gain=bool((util_gain > 0).all()),
            welfare=float(df["utility"].sum() + broker),
            siloed_welfare=float(df["siloed_utility"].sum()),
            broker_take=broker,
            trades=int(len(t)),
            alive=int(df["alive"].sum()),
            revenue_of_sellers=float(t["price"].sum()),
            mean_abs_estimation_error=float(t["estimation_error"].abs().mean()) if len(t) else None,
        )
    agents = []
    n_seeds = max(len(per_seed), 1)
    for agent, df in last.groupby("agent"):
        agents.append(
            dict(
                agent=int(agent),
                market_accuracy=float(df["accuracy"].mean()),
                siloed_accuracy=float(df["siloed_accuracy"].mean()),
                gain=float((df["accuracy"] - df["siloed_accuracy"]).mean()),
                gain_std=float((df["accuracy"] - df["siloed_accuracy"]).std(ddof=0)),
                utility=float(df["utility"].mean()),
                siloed_utility=float(df["siloed_utility"].mean()),
                fedavg_accuracy=_mean_or_none(df["fedavg_accuracy"]),
                central_accuracy=_mean_or_none(df["central_accuracy"]),
                trades=float((trades["buyer"] == agent).sum() / n_seeds),
                sales=float((trades["seller"] == agent).sum() / n_seeds),
            )
        )
    seeds = per_seed.values()
    errors = trades["estimation_error"].abs()
    return dict(
        seeds=sorted(per_seed),
        rounds=int(rounds["round"].max()) + 1,
        agents=agents,
        market_accuracy=float(last["accuracy"].mean()),
        siloed_accuracy=float(last["siloed_accuracy"].mean()),
        accuracy_gain_all_fraction=float(np.mean([s["accuracy_gain_all"] for s in seeds])),
        mutual_gain=all(s["mutual_gain"] for s in seeds),
        mutual_gain_fraction=float(np.mean([s["mutual_gain"] for s in seeds])),
        welfare=float(np.mean([s["welfare"] for s in seeds])),
        siloed_welfare=float(np.mean([s["siloed_welfare"] for s in seeds])),
        broker_take=float(np.mean([s["broker_take"] for s in seeds])),
        trade_count=int(len(trades)),
        alive=float(np.mean([s["alive"] for s in seeds])),
        mean_price=float(trades["price"].mean()) if len(trades) else None,
        mean_abs_estimation_error=float(errors.mean()) if len(trades) else None,
        per_seed=per_seed,
    )


def _mean_or_none(col: pd.Series):
    return None if col.isna().all() else float(col.mean())


def check_out_dir(out: str | os.PathLike) -> pathlib.Path:
    """The run folder must not exist yet, or be empty, so nothing earlier is overwritten."""
    path = pathlib.Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ParamarketError(f"--out {path} already exists and is not empty; choose a new folder")
    existing = next(p for p in path.resolve().parents if p.exists())
    if not existing.is_dir():
        raise ParamarketError(f"--out {path}: {existing} is a file, not a folder")
    return path


def write_run(out: str | os.PathLike, files: dict[str, object]) -> pathlib.Path:
    """Write a run folder atomically: everything goes to a temporary sibling, then renames.

    Args:
        out: the run folder (must not exist or be empty).
        files: file name -> a DataFrame (Parquet), dict (JSON), str (text), or a callable
            taking the destination path (plots).
    """
    path = check_out_dir(out)
    path.resolve().parent.mkdir(parents=True, exist_ok=True)
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
