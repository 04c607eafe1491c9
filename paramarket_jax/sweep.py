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

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import tomllib
from collections.abc import Callable

import jax
import numpy as np
import pandas as pd
from jax.experimental import multihost_utils

from paramarket_jax import scenario as sc
from paramarket_jax.engines import batch, checkpoint
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import Experiment, build, dataset_key, load_shared_dataset
from paramarket_jax.results.folders import write_into, write_run
from paramarket_jax.results.report import sweep_outputs, write_files
from paramarket_jax.runs import (
    CHECKPOINT_ENGINE,
    MESA_DEVICES,
    RunResult,
    resolve_engine,
    result_of,
    run_cells,
    run_mesa,
)

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


def _replace_run(folder: pathlib.Path, files: dict) -> None:
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
    datasets: dict[tuple, object] = {}
    grouped: dict[tuple, list] = {}
    for i, scenario in enumerate(scenarios):
        dkey = dataset_key(scenario)
        if dkey not in datasets:
            datasets[dkey] = load_shared_dataset(scenario)
        exp = build(scenario, datasets[dkey])
        key = (dkey, exp.spec, exp.noise, scenario.train.rounds, tuple(scenario.seeds))
        grouped.setdefault(key, []).append((i, exp))
    yield from grouped.values()


def group_id(cells: list[tuple[str, sc.Scenario]]) -> str:
    """The checkpoint folder name of a group of cells: a hash of their names and resolved
    scenarios (seeds, rounds and every knob), in order. The same command gives the same
    group the same id; a cell whose scenario changed (``--set``, ``--force``) gets a new
    one, so it never goes on from another scenario's checkpoint."""
    text = json.dumps([[name, sc.dumps(scenario)] for name, scenario in cells])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs its cells: :func:`run_sweep`'s keyword options.

    Attributes:
        engine: ``batch`` (cells differing only in numeric knobs share one compiled call),
            ``mesa`` (each cell's seeds stepped through the Mesa model) or ``auto``
            (``batch`` unless agents enter the market).
        max_batch: most runs per compiled call of the batch path.
        force: rerun complete cells whose scenario differs from the requested one (else
            such a cell stops the sweep, naming the differing keys, before any compute).
        report: write the sweep's figures and ``report.html`` at the end (cells get tables
            only; ``paramarket report`` on a cell folder draws one).
        checkpoint_every: save each group of cells every K rounds under
            ``out/.checkpoints`` and go on from there (batch engine only; see the module).
        devices, shard: run on this many devices, splitting runs or agents over them
            (:func:`paramarket_jax.engines.batch.prepare`).
    """

    engine: str = "auto"
    max_batch: int | None = None
    force: bool = False
    report: bool = True
    checkpoint_every: int | None = None
    devices: int = 1
    shard: str = "auto"

    def __post_init__(self):
        every = self.checkpoint_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ParamarketError(f"--checkpoint-every must be a positive integer, got {every!r}")


def check_cells(planned, options: SweepOptions) -> None:
    """Every cell's engine suits the options: a bad one fails before any compute."""
    for _, scenario in planned:
        if resolve_engine(scenario, options.engine) == "batch":
            continue
        if options.checkpoint_every is not None:
            raise ParamarketError(CHECKPOINT_ENGINE)
        if options.devices != 1:
            raise ParamarketError(MESA_DEVICES)
    if jax.process_count() > 1 and options.checkpoint_every is not None:
        raise ParamarketError(
            "--checkpoint-every works in one process only; run the processes without it"
        )


def pending(root: pathlib.Path, planned, force: bool, check: bool = True):
    """The cells to run, [(folder, scenario)], and the names of the complete cells kept.

    With ``check`` a cell holding a ``summary.json`` is kept if it ran the requested
    scenario; one that ran another is run again with ``force``, and stops the sweep without
    it. Without ``check`` (a process other than 0, which learns from process 0) every cell
    is to run.
    """
    todo, kept = [], []
    for assignment, scenario in planned:
        folder = root / cell_name(assignment)
        if check and (folder / "summary.json").exists():
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
    return todo, kept


def _shared_todo(root: pathlib.Path, planned, todo):
    """In a multi-process run every process runs the cells process 0 found missing."""
    folders = {folder for folder, _ in todo}
    missing = np.array([(root / cell_name(a)) in folders for a, _ in planned])
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [(root / cell_name(a), s) for (a, s), m in zip(planned, missing, strict=True) if m]


def _run_checkpointed(
    root: pathlib.Path, names: list[str], cells: list[Experiment], options: SweepOptions, tick, note
) -> tuple[list, pathlib.Path]:
    """A group's cells through the batch path in chunks of ``checkpoint_every`` rounds,
    saving after each into ``root/.checkpoints/<group id>`` and going on from the newest
    usable step there: their RunResults and that folder. A group that fails for good (every
    agent diverged) drops its checkpoints."""
    every = options.checkpoint_every
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
                max_batch=options.max_batch,
                progress=tick,
                start=saves.starter(tick),
                save=saves.save,
                devices=options.devices,
                shard=options.shard,
            )
        return [result_of(c, r) for c, r in zip(cells, out.records, strict=True)], folder
    except ParamarketError:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run_group(
    root: pathlib.Path,
    names: list[str],
    cells: list[Experiment],
    options: SweepOptions,
    tick,
    note=None,
) -> tuple[list[RunResult], pathlib.Path | None]:
    """One group of built cells (from :func:`groups`): checkpointed, through the batch path
    (one compiled call) or each through the Mesa view. Their RunResults, and the group's
    checkpoint folder (None without checkpoints); ``tick(k)`` after k rounds x seeds."""
    if options.checkpoint_every is not None:
        quiet = note or (lambda text: None)
        return _run_checkpointed(root, names, cells, options, tick, quiet)
    if resolve_engine(cells[0].scenario, options.engine) == "mesa":
        return [run_mesa(exp, tick) for exp in cells], None
    rounds = cells[0].scenario.train.rounds
    results = run_cells(
        cells,
        max_batch=options.max_batch,
        progress=lambda runs: tick(runs * rounds),
        devices=options.devices,
        shard=options.shard,
    )
    return results, None


def write_group(
    root: pathlib.Path,
    planned,
    folders: list[pathlib.Path],
    results,
    progress=None,
    saved: pathlib.Path | None = None,
) -> None:
    """A group's cells into their folders (``progress(name, False)`` after each), its
    checkpoints (``saved``) removed, and ``sweep.parquet`` rewritten: the finished cells so
    far, so a report works mid-sweep."""
    for folder, result in zip(folders, results, strict=True):
        _replace_run(folder, result.files(report=False))
        if progress is not None:
            progress(folder.name, False)
    if saved is not None:
        shutil.rmtree(saved, ignore_errors=True)
    _write_table(root, planned)


def _finish(root: pathlib.Path, planned, report: bool) -> pd.DataFrame:
    """Every cell is complete: the final table; checkpoints left by groups of other
    settings are of no use; with ``report``, the sweep's figures and page."""
    table = _write_table(root, planned)
    shutil.rmtree(root / checkpoint.FOLDER, ignore_errors=True)
    if report:
        write_files(root, sweep_outputs(root))
    return table


def run_sweep(
    base: str,
    grid,
    overrides,
    out: str | os.PathLike,
    progress: Callable[[str, bool], None] | None = None,
    *,
    bar=None,
    command: str | None = None,
    note: Callable[[str], None] | None = None,
    **options,
) -> pd.DataFrame:
    """Run every missing cell of the grid into ``out``: ``sweep.json`` (what is swept) first,
    ``sweep.parquet`` (one row per finished cell x seed) after every group of cells, and at
    the end, with ``report``, ``report.html`` and the sweep's figures.

    Every cell is checked and built (datasets loaded once each, models and mechanisms
    checked) before any cell runs. In a multi-process run (``jax.distributed``) process 0
    decides which cells to run and tells the others, and only process 0 writes; the others
    return an empty table.

    Args:
        base: bundled scenario name or TOML path.
        grid: [(dotted key, values)], e.g. from :func:`parse_grid`.
        overrides: ``key=value`` overrides applied to every cell.
        out: the sweep folder (created if missing; complete cells are kept).
        progress: optional callable(cell name, done) after each cell.
        bar: optional callable(total) -> progress bar (tqdm-like ``update(k)``) over the
            rounds x seeds of the cells to run, made once every cell is checked and built.
        command: the command line, recorded in ``sweep.json`` and the report.
        note: optional callable(text) for checkpoint messages (which step a group goes
            on from).
        **options: the fields of :class:`SweepOptions` (``engine``, ``max_batch``,
            ``force``, ``report``, ``checkpoint_every``, ``devices``, ``shard``).
    """
    options = SweepOptions(**options)
    planned = plan(base, grid, overrides)
    check_cells(planned, options)
    root = pathlib.Path(out)
    writer = jax.process_index() == 0
    todo, kept = pending(root, planned, options.force, check=writer)
    if jax.process_count() > 1:
        todo = _shared_todo(root, planned, todo)
    if not writer:
        progress = bar = None
    for name in kept:
        if progress is not None:
            progress(name, True)
    built = list(groups([scenario for _, scenario in todo]))
    if writer:
        root.mkdir(parents=True, exist_ok=True)
        meta = dict(
            scenario=base,
            grid=[[k, list(v)] for k, v in grid],
            overrides=list(overrides),
            command=command,
        )
        write_into(root, {"sweep.json": meta}, last="sweep.json")
    if bar is not None:
        bar = bar(sum(s.train.rounds * len(s.seeds) for _, s in todo))
    tick = (lambda k: None) if bar is None else bar.update
    for group in built:
        folders = [todo[i][0] for i, _ in group]
        cells = [exp for _, exp in group]
        results, saved = run_group(root, [f.name for f in folders], cells, options, tick, note)
        if writer:
            write_group(root, planned, folders, results, progress, saved)
    return _finish(root, planned, options.report) if writer else pd.DataFrame()
