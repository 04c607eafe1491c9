"""Plots that read result tables only (never kernels)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def accuracy_per_round(rounds: pd.DataFrame, path, title: str = "") -> None:
    """Test accuracy per round for every agent, market (solid) against siloed (dashed).

    Lines are means over seeds; the band is the spread (min to max) over seeds.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for agent, df in rounds.groupby("agent"):
        c = colors[int(agent) % len(colors)]
        for col, style, label in (("accuracy", "-", "market"), ("siloed_accuracy", "--", "siloed")):
            g = df.groupby("round")[col]
            mean = g.mean()
            ax.plot(mean.index, mean.to_numpy(), style, color=c, label=f"agent {agent} {label}")
            if df["seed"].nunique() > 1:
                ax.fill_between(mean.index, g.min(), g.max(), color=c, alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "market vs siloed")
    if rounds["agent"].nunique() <= 6:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_accuracy_per_round(rounds: pd.DataFrame, path, title: str = "") -> None:
    """Mean test accuracy over agents per round: market, siloed and any baselines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (
        ("accuracy", "market"),
        ("siloed_accuracy", "siloed"),
        ("fedavg_accuracy", "FedAvg"),
        ("central_accuracy", "centralized"),
    ):
        if rounds[col].isna().all():
            continue
        per_seed = rounds.groupby(["seed", "round"])[col].mean().groupby("round")
        mean = per_seed.mean()
        ax.plot(mean.index, mean.to_numpy(), label=label)
        ax.fill_between(mean.index, per_seed.min(), per_seed.max(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("mean test accuracy over agents")
    ax.set_title(title or "market vs siloed")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
