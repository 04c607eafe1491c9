"""Tidy result tables (Parquet), summary.json and the run folder, written atomically."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pandas as pd

from paramarket_jax.errors import ParamarketError

ROUND_COLUMNS = [
    "loss", "accuracy", "val_accuracy", "siloed_loss", "siloed_accuracy", "fedavg_accuracy",
    "central_accuracy", "trades", "revenue", "cost", "payment", "receipt", "fees", "cash",
    "utility", "siloed_revenue", "siloed_cash", "siloed_utility", "alive", "siloed_alive",
    "diverged", "siloed_diverged",
]  # fmt: skip
TRADE_COLUMNS = [
    "seed", "round", "buyer", "seller", "hostile", "alpha", "predicted_gain", "gain_se",
    "acc_gain", "acc_gain_se", "realized_gain", "value", "realized_value", "estimation_error",
    "reservation", "bid", "ask", "price", "fee",
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
        "diverged": twin(r.diverged, "market") > 0,
        "siloed_diverged": twin(r.diverged, "siloed") > 0,
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
            "hostile": np.asarray(t.hostile, bool)[mask],
        }
    )
    gains = ("predicted_gain", "gain_se", "acc_gain", "acc_gain_se", "realized_gain")
    for col in ("alpha", *gains, "value", "realized_value"):
        df[col] = np.asarray(getattr(t, col), np.float64)[mask]
    df["estimation_error"] = df["value"] - df["realized_value"]
    for col in ("reservation", "bid", "ask", "price", "fee"):
        df[col] = np.asarray(getattr(t, col), np.float64)[mask]
    return df[TRADE_COLUMNS]


def market_lost(diverged, alive, test_loss) -> np.ndarray:
    """Rounds after which the market twin has no agent left that trains: every agent in
    the market has diverged (a non-finite test loss counts as diverged), and some has.

    Args:
        diverged, alive, test_loss: (..., T, N) host arrays (records' leaves).

    Returns:
        (...) bool.
    """
    gone = np.asarray(diverged)[..., 0, :] | ~np.isfinite(np.asarray(test_loss)[..., 0, :])
    alive = np.asarray(alive, bool)[..., 0, :]
    return (gone | ~alive).all(-1) & (gone & alive).any(-1)


def check_finite_losses(records, seeds, learning_rate) -> None:
    """Raise ParamarketError naming the first round and seed after which every agent of
    the market twin has diverged (:func:`market_lost`). A run in which only some agents
    diverge completes: they are frozen and marked (``diverged`` columns)."""
    lost = market_lost(records.diverged, records.alive, records.test_loss)
    if lost.any():
        s, r = (int(v[0]) for v in np.nonzero(lost))
        raise diverged(r, seeds[s], learning_rate)


def diverged(round_index: int, seed: int, learning_rate) -> ParamarketError:
    """The error for a run whose loss stopped being finite."""
    return ParamarketError(
        f"every agent's training diverged (loss not finite, or above train.diverge_loss "
        f"times its initial loss) by round {round_index}, seed {seed}; "
        f"lower train.learning_rate (now {learning_rate})"
    )


def invariant_violations(rounds: pd.DataFrame, trades: pd.DataFrame) -> list[str]:
    """The market's bookkeeping invariants, checked on a run's tables for every round.

    - money is conserved: each agent's utility changes by exactly its revenue minus its
      compute cost, minus what it paid, plus what it received, minus its fees (to float32
      rounding of its cash), so the agents' cash plus the broker's take (payments minus
      receipts plus fees) only changes by revenue and compute;
    - no payment without a trade: an agent pays only in a round it bought, and receives
      only in a round it sold;
    - the purchase counts in the rounds table are the trades table's.

    Returns:
        One line per violated invariant (the first offending seed, round and agent).
    """
    out = []
    r = rounds.sort_values(["seed", "agent", "round"])
    change = r.groupby(["seed", "agent"])["utility"].diff().fillna(r["utility"])
    flows = r["revenue"] - r["cost"] - r["payment"] + r["receipt"] - r["fees"]
    scale = np.maximum(r["cash"].abs(), (r["cash"] - r["utility"]).abs()).to_numpy(np.float32)
    tol = 16 * np.spacing(np.maximum(scale, 1).astype(np.float32)).astype(np.float64)
    bad = (change - flows).abs().to_numpy() > tol
    if bad.any():
        row = r[bad].iloc[0]
        out.append(
            f"money not conserved: seed {row['seed']}, round {row['round']}, agent "
            f"{row['agent']}: utility changed by {change[bad].iloc[0]:.6g}, its flows add to "
            f"{flows[bad].iloc[0]:.6g}"
        )
    keys = ["seed", "round", "agent"]
    for col, side in (("payment", "buyer"), ("receipt", "seller")):
        traded = set(map(tuple, trades[["seed", "round", side]].to_numpy().tolist()))
        paid = r.loc[r[col] != 0, keys]
        orphans = [k for k in map(tuple, paid.to_numpy().tolist()) if k not in traded]
        if orphans:
            s, rd, a = orphans[0]
            out.append(
                f"{col} without a trade: seed {s}, round {rd}, agent {a} ({len(orphans)} rows)"
            )
    # purchases per round: the rise of the cumulative count (an entrant's count restarts)
    rise = r.groupby(["seed", "agent"])["trades"].diff().fillna(r["trades"])
    rise = rise.where(rise >= 0, r["trades"]).to_numpy()
    per_round = trades.groupby(["seed", "round", "buyer"]).size() if len(trades) else None
    index = pd.MultiIndex.from_frame(r[keys].rename(columns={"agent": "buyer"}))
    counted = np.zeros(len(r)) if per_round is None else per_round.reindex(index, fill_value=0)
    if not np.array_equal(rise, np.asarray(counted)):
        out.append("purchase counts in the rounds table differ from the trades table")
    return out


def check_invariants(rounds: pd.DataFrame, trades: pd.DataFrame) -> None:
    """Raise ParamarketError naming the first violated invariant (``paramarket run --check``)."""
    violations = invariant_violations(rounds, trades)
    if violations:
        raise ParamarketError(f"invariant violated: {violations[0]}")


def summarize(rounds: pd.DataFrame, trades: pd.DataFrame) -> dict:
    """Per-agent outcomes against the siloed twins, per seed and averaged over seeds.

    ``mutual_gain`` for a seed (DESIGN.md s4): every agent's utility (revenue - costs -
    payments + receipts - fees, summed over rounds) exceeds its siloed twin's.
    ``accuracy_gain_all``: every agent ends with higher test accuracy than its twin.
    Welfare is the agents' total utility plus the broker's take. ``diverged``: market agents
    whose training diverged by the last round (frozen, no longer trading), a count per
    seed (with ``diverged_agents``), per agent the seeds in which it did, and the mean.
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
            diverged=int(df["diverged"].sum()),
            diverged_agents=df.loc[df["diverged"].astype(bool), "agent"].astype(int).tolist(),
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
                diverged=int(df["diverged"].astype(bool).sum()),
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
        diverged=float(np.mean([s["diverged"] for s in seeds])),
        mean_price=float(trades["price"].mean()) if len(trades) else None,
        mean_abs_estimation_error=float(errors.mean()) if len(trades) else None,
        per_seed=per_seed,
    )


def _mean_or_none(col: pd.Series):
    return None if col.isna().all() else float(col.mean())


# Temporary run folders are named ``.<name>.<pid>.<8 random characters>`` (tempfile's
# alphabet has no dots), so stale ones of a killed run can be told apart from anyone else's.
_TEMP_TAIL = re.compile(r"(\d+)\.[a-z0-9_]{8}")


def _temp_prefix(path: pathlib.Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _name_max(folder: pathlib.Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable(path: pathlib.Path, what: str = "--out") -> None:
    """Raise ParamarketError unless a folder can be created at ``path`` (and a temporary
    sibling beside it): every missing part of it fits a file name, and the nearest existing
    folder above it takes a new folder (probed by creating and removing one)."""
    try:
        absolute = pathlib.Path(path).resolve()
        existing = next(p for p in absolute.parents if p.exists())
    except (OSError, ValueError, RuntimeError) as err:
        raise ParamarketError(f"{what} {path}: not a usable path ({_strerror(err)})") from None
    if not existing.is_dir():
        raise ParamarketError(f"{what} {path}: {existing} is a file, not a folder")
    limit = _name_max(existing)
    missing = [p for p in [absolute, *absolute.parents] if existing in p.parents]
    names = [p.name for p in missing] + [_temp_prefix(absolute) + "x" * 8]
    too_long = [n for n in names if len(os.fsencode(n)) > limit]
    if too_long:
        raise ParamarketError(
            f"{what} {path}: the name {too_long[0][:40]!r}... is longer than this file system "
            f"allows ({limit} bytes)"
        )
    try:
        probe = tempfile.mkdtemp(prefix=_temp_prefix(absolute), dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise ParamarketError(
            f"{what} {path}: cannot create a folder in {existing} ({_strerror(err)}); "
            f"choose a writable location"
        ) from None


def _strerror(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)


def check_out_dir(out: str | os.PathLike, *, resume: bool = False) -> pathlib.Path:
    """The run folder must not exist yet, or be an empty folder, so nothing earlier is
    overwritten; it must be creatable (checked before any compute). Returns it as a Path.

    Args:
        out: the folder.
        resume: a sweep folder, which may already hold cells: it must be a folder (or
            creatable) in which new folders can be made.
    """
    path = pathlib.Path(out)
    if not str(out):
        raise ParamarketError("--out must name a folder, got an empty path")
    try:
        exists, is_dir = path.exists(), path.is_dir()
        not_empty = is_dir and any(path.iterdir())
    except (OSError, ValueError) as err:
        raise ParamarketError(f"--out {path}: not a usable path ({_strerror(err)})") from None
    if exists and not is_dir:
        raise ParamarketError(
            f"--out {path} already exists and is not a folder; choose a new folder"
        )
    if not_empty and not resume:
        raise ParamarketError(f"--out {path} already exists and is not empty; choose a new folder")
    check_writable(path / "cell" if resume and is_dir else path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process (or not a pid we can ask about): keep
    return True


def clean_stale_temps(path: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporary siblings ``.<name>.<pid>.*`` of ``path`` left by killed runs (their
    pid no longer exists); returns what was removed. Nobody else's folders are touched."""
    parent, head = path.parent, f".{path.name}."
    removed = []
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(head)]
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_TAIL.fullmatch(entry.name[len(head) :])
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_run(out: str | os.PathLike, files: dict[str, object]) -> pathlib.Path:
    """Write a run folder atomically: everything goes to a temporary sibling
    (``.<name>.<pid>.XXXXXXXX``), then renames; stale temporaries of killed runs are
    removed first. The folder gets the usual permissions (``0o777`` less the umask).

    Args:
        out: the run folder (must not exist or be empty).
        files: file name -> a DataFrame (Parquet), dict (JSON), str (text), or a callable
            taking the destination path (plots).
    """
    given = check_out_dir(out)
    path = given.resolve()  # a symbolic link to an empty folder (or to none) is followed
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _write_files(tmp, files)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _write_files(folder: pathlib.Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        dest = folder / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(dest, index=False)
        elif isinstance(content, dict):
            dest.write_text(json.dumps(content, indent=2) + "\n")
        elif isinstance(content, str):
            dest.write_text(content)
        elif isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            content(dest)


def write_into(out: str | os.PathLike, files: dict[str, object], last: str = "summary.json"):
    """Write a run's files into its existing folder (a checkpointed run's, see
    :mod:`paramarket_jax.checkpoint`): they are written to a temporary sibling first and
    renamed in one by one, ``last`` last, so a folder holding ``last`` holds every file
    whole. Stale temporaries of killed runs are removed first.
    """
    path = pathlib.Path(out).resolve()
    clean_stale_temps(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        _write_files(tmp, files)
        for name in sorted(files, key=lambda name: name == last):
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
