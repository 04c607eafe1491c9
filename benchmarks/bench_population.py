"""Population trainer throughput (agent-steps/s) against a naive per-agent loop and the probe.

The architecture and batch match ``shared/bench/population_anchor.py``: a 64-128-128-10 MLP,
Adam, batch 32. Ours draws every minibatch by index from a shared dataset inside the kernel
(the probe trains on pre-generated per-agent batches).

``--model gpt`` times the bundled ``transformer_arithmetic`` scenario's GPT instead (2 blocks,
4 heads, d_model 32, d_head 8, d_mlp 64; modular arithmetic mod 23, the ``groups``
partition, Adam at 0.003, batch 32; cases ``gpt_naive_per_agent_jit`` and
``gpt_vmapped_scan_vs_naive``, with ``model``: ``gpt``; no probe comparison, the probe is an
MLP), for N in ``--sizes`` (default 1,4,16).

Usage: python -m benchmarks.bench_population [--model mlp|gpt] [--sizes 1,16,64,256]
       [--steps 50] [--naive-max 64] [--anchor-dir ../shared/bench]
GPU run: --sizes 1,16,64,256,1024,4096,16384 (gpt: --model gpt --sizes 1,16,64,256,1024)
"""

from __future__ import annotations

import argparse
import functools

import jax

from benchmarks.common import (
    ARITHMETIC,
    DEFAULT_ANCHOR_DIR,
    TRANSFORMER_LR,
    TRANSFORMER_SHAPE,
    emit,
    load_anchor,
    peak_mem_mb,
    timeit,
)
from paramarket_jax.data import load_dataset, partition
from paramarket_jax.models import make_model
from paramarket_jax.population import agent_data, agent_keys, make_trainer

D_IN, WIDTHS, CLASSES, BATCH, LR = 64, (128, 128), 10, 32, 1e-3


def setup(n: int, model_name: str = "mlp"):
    """Model, trainer, population and agent data for N agents on gaussian data (``gpt``:
    :func:`setup_gpt`)."""
    if model_name == "gpt":
        return setup_gpt(n)
    k_data, k_split, k_init = jax.random.split(jax.random.key(0), 3)
    ds = load_dataset(
        "gaussian", k_data, n_train=max(4000, 64 * n), n_test=1000, dim=D_IN, num_classes=CLASSES
    )
    part = partition("iid", k_split, ds, n, eval_size=64)
    model = make_model("mlp", (D_IN,), CLASSES, widths=WIDTHS)
    trainer = make_trainer(model, "adam", BATCH)
    pop = trainer.init(k_init, n, LR)
    return trainer, pop, agent_data(ds, part)


def setup_gpt(n: int):
    """The bundled ``transformer_arithmetic`` scenario's GPT, data and optimizer for N
    agents: modular arithmetic mod 23 (four operations, 90% of each table in the train
    pool), the ``groups`` partition (128 validation rows each), Adam at 0.003, batch 32."""
    k_data, k_split, k_init = jax.random.split(jax.random.key(0), 3)
    ds = load_dataset("arithmetic", k_data, **ARITHMETIC)
    part = partition("groups", k_split, ds, n, eval_size=128)
    model = make_model(
        "gpt", ds.x_train.shape[1:], ds.num_classes, vocab=ds.vocab, **TRANSFORMER_SHAPE
    )
    trainer = make_trainer(model, "adam", BATCH)
    pop = trainer.init(k_init, n, TRANSFORMER_LR)
    return trainer, pop, agent_data(ds, part)


def population_rate(n: int, steps: int, model_name: str = "mlp") -> float:
    trainer, pop, data = setup(n, model_name)
    t = timeit(lambda: trainer.train(pop, jax.random.key(1), data, steps))
    return n * steps / t


def naive_rate(n: int, steps: int, model_name: str = "mlp") -> float:
    """Each agent owns its parameters and calls its own jitted step, one step at a time."""
    trainer, pop, data = setup(n, model_name)
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
    ap.add_argument(
        "--model",
        default="mlp",
        choices=("mlp", "gpt"),
        help="mlp: the probe's MLP on gaussian data; gpt: the transformer_arithmetic "
        "scenario's GPT (cases gpt_*, no probe comparison)",
    )
    ap.add_argument("--sizes", default=None, help="default 1,16,64,256 (mlp), 1,4,16 (gpt)")
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
    gpt = args.model == "gpt"
    if args.sizes is None:
        args.sizes = "1,4,16" if gpt else "1,16,64,256"
    sizes = [int(s) for s in args.sizes.split(",")]
    anchor = None if gpt else load_anchor(args.anchor_dir, "population_anchor")
    prefix, extra = ("gpt_", dict(model="gpt")) if gpt else ("", {})
    naive = {}
    for n in sizes:
        if n <= args.naive_max:
            naive[n] = naive_rate(n, args.steps, args.model)
            emit(
                "population",
                prefix + "naive_per_agent_jit",
                n,
                "agent_steps_per_s",
                naive[n],
                "none",
                None,
                steps=args.steps,
                **extra,
            )
    ref_naive = naive[max(naive)] if naive else None
    for n in sizes:
        ours = population_rate(n, args.steps, args.model)
        mem = peak_mem_mb()
        base_n = n if n in naive else max(naive) if naive else None
        emit(
            "population",
            prefix + "vmapped_scan_vs_naive",
            n,
            "agent_steps_per_s",
            ours,
            f"{prefix}naive_per_agent_jit@N={base_n}",
            naive.get(n, ref_naive),
            steps=args.steps,
            peak_mem_mb=mem,
            **extra,
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
