"""What the page's panels show, from a run's rounds and trades tables (the run folder's
format, one seed, the rounds so far): the same figures as a run's report
(:mod:`paramarket_jax.results.plots`) and a table per agent. No Solara here."""

from __future__ import annotations

import numpy as np
import pandas as pd

from paramarket_jax.results import plots

# panel title -> what it draws from (rounds, trades, number of agents): PNG bytes
FIGURES = {
    "Welfare": lambda rounds, trades, n: plots.welfare_per_round(
        rounds, "welfare per round: market against siloed"
    ),
    "Mean accuracy": lambda rounds, trades, n: plots.accuracy_per_round(rounds),
    "Trades and price": lambda rounds, trades, n: plots.prices_and_volume(rounds, trades),
    "Who bought from whom": lambda rounds, trades, n: plots.trade_matrix(
        trades, n, "who bought from whom (buyer row, seller column)"
    ),
}
AGENT_COLUMNS = ("agent", "cash", "accuracy", "alive", "bought", "sold")


def figures(rounds: pd.DataFrame, trades: pd.DataFrame, n: int) -> dict[str, bytes]:
    """Each panel's figure as PNG bytes; empty before the first round."""
    if not len(rounds):
        return {}
    return {title: draw(rounds, trades, n) for title, draw in FIGURES.items()}


def agents(rounds: pd.DataFrame, trades: pd.DataFrame, n: int) -> pd.DataFrame:
    """One row per agent after the last round of ``rounds``: cash, test accuracy, in the
    market, purchases (``bought``) and sales (``sold``) so far."""
    if not len(rounds):
        return pd.DataFrame(columns=list(AGENT_COLUMNS))
    last = rounds[rounds["round"] == rounds["round"].max()].set_index("agent").sort_index()
    last = last.reindex(range(n))
    sold = np.bincount(trades["seller"].to_numpy(np.int64), minlength=n)[:n]
    bought = np.bincount(trades["buyer"].to_numpy(np.int64), minlength=n)[:n]
    return pd.DataFrame(
        {
            "agent": np.arange(n),
            "cash": last["cash"].to_numpy(np.float64),
            "accuracy": last["accuracy"].to_numpy(np.float64),
            "alive": last["alive"].fillna(False).astype(bool).to_numpy(),
            "bought": bought,
            "sold": sold,
        }
    )


def headline(rounds: pd.DataFrame, trades: pd.DataFrame) -> dict[str, float]:
    """After the last round of ``rounds``: welfare market and siloed, mean accuracy market
    and siloed, and the trades so far (NaN before the first round)."""
    if not len(rounds):
        nan = float("nan")
        return dict(welfare=nan, siloed_welfare=nan, accuracy=nan, siloed_accuracy=nan, trades=0)
    w = plots.welfare_by_round(rounds).iloc[-1]
    last = rounds[rounds["round"] == rounds["round"].max()]
    return dict(
        welfare=float(w["market"]),
        siloed_welfare=float(w["siloed"]),
        accuracy=float(last["accuracy"].mean()),
        siloed_accuracy=float(last["siloed_accuracy"].mean()),
        trades=len(trades),
    )


def agents_html(table: pd.DataFrame) -> str:
    """The per-agent table as an HTML table (class ``agents-table``)."""
    return table.to_html(
        index=False,
        classes="agents-table",
        border=0,
        float_format=lambda v: f"{v:.3f}",
        na_rep="-",
    )
