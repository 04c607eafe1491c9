"""Mechanism benchmark: VCG payments from one assignment against 2N + 1 full solves.

``vcg_payments`` (JSON lines): seconds for ``vcg_assignment``'s outcome (allocation and
payments) on a random market of N agents, jitted, median after compilation, against the
same outcome computed by 2N + 1 full Hungarian solves (``reference_leave_one_out``, the
implementation it replaced) in the same run; both are checked to agree. Markets are drawn
as in ``many_agents_assignment``: each buyer has ``--candidates`` random candidate sellers
(0: every other agent), bids uniform in [0, 1], asks uniform in [0, 0.2]. Where the
baseline would run past ``--baseline-max`` agents it is timed on ``--baseline-sample``
of its 2N + 1 solves (vmapped, as it runs) and scaled to all of them, and the line says so;
where the baseline is measured whole, ``sampled_estimate_s`` is what that extrapolation
would have given (on two CPU cores at N = 256 it overestimated about 2x from 16 solves).

    python -m benchmarks.bench_mechanisms --sizes 64,256,1024
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import emit, peak_mem_mb, timeit
from paramarket_jax.mechanisms import Market
from paramarket_jax.mechanisms.assignment import reference_leave_one_out
from paramarket_jax.mechanisms.vcg import vcg_outcome

BENCH = "bench_mechanisms"


def draw_market(key, n: int, candidates: int) -> Market:
    """A random market: K candidate sellers per buyer (0: all), bids in [0, 1], asks in [0, 0.2]."""
    k_bid, k_ask, k_mask = jax.random.split(key, 3)
    bids = jax.random.uniform(k_bid, (n, n))
    asks = 0.2 * jax.random.uniform(k_ask, (n, n))
    if candidates and candidates < n - 1:
        score = jax.random.uniform(k_mask, (n, n)) - 2.0 * jnp.eye(n)
        kth = jnp.sort(score, axis=1)[:, -candidates][:, None]
        mask = score >= kth
    else:
        mask = jnp.ones((n, n), bool)
    return Market(bids=bids, asks=asks, mask=mask & ~jnp.eye(n, dtype=bool))


def sampled_baseline(market: Market, capacity: int, sample: int, reps: int) -> float:
    """Seconds of the 2N + 1 full solves, from ``sample`` of them (vmapped) scaled up."""
    n = market.bids.shape[0]
    profit = jnp.repeat(jnp.clip(market.bids - market.asks, 0.0, None), capacity, axis=1)
    drop = jax.random.bernoulli(jax.random.PRNGKey(0), 1.0 / n, (sample,) + profit.shape)

    @jax.jit
    def solves(drop):
        def one(d):
            rows, cols = optax.assignment.hungarian_algorithm(-jnp.where(d, 0.0, profit))
            return (rows * cols).sum()  # uses the solution (a lone sum may fold away)

        return jax.vmap(one)(drop)

    return timeit(solves, drop, reps=reps) * (2 * n + 1) / sample


def vcg_payments(sizes, capacity: int, candidates: int, reps: int, base_max: int, sample: int):
    for n in sizes:
        market = draw_market(jax.random.PRNGKey(n), n, candidates)
        fast = jax.jit(functools.partial(vcg_outcome, capacity=capacity))
        seconds = timeit(fast, market, reps=reps)
        extra = {}
        if n <= base_max:
            slow = jax.jit(
                functools.partial(vcg_outcome, capacity=capacity, optima=reference_leave_one_out)
            )
            base = timeit(slow, market, reps=1)
            a, b = fast(market), slow(market)
            extra["agree"] = bool(
                (np.asarray(a.alloc) == np.asarray(b.alloc)).all()
                and np.allclose(a.payment, b.payment, atol=1e-4)
                and np.allclose(a.receipt, b.receipt, atol=1e-4)
            )
            extra["baseline_measured"] = "all 2N + 1 solves"
            # what the extrapolation above --baseline-max would have said: its bias, here
            extra["sampled_estimate_s"] = sampled_baseline(market, capacity, sample, reps=1)
        else:
            base = sampled_baseline(market, capacity, sample, reps=1)
            extra["baseline_measured"] = f"extrapolated from {sample} of {2 * n + 1} solves"
        emit(
            BENCH,
            "vcg_payments",
            n,
            "seconds_per_outcome",
            seconds,
            "full_solves_s",
            base,
            capacity=capacity,
            candidates=candidates,
            trades=int(np.asarray(fast(market).alloc).sum()),
            speedup=base / seconds,
            peak_mem_mb=peak_mem_mb(),
            ratio_note="ratio = one-assignment / full solves; below 1 is faster",
            **extra,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,256,1024", help="agents N, comma-separated")
    ap.add_argument("--capacity", type=int, default=1, help="licences per seller")
    ap.add_argument("--candidates", type=int, default=8, help="candidate sellers per buyer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline-max", type=int, default=256,
                    help="largest N whose baseline runs all its 2N + 1 solves")  # fmt: skip
    ap.add_argument("--baseline-sample", type=int, default=64,
                    help="solves timed (and scaled) past --baseline-max")  # fmt: skip
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    vcg_payments(sizes, args.capacity, args.candidates, args.reps, args.baseline_max,
                 args.baseline_sample)  # fmt: skip


if __name__ == "__main__":
    main()
