"""When does mutual gain survive competition? Sweeps of ``rival_market`` and their table.

``run`` sweeps the competition's knobs one arm at a time around ``rival_market`` (five
rivals for one market, gamma 1, outside option 0.5, Nash bargaining, myopic valuation, no
compensation): competition intensity, the outside option crossed with compensation of the
third parties, the number of agents, the mechanism, and the valuation crossed with
compensation. Each arm is a ``paramarket sweep`` folder; next to its ``sweep.parquet``
the arm gets ``study.parquet``: one row per cell x seed with the sweep's columns (welfare,
its decomposition, agents above their twins) and the trades' private and social values.

``report`` reads the ``study.parquet`` files and prints the table (mean ± sd over seeds)
and draws the figure.

python analysis/competition.py run --out runs/competition --seeds 5
python analysis/competition.py report runs/competition --figure docs/figures/competition.png
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pandas as pd

BASE = "rival_market"
ARMS = {
    "gamma": [("economics.gamma", [0.5, 1.0, 2.0, 4.0])],
    "outside": [
        ("economics.outside_option", [0.0, 0.25, 0.5, 1.0]),
        ("economics.compensation", [0.0, 1.0]),
    ],
    "agents": [("agents.n", [3, 5, 8])],
    "mechanism": [("mechanism.name", ["take_it", "nash_bargaining", "vcg_assignment"])],
    "valuation": [
        ("broker.valuation", ["myopic", "anticipating"]),
        ("economics.compensation", [0.0, 1.0]),
    ],
}


def run(out: pathlib.Path, seeds: int, arms: list[str], extra=()) -> None:
    from paramarket_jax.sweep import run_sweep

    overrides = [f"seeds={list(range(seeds))}", *extra]
    for arm in arms:
        folder = out / arm
        print(f"arm {arm}", flush=True)
        run_sweep(BASE, ARMS[arm], overrides, folder, report=False)
        study(folder).to_parquet(folder / "study.parquet", index=False)


def study(folder: pathlib.Path) -> pd.DataFrame:
    """The sweep's rows with each cell x seed's trade sums and agent count added."""
    sweep = pd.read_parquet(folder / "sweep.parquet")
    extra = []
    for cell, g in sweep.groupby("cell"):
        trades = pd.read_parquet(folder / cell / "trades.parquet")
        n = len(json.loads((folder / cell / "summary.json").read_text())["agents"])
        for seed in g["seed"]:
            t = trades[trades["seed"] == seed]
            extra.append(
                {
                    "cell": cell,
                    "seed": seed,
                    "agents": n,
                    "private_value": t["realized_value"].sum(),
                    "social_value": t["social_value"].sum(),
                    "external_value": t["external_value"].sum(),
                    "compensation_paid": t["compensation"].sum(),
                    "price_paid": t["price"].sum(),
                }
            )
    return sweep.merge(pd.DataFrame(extra), on=["cell", "seed"])


def _ms(values, fmt: str = "+.2f") -> str:
    v = np.asarray(values, float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=0):{fmt.lstrip('+')}}"


KNOBS = {
    "economics.gamma": "gamma",
    "economics.outside_option": "outside",
    "economics.compensation": "compensation",
    "agents.n": "N",
    "mechanism.name": "mechanism",
    "broker.valuation": "valuation",
}


def table(out: pathlib.Path) -> pd.DataFrame:
    """One row per (arm, cell): the cell's knobs and mean ± sd over seeds."""
    rows = []
    for arm in ARMS:
        path = out / arm / "study.parquet"
        if not path.exists():
            continue
        df = pd.read_parquet(path)
        knobs = [k for k, _ in ARMS[arm]]
        for values, g in df.groupby(knobs, sort=False):
            values = values if isinstance(values, tuple) else (values,)
            gain = g["welfare"] - g["siloed_welfare"]
            rows.append(
                {
                    "arm": arm,
                    "cell": ", ".join(
                        f"{KNOBS[k]} {v}" for k, v in zip(knobs, values, strict=True)
                    ),
                    "welfare gain": _ms(gain),
                    "expansion": _ms(g["market_expansion"]),
                    "stolen": _ms(g["stolen"]),
                    "above twin": f"{(g['better_off'] / g['agents']).mean():.0%}",
                    "mutual gain": f"{int(g['mutual_gain'].sum())}/{len(g)}",
                    "trades": f"{g['trades'].mean():.0f}",
                    "private / social value": f"{g['private_value'].mean():.2f} / "
                    f"{g['social_value'].mean():.2f}",
                    "_gain": gain.mean(),
                    "_above": (g["better_off"] / g["agents"]).mean(),
                    "_above_sd": (g["better_off"] / g["agents"]).std(ddof=0),
                    "_gain_sd": gain.std(ddof=0),
                }
            )
    return pd.DataFrame(rows)


SHORT = {
    "nash_bargaining": "nash",
    "vcg_assignment": "vcg",
    "anticipating": "antic.",
    "compensation": "comp.",
    "valuation ": "",
    "mechanism ": "",
    "outside ": "out ",
}


def _short(cell: str) -> str:
    """A cell's tick label: one knob a line, long names shortened (the panel names the arm)."""
    for long, short in SHORT.items():
        cell = cell.replace(long, short)
    return cell.replace(", ", "\n")


def figure(t: pd.DataFrame, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if (t["arm"] == a).any()]
    widths = [max(3, int((t["arm"] == a).sum())) for a in arms]
    fig, axes = plt.subplots(
        2,
        len(arms),
        figsize=(0.9 * sum(widths) + 1.5, 6.2),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for col, arm in enumerate(arms):
        g = t[t["arm"] == arm]
        x = np.arange(len(g))
        labels = [_short(c) for c in g["cell"]]
        top, bottom = axes[0, col], axes[1, col]
        top.bar(x, g["_gain"], yerr=g["_gain_sd"], color="tab:blue", capsize=2)
        top.axhline(0, color="k", lw=0.6)
        top.set_title(arm)
        top.set_xticks(x, labels, fontsize=7)
        bottom.bar(x, 100 * g["_above"], yerr=100 * g["_above_sd"], color="tab:green", capsize=2)
        bottom.axhline(100, color="k", lw=0.6, ls=":")
        bottom.set_ylim(0, 105)
        bottom.set_xticks(x, labels, fontsize=7)
        if col == 0:
            top.set_ylabel("welfare - siloed welfare")
            bottom.set_ylabel("% of agent-seeds above twin")
    fig.suptitle("When does mutual gain survive competition? (rival_market, mean ± sd over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/competition"))
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--set", action="append", default=[], help="an override for every cell")
    s = sub.add_parser("report")
    s.add_argument("out", type=pathlib.Path)
    s.add_argument("--figure", type=pathlib.Path)
    args = p.parse_args(argv)
    if args.command == "run":
        run(args.out, args.seeds, args.arms, args.set)
        return
    t = table(args.out)
    shown = t[[c for c in t if not c.startswith("_")]]
    print("| " + " | ".join(shown.columns) + " |")
    print("|" + "---|" * len(shown.columns))
    for row in shown.itertuples(index=False):
        print("| " + " | ".join(map(str, row)) + " |")
    if args.figure:
        figure(t, args.figure)


if __name__ == "__main__":
    main()
