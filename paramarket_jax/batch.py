"""The batch path: whole runs (``round.simulate``) vmapped over seeds and numeric cells.

Runs that share a :class:`~paramarket_jax.round.MarketSpec`, a dataset and a number of
rounds go through one compiled call: every seed's data is the shared feature arrays plus
its own index arrays, and every cell's knobs are a :class:`~paramarket_jax.round.MarketParams`.
A knob that differs between the cells gets a batch axis; a knob they share stays
unbatched, so (for example) the trading schedule stays a real ``lax.cond`` unless the
cells disagree on it. Runs are chunked to a memory budget; the last chunk is padded so
every chunk has one shape and one compilation. This module imports no Mesa.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import Experiment, seed_data
from paramarket_jax.population import AgentData
from paramarket_jax.round import MarketData, MarketSpec, simulate

# index arrays differ between seeds; feature arrays are shared by every seed
DATA_AXES = MarketData(
    agents=AgentData(
        x_train=None, y_train=None, train_rows=0, train_start=0, train_size=0,
        x_val=None, y_val=None, val_idx=0, x_test=None, y_test=None, test_idx=0,
    ),
    pool_rows=0,
    pool_size=0,
)  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def simulate_runs(spec: MarketSpec, rounds: int, param_axes, params, data, keys):
    """B runs at once: ``vmap`` of :func:`~paramarket_jax.round.simulate` (records only).

    Args:
        spec: the shared static spec.
        rounds: rounds per run (static).
        param_axes: a MarketParams of 0 (batched leaf) or None (shared leaf), hashable.
        params: MarketParams, batched leaves with a leading axis B.
        data: MarketData, index leaves with a leading axis B (see ``DATA_AXES``).
        keys: (B, ...) uint32 run keys as raw key data (``jax.random.key_data``).

    Returns:
        RoundRecord with leaves (B, rounds, ...).
    """

    def one(p, d, k):
        return simulate(spec, p, d, jax.random.wrap_key_data(k), rounds)[1]

    return jax.vmap(one, in_axes=(param_axes, DATA_AXES, 0))(params, data, keys)


def run_bytes(spec: MarketSpec, eval_rows: int) -> int:
    """A rough upper bound of one run's device memory: populations, optimizer states, the
    valuation's aligned sellers and merges (A alphas per candidate pair), and the
    evaluation rows every twin's agents gather (validation and test)."""
    n_params = spec.make_model().num_params
    k = spec.n - 1 if spec.candidates == 0 else min(spec.candidates, spec.n - 1)
    buyers = spec.chunk or spec.n
    per_pair = spec.alphas + 3  # merged models at every alpha, the seller, its alignment
    features = int(np.prod(spec.input_shape))
    gathers = 2 * spec.twins * spec.n * eval_rows * features
    return 4 * (n_params * (4 * spec.twins * spec.n + buyers * k * per_pair) + gathers)


def memory_budget() -> int:
    """Bytes the batch may use: half the accelerator's memory, or a quarter of host RAM."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 * 2**30


class BatchOutput(NamedTuple):
    """Records of every run of every cell, and how they were computed.

    Attributes:
        records: per cell, a RoundRecord of host arrays with leading axes (seeds, rounds).
        calls: compiled calls made (chunks).
        chunk: runs per call.
    """

    records: list
    calls: int
    chunk: int


def _stack_params(cells: Sequence[Experiment], runs: list[tuple[int, int]]):
    """Per-leaf: shared (axis None) if every cell agrees, else stacked over runs (axis 0).

    Stacking happens on the host (NumPy), so no small XLA programs compile for it.
    """
    leaves = [[np.asarray(v) for v in jax.tree.leaves(c.params)] for c in cells]
    treedef = jax.tree.structure(cells[0].params)
    axes, values = [], []
    for j, first in enumerate(leaves[0]):
        if all(np.array_equal(first, leaf[j]) for leaf in leaves):
            axes.append(None)
            values.append(first)
        else:
            axes.append(0)
            values.append(np.stack([leaves[c][j] for c, _ in runs]))
    return jax.tree.unflatten(treedef, axes), jax.tree.unflatten(treedef, values)


def _run_data(cells: Sequence[Experiment], runs) -> list[tuple[MarketData, jax.Array]]:
    """Every run's partition and key. Cells may differ in split options (``data.split.d``):
    each cell partitions with its own; cells with equal data settings share the work."""
    cache: dict[tuple, tuple[MarketData, jax.Array]] = {}
    out = []
    for c, s in runs:
        scenario = cells[c].scenario
        key = (repr(scenario.data), scenario.agents.n, s)
        if key not in cache:
            cache[key] = seed_data(cells[c], s)
        out.append(cache[key])
    return out


def _stack_data(per_run: list[tuple[MarketData, jax.Array]]):
    """Shared feature arrays once; every run's index arrays and raw key data stacked."""
    first = per_run[0][0]

    def pick(axis, leaf_first, *leaves):
        return leaf_first if axis is None else np.stack([np.asarray(v) for v in leaves])

    batched = [d for d, _ in per_run]
    stacked = jax.tree.map(pick, DATA_AXES, first, *batched, is_leaf=lambda x: x is None)
    keys = np.stack([np.asarray(jax.random.key_data(k)) for _, k in per_run])
    return stacked, keys


def run_cells(
    cells: Sequence[Experiment],
    *,
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BatchOutput:
    """Every seed of every cell, through as few compiled calls as the memory budget allows.

    Args:
        cells: experiments that share one spec, dataset, number of rounds and seed list
            (cells of a sweep that differ only in numeric knobs).
        max_batch: most runs per compiled call (default: as many as fit the budget).
        progress: called with the number of runs finished after each call.

    Returns:
        :class:`BatchOutput`; ``records[c]`` has leaves (len(seeds), rounds, ...).
    """
    first = cells[0]
    spec, sc = first.spec, first.scenario
    rounds, seeds = sc.train.rounds, list(sc.seeds)
    for c in cells:
        if c.spec != spec or c.scenario.train.rounds != rounds or list(c.scenario.seeds) != seeds:
            raise ParamarketError("run_cells needs cells with one spec, rounds and seeds")
        if c.dataset is not first.dataset:
            raise ParamarketError("run_cells needs cells that share one dataset")
    runs = [(c, s) for c in range(len(cells)) for s in seeds]
    per_run = _run_data(cells, runs)
    param_axes, params = _stack_params(cells, runs)
    data, keys = _stack_data(per_run)
    total = len(runs)
    eval_rows = int(per_run[0][0].agents.val_idx.shape[1])
    fit = max(1, memory_budget() // max(run_bytes(spec, eval_rows), 1))
    chunk = max(1, min(total, max_batch or total, fit))
    n_calls = -(-total // chunk)
    pad = n_calls * chunk - total

    def padded(axis, leaf):
        if axis is None or not pad:
            return leaf
        return np.concatenate([leaf, np.repeat(leaf[-1:], pad, axis=0)])

    is_none = lambda x: x is None  # noqa: E731
    params = jax.tree.map(padded, param_axes, params, is_leaf=is_none)
    data = jax.tree.map(padded, DATA_AXES, data, is_leaf=is_none)
    keys = padded(0, keys)
    outs = []
    for i in range(n_calls):
        sl = slice(i * chunk, (i + 1) * chunk)
        cut = lambda axis, leaf, sl=sl: leaf if axis is None else leaf[sl]  # noqa: E731
        rec = simulate_runs(
            spec,
            rounds,
            param_axes,
            jax.tree.map(cut, param_axes, params, is_leaf=is_none),
            jax.tree.map(cut, DATA_AXES, data, is_leaf=is_none),
            keys[sl],
        )
        outs.append(jax.device_get(rec))
        if progress is not None:
            progress(min(chunk, total - i * chunk))
    records = jax.tree.map(lambda *xs: np.concatenate(xs)[:total], *outs)
    k = len(seeds)
    per_cell = [
        jax.tree.map(lambda x, c=c: x[c * k : (c + 1) * k], records) for c in range(len(cells))
    ]
    return BatchOutput(per_cell, n_calls, chunk)
