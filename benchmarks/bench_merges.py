"""Valuation throughput of every merge method against ``linear`` in the same run.

One trading round's try-before-buy of the ``foundation_market`` scenario (8 GPT agents
fine-tuned from one pretrained base, every candidate pair valued at every knob of the
grid) is timed for each method and kind of good: ``linear`` (the baseline), task
arithmetic, TIES (its top-k trim), DARE and DARE-TIES (their random drops), Fisher (the
per-example gradients of every agent's Fisher included) and TIES with the layer-wise fit
(its gradient steps included). Each JSON line gives merged models scored per second, the
linear valuation's in the same process as the baseline, and their ratio
(``ratio``); a method with a second knob scores ``alphas x second`` merges a pair.

python benchmarks/bench_merges.py [--reps 3] [--agents 8] [--shrink]
"""

from __future__ import annotations

import argparse
import functools

import jax

from benchmarks.common import emit, peak_mem_mb, timeit
from paramarket_jax import scenario as sc
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade

BENCH = "merges"
CASES = {
    "linear": ["broker.merge=linear"],
    "task_arithmetic": ["broker.merge=task_arithmetic"],
    "ties": ["broker.merge=ties"],
    "dare": ["broker.merge=dare"],
    "dare_ties": ["broker.merge=dare_ties"],
    "fisher": ["broker.merge=fisher"],
    "ties_layerwise": ["broker.merge=ties", "broker.fit=layerwise"],
    "adapter_task_arithmetic": [
        "broker.goods=adapter",
        "broker.merge=task_arithmetic",
    ],
}
SHRINK = ["model.layers=1", "model.d_model=16", "model.d_mlp=32", "pretrain.steps=20"]


@functools.partial(jax.jit, static_argnums=0)
def _valuation(spec, key, state, params, data):
    return trade.value_offers(spec, key, state, params, data).gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--shrink", action="store_true", help="a smaller GPT (a quick check)")
    args = ap.parse_args()
    base = [
        f"agents.n={args.agents}",
        "broker.candidates=0",
        "broker.alphas=[0.25, 0.5, 0.75, 1.0]",
        "broker.density=[0.2, 0.5]",
        "broker.drop=[0.3, 0.6]",
        *(SHRINK if args.shrink else []),
    ]
    results = {}
    for case, extra in CASES.items():
        exp = build(sc.load("foundation_market", [*base, *extra]))
        data, key = seed_data(exp, 0)
        k_init, k_rounds = jax.random.split(key)
        state = market_round.init_jit(exp.spec, k_init, exp.params, data)
        k = jax.random.fold_in(k_rounds, 1)
        t = timeit(_valuation, exp.spec, k, state, exp.params, data, reps=args.reps)
        n = exp.spec.n
        merges = n * (n - 1) * exp.spec.alphas * max(exp.spec.second, 1)
        results[case] = (merges / t, merges, exp)
    linear = results["linear"][0]
    for case, (rate, merges, exp) in results.items():
        emit(
            BENCH,
            case,
            exp.spec.n,
            "merged_models_per_s",
            rate,
            "linear valuation, same run",
            linear,
            merges_per_round=merges,
            goods=exp.spec.goods,
            fit=exp.spec.fit,
            model=exp.spec.model,
            val_rows=exp.scenario.data.split.eval_size,
            peak_mem_mb=peak_mem_mb(),
        )


if __name__ == "__main__":
    main()
