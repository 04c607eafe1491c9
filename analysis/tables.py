"""Markdown tables for the studies (docs/studies/), read from sweep folders' sweep.parquet only.

python analysis/tables.py replication runs/replication_digits runs/replication_mnist1d
python analysis/tables.py alignment runs/alignment_digits runs/alignment_mnist1d
python analysis/tables.py duopoly runs/duopoly
python analysis/tables.py license runs/license
python analysis/tables.py scale runs/scale
python analysis/tables.py transformers runs/transformer_market_transformer_arithmetic \
    runs/transformer_market_transformer_arithmetic_none runs/transformer_market_vit_digits \
    runs/transformer_market_vit_digits_none
"""

from __future__ import annotations

import argparse
import pathlib

import pandas as pd


def _load(folder: str) -> pd.DataFrame:
    return pd.read_parquet(pathlib.Path(folder) / "sweep.parquet")


def _ms(series: pd.Series, fmt: str = ".3f") -> str:
    return f"{series.mean():{fmt}} ± {series.std(ddof=0):{fmt.lstrip('+')}}"


def replication(folders: list[str]) -> str:
    """Market vs siloed final test accuracy by dataset, alignment and scarcity d."""
    rows = [
        "| dataset | d | alignment | market acc | siloed acc | market - siloed "
        "| seeds where every agent gains | trades/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        df = _load(folder)
        dataset = pathlib.Path(folder).name.split("_")[-1]
        df["gap"] = df["market_accuracy"] - df["siloed_accuracy"]
        for (d, align), g in df.groupby(["data.split.d", "broker.align"], sort=True):
            rows.append(
                f"| {dataset} | {d} | {'on' if align else 'off'} | {_ms(g['market_accuracy'])} "
                f"| {_ms(g['siloed_accuracy'])} | {_ms(g['gap'], '+.3f')} "
                f"| {int(g['accuracy_gain_all'].sum())}/{len(g)} | {g['trades'].mean():.1f} |"
            )
    return "\n".join(rows)


def duopoly(folders: list[str]) -> str:
    """Utility gain of each agent over its siloed twin by bargaining power and competition."""
    df = _load(folders[0])
    for i in (0, 1):
        df[f"gain_{i}"] = df[f"utility_{i}"] - df[f"siloed_utility_{i}"]
    rows = [
        "| gamma | beta | utility gain agent 0 | utility gain agent 1 | mean price "
        "| mutual gain (seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for (gamma, beta), g in df.groupby(["economics.gamma", "mechanism.beta"], sort=True):
        price = g["revenue_of_sellers"] / g["trades"].where(g["trades"] > 0)
        rows.append(
            f"| {gamma} | {beta} | {_ms(g['gain_0'], '+.3f')} | {_ms(g['gain_1'], '+.3f')} "
            f"| {price.mean():.4f} | {int(g['mutual_gain'].sum())}/{len(g)} |"
        )
    return "\n".join(rows)


def license_(folders: list[str]) -> str:
    """Seller revenue, welfare and trades by mechanism."""
    df = _load(folders[0])
    df["welfare_gain"] = df["welfare"] - df["siloed_welfare"]
    df["seller_gain"] = df["utility_0"] - df["siloed_utility_0"]
    rows = [
        "| mechanism | seller revenue | welfare | welfare - siloed | seller utility gain "
        "| trades/run | mutual gain (seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mech, g in df.groupby("mechanism.name", sort=False):
        rows.append(
            f"| {mech} | {_ms(g['revenue_of_sellers'])} | {_ms(g['welfare'], '.2f')} "
            f"| {_ms(g['welfare_gain'], '+.2f')} | {_ms(g['seller_gain'], '+.3f')} "
            f"| {g['trades'].mean():.1f} | {int(g['mutual_gain'].sum())}/{len(g)} |"
        )
    return "\n".join(rows)


def scale(folders: list[str]) -> str:
    """Gains over siloed and trades per agent by market size N and alignment mode."""
    df = _load(folders[0])
    n = df["agents.n"]
    df["welfare_gain"] = (df["welfare"] - df["siloed_welfare"]) / n
    df["gap"] = df["market_accuracy"] - df["siloed_accuracy"]
    df["trades_per_agent"] = df["trades"] / n
    rows = [
        "| N | alignment | market acc | siloed acc | market - siloed | welfare gain per agent "
        "| trades per agent per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for (size, align), g in df.groupby(["agents.n", "broker.align"], sort=True):
        rows.append(
            f"| {size} | {align} | {_ms(g['market_accuracy'])} | {_ms(g['siloed_accuracy'])} "
            f"| {_ms(g['gap'], '+.3f')} | {_ms(g['welfare_gain'], '+.3f')} "
            f"| {g['trades_per_agent'].mean():.2f} |"
        )
    return "\n".join(rows)


def alignment(folders: list[str]) -> str:
    """Accuracy gain over siloed, aligned against not, by dataset, trading start and cap."""
    rows = [
        "| dataset | trading from | max alpha | gain, aligned (points) | gain, not aligned "
        "| aligned - not (paired by seed) | seeds aligned ahead |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        df = _load(folder)
        dataset = pathlib.Path(folder).name.split("_")[-1]
        df["gap"] = 100 * (df["market_accuracy"] - df["siloed_accuracy"])
        keys = ["trading.start", "broker.max_alpha"]
        wide = df.pivot_table(index=[*keys, "seed"], columns="broker.align", values="gap")
        wide["diff"] = wide[True] - wide[False]
        for (start, cap), g in wide.groupby(level=keys, sort=True):
            rows.append(
                f"| {dataset} | {start} | {cap} | {_ms(g[True], '.1f')} | {_ms(g[False], '.1f')} "
                f"| {_ms(g['diff'], '+.1f')} | {int((g['diff'] > 0).sum())}/{len(g)} |"
            )
    return "\n".join(rows)


def transformers(folders: list[str]) -> str:
    """The market's gain over siloed training under each alignment arm, by scenario: folders
    of ``broker.heads x model.residual`` sweeps and of ``broker.align = false`` ones."""
    rows = [
        "| scenario | alignment | market acc | siloed acc | market - siloed (points) "
        "| seeds every agent more accurate | seeds every agent better off | welfare, market "
        "/ siloed | trades/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        df = _load(folder)
        scenario = pathlib.Path(folder).name.removeprefix("transformer_market_")
        scenario = scenario.removesuffix("_none")
        df["gap"] = 100 * (df["market_accuracy"] - df["siloed_accuracy"])
        df["welfare_ratio"] = df["welfare"] / df["siloed_welfare"]
        for cell, g in df.groupby("cell", sort=True):
            arm = "none" if "broker.align" in df else cell.replace("broker.heads=", "")
            arm = arm.replace("__model.residual=", " / ")
            k = len(g)
            rows.append(
                f"| {scenario} | {arm} | {_ms(g['market_accuracy'])} "
                f"| {_ms(g['siloed_accuracy'])} | {_ms(g['gap'], '+.1f')} "
                f"| {int(g['accuracy_gain_all'].sum())}/{k} | {int(g['mutual_gain'].sum())}/{k} "
                f"| {_ms(g['welfare_ratio'], '.2f')} | {g['trades'].mean():.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    studies = ["replication", "alignment", "duopoly", "license", "scale", "transformers"]
    ap.add_argument("study", choices=studies)
    ap.add_argument("folders", nargs="+")
    args = ap.parse_args()
    tables = {"replication": replication, "alignment": alignment, "duopoly": duopoly,
              "license": license_, "scale": scale, "transformers": transformers}  # fmt: skip
    table = tables[args.study]
    print(table(args.folders))


if __name__ == "__main__":
    main()
