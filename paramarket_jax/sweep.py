"""Sweeps: a grid of scenario overrides x seeds into one folder of runs plus one table.

Each cell is an ordinary run folder (written atomically, so a cell is either complete or
absent); an interrupted sweep resumes by skipping complete cells. Cells that share a
``MarketSpec``, a dataset, rounds and seeds (they differ only in numeric knobs) run
together through the batch path: every seed of every such cell in one compiled call.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import tomllib

import pandas as pd

from paramarket_jax import scenario as sc
from paramarket_jax.errors import ParamarketError

SEED_FIELDS = ("mutual_gain", "accuracy_gain_all", "welfare", "siloed_welfare", "broker_take",
               "trades", "revenue_of_sellers", "mean_abs_estimation_error")  # fmt: skip


def parse_grid(text: str) -> tuple[str, list]:
    """``"mechanism.beta=0,0.5,1"`` -> ("mechanism.beta", [0, 0.5, 1]); values are TOML
    (bare words become strings, so ``mechanism.name=first_price,second_price`` works)."""
    if "=" not in text:
        raise ParamarketError(f"--grid {text!r} must look like key=v1,v2,...")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        values = tomllib.loads(f"v = [{raw}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [v.strip() for v in raw.split(",") if v.strip()]
    if not key or not values:
        raise ParamarketError(f"--grid {text!r} names no key or no values")
    return key, values


def cell_name(assignment: dict) -> str:
    """A folder name for one grid cell, e.g. ``mechanism.beta=0.5__economics.gamma=2``."""
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in assignment.items()]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", "__".join(parts)) or "base"


def cells(grid: list[tuple[str, list]]):
    """Every assignment of the grid (cartesian product, first key slowest)."""
    keys = [k for k, _ in grid]
    for combo in itertools.product(*(v for _, v in grid)):
        yield dict(zip(keys, combo, strict=True))


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def plan(base: str, grid: list[tuple[str, list]], overrides: list[str]):
    """Validate every cell up front (bad input fails before anything runs or is written)."""
    out = []
    for assignment in cells(grid):
        extra = [_override(k, v) for k, v in assignment.items()]
        out.append((assignment, sc.load(base, [*overrides, *extra])))
    return out


def sweep_table(out: pathlib.Path, planned) -> pd.DataFrame:
    """One row per cell x seed, from the cells' summary.json files."""
    rows = []
    for assignment, _ in planned:
        path = out / cell_name(assignment) / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        for seed, s in summary["per_seed"].items():
            row = {"cell": cell_name(assignment), **assignment, "seed": int(seed)}
            row.update({f: s.get(f) for f in SEED_FIELDS})
            row["market_accuracy"] = sum(s["market_accuracy"]) / len(s["market_accuracy"])
            row["siloed_accuracy"] = sum(s["siloed_accuracy"]) / len(s["siloed_accuracy"])
            for i, (u, v) in enumerate(zip(s["utility"], s["siloed_utility"], strict=True)):
                row[f"utility_{i}"], row[f"siloed_utility_{i}"] = u, v
            rows.append(row)
    return pd.DataFrame(rows)


def groups(scenarios: list[sc.Scenario]):
    """Indices of scenarios that can share one batch call, with their experiments.

    Yields lists of (index, Experiment): one dataset is loaded per distinct data setting,
    and cells are grouped by spec, rounds and seeds.
    """
    from paramarket_jax.experiment import build, dataset_key, load_shared_dataset

    datasets: dict[tuple, object] = {}
    grouped: dict[tuple, list] = {}
    for i, scenario in enumerate(scenarios):
        dkey = dataset_key(scenario)
        if dkey not in datasets:
            datasets[dkey] = load_shared_dataset(scenario)
        exp = build(scenario, datasets[dkey])
        key = (dkey, exp.spec, scenario.train.rounds, tuple(scenario.seeds))
        grouped.setdefault(key, []).append((i, exp))
    yield from grouped.values()


def run_sweep(
    base: str,
    grid,
    overrides,
    out: str | os.PathLike,
    progress=None,
    *,
    engine: str = "auto",
    max_batch: int | None = None,
) -> pd.DataFrame:
    """Run every missing cell of the grid and (re)write ``out/sweep.parquet``.

    Args:
        base: bundled scenario name or TOML path.
        grid: [(dotted key, values)], e.g. from :func:`parse_grid`.
        overrides: ``key=value`` overrides applied to every cell.
        out: the sweep folder (created if missing; complete cells are kept).
        progress: optional callable(cell name, done) after each cell.
        engine: ``batch`` (cells differing only in numeric knobs share one compiled call),
            ``mesa`` (each cell's seeds stepped through the Mesa model) or ``auto``
            (``batch`` unless agents enter the market).
        max_batch: most runs per compiled call of the batch path.
    """
    from paramarket_jax.results import write_run
    from paramarket_jax.runs import resolve_engine, run_cells, run_scenario

    planned = plan(base, grid, overrides)
    for _, scenario in planned:  # a bad engine for any cell fails before any compute
        resolve_engine(scenario, engine)
    root = pathlib.Path(out)
    todo = []
    for assignment, scenario in planned:
        folder = root / cell_name(assignment)
        if (folder / "summary.json").exists():
            if progress is not None:
                progress(folder.name, True)
        else:
            todo.append((folder, scenario))
    root.mkdir(parents=True, exist_ok=True)
    for group in groups([scenario for _, scenario in todo]):
        if resolve_engine(group[0][1].scenario, engine) == "batch":
            outcomes = run_cells([exp for _, exp in group], max_batch=max_batch)
        else:
            outcomes = [run_scenario(exp.scenario, engine="mesa") for _, exp in group]
        for (i, _), result in zip(group, outcomes, strict=True):
            folder = todo[i][0]
            write_run(folder, result.files())
            if progress is not None:
                progress(folder.name, False)
    table = sweep_table(root, planned)
    tmp = root / ".sweep.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, root / "sweep.parquet")
    return table
