"""Run by tests/test_sharding.py in a subprocess with 4 fake CPU devices (XLA_FLAGS).

One market (3 agents, padded to 4 when its agents are split) runs unsharded, with its
agents split over the 4 devices, and with its runs split over them. Writes OUT/results.npz
(records of each layout, shardings seen) and OUT/summary.json (the unsharded summary).
"""

import json
import pathlib
import sys

import jax
import numpy as np
from shrink import SHRINK

from paramarket_jax import runs
from paramarket_jax import scenario as sc
from paramarket_jax.engines import batch
from paramarket_jax.experiment import build
from paramarket_jax.market import sharding

OVERRIDES = [
    *SHRINK,
    "agents.n=3",
    "train.rounds=2",
    "trading.start=0",
    "trading.every=1",
    "seeds=[0, 1]",
]


def flat(records, prefix):
    return {
        prefix + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(records)
    }


def main(out: pathlib.Path) -> None:
    assert jax.device_count() == 4, jax.devices()
    exp = build(sc.load("paper_two_agent", OVERRIDES))
    found = {}

    base = batch.run_cells([exp]).records[0]
    found.update(flat(base, "base"))
    summary = runs.result_of(exp, base).summary

    # the agents split over 4 devices (3 agents + 1 dead one), run as checkpoints run it
    b = batch.prepare([exp], devices=4, shard="agents")
    params, data, keys = b.call(0)
    states = batch.init_runs(b.spec, b.param_axes, params, data, keys)
    states, records = batch.simulate_runs_chunk(
        b.spec, b.rounds, b.param_axes, params, data, states, keys, np.int32(0)
    )
    found.update(flat(b.per_cell(jax.device_get(records))[0], "agents"))
    leaf = jax.tree.leaves(states.twins.params)[0]  # (runs, twins, N, ...)
    found["agents_pad"] = np.asarray(b.spec.pad)
    found["agents_spec"] = np.asarray([str(x) for x in leaf.sharding.spec])
    found["agents_shards"] = np.asarray([s.data.shape[2] for s in leaf.addressable_shards])
    found["cash_spec"] = np.asarray([str(x) for x in states.cash.sharding.spec])

    # the runs split over 4 devices (2 runs padded to 4)
    spread = batch.run_cells([exp], devices=4, shard="runs")
    found.update(flat(spread.records[0], "runs"))
    found["runs_chunk"] = np.asarray(spread.chunk)

    found["auto"] = np.asarray([sharding.choose("auto", r, 4) for r in (2, 4, 9)])
    np.savez(out / "results.npz", **found)
    (out / "summary.json").write_text(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
