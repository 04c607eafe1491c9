"""Population trainer throughput (agent-steps/s) against a naive per-agent loop and the probe.

The architecture and batch match ``shared/bench/population_anchor.py``: a 64-128-128-10 MLP,
Adam, batch 32. Ours draws every minibatch by index from a shared dataset inside the kernel
(the probe trains on pre-generated per-agent batches).

Usage: python -m benchmarks.bench_population [--sizes 1,16,64,256] [--steps 50]
       [--naive-max 64] [--anchor-dir ../shared/bench]
GPU run: --sizes 1,16,64,256,1024,4096,16384
"""

from __future__ import annotations

import argparse
import functools

import jax

from benchmarks.common import DEFAULT_ANCHOR_DIR, emit, load_anchor, peak_mem_mb, timeit
from paramarket_jax.data import load_dataset, partition
from paramarket_jax.models import make_model
from paramarket_jax.population import agent_data, agent_keys, make_trainer

D_IN, WIDTHS, CLASSES, BATCH, LR = 64, (128, 128), 10, 32, 1e-3


def setup(n: int):
    """Model, trainer, population and agent data for N agents on gaussian data."""
    k_data, k_split, k_init = jax.random.split(jax.random.key(0), 3)
    ds = load_dataset(
        "gaussian", k_data, n_train=max(4000, 64 * n), n_test=1000, dim=D_IN, num_classes=CLASSES
    )
    part = partition("iid", k_split, ds, n, eval_size=64)
    model = make_model("mlp", (D_IN,), CLASSES, widths=WIDTHS)
    trainer = make_trainer(model, "adam", BATCH)
    pop = trainer.init(k_init, n, LR)
    return trainer, pop, agent_data(ds, part)


def population_rate(n: int, steps: int) -> float:
    trainer, pop, data = setup(n)
    t = timeit(lambda: trainer.train(pop, jax.random.key(1), data, steps))
    return n * steps / t


def naive_rate(n: int, steps: int) -> float:
    """Each agent owns its parameters and calls its own jitted step, one step at a time."""
    trainer, pop, data = setup(n)
    step = jax.jit(functools.partial(trainer.train_one, steps=1))
    agents = [jax.tree.map(lambda v, i=i: v[i], (pop.params, pop.opt_state)) for i in range(n)]
    keys = agent_keys(jax.random.key(1), n)

    def loop():
        out = []
        for i, (p, o) in enumerate(agents):
            for k in jax.random.split(keys[i], steps):
                p, o, _ = step(
                    p,
                    o,
                    pop.learning_rate[i],
                    k,
                    data.train_start[i],
                    data.train_size[i],
                    data.train_rows,
                    data.x_train,
                    data.y_train,
                )
            out.append(p)
        return out

    return n * steps / timeit(loop, reps=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,64,256")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--naive-max",
        type=int,
        default=64,
        help="largest N the naive loop runs; its rate is per agent-step, so "
        "larger N are compared with the rate measured at this N",
    )
    ap.add_argument("--anchor-dir", default=str(DEFAULT_ANCHOR_DIR))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    anchor = load_anchor(args.anchor_dir, "population_anchor")
    naive = {}
    for n in sizes:
        if n <= args.naive_max:
            naive[n] = naive_rate(n, args.steps)
            emit(
                "population",
                "naive_per_agent_jit",
                n,
                "agent_steps_per_s",
                naive[n],
                "none",
                None,
                steps=args.steps,
            )
    ref_naive = naive[max(naive)] if naive else None
    for n in sizes:
        ours = population_rate(n, args.steps)
        mem = peak_mem_mb()
        base_n = n if n in naive else max(naive) if naive else None
        emit(
            "population",
            "vmapped_scan_vs_naive",
            n,
            "agent_steps_per_s",
            ours,
            f"naive_per_agent_jit@N={base_n}",
            naive.get(n, ref_naive),
            steps=args.steps,
            peak_mem_mb=mem,
        )
        if anchor is not None:
            t_scan, _ = anchor.bench_population(n, args.steps)
            emit(
                "population",
                "vmapped_scan_vs_probe",
                n,
                "agent_steps_per_s",
                ours,
                "population_anchor.scan",
                n * args.steps / t_scan,
                steps=args.steps,
                peak_mem_mb=mem,
            )


if __name__ == "__main__":
    main()
