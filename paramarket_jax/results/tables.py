"""Tidy result tables from round records, the run summary, the bookkeeping invariants."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from paramarket_jax.errors import ParamarketError

ROUND_COLUMNS = [
    "loss", "accuracy", "val_accuracy", "siloed_loss", "siloed_accuracy", "fedavg_accuracy",
    "central_accuracy", "trades", "revenue", "cost", "payment", "receipt", "fees",
    "compensation", "cash", "utility", "siloed_revenue", "siloed_cost", "siloed_cash",
    "siloed_utility", "alive", "siloed_alive", "diverged", "siloed_diverged", "entered",
]  # fmt: skip
# the welfare decomposition (:func:`decompose`), added to the rounds table by a run
WELFARE_COLUMNS = [
    "market_expansion", "business_stealing", "transfers", "cost_saving", "utility_gain",
]  # fmt: skip
TRADE_COLUMNS = [
    "seed", "round", "buyer", "seller", "hostile", "alpha", "predicted_gain", "gain_se",
    "acc_gain", "acc_gain_se", "realized_gain", "value", "realized_value", "estimation_error",
    "reservation", "bid", "ask", "price", "fee", "second", "shipped", "transfer",
    "compensation", "social_value", "external_value",
]  # fmt: skip


def knob_text(value):
    """A swept value as a table shows it: scalars as they are, a list as its JSON text
    (hashable, so a table groups by it)."""
    return value if np.isscalar(value) or value is None else json.dumps(np.asarray(value).tolist())


def rounds_table(records, seeds, twin_names=("market", "siloed")) -> pd.DataFrame:
    """One row per seed x round x agent, built from round records in bulk.

    Args:
        records: a :class:`~paramarket_jax.market.types.RoundRecord` of host arrays, every leaf
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
        "compensation": f64(r.flows.compensation),
        "cash": cash,
        "utility": cash - endowment,
        "siloed_revenue": twin(r.revenue, "siloed"),
        "siloed_cost": twin(r.cost, "siloed"),
        "siloed_cash": siloed_cash,
        "siloed_utility": siloed_cash - siloed_endowment,
        "alive": twin(r.alive, "market") > 0,
        "siloed_alive": twin(r.alive, "siloed") > 0,
        "diverged": twin(r.diverged, "market") > 0,
        "siloed_diverged": twin(r.diverged, "siloed") > 0,
        # a newcomer took the slot at the end of the round (alive from the next round on)
        "entered": np.asarray(r.entered, bool).reshape(-1),
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
    for col in TRADE_COLUMNS[TRADE_COLUMNS.index("reservation") :]:
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
      compute cost, minus what it paid, plus what it received, minus its fees, plus the
      compensation it received less what it paid (to float32
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
    flows = flows + r.get("compensation", 0.0)
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
    entered = r.get("entered", pd.Series(False, index=r.index)).astype(bool)
    came = entered.groupby([r["seed"], r["agent"]]).shift(fill_value=False)
    rise = rise.where(~came & (rise >= 0), r["trades"]).to_numpy()
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


def decompose(rounds: pd.DataFrame, revenue: str) -> pd.DataFrame:
    """Each agent's utility gain over its siloed twin, per round, in four parts
    (:data:`WELFARE_COLUMNS`, aligned with ``rounds``' rows).

    - ``market_expansion`` and ``business_stealing`` split the revenue difference
      ``R_i - R_i^s``. With the agents' total revenue T and agent i's share s_i of it, in
      the market (m) and the siloed world (s): expansion is the change of the total at the
      mean share, ``(T^m - T^s) (s^m_i + s^s_i) / 2``, and stealing the change of the share
      at the mean total, ``(T^m + T^s) (s^m_i - s^s_i) / 2`` (the symmetric split of a
      product, so neither world is the reference). Stealing sums to zero over the agents:
      it is revenue moved between them. Expansion sums to the change of total revenue:
      customers won from the outside option, or revenue that grows with quality. In an
      ``independent`` market no agent's revenue depends on another's, so the whole
      difference is expansion.
    - ``transfers``: receipts - payments - fees + compensation (money between agents and
      to the broker: over the agents it sums to minus the broker's take).
    - ``cost_saving``: the twin's compute cost less the agent's.
    - ``utility_gain``: their sum, the round's change of ``utility - siloed_utility``
      (money is conserved, :func:`invariant_violations`, so the parts over a run add up to
      the final utility gain, and over agents plus the broker to the welfare gain).

    A run without its siloed twin has NaN parts.
    """
    r = rounds
    keys = [r["seed"], r["round"]]
    rev, twin = r["revenue"].astype(float), r["siloed_revenue"].astype(float)
    total_m = rev.groupby(keys).transform("sum")
    total_s = twin.groupby(keys).transform("sum")
    share_m = (rev / total_m.where(total_m != 0)).fillna(0.0)
    share_s = (twin / total_s.where(total_s != 0)).fillna(0.0)
    # a world without revenue has no shares: take the other world's (all is expansion)
    share_m, share_s = share_m.where(total_m != 0, share_s), share_s.where(total_s != 0, share_m)
    if revenue == "independent":
        expansion, stealing = rev - twin, pd.Series(0.0, index=r.index).where(twin.notna())
    else:
        expansion = (total_m - total_s) * (share_m + share_s) / 2
        stealing = (total_m + total_s) * (share_m - share_s) / 2
    transfers = r["receipt"] - r["payment"] - r["fees"] + r.get("compensation", 0.0)
    saving = r["siloed_cost"] - r["cost"]
    parts = pd.DataFrame(
        {
            "market_expansion": expansion,
            "business_stealing": stealing,
            "transfers": transfers.where(twin.notna()),
            "cost_saving": saving,
        }
    ).astype(np.float64)
    parts["utility_gain"] = parts.sum(axis=1, skipna=False)
    return parts[WELFARE_COLUMNS]


def welfare_parts(rounds: pd.DataFrame, revenue: str) -> dict:
    """A run's welfare decomposition per seed (:func:`decompose`, summed over rounds and
    agents): ``welfare_gain`` (welfare - siloed welfare) = ``market_expansion`` +
    ``cost_saving`` + ``business_stealing`` (zero but for rounding); ``stolen``: revenue
    moved between agents (the sum of the positive stealing); ``agent_transfers``: what
    the agents paid the broker, net (minus its take); ``agents_gain``: the agents' total
    utility gain. None without a siloed twin."""
    parts = rounds.reindex(columns=WELFARE_COLUMNS)
    if parts.isna().all().all():
        parts = decompose(rounds, revenue)
    if parts["utility_gain"].isna().any():
        return {}
    out = {}
    for seed, p in parts.groupby(rounds["seed"]):
        stolen = p["business_stealing"].clip(lower=0).sum()
        expansion, saving = p["market_expansion"].sum(), p["cost_saving"].sum()
        out[int(seed)] = dict(
            welfare_gain=float(expansion + saving + p["business_stealing"].sum()),
            market_expansion=float(expansion),
            business_stealing=float(p["business_stealing"].sum()),
            stolen=float(stolen),
            cost_saving=float(saving),
            agent_transfers=float(p["transfers"].sum()),
            agents_gain=float(p["utility_gain"].sum()),
        )
    return out


def summarize(rounds: pd.DataFrame, trades: pd.DataFrame, revenue: str | None = None) -> dict:
    """Per-agent outcomes against the siloed twins, per seed and averaged over seeds.

    With the welfare decomposition's columns in ``rounds`` (a run adds them) or the
    market's ``revenue`` kind to compute them, every seed, every agent and the means gain
    its parts (:func:`welfare_parts`; per agent, summed over rounds), and
    ``better_off_fraction`` is the share of agent-seeds whose utility beats their twin's.

    ``mutual_gain`` for a seed (DESIGN.md s4): every agent's utility (revenue - costs -
    payments + receipts - fees, summed over rounds) exceeds its siloed twin's.
    ``accuracy_gain_all``: every agent ends with higher test accuracy than its twin.
    Welfare is the agents' total utility plus the broker's take. ``diverged``: market agents
    whose training diverged by the last round (frozen, no longer trading), a count per
    seed (with ``diverged_agents``), per agent the seeds in which it did, and the mean.
    ``alive``: market agents in the market after the last round (its exits, before its
    entries); ``entered``: newcomers that entered over the run (``agents.entry``).
    """
    last = rounds[rounds["round"] == rounds["round"].max()]
    have = set(WELFARE_COLUMNS) <= set(rounds.columns)
    parts = welfare_parts(rounds, revenue) if have or revenue else {}
    per_agent_parts = (
        (rounds[WELFARE_COLUMNS] if have else decompose(rounds, revenue))
        .groupby([rounds["seed"], rounds["agent"]])
        .sum()
        .groupby(level="agent")
        .mean()
        if parts
        else None
    )
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
            entered=int(every["entered"].sum()) if "entered" in every else 0,
            diverged=int(df["diverged"].sum()),
            diverged_agents=df.loc[df["diverged"].astype(bool), "agent"].astype(int).tolist(),
            revenue_of_sellers=float(t["price"].sum()),
            mean_abs_estimation_error=float(t["estimation_error"].abs().mean()) if len(t) else None,
            better_off=int((util_gain > 0).sum()),
            **({"decomposition": parts[int(seed)]} if parts else {}),
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
                better_off=float((df["utility"] > df["siloed_utility"]).mean()),
                paid=float(_of(trades, "buyer", agent)["price"].sum() / n_seeds),
                received=float(_of(trades, "seller", agent)["price"].sum() / n_seeds),
                **_loss_columns(df),
                **(
                    {k: float(v) for k, v in per_agent_parts.loc[agent].items()}
                    if per_agent_parts is not None
                    else {}
                ),
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
        entered=float(np.mean([s["entered"] for s in seeds])),
        diverged=float(np.mean([s["diverged"] for s in seeds])),
        mean_price=float(trades["price"].mean()) if len(trades) else None,
        mean_abs_estimation_error=float(errors.mean()) if len(trades) else None,
        better_off_fraction=float((last["utility"] > last["siloed_utility"]).mean()),
        **({"decomposition": _mean_parts(parts)} if parts else {}),
        per_seed=per_seed,
    )


def _of(trades: pd.DataFrame, side: str, agent) -> pd.DataFrame:
    return trades[trades[side] == agent]


def _mean_parts(parts: dict) -> dict:
    """The seeds' mean of each part of :func:`welfare_parts`."""
    return {k: float(np.mean([p[k] for p in parts.values()])) for k in next(iter(parts.values()))}


def _loss_columns(df: pd.DataFrame) -> dict:
    """An agent's final test losses beside the lowest loss its test rows allow, where the
    dataset knows it (``loss_floor``: a Markov dataset's entropy rates)."""
    if "loss_floor" not in df:
        return {}
    return dict(
        market_loss=float(df["loss"].mean()),
        siloed_loss=float(df["siloed_loss"].mean()),
        loss_floor=float(df["loss_floor"].mean()),
    )


def _mean_or_none(col: pd.Series):
    return None if col.isna().all() else float(col.mean())
