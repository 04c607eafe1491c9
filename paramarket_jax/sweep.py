"""Sweeps: a grid of scenario overrides x seeds into one folder of runs plus one table.

Each cell is an ordinary run folder (written atomically, so a cell is either complete or
absent); an interrupted sweep resumes by skipping complete cells. Cells that share a
``MarketSpec``, a dataset, rounds and seeds (they differ only in numeric knobs) run
together through the batch path: every seed of every such cell in one compiled call.

With ``checkpoint_every`` (``paramarket sweep --checkpoint-every K``) each such group saves
its carry every K rounds into ``DIR/.checkpoints/<group id>/`` (orbax steps, as
:mod:`paramarket_jax.engines.checkpoint` writes a run's), so a group killed in the middle goes on
from its newest usable checkpoint when the same command runs again: the same tables, bit
for bit. A group's checkpoints are removed once its cells are written, and the whole
``.checkpoints`` folder once every cell is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import tomllib

import numpy as np
import pandas as pd

from paramarket_jax import scenario as sc
from paramarket_jax.errors import ParamarketError

SEED_FIELDS = (
    "mutual_gain",
    "accuracy_gain_all",
    "welfare",
    "siloed_welfare",
    "broker_take",
    "trades",
    "revenue_of_sellers",
    "mean_abs_estimation_error",
    "diverged",
)


def parse_grid(text: str) -> tuple[str, list]:
    """``"mechanism.beta=0,0.5,1"`` -> ("mechanism.beta", [0, 0.5, 1]); values are TOML
    (bare words become strings, so ``mechanism.name=first_price,second_price`` works)."""
    if "=" not in text:
        raise ParamarketError(f"--grid {text!r} must look like key=v1,v2,...")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        values = tomllib.loads(f"v = [{raw}]")["v"]
    except RecursionError:
        raise ParamarketError(f"--grid {key}=...: values nested too deeply") from None
    except tomllib.TOMLDecodeError:
        values = [v.strip() for v in raw.split(",") if v.strip()]
    if not key or not values:
        raise ParamarketError(f"--grid {text!r} names no key or no values")
    return key, values


def knob_text(value):
    """A swept value as a table shows it: scalars as they are, a list as its JSON text
    (hashable, so a table groups by it)."""
    return value if np.isscalar(value) or value is None else json.dumps(np.asarray(value).tolist())


def cell_name(assignment: dict) -> str:
    """A folder name for one grid cell, e.g. ``mechanism.beta=0.5__economics.gamma=2``.

    Characters a folder name should not hold are dropped; when that changes the name, a
    short hash of the whole assignment is appended, so two values never share a folder.
    """
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in assignment.items()]
    raw = "__".join(parts)
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "", raw)
    if name != raw:
        name += "~" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return name or "base"


def stale_keys(folder: pathlib.Path, scenario: sc.Scenario) -> list[str]:
    """Dotted keys whose value in the cell's ``scenario.toml`` differs from ``scenario``."""
    try:
        done = sc.to_dict(sc.from_dict(tomllib.loads((folder / "scenario.toml").read_text())))
    except (OSError, tomllib.TOMLDecodeError, ParamarketError):
        return ["scenario.toml (missing or unreadable)"]
    want = sc.to_dict(scenario)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(done), flat(want)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


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


def _replace_run(folder: pathlib.Path, files: dict, write_run) -> None:
    """Write a cell's run folder; an older run there (``--force``) is swapped out only once
    the new one is complete, and comes back if writing fails."""
    if not folder.exists():
        write_run(folder, files)
        return
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        write_run(folder, files)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_table(root: pathlib.Path, planned) -> pd.DataFrame:
    """(Re)write ``sweep.parquet`` from the finished cells' summaries, atomically."""
    table = sweep_table(root, planned)
    tmp = root / ".sweep.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, root / "sweep.parquet")
    return table


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


def group_id(cells: list[tuple[str, sc.Scenario]]) -> str:
    """The checkpoint folder name of a group of cells: a hash of their names and resolved
    scenarios (seeds, rounds and every knob), in order. The same command gives the same
    group the same id; a cell whose scenario changed (``--set``, ``--force``) gets a new
    one, so it never goes on from another scenario's checkpoint."""
    text = json.dumps([[name, sc.dumps(scenario)] for name, scenario in cells])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _run_checkpointed(root: pathlib.Path, names: list[str], cells, every: int,
                      max_batch: int | None, tick, note, devices: int = 1,
                      shard: str = "auto") -> tuple[list, pathlib.Path]:  # fmt: skip
    """A group's cells through the batch path in chunks of ``every`` rounds, saving after
    each into ``root/.checkpoints/<group id>`` and going on from the newest usable step
    there: their RunResults and that folder. A group that fails for good (every agent
    diverged) drops its checkpoints."""
    from paramarket_jax.engines import batch, checkpoint
    from paramarket_jax.runs import result_of

    gid = group_id([(name, c.scenario) for name, c in zip(names, cells, strict=True)])
    folder = root / checkpoint.FOLDER / gid
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    name = f"the group of cell(s) {shown}"
    saves = checkpoint.Checkpoints(
        root, every, resume=folder.exists(), note=note, folder=folder, name=name
    )

    try:
        with saves:
            out = batch.run_cells_chunked(
                cells,
                every,
                max_batch=max_batch,
                progress=tick,
                start=saves.starter(tick),
                save=saves.save,
                devices=devices,
                shard=shard,
            )
        return [result_of(c, r) for c, r in zip(cells, out.records, strict=True)], folder
    except ParamarketError:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run_sweep(
    base: str,
    grid,
    overrides,
    out: str | os.PathLike,
    progress=None,
    *,
    engine: str = "auto",
    max_batch: int | None = None,
    force: bool = False,
    bar=None,
    report: bool = True,
    command: str | None = None,
    checkpoint_every: int | None = None,
    note=None,
    devices: int = 1,
    shard: str = "auto",
) -> pd.DataFrame:
    """Run every missing cell of the grid into ``out``: ``sweep.json`` (what is swept) first,
    ``sweep.parquet`` (one row per finished cell x seed) after every batch of cells, and at
    the end, with ``report``, ``report.html`` and the sweep's figures.

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
        bar: optional callable(total) -> progress bar (tqdm-like ``update(k)``) over the
            rounds x seeds of the cells to run, made once every cell is checked and built.
        report: write the sweep's figures and ``report.html`` at the end (cells get tables
            only; ``paramarket report`` on a cell folder draws one).
        command: the command line, recorded in ``sweep.json`` and the report.
        force: rerun complete cells whose scenario differs from the requested one (else
            such a cell stops the sweep, naming the differing keys, before any compute).
        checkpoint_every: save each batch of cells every K rounds under
            ``out/.checkpoints`` and go on from there (batch engine only; see the module).
        note: optional callable(text) for checkpoint messages (which step a group goes
            on from).
        devices, shard: run on this many devices, splitting runs or agents over them
            (:func:`paramarket_jax.engines.batch.prepare`). In a multi-process run (``jax.
            distributed``) process 0 decides which cells to run and tells the others, and
            only process 0 writes; the others return an empty table.
    """
    import jax

    from paramarket_jax.engines import checkpoint
    from paramarket_jax.results.folders import write_run
    from paramarket_jax.runs import (
        CHECKPOINT_ENGINE,
        MESA_DEVICES,
        resolve_engine,
        run_cells,
        run_scenario,
    )

    every = checkpoint_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ParamarketError(f"--checkpoint-every must be a positive integer, got {every!r}")
    planned = plan(base, grid, overrides)
    for _, scenario in planned:  # a bad engine for any cell fails before any compute
        if resolve_engine(scenario, engine) != "batch" and every is not None:
            raise ParamarketError(CHECKPOINT_ENGINE)
        if resolve_engine(scenario, engine) != "batch" and devices != 1:
            raise ParamarketError(MESA_DEVICES)
    processes = jax.process_count()
    writer = jax.process_index() == 0
    if processes > 1 and every is not None:
        raise ParamarketError(
            "--checkpoint-every works in one process only; run the processes without it"
        )
    root = pathlib.Path(out)
    todo, kept = [], []
    for assignment, scenario in planned:
        folder = root / cell_name(assignment)
        if writer and (folder / "summary.json").exists():
            stale = stale_keys(folder, scenario)
            if not stale:
                kept.append(folder.name)
                continue
            if not force:
                raise ParamarketError(
                    f"{folder} holds a run of another scenario (differs in "
                    f"{', '.join(stale[:5])}); use a new --out, or --force to rerun it"
                )
        todo.append((folder, scenario))
    if processes > 1:  # every process runs the cells process 0 found missing
        from jax.experimental import multihost_utils

        missing = np.array([(root / cell_name(a)) in {f for f, _ in todo} for a, _ in planned])
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
        todo = [(root / cell_name(a), s) for (a, s), m in zip(planned, missing, strict=True) if m]
        if not writer:
            kept, progress, bar, report = [], None, None, False
    for name in kept:
        if progress is not None:
            progress(name, True)
    # every cell is built (datasets, models, mechanisms checked) before any cell runs
    built = list(groups([scenario for _, scenario in todo]))
    if writer:
        root.mkdir(parents=True, exist_ok=True)
    meta = dict(
        scenario=base,
        grid=[[k, list(v)] for k, v in grid],
        overrides=list(overrides),
        command=command,
    )
    if writer:
        _atomic_text(root / "sweep.json", json.dumps(meta, indent=2) + "\n")
    if bar is not None:
        bar = bar(sum(s.train.rounds * len(s.seeds) for _, s in todo))
    tick = (lambda k: None) if bar is None else bar.update
    for group in built:
        rounds = group[0][1].scenario.train.rounds
        saved = None  # the group's checkpoint folder
        if every is not None:
            outcomes, saved = _run_checkpointed(
                root, [todo[i][0].name for i, _ in group], [exp for _, exp in group], every,
                max_batch, tick, note or (lambda text: None), devices, shard,
            )  # fmt: skip
        elif resolve_engine(group[0][1].scenario, engine) == "batch":
            outcomes = run_cells(
                [exp for _, exp in group],
                max_batch=max_batch,
                progress=lambda runs, rounds=rounds: tick(runs * rounds),
                devices=devices,
                shard=shard,
            )
        else:
            outcomes = [
                run_scenario(exp.scenario, engine="mesa", progress=tick) for _, exp in group
            ]
        if not writer:
            continue
        for (i, _), result in zip(group, outcomes, strict=True):
            folder = todo[i][0]
            _replace_run(folder, result.files(report=False), write_run)
            if progress is not None:
                progress(folder.name, False)
        if saved is not None:
            shutil.rmtree(saved, ignore_errors=True)
        _write_table(root, planned)  # the finished cells so far: a report works mid-sweep
    if not writer:
        return pd.DataFrame()
    table = _write_table(root, planned)
    # every cell is complete: checkpoints left by groups of other settings are of no use
    shutil.rmtree(root / checkpoint.FOLDER, ignore_errors=True)
    if report:
        from paramarket_jax.results.report import sweep_outputs, write_files

        write_files(root, sweep_outputs(root))
    return table
