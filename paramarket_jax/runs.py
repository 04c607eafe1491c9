"""Run a scenario over its seeds (batch path or Mesa view) and gather tables and summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import pandas as pd

from paramarket_jax.engines import batch
from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.experiment import Experiment, build, loss_floors
from paramarket_jax.results import tables
from paramarket_jax.scenario import Scenario, dumps

ENGINES = ("auto", "batch", "mesa")
CHECKPOINT_ENGINE = (
    "--checkpoint-every works with the batch engine only; the mesa engine (--engine mesa) "
    "has no checkpoints"
)

MESA_DEVICES = (
    "--devices above 1 needs the batch engine; the mesa engine (--engine mesa) steps one "
    "seed on one device"
)


def resolve_engine(engine: str) -> str:
    """``auto`` is ``batch``: every scenario runs through it (exits and entry are part of
    the pure round); ``mesa`` steps the same round through the Mesa view."""
    if engine not in ENGINES:
        raise unknown("engine", engine, ENGINES)
    return "batch" if engine == "auto" else engine


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Everything a run writes: the resolved scenario, tables and summary."""

    scenario: Scenario
    rounds: pd.DataFrame
    trades: pd.DataFrame
    summary: dict

    def files(self, report: bool = True) -> dict[str, object]:
        """Run-folder contents for :func:`paramarket_jax.results.folders.write_run`: the tables, and
        with ``report`` the figures (PNG) and the self-contained ``report.html``."""
        text = dumps(self.scenario)
        files: dict[str, object] = {
            "scenario.toml": text,
            "rounds.parquet": self.rounds,
            "trades.parquet": self.trades,
            "summary.json": self.summary,
        }
        if report:
            from paramarket_jax.results.report import run_outputs  # deferred: matplotlib

            outputs = run_outputs(text, self.rounds, self.trades, self.summary, self.scenario.name)
            files.update(outputs)  # PNG bytes and the page's text
        return files


def result_of(experiment: Experiment, records) -> RunResult:
    """Tables and summary from host records with leading axes (seeds, rounds)."""
    scenario = experiment.scenario
    seeds = list(scenario.seeds)
    tables.check_finite_losses(records, seeds, scenario.train.learning_rate)
    rounds = tables.rounds_table(records, seeds, experiment.spec.twin_names)
    floors = {seed: loss_floors(experiment, seed) for seed in seeds}
    if all(f is not None for f in floors.values()):
        pairs = zip(rounds["seed"], rounds["agent"], strict=True)
        rounds["loss_floor"] = [floors[seed][agent] for seed, agent in pairs]
    trades = tables.trades_table(records, seeds)
    rounds[tables.WELFARE_COLUMNS] = tables.decompose(rounds, scenario.economics.revenue)
    return RunResult(scenario, rounds, trades, tables.summarize(rounds, trades))


def run_cells(
    cells: list[Experiment],
    *,
    max_batch: int | None = None,
    progress: Callable | None = None,
    devices: int = 1,
    shard: str = "auto",
    note: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Cells that differ only in numeric knobs, all seeds, through the batch path (on
    ``devices`` devices, split as ``shard`` says: :func:`paramarket_jax.engines.batch.prepare`;
    ``note`` hears how the runs are split into calls when they take several)."""
    out = batch.run_cells(
        cells, max_batch=max_batch, progress=progress, devices=devices, shard=shard, note=note
    )
    return [result_of(c, rec) for c, rec in zip(cells, out.records, strict=True)]


def run_mesa(
    experiment: Experiment, progress: Callable[[int], None] | None = None, *, model=None
) -> RunResult:
    """Every seed of a built experiment stepped through the Mesa view, one seed at a time;
    ``progress(1)`` after each round.

    Args:
        model: the Mesa model class, :class:`~paramarket_jax.engines.mesa.MarketModel` or
            a subclass of it with Python behaviour between the rounds (docs/mesa_behaviour.md).
    """
    if model is None:
        # deferred: Mesa is imported only by runs that use it (the batch path never does)
        from paramarket_jax.engines.mesa import MarketModel as model

    records = []
    for seed in experiment.scenario.seeds:
        market = model(experiment, seed)
        market.run(None if progress is None else (lambda: progress(1)))
        records.append(market.records())
    return result_of(experiment, jax.tree.map(lambda *xs: np.stack(xs), *records))


def run_scenario(
    scenario: Scenario,
    *,
    engine: str = "auto",
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
    checkpoints=None,
    check: bool = False,
    devices: int = 1,
    shard: str = "auto",
    note: Callable[[str], None] | None = None,
) -> RunResult:
    """Run every seed of ``scenario``.

    Args:
        scenario: a validated scenario.
        engine: ``batch`` (every seed in one compiled ``vmap`` of the scanned run),
            ``mesa`` (the Mesa model steps the same jitted round, one seed at a time) or
            ``auto`` (``batch``).
        max_batch: most runs per compiled call of the batch path.
        progress: called with a number of rounds x seeds finished.
        check: check the market's bookkeeping invariants on the tables
            (:func:`~paramarket_jax.results.tables.check_invariants`; ``paramarket run --check``).
        checkpoints: a :class:`paramarket_jax.engines.checkpoint.Checkpoints` (batch engine only):
            run in chunks of its ``every`` rounds, saving after each, and go on from its
            newest usable checkpoint.
        devices, shard: run on this many devices (batch engine only), splitting the runs
            or the agents over them (:func:`paramarket_jax.market.sharding.choose`).
        note: told once, before the first call, when the batch path splits the runs into
            several compiled calls (the memory budget or ``max_batch``): e.g. "runs split
            into 4 calls of 64 (memory budget)"; ``paramarket run`` shows it in its
            progress bar.
    """
    result = _run_scenario(scenario, engine, max_batch, progress, checkpoints, devices, shard,
                           note)  # fmt: skip
    if check:
        tables.check_invariants(result.rounds, result.trades)
    return result


def _run_scenario(scenario, engine, max_batch, progress, checkpoints, devices, shard, note):
    engine = resolve_engine(engine)
    if engine == "mesa" and devices != 1:
        raise ParamarketError(MESA_DEVICES)
    exp = build(scenario)
    rounds = scenario.train.rounds
    if checkpoints is not None:
        if engine != "batch":
            raise ParamarketError(CHECKPOINT_ENGINE)

        out = batch.run_cells_chunked(
            [exp],
            checkpoints.every,
            max_batch=max_batch,
            progress=progress,
            start=checkpoints.starter(progress),
            save=checkpoints.save,
            devices=devices,
            shard=shard,
            note=note,
        )
        return result_of(exp, out.records[0])
    if engine == "batch":
        tick = None if progress is None else (lambda runs: progress(runs * rounds))
        return run_cells([exp], max_batch=max_batch, progress=tick, devices=devices, shard=shard,
                         note=note)[0]  # fmt: skip
    return run_mesa(exp, progress)
