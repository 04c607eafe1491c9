"""Which merge should a broker offer? A table and a figure from ``foundation_market`` sweeps.

For every cell of the sweep folders given (one per merge method, fit or kind of good): the
market's final test loss and accuracy against the siloed twins', welfare, trades, prices,
the parameters shipped per trade and the realised value per million shipped parameters,
mean ± sd over seeds. Reads only what the sweeps wrote (sweep.parquet, each cell's
rounds.parquet and trades.parquet).

python analysis/merge_methods.py runs/foundation_merges runs/foundation_fit \
    runs/foundation_goods --figure docs/figures/merge_methods.png
"""

from __future__ import annotations

import argparse
import pathlib
import tomllib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _ms(values, fmt: str = ".3f") -> str:
    v = np.asarray(values, float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=0):{fmt.lstrip('+')}}"


def cells(folders: list[str]) -> pd.DataFrame:
    """One row per (cell, seed): final losses and accuracies, welfare, trades, prices."""
    rows = []
    for folder in folders:
        sweep = pd.read_parquet(pathlib.Path(folder) / "sweep.parquet")
        for (cell, seed), g in sweep.groupby(["cell", "seed"], sort=True):
            cell_dir = pathlib.Path(folder) / cell
            rounds = pd.read_parquet(cell_dir / "rounds.parquet")
            trades = pd.read_parquet(cell_dir / "trades.parquet")
            r = rounds[rounds["seed"] == seed]
            last = r[r["round"] == r["round"].max()]
            t = trades[trades["seed"] == seed]
            shipped = t["shipped"].sum()
            rows.append(
                {
                    "cell": _label(cell_dir),
                    "seed": seed,
                    "loss_gain": (last["siloed_loss"] - last["loss"]).mean(),
                    "acc_gain": 100 * (last["accuracy"] - last["siloed_accuracy"]).mean(),
                    "better_off": float(g["mutual_gain"].iloc[0]),
                    "welfare_ratio": float(g["welfare"].iloc[0] / g["siloed_welfare"].iloc[0]),
                    "trades": len(t),
                    "price": t["price"].mean() if len(t) else 0.0,
                    "shipped": t["shipped"].mean() if len(t) else 0.0,
                    "value_per_m": 1e6 * t["realized_value"].sum() / shipped if shipped else 0.0,
                }
            )
    return pd.DataFrame(rows)


def _label(cell_dir: pathlib.Path) -> str:
    """``good / merge method`` (and the fit, if on) from the cell's resolved scenario."""
    broker = tomllib.loads((cell_dir / "scenario.toml").read_text())["broker"]
    fit = " + layer-wise fit" if broker.get("fit", "none") != "none" else ""
    return f"{broker.get('goods', 'model')} / {broker.get('merge', 'linear')}{fit}"


def table(df: pd.DataFrame) -> str:
    out = [
        "| cell | test loss, siloed - market | accuracy, market - siloed (points) "
        "| welfare, market / siloed | seeds every agent better off | trades / run "
        "| mean price | parameters shipped / trade | realised value / 1M shipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, g in df.groupby("cell", sort=False):
        out.append(
            f"| {cell} | {_ms(g['loss_gain'], '+.4f')} | {_ms(g['acc_gain'], '+.2f')} "
            f"| {_ms(g['welfare_ratio'], '.3f')} | {int(g['better_off'].sum())}/{len(g)} "
            f"| {g['trades'].mean():.1f} | {_ms(g['price'], '.4f')} "
            f"| {g['shipped'].mean():.0f} | {_ms(g['value_per_m'], '.3f')} |"
        )
    return "\n".join(out)


def figure(df: pd.DataFrame, path: str) -> None:
    order = list(dict.fromkeys(df["cell"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, title in (
        (axes[0], "loss_gain", "test loss, siloed - market (higher: market better)"),
        (axes[1], "value_per_m", "realised value per 1M parameters shipped"),
    ):
        means = [df.loc[df["cell"] == c, col].mean() for c in order]
        sds = [df.loc[df["cell"] == c, col].std(ddof=0) for c in order]
        ax.barh(range(len(order)), means, xerr=sds, color="#4c72b0")
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    fig.suptitle("foundation_market: merge methods and goods (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--figure", default="")
    args = ap.parse_args()
    df = cells(args.folders)
    print(table(df))
    if args.figure:
        figure(df, args.figure)


if __name__ == "__main__":
    main()
