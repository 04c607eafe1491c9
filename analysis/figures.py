"""Figures for the studies (docs/studies/), read from sweep folders' sweep.parquet only.

python analysis/figures.py replication runs/replication_digits runs/replication_mnist1d \
    --out docs/figures/replication.png
python analysis/figures.py alignment runs/alignment_digits runs/alignment_mnist1d \
    --out docs/figures/alignment.png
python analysis/figures.py duopoly runs/duopoly --out docs/figures/duopoly.png
python analysis/figures.py license runs/license --out docs/figures/license.png

Each sweep folder also holds the generic figures and report.html that ``paramarket sweep``
wrote (``paramarket report DIR`` redraws them).
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from paramarket_jax.results.plots import MARKET, SILOED

ALIGN = {True: (MARKET, "aligned"), False: ("0.45", "not aligned")}


def _load(folder: str) -> pd.DataFrame:
    df = pd.read_parquet(pathlib.Path(folder) / "sweep.parquet")
    df["acc_gain"] = 100 * (df["market_accuracy"] - df["siloed_accuracy"])
    df["welfare_gain"] = df["welfare"] - df["siloed_welfare"]
    return df


def _dataset(folder: str) -> str:
    return pathlib.Path(folder).name.split("_")[-1]


def _lines(ax, df, x, by, y, styles, offset=0.0):
    """One error-bar line per value of ``by``: mean and sd over seeds of ``y`` against x."""
    keys = sorted(df[by].unique(), key=str)
    for k, key in enumerate(keys):
        g = df[df[by] == key].groupby(x)[y]
        mean, sd = g.mean(), g.std(ddof=0)
        shift = offset * (k - (len(keys) - 1) / 2)
        color, label = styles(key)
        ax.errorbar(
            mean.index + shift, mean, yerr=sd, marker="o", ms=4, capsize=3, color=color, label=label
        )
    ax.axhline(0, color="0.3", lw=0.8)
    ax.grid(alpha=0.3)


def replication(folders: list[str]):
    fig = Figure(figsize=(5.2 * len(folders), 3.8))
    axes = fig.subplots(1, len(folders), sharey=True)
    for ax, folder in zip(np.atleast_1d(axes), folders, strict=True):
        df = _load(folder)
        df["align"] = df["broker.align"].map(lambda v: v is True or v in ("pairwise", "true"))
        _lines(ax, df, "data.split.d", "align", "acc_gain", ALIGN.get, offset=0.008)
        ax.set_title(f"{_dataset(folder)}: market - siloed", fontsize=10)
        ax.set_xlabel("d (share of the other agent's classes each agent holds)")
    np.atleast_1d(axes)[0].set_ylabel("final test accuracy gain\nover siloed (points)")
    np.atleast_1d(axes)[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def alignment(folders: list[str]):
    frames = []
    for folder in folders:
        df = _load(folder)
        df["dataset"] = _dataset(folder)
        frames.append(df)
    df = pd.concat(frames)
    starts = sorted(df["trading.start"].unique())
    sets = list(dict.fromkeys(df["dataset"]))
    fig = Figure(figsize=(4.6 * len(starts) + 1.2, 3.2 * len(sets)))
    axes = fig.subplots(len(sets), len(starts), squeeze=False, sharex=True)
    for i, ds in enumerate(sets):
        for j, start in enumerate(starts):
            ax = axes[i, j]
            sub = df[(df["dataset"] == ds) & (df["trading.start"] == start)]
            _lines(ax, sub, "broker.max_alpha", "broker.align", "acc_gain", ALIGN.get, 0.012)
            ax.set_title(f"{ds}, trading from round {start}", fontsize=10)
            if j == 0:
                ax.set_ylabel("accuracy gain over\nsiloed (points)")
            if i == len(sets) - 1:
                ax.set_xlabel("broker.max_alpha (largest seller weight tried)")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def duopoly(folders: list[str]):
    df = _load(folders[0])
    fig = Figure(figsize=(10.5, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    gammas = sorted(df["economics.gamma"].unique())
    for i, ax in enumerate(axes):
        df[f"gain_{i}"] = df[f"utility_{i}"] - df[f"siloed_utility_{i}"]
        _lines(
            ax,
            df,
            "mechanism.beta",
            "economics.gamma",
            f"gain_{i}",
            lambda g: (
                matplotlib.colormaps["viridis"](0.85 * gammas.index(g) / max(len(gammas) - 1, 1)),
                f"gamma = {g}",
            ),
            offset=0.02,
        )
        ax.set_title(f"agent {i}: utility gain over its siloed twin", fontsize=10)
        ax.set_xlabel("buyer bargaining power beta")
    axes[0].set_ylabel("utility gain (money units)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def license_(folders: list[str]):
    df = _load(folders[0])
    df["seller_gain"] = df["utility_0"] - df["siloed_utility_0"]
    mechs = list(dict.fromkeys(df["mechanism.name"]))
    g = df.groupby("mechanism.name")
    fig = Figure(figsize=(9, 3.8))
    ax = fig.subplots()
    x = np.arange(len(mechs))
    for k, (col, color, label) in enumerate(
        (
            ("welfare_gain", MARKET, "welfare - siloed welfare"),
            ("revenue_of_sellers", SILOED, "seller revenue (prices paid)"),
        )
    ):
        mean, sd = g[col].mean()[mechs], g[col].std(ddof=0)[mechs]
        ax.bar(x + (k - 0.5) * 0.38, mean, 0.38, yerr=sd, capsize=3, color=color, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(mechs, rotation=25, ha="right")
    ax.set_ylabel("money units per run")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("licence sales by mechanism (mean and sd over seeds)", fontsize=10)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=["replication", "alignment", "duopoly", "license"])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", required=True, help="PNG file to write")
    args = ap.parse_args()
    make = {
        "replication": replication,
        "alignment": alignment,
        "duopoly": duopoly,
        "license": license_,
    }[args.study]
    fig = make(args.folders)
    fig.tight_layout()
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
