"""The batch path: whole runs (``round.init`` and ``round.simulate_chunk``) vmapped over seeds
and numeric cells.

Runs that share a :class:`~paramarket_jax.market.types.MarketSpec`, a dataset and a number of
rounds go through one compiled call: every seed's data is the shared feature arrays plus
its own index arrays, and every cell's knobs are a
:class:`~paramarket_jax.market.types.MarketParams`.
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

from paramarket_jax.engines import programs
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import Experiment, seed_data
from paramarket_jax.market import sharding
from paramarket_jax.market.round import init, simulate_chunk
from paramarket_jax.market.types import DATA_AXES, MarketData, MarketParams, MarketSpec

# the seed axis of every run's data (``vmap`` in_axes): 0 for the leaves that differ between
# seeds (:data:`~paramarket_jax.market.types.DATA_AXES`), None for the shared feature arrays
SEED_AXES = jax.tree.map(lambda a: 0 if a.per_seed else None, DATA_AXES)


def simulate_runs(spec: MarketSpec, rounds: int, param_axes, params, data, keys):
    """B runs at once: :func:`init_runs` then one :func:`simulate_runs_chunk` of all
    ``rounds`` (the records only). Plain and checkpointed runs share these two programs;
    kept apart, they also compile faster than one program holding both (13.4 s against
    17.5 s for the default scenario on two CPU cores), with the same numbers.

    Args:
        spec: the shared static spec.
        rounds: rounds per run (static).
        param_axes: a MarketParams of 0 (batched leaf) or None (shared leaf), hashable.
        params: MarketParams, batched leaves with a leading axis B.
        data: MarketData, index leaves with a leading axis B (see :data:`SEED_AXES`).
        keys: (B, ...) uint32 run keys as raw key data (``jax.random.key_data``).

    Returns:
        RoundRecord with leaves (B, rounds, ...).
    """
    states = init_runs(spec, param_axes, params, data, keys)
    return simulate_runs_chunk(spec, rounds, param_axes, params, data, states, keys,
                               np.int32(0))[1]  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_runs(spec: MarketSpec, param_axes, params, data, keys):
    """B runs' initial states, as :func:`~paramarket_jax.market.round.simulate` draws them (from
    the first half of each run key's split): leaves with a leading axis B (split over the
    devices as the spec says, like the states :func:`simulate_runs_chunk` returns)."""

    def one(p, d, k):
        k_init, _ = jax.random.split(jax.random.wrap_key_data(k))
        return sharding.constrain_state(spec, init(spec, k_init, p, d))

    return jax.vmap(one, in_axes=(param_axes, SEED_AXES, 0))(params, data, keys)


def simulate_runs_chunk(spec: MarketSpec, length: int, param_axes, params, data, states, keys,
                        start):  # fmt: skip
    """Rounds ``start .. start + length - 1`` of B runs from their ``states``: ``vmap`` of
    :func:`~paramarket_jax.market.round.simulate_chunk` (``start`` unbatched and traced, so one
    compilation per ``length``). Chained from :func:`init_runs`' states, the chunks'
    records are :func:`simulate_runs`' records. With the compilation cache on, the traced
    program is saved too (:mod:`paramarket_jax.engines.programs`), so the next process
    neither traces nor compiles it.

    Returns:
        (states after the chunk, RoundRecord with leaves (B, length, ...)).
    """
    # a host callback (broker.solver = "callback") or a sharded program is not exported
    exportable = spec.devices == 1 and spec.solver == "optax"
    static = (spec, length, param_axes)
    return programs.call("simulate_runs_chunk", simulate_runs_chunk_jit, static, params, data,
                         states, keys, start, exportable=exportable)  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def simulate_runs_chunk_jit(spec: MarketSpec, length: int, param_axes, params, data, states,
                            keys, start):  # fmt: skip
    """:func:`simulate_runs_chunk` itself, jitted (``spec``, ``length`` and ``param_axes``
    static): for ``jax.eval_shape`` and the saved program's first trace."""

    def one(p, d, s, k):
        _, k_rounds = jax.random.split(jax.random.wrap_key_data(k))
        return simulate_chunk(spec, k_rounds, s, p, d, start, length)

    states, records = jax.vmap(one, in_axes=(param_axes, SEED_AXES, 0, 0))(
        params, data, states, keys
    )
    return states, sharding.replicate(spec, records)


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
        key = (repr(scenario.data), scenario.agents.n, cells[c].noise, s)
        if key not in cache:
            cache[key] = seed_data(cells[c], s)
        out.append(cache[key])
    return out


def _stack_data(per_run: list[tuple[MarketData, jax.Array]]):
    """Shared feature arrays once; every run's index arrays and raw key data stacked."""
    first = per_run[0][0]

    def pick(axis, leaf_first, *leaves):
        if axis is None or leaf_first is None:  # shared, or absent (no public rows)
            return leaf_first
        return np.stack([np.asarray(v) for v in leaves])

    batched = [d for d, _ in per_run]
    stacked = jax.tree.map(pick, SEED_AXES, first, *batched, is_leaf=lambda x: x is None)
    keys = np.stack([np.asarray(jax.random.key_data(k)) for _, k in per_run])
    return stacked, keys


class Batch(NamedTuple):
    """Every run of a batch of cells, stacked and padded for :func:`run_cells`' calls.

    Attributes:
        spec, rounds, seeds: what every cell shares.
        param_axes: a MarketParams of 0 (batched leaf) or None (shared leaf).
        params, data, keys: host arrays, batched leaves with a leading axis
            ``calls * chunk`` (the last run repeated as padding).
        total: runs (cells x seeds); chunk: runs per compiled call; calls: calls.
        limit: what held a call to ``chunk`` runs when there are several calls: the memory
            budget (:func:`memory_budget`) or the caller's ``max_batch`` (``--batch``).
    """

    spec: MarketSpec
    rounds: int
    seeds: list
    param_axes: MarketParams
    params: MarketParams
    data: MarketData
    keys: np.ndarray
    total: int
    chunk: int
    calls: int
    limit: str = ""

    def plan(self) -> str:
        """What a progress bar says of the calls: "" for one, else e.g. "runs split into 4
        calls of 64 (memory budget)"."""
        if self.calls == 1:
            return ""
        return f"runs split into {self.calls} calls of {self.chunk} ({self.limit})"

    def call(self, i: int):
        """The params, data and keys of compiled call ``i`` (runs ``i * chunk ...``), on
        the spec's devices (:func:`paramarket_jax.market.sharding.put`)."""
        sl = slice(i * self.chunk, (i + 1) * self.chunk)
        cut = lambda axis, leaf: leaf if axis is None or leaf is None else leaf[sl]  # noqa: E731
        is_none = lambda x: x is None  # noqa: E731
        params = jax.tree.map(cut, self.param_axes, self.params, is_leaf=is_none)
        data = jax.tree.map(cut, SEED_AXES, self.data, is_leaf=is_none)
        return (
            sharding.put(self.spec, params, self.param_axes),
            sharding.put(self.spec, data, SEED_AXES),
            sharding.put(self.spec, self.keys[sl], 0),
        )

    def states(self, i: int, states):
        """Call ``i``'s slice of every run's states (host arrays with leading axis
        ``calls * chunk``), on the spec's devices."""
        sl = slice(i * self.chunk, (i + 1) * self.chunk)
        part = jax.tree.map(lambda x: x[sl], states)
        return sharding.put(self.spec, part, jax.tree.map(lambda _: 0, part))

    def pad(self, tree):
        """Pad a tree of host arrays with a leading axis ``total`` to ``calls * chunk``."""
        pad = self.calls * self.chunk - self.total
        if not pad:
            return tree
        return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]), tree)

    def per_cell(self, records) -> list:
        """Split host records with a leading axis ``total`` into one per cell (padded
        agents cut off)."""
        records = sharding.unpad_records(records, self.spec.real)
        k = len(self.seeds)
        cells = self.total // k
        return [jax.tree.map(lambda x, c=c: x[c * k : (c + 1) * k], records) for c in range(cells)]


def prepare(
    cells: Sequence[Experiment], max_batch: int | None = None, devices: int = 1,
    shard: str = "auto", note: Callable[[str], None] | None = None,
) -> Batch:  # fmt: skip
    """Stack every seed of every cell into one padded :class:`Batch` (see :func:`run_cells`;
    ``note`` is told :meth:`Batch.plan` when the runs take several calls).

    On several ``devices`` the runs (``shard="runs"``) or the agents (``"agents"``) are
    split over them (``"auto"``: :func:`paramarket_jax.market.sharding.choose`); the batch's spec
    says which, and holds the dead agents that pad the population.
    """
    first = cells[0]
    spec, sc = first.spec, first.scenario
    rounds, seeds = sc.train.rounds, list(sc.seeds)
    for c in cells:
        if (c.spec, c.noise, c.scenario.train.rounds, list(c.scenario.seeds)) != (
            spec, first.noise, rounds, seeds
        ):  # fmt: skip
            raise ParamarketError(
                "run_cells needs cells with one spec, label noise, rounds and seeds"
            )
        if c.dataset is not first.dataset:
            raise ParamarketError("run_cells needs cells that share one dataset")
    runs = [(c, s) for c in range(len(cells)) for s in seeds]
    total = len(runs)
    spec = sharding.with_padding(spec, devices, sharding.choose(shard, total, devices))
    per_run = [(sharding.pad_data(d, spec.pad), k) for d, k in _run_data(cells, runs)]
    padded_params = [c._replace(params=sharding.pad_params(c.params, spec.pad)) for c in cells]
    param_axes, params = _stack_params(padded_params, runs)
    data, keys = _stack_data(per_run)
    eval_rows = int(per_run[0][0].agents.val_idx.shape[1])
    fit = max(1, devices * memory_budget() // max(run_bytes(spec, eval_rows), 1))
    chunk = max(1, min(total, max_batch or total, fit))
    limit = "memory budget" if fit < min(total, max_batch or total) else f"--batch {max_batch}"
    if spec.shard == "runs":  # every call splits evenly over the devices
        chunk = max(devices, chunk // devices * devices)
    n_calls = -(-total // chunk)
    pad = n_calls * chunk - total

    def padded(axis, leaf):
        if axis is None or not pad or leaf is None:
            return leaf
        return np.concatenate([leaf, np.repeat(leaf[-1:], pad, axis=0)])

    is_none = lambda x: x is None  # noqa: E731
    params = jax.tree.map(padded, param_axes, params, is_leaf=is_none)
    data = jax.tree.map(padded, SEED_AXES, data, is_leaf=is_none)
    keys = padded(0, keys)
    b = Batch(spec, rounds, seeds, param_axes, params, data, keys, total, chunk, n_calls, limit)
    if note is not None and b.calls > 1:
        note(b.plan())
    return b


def run_cells(
    cells: Sequence[Experiment],
    *,
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
    devices: int = 1,
    shard: str = "auto",
    note: Callable[[str], None] | None = None,
) -> BatchOutput:
    """Every seed of every cell, through as few compiled calls as the memory budget allows.

    Args:
        cells: experiments that share one spec, dataset, number of rounds and seed list
            (cells of a sweep that differ only in numeric knobs).
        max_batch: most runs per compiled call (default: as many as fit the budget).
        progress: called with the number of runs finished after each call.
        devices, shard: the devices to run on and how to split the work over them
            (:func:`prepare`).
        note: told :meth:`Batch.plan` once, before the first call, when the runs take
            several calls (the progress bar says so).

    Returns:
        :class:`BatchOutput`; ``records[c]`` has leaves (len(seeds), rounds, ...).
    """
    b = prepare(cells, max_batch, devices, shard, note)
    outs = []
    for i in range(b.calls):
        rec = simulate_runs(b.spec, b.rounds, b.param_axes, *b.call(i))
        outs.append(jax.device_get(rec))
        if progress is not None:
            progress(min(b.chunk, b.total - i * b.chunk))
    records = jax.tree.map(lambda *xs: np.concatenate(xs)[: b.total], *outs)
    return BatchOutput(b.per_cell(records), b.calls, b.chunk)


class Carry(NamedTuple):
    """A batch between chunks of rounds (what a checkpoint holds), host arrays.

    Attributes:
        done: rounds run so far.
        states: MarketState of every run (cells x seeds), leaves (total, ...).
        records: RoundRecord of the rounds so far, leaves (total, done, ...); None before
            the first round.
    """

    done: int
    states: object
    records: object


def run_cells_chunked(
    cells: Sequence[Experiment],
    every: int,
    *,
    max_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
    start: Callable[[Batch], Carry | None] | None = None,
    save: Callable[[Batch, Carry], None] | None = None,
    devices: int = 1,
    shard: str = "auto",
    note: Callable[[str], None] | None = None,
) -> BatchOutput:
    """:func:`run_cells` in chunks of ``every`` rounds, the carry handed to ``save`` after
    each chunk (the last one too), so a killed run can go on from it: the same records.

    Args:
        cells, max_batch: as for :func:`run_cells`.
        every: rounds per chunk (the last chunk may be shorter: one more compilation).
        progress: called with the number of runs x rounds finished after each call.
        start: given the prepared batch, the carry to go on from (None: from round 0).
        save: called with the batch and the carry after every chunk.
        devices, shard, note: as for :func:`run_cells`.
    """
    b = prepare(cells, max_batch, devices, shard, note)
    carry = start(b) if start is not None else None
    if carry is None:
        states = [jax.device_get(init_runs(b.spec, b.param_axes, *b.call(i)))
                  for i in range(b.calls)]  # fmt: skip
        states = jax.tree.map(lambda *xs: np.concatenate(xs)[: b.total], *states)
        carry = Carry(0, states, None)
    while carry.done < b.rounds:
        length = min(every, b.rounds - carry.done)
        padded = b.pad(carry.states)
        outs = []
        for i in range(b.calls):
            params, data, keys = b.call(i)
            states = b.states(i, padded)
            out = simulate_runs_chunk(b.spec, length, b.param_axes, params, data, states, keys,
                                      np.int32(carry.done))  # fmt: skip
            outs.append(jax.device_get(out))
            if progress is not None:
                progress(min(b.chunk, b.total - i * b.chunk) * length)
        states, records = jax.tree.map(lambda *xs: np.concatenate(xs)[: b.total], *outs)
        if carry.records is not None:
            records = jax.tree.map(lambda a, c: np.concatenate([a, c], 1), carry.records, records)
        carry = Carry(carry.done + length, states, records)
        if save is not None:
            save(b, carry)
    return BatchOutput(b.per_cell(carry.records), b.calls, b.chunk)
