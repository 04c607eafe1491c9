"""Figures that read result tables only (never kernels): each returns PNG bytes.

Colours are fixed across every figure: the market blue, its siloed twins orange, FedAvg
green, centralized purple; trades from hostile sellers red (from honest ones the market
blue); an agent above its siloed twin green, below it red. Lines are means over seeds;
bands span the seeds (min to max); error bars are one standard deviation over seeds.
Legends sit outside the data.

Drawn with matplotlib's object API (``Figure``, rendered by the Agg canvas), never pyplot:
importing this module leaves the process's backend as it was.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MARKET, SILOED, FEDAVG, CENTRAL = "#1f6fb4", "#e8801c", "#2f9e44", "#8c5aa8"
HOSTILE = "#c92a2a"
# who gained: an agent above its siloed twin green, below red; the parts of its gain
GAINED, LOST = "#2f9e44", "#c92a2a"
PARTS = (
    ("market_expansion", "market expansion", "#1f6fb4"),
    ("business_stealing", "business stealing", "#8c5aa8"),
    ("transfers", "transfers (prices, fees, compensation)", "#868e96"),
    ("cost_saving", "cost saving", "#f2c14e"),
)
# a trade's social value (all agents' revenue) beside its private one
SOCIAL, SOCIAL_LABEL = "#212529", "social (all agents' revenue)"
DPI = 110
MAX_AGENT_LINES = 12


def _figure(*args, figsize, **kw):
    """A figure and its axes (as ``pyplot.subplots``), outside pyplot: it renders with the
    Agg canvas whatever backend the process selected, and is freed with its last reference."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, **kw)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _band(ax, table: pd.DataFrame, color, label, style="-") -> None:
    """Plot a (round x seed) table: the mean over seeds, and a min-max band when seeds > 1."""
    mean = table.mean(axis=1)
    ax.plot(mean.index, mean.to_numpy(), style, color=color, label=label, lw=1.6)
    if table.shape[1] > 1:
        ax.fill_between(mean.index, table.min(axis=1), table.max(axis=1), color=color, alpha=0.15)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)


def welfare_by_round(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per seed and round: market welfare (utilities plus the broker's take so far) and
    siloed welfare (the twins' utilities), as columns ``market`` and ``siloed``."""
    g = rounds.groupby(["seed", "round"])
    flows = g["payment"].sum() - g["receipt"].sum() + g["fees"].sum()
    broker = flows.groupby(level="seed").cumsum()
    return pd.DataFrame(
        {"market": g["utility"].sum() + broker, "siloed": g["siloed_utility"].sum()}
    )


def welfare_per_round(rounds: pd.DataFrame, title: str = "") -> bytes:
    """Welfare per round, market against siloed (mean over seeds, band over seeds)."""
    w = welfare_by_round(rounds)
    fig, ax = _figure(figsize=(6.4, 3.8))
    _band(ax, w["market"].unstack("seed"), MARKET, "market (utilities + broker take)")
    _band(ax, w["siloed"].unstack("seed"), SILOED, "siloed twins", "--")
    _finish(ax, "round", "welfare (money units, cumulative)", title or "welfare per round")
    return _png(fig)


def accuracy_per_round(rounds: pd.DataFrame, title: str = "") -> bytes:
    """Mean test accuracy over agents per round: market, siloed and any baselines run."""
    fig, ax = _figure(figsize=(6.4, 3.8))
    for col, color, label, style in (
        ("accuracy", MARKET, "market", "-"),
        ("siloed_accuracy", SILOED, "siloed", "--"),
        ("fedavg_accuracy", FEDAVG, "FedAvg", "-."),
        ("central_accuracy", CENTRAL, "centralized", ":"),
    ):
        if col not in rounds or rounds[col].isna().all():  # a baseline not run
            continue
        table = rounds.groupby(["round", "seed"])[col].mean().unstack("seed")
        _band(ax, table, color, label, style)
    _finish(ax, "round", "mean test accuracy over agents", title or "accuracy per round")
    return _png(fig)


def accuracy_per_agent(rounds: pd.DataFrame, title: str = "") -> bytes:
    """Each agent's test accuracy per round, market (solid) against siloed (dashed)."""
    fig, ax = _figure(figsize=(6.4, 3.8))
    tab = matplotlib.colormaps["tab10"]
    palette = [tab(i) for i in (2, 3, 4, 5, 6, 8, 9, 7)]  # never the market blue or siloed orange
    for agent, df in rounds.groupby("agent"):
        c = palette[int(agent) % len(palette)]
        for col, style, label in (("accuracy", "-", "market"), ("siloed_accuracy", "--", "siloed")):
            table = df.pivot_table(index="round", columns="seed", values=col)
            _band(ax, table, c, f"agent {agent} {label}", style)
    _finish(ax, "round", "test accuracy", title or "accuracy per agent")
    return _png(fig)


def utility_gain_per_agent(rounds: pd.DataFrame, title: str = "") -> bytes:
    """Each agent's final utility minus its siloed twin's (mean, error bar: sd over seeds)."""
    last = rounds[rounds["round"] == rounds["round"].max()]
    gain = (last["utility"] - last["siloed_utility"]).groupby(last["agent"])
    mean, sd = gain.mean(), gain.std(ddof=0).fillna(0.0)
    n = len(mean)
    fig, ax = _figure(figsize=(min(max(5.0, 3.0 + 0.35 * n), 11.0), 3.6))
    colors = [MARKET if v >= 0 else SILOED for v in mean]
    ax.bar(
        mean.index,
        mean.to_numpy(),
        yerr=sd.to_numpy() if n <= 64 else None,
        color=colors,
        capsize=2 if n <= 32 else 0,
        width=0.8,
    )
    ax.axhline(0, color="0.3", lw=0.8)
    if n <= 32:
        ax.set_xticks(mean.index)
    _finish(
        ax,
        "agent",
        "utility gain over siloed twin (money units)",
        title or "final utility gain per agent (blue: gain, orange: loss)",
    )
    return _png(fig)


def gain_parts(rounds: pd.DataFrame) -> pd.DataFrame | None:
    """Per agent, the parts of its utility gain over its siloed twin (the rounds table's
    welfare decomposition columns, summed over rounds, mean over seeds); None for a table
    without them (written before the decomposition) or without a siloed twin."""
    cols = [c for c, _, _ in PARTS]
    if not set(cols) <= set(rounds.columns) or rounds[cols].isna().all().all():
        return None
    per_seed = rounds.groupby(["seed", "agent"])[cols].sum(min_count=1)
    return per_seed.groupby(level="agent").mean()


def who_gained(rounds: pd.DataFrame, title: str = "") -> bytes:
    """Per agent, sorted: its final utility gain over its siloed twin (mean over seeds;
    green above zero, red below), and beside it, stacked, the parts of that gain where the
    table has them (market expansion, business stealing, transfers, cost saving where
    there is any). The title counts the agent-seeds above their twins and gives the
    welfare gain, so a market whose welfare rose while most agents fell reads at once."""
    last = rounds[rounds["round"] == rounds["round"].max()]
    gain = last["utility"] - last["siloed_utility"]
    mean = gain.groupby(last["agent"]).mean().sort_values(ascending=False, kind="stable")
    above, total = int((gain > 0).sum()), len(gain)
    w = welfare_by_round(rounds).xs(rounds["round"].max(), level="round")
    welfare = float((w["market"] - w["siloed"]).mean())
    parts = gain_parts(rounds)
    n = len(mean)
    xs = np.arange(n, dtype=float)
    fig, ax = _figure(figsize=(min(max(5.6, 3.4 + 0.55 * n), 12.0), 4.0))
    wide = 0.8 if parts is None else 0.5
    shift = 0.0 if parts is None else -0.14
    values = mean.to_numpy()
    for side, color, label in (
        (values > 0, GAINED, "utility gain: above its twin"),
        (~(values > 0), LOST, "utility gain: below its twin"),
    ):
        if side.any():
            ax.bar(xs[side] + shift, values[side], width=wide, color=color, alpha=0.85, label=label)
    if parts is not None:
        parts = parts.reindex(mean.index)
        up, down = np.zeros(n), np.zeros(n)
        for col, label, color in PARTS:
            v = parts[col].fillna(0.0).to_numpy()
            if col == "cost_saving" and not np.any(np.abs(v) > 1e-12):
                continue  # no compute saved or spent: not drawn
            base = np.where(v >= 0, up, down)
            ax.bar(xs + 0.3, v, width=0.2, bottom=base, color=color, label=label, lw=0)
            up, down = up + np.maximum(v, 0), down + np.minimum(v, 0)
    ax.axhline(0, color="0.3", lw=0.8)
    if n <= 32:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(a) for a in mean.index])
    seeds = rounds["seed"].nunique()
    heading = (
        f"{above}/{total} agent-seeds above their siloed twins; welfare "
        f"{welfare:+.3g} against siloed (mean over {seeds} seed(s))"
    )
    _finish(
        ax,
        "agent (sorted by its gain)",
        "utility gain over siloed twin\n(money units, mean over seeds)",
        f"{title}\n{heading}" if title else heading,
    )
    return _png(fig)


def prices_and_volume(rounds: pd.DataFrame, trades: pd.DataFrame, title: str = "") -> bytes:
    """Trades per round and the mean price paid per round (mean and band over seeds)."""
    fig, (top, bottom) = _figure(2, 1, figsize=(6.4, 5.0), sharex=True)
    index = pd.MultiIndex.from_product(
        [sorted(rounds["round"].unique()), sorted(rounds["seed"].unique())], names=["round", "seed"]
    )
    volume = trades.groupby(["round", "seed"]).size().reindex(index, fill_value=0)
    _band(top, volume.unstack("seed").astype(float), MARKET, "trades")
    _finish(top, "", "trades per round", title or "trade volume and prices")
    if len(trades):
        price = trades.groupby(["round", "seed"])["price"].mean().unstack("seed")
        bottom.plot(
            price.index,
            price.mean(axis=1).to_numpy(),
            "o-",
            ms=3,
            color=MARKET,
            label="mean price per trade",
        )
        if price.shape[1] > 1:
            bottom.fill_between(
                price.index, price.min(axis=1), price.max(axis=1), color=MARKET, alpha=0.15
            )
    else:
        _empty(bottom, "no trades")
    _finish(bottom, "round", "price (money units)", "")
    return _png(fig)


def trade_matrix(trades: pd.DataFrame, n_agents: int, title: str = "") -> bytes:
    """Who bought from whom: trades and money paid per (buyer, seller), per seed on average."""
    seeds = max(trades["seed"].nunique(), 1) if len(trades) else 1
    count = np.zeros((n_agents, n_agents))
    money = np.zeros((n_agents, n_agents))
    if len(trades):
        b, s = trades["buyer"].to_numpy(), trades["seller"].to_numpy()
        np.add.at(count, (b, s), 1.0 / seeds)
        np.add.at(money, (b, s), trades["price"].to_numpy() / seeds)
    fig, axes = _figure(1, 2, figsize=(10.5, 4.4))
    for ax, m, label, cmap in (
        (axes[0], count, "trades per run", "Blues"),
        (axes[1], money, "money paid per run", "Oranges"),
    ):
        im = ax.imshow(
            m,
            cmap=cmap,
            origin="upper",
            aspect="equal",
            interpolation="nearest",
            vmin=0,
            vmax=float(m.max()) if m.max() > 0 else 1.0,
        )
        fig.colorbar(im, ax=ax, shrink=0.85)
        ax.set_xlabel("seller (agent)")
        ax.set_ylabel("buyer (agent)")
        ax.set_title(label, fontsize=10)
        if n_agents <= 16:
            ax.set_xticks(range(n_agents))
            ax.set_yticks(range(n_agents))
        if not len(trades):
            _empty(ax, "no trades")
        elif not m.any():
            _empty(ax, "every trade at price 0")
    fig.suptitle(title or "who bought from whom", fontsize=11)
    return _png(fig)


def value_scatter(trades: pd.DataFrame, title: str = "", hue: pd.Series | None = None) -> bytes:
    """Each trade's value estimated on the buyer's validation rows against its realised value
    on test: points near the diagonal mean try-before-buy predicts well. With a
    ``social_value`` column (tables written since trades were scored on every agent), each
    trade's social value (its effect on all agents' revenue) against the same estimate too,
    so a trade's private and social value are seen side by side."""
    fig, ax = _figure(figsize=(5.6, 4.6))
    social = _social_values(trades)
    if not len(trades):
        _empty(ax, "no trades")
    else:
        x, y = trades["value"].to_numpy(), trades["realized_value"].to_numpy()
        private = "private (buyer's own, rivals fixed)" if social is not None else "trade"
        if hue is None:
            ax.scatter(x, y, s=10, alpha=0.5, color=MARKET, label=private, lw=0)
        else:
            for i, (value, idx) in enumerate(trades.groupby(hue.to_numpy()).groups.items()):
                rows = trades.loc[idx]
                ax.scatter(
                    rows["value"],
                    rows["realized_value"],
                    s=10,
                    alpha=0.5,
                    lw=0,
                    color=matplotlib.colormaps["tab10"](i % 10),
                    label=f"{hue.name}={value}",
                )
        shown = [x, y]
        if social is not None:
            sx, sy = x[social], trades["social_value"].to_numpy()[social]
            ax.scatter(
                sx, sy, s=16, alpha=0.7, color=SOCIAL, marker="x", lw=0.8, label=SOCIAL_LABEL
            )
            shown.append(sy)
        lo = float(min(v.min() for v in shown))
        hi = float(max(v.max() for v in shown))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.3", lw=0.8, label="y = x")
        worse = float(np.mean(y < 0))
        corr = (
            float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else None
        )
        note = f"{len(x)} trades; {worse:.1%} realised < 0"
        note += f"; corr {corr:.2f}" if corr is not None else ""
        if social is not None:
            note += f"\n{float(np.mean(sy < 0)):.1%} social < 0"
            note += f"; social - private {float(np.mean(sy - y[social])):+.3g} per trade"
        ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=8)
    _finish(
        ax,
        "estimated value (validation, money units)",
        "realised value (test, money units)",
        title or "try-before-buy: estimated against realised value",
    )
    return _png(fig)


def _social_values(trades: pd.DataFrame) -> np.ndarray | None:
    """The trades whose ``social_value`` is known (a mask), None when none is (no such
    column: a table written before it existed)."""
    if "social_value" not in trades.columns or not len(trades):
        return None
    known = np.isfinite(pd.to_numeric(trades["social_value"], errors="coerce").to_numpy(float))
    return known if known.any() else None


def seller_is_hostile(trades: pd.DataFrame, hostile=()) -> pd.Series:
    """Per trade, whether its seller was hostile: the ``hostile`` column (tables written
    before it existed: the seller is one of the agents ``hostile``)."""
    if "hostile" in trades.columns:
        return trades["hostile"].eq(True)
    return trades["seller"].isin(list(hostile))


def has_hostile(trades: pd.DataFrame, hostile=()) -> bool:
    """A run has hostile agents: its scenario lists some (``hostile``), or some trade's
    seller was hostile."""
    return bool(len(hostile)) or bool(seller_is_hostile(trades, hostile).any())


def hostile_trades(trades: pd.DataFrame, seeds: int, hostile=(), title: str = "") -> bytes:
    """Purchases from hostile sellers against honest ones: each trade's realised value
    against its price (top), and the money paid and realised value per run, mean over seeds
    (bottom)."""
    mark = seller_is_hostile(trades, hostile).to_numpy()
    groups = (("honest sellers", ~mark, MARKET, "o"), ("hostile sellers", mark, HOSTILE, "x"))
    fig, (top, bottom) = _figure(2, 1, figsize=(6.4, 7.2))
    fig.subplots_adjust(hspace=0.4)
    if not len(trades):
        _empty(top, "no trades")
    else:
        for label, rows, color, marker in groups:
            t = trades[rows]
            if len(t):
                top.scatter(
                    t["price"],
                    t["realized_value"],
                    s=18,
                    alpha=0.7,
                    color=color,
                    marker=marker,
                    lw=1 if marker == "x" else 0,
                    label=f"{label} ({len(t)})",
                )
        price, realised = trades["price"].to_numpy(), trades["realized_value"].to_numpy()
        lo, hi = float(min(price.min(), 0)), float(max(price.max(), realised.max()))
        top.plot([lo, hi], [lo, hi], color="0.3", lw=0.8, label="realised = paid")
        top.axhline(0, color="0.3", lw=0.8, ls=":")
        if not mark.any():
            top.text(
                0.02,
                0.98,
                "no purchase from a hostile seller",
                transform=top.transAxes,
                va="top",
                fontsize=8,
            )
    _finish(
        top,
        "price paid (money units)",
        "realised value (test, money units)",
        title or "purchases from hostile and honest sellers",
    )
    per_run = max(int(seeds), 1)
    width = 0.38
    for k, (label, rows, color, _) in enumerate(groups):
        t = trades[rows]
        sums = np.array([t["price"].sum(), t["realized_value"].sum()]) / per_run
        worse = int((t["realized_gain"] < 0).sum())
        xs = np.arange(2) + (k - 0.5) * width
        bottom.bar(
            xs,
            sums,
            width=width,
            color=color,
            alpha=0.85,
            label=f"{label}: {len(t) / per_run:.3g} bought, {worse / per_run:.3g} "
            "made the buyer worse on test",
        )
    bottom.axhline(0, color="0.3", lw=0.8)
    bottom.set_xticks(range(2))
    bottom.set_xticklabels(["paid", "realised value"])
    _finish(bottom, "", "money units per run", f"per run, mean over {per_run} seed(s)")
    return _png(fig)


def _has_saving(rounds: pd.DataFrame) -> bool:
    parts = gain_parts(rounds)
    return parts is not None and bool((parts["cost_saving"].abs() > 1e-12).any())


def run_figures(rounds: pd.DataFrame, trades: pd.DataFrame, title: str = "", hostile=()) -> dict:
    """Every figure of one run: file name -> (PNG bytes, caption). ``hostile``: the agents
    its scenario marks hostile (with any, or a trade from a hostile seller, a figure of
    what buyers paid those sellers and got)."""
    n = int(rounds["agent"].max()) + 1
    seeds = rounds["seed"].nunique()
    spread = "band: min to max over seeds" if seeds > 1 else "one seed"
    out = {
        "welfare.png": (
            welfare_per_round(rounds, title),
            f"Welfare per round (sum of utilities plus the broker's take), market "
            f"against the siloed twins; mean over {seeds} seed(s), {spread}.",
        ),
        "who_gained.png": (
            who_gained(rounds, title),
            "Who gained: each agent's final utility against its siloed twin (mean over "
            f"{seeds} seed(s)), best first; green above its twin, red below."
            + (
                " The thin bar beside it splits that gain: market expansion (its share of "
                "the revenue the market added for all agents), business stealing (revenue "
                "it took from rivals, or lost to them), transfers (prices, fees and "
                "compensation it received less what it paid)"
                + (", cost saving (compute its twin paid for)" if _has_saving(rounds) else "")
                + "."
                if gain_parts(rounds) is not None
                else ""
            )
            + " The title counts the agent-seeds above their twins: welfare can rise while "
            "most agents end below theirs.",
        ),
        "accuracy.png": (
            accuracy_per_round(rounds, title),
            f"Mean test accuracy over agents per round; {spread}.",
        ),
        "utility_gain.png": (
            utility_gain_per_agent(rounds, title),
            "Each agent's final utility minus its siloed twin's; error bars: "
            "one standard deviation over seeds.",
        ),
        "prices_volume.png": (
            prices_and_volume(rounds, trades, title),
            f"Trades per round and mean price per trade; {spread}.",
        ),
        "trade_matrix.png": (
            trade_matrix(trades, n, title),
            "Who bought from whom: trades and money paid per run, averaged "
            "over seeds (rows: buyer, columns: seller).",
        ),
        "value_scatter.png": (
            value_scatter(trades, title),
            "Each trade's value as estimated on the buyer's validation rows "
            "against its realised value on test (the diagonal is a perfect "
            "estimate)"
            + (
                "; black crosses: the same trade's social value, its effect on all agents' "
                "revenue with the round's other trades standing (below the blue point: the "
                "buyer's gain came partly out of its rivals' revenue)."
                if _social_values(trades) is not None
                else "."
            ),
        ),
    }
    if n <= MAX_AGENT_LINES:
        out["accuracy_per_agent.png"] = (
            accuracy_per_agent(rounds, title),
            f"Each agent's test accuracy, market (solid) against siloed (dashed); {spread}.",
        )
    if has_hostile(trades, hostile):
        out["hostile.png"] = (
            hostile_trades(trades, seeds, hostile, title),
            "Purchases from hostile sellers (red crosses) and honest ones (blue): top, each "
            "trade's realised value on the buyer's test rows against the price paid (below "
            "the diagonal the buyer paid more than it got, below zero the merge lost "
            f"value); bottom, money paid and realised value per run, mean over {seeds} "
            "seed(s).",
        )
    return out


# ---- sweeps ---------------------------------------------------------------------------------


def _shade(k: int, values: list):
    """The k-th line colour for a knob's values: ordered shades (viridis without its pale
    yellow) for numbers, distinct hues for names."""
    if not _is_numeric(values):
        return matplotlib.colormaps["tab10"](k % 10)
    return matplotlib.colormaps["viridis"](0.85 * k / max(len(values) - 1, 1))


def _is_numeric(values) -> bool:
    return all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
        for v in values
    )


def _positions(values) -> tuple[dict, list | None]:
    """x position per knob value (numeric knobs keep their values; others are categories)."""
    values = list(dict.fromkeys(values))
    if _is_numeric(values):
        return {v: float(v) for v in values}, None
    return {v: float(i) for i, v in enumerate(values)}, [str(v) for v in values]


SWEEP_METRICS = (
    ("welfare_gain", "welfare gain over siloed\n(money units)"),
    ("accuracy_gain", "accuracy gain over siloed\n(points)"),
    ("mutual_gain", "mutual-gain share\n(fraction of seeds)"),
)


def sweep_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep table with the plotted gains as columns."""
    t = table.copy()
    t["welfare_gain"] = t["welfare"] - t["siloed_welfare"]
    t["accuracy_gain"] = 100.0 * (t["market_accuracy"] - t["siloed_accuracy"])
    t["mutual_gain"] = t["mutual_gain"].astype(float)
    return t


def sweep_panels(table: pd.DataFrame, knobs: list[str]) -> bytes:
    """Final welfare gain, accuracy gain and mutual-gain share against each swept knob.

    One column of panels per knob; one line per value of a second knob (the next one in the
    grid); any further knobs are averaged per seed first. Error bars: one standard deviation
    over seeds (for the mutual-gain share, the binomial standard error).
    """
    t = sweep_metrics(table)
    cols = len(knobs)
    fig, axes = _figure(3, cols, figsize=(4.2 * cols + 1.8, 8.4), squeeze=False)
    for j, knob in enumerate(knobs):
        other = knobs[(j + 1) % cols] if cols > 1 else None
        pos, labels = _positions(t[knob])
        keys = [knob] + ([other] if other else [])
        per_seed = t.groupby([*keys, "seed"], sort=False)[[m for m, _ in SWEEP_METRICS]].mean()
        line_values = list(dict.fromkeys(t[other])) if other else [None]
        offset = 0.0 if labels is None else 0.08
        for i, (metric, ylabel) in enumerate(SWEEP_METRICS):
            ax = axes[i, j]
            for k, lv in enumerate(line_values):
                sub = per_seed if lv is None else per_seed.xs(lv, level=other)
                g = sub[metric].groupby(level=knob, sort=False)
                mean, sd, count = g.mean(), g.std(ddof=0), g.count()
                if metric == "mutual_gain":
                    sd = np.sqrt(mean * (1 - mean) / count)
                xs = np.array([pos[v] for v in mean.index]) + offset * (
                    k - (len(line_values) - 1) / 2
                )
                order = np.argsort(xs)
                color = MARKET if lv is None else _shade(k, line_values)
                ax.errorbar(
                    xs[order],
                    mean.to_numpy()[order],
                    yerr=sd.to_numpy()[order],
                    ls="-" if labels is None else "none",  # names: no line between them
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=color,
                    label=None if lv is None else f"{other}={lv}",
                )
            if metric != "mutual_gain":
                ax.axhline(0, color="0.3", lw=0.8)
            else:
                ax.set_ylim(-0.05, 1.05)
            if labels is not None:
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(
                    labels,
                    rotation=30 if max(map(len, labels)) > 6 else 0,
                    ha="right" if max(map(len, labels)) > 6 else "center",
                )
            ax.set_ylabel(ylabel if j == 0 else "")
            ax.grid(alpha=0.3)
            if i == 2:
                ax.set_xlabel(knob)
            if i == 0:
                ax.set_title(f"against {knob}", fontsize=10)
                _legend(ax)
    fig.tight_layout()
    return _png(fig)


def sweep_welfare_per_round(cell_rounds: dict, table: pd.DataFrame, knobs: list[str]) -> bytes:
    """Welfare gain over siloed per round: one panel per value of the second knob, one line
    per value of the first (further knobs averaged per seed), band over seeds."""
    if not cell_rounds:  # no cell folder holds its tables (moved away, or deleted)
        fig, ax = _figure(figsize=(6.4, 3.3))
        _empty(ax, "no cell folder holds its rounds table")
        return _png(fig)
    frames = []
    cells = table.drop_duplicates("cell").set_index("cell")
    for cell, rounds in cell_rounds.items():
        w = welfare_by_round(rounds)
        gain = (w["market"] - w["siloed"]).rename("gain").reset_index()
        for knob in knobs:
            gain[knob] = [cells.loc[cell, knob]] * len(gain)
        frames.append(gain)
    data = pd.concat(frames, ignore_index=True)
    first = knobs[0]
    second = knobs[1] if len(knobs) > 1 else None
    panels = list(dict.fromkeys(table[second])) if second else [None]
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = _figure(
        rows, cols, figsize=(4.4 * cols + 2.0, 3.3 * rows), squeeze=False, sharey=True
    )
    lines = list(dict.fromkeys(table[first]))
    for p, pv in enumerate(panels):
        ax = axes[p // cols, p % cols]
        sub = data if pv is None else data[data[second] == pv]
        for k, lv in enumerate(lines):
            rows_ = sub[sub[first] == lv]
            per_seed = rows_.groupby(["round", "seed"])["gain"].mean().unstack("seed")
            color = _shade(k, lines)
            _band(ax, per_seed, color, f"{first}={lv}")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_title("" if pv is None else f"{second}={pv}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("welfare gain over siloed\n(money units)" if p % cols == 0 else "")
        ax.grid(alpha=0.3)
    for p in range(len(panels), rows * cols):
        axes[p // cols, p % cols].set_visible(False)
    _legend(axes[0, cols - 1])
    fig.tight_layout()
    return _png(fig)


def sweep_figures(
    table: pd.DataFrame, knobs: list[str], cell_rounds: dict, cell_trades: dict
) -> dict:
    """Every figure of a sweep: file name -> (PNG bytes, caption)."""
    rest = f"; {', '.join(knobs[2:])} averaged per seed" if len(knobs) > 2 else ""
    out = {
        "sweep_gains.png": (
            sweep_panels(table, knobs),
            "Final welfare gain, accuracy gain (percentage points) and the "
            "share of seeds with mutual gain (every agent's utility above its "
            "siloed twin's), against each swept knob; one line per value of "
            f"the next knob{rest}. Error bars: one standard deviation over "
            "seeds (binomial standard error for the share).",
        ),
        "sweep_welfare.png": (
            sweep_welfare_per_round(cell_rounds, table, knobs),
            "Welfare gain over the siloed twins per round, mean over seeds "
            f"with a min-max band{rest}.",
        ),
    }
    if cell_trades:
        trades = pd.concat(
            [
                t.assign(**{knobs[0]: table.loc[table["cell"] == c, knobs[0]].iloc[0]})
                for c, t in cell_trades.items()
            ],
            ignore_index=True,
        )
        hue = trades[knobs[0]] if len(trades) else None
        out["value_scatter.png"] = (
            value_scatter(trades, hue=hue),
            f"Every trade of every cell, estimated against realised value, coloured by {knobs[0]}.",
        )
    return out
