"""Scaling benchmark: one market over 1, 2, 4 devices (``MarketSpec.devices``).

Cases (JSON lines, DESIGN.md section 8; ``value`` is rounds/s of one run, ``agent_steps_s``
is agent training steps per second over every run of the call, the baseline is the same
case on 1 device, so ``ratio`` is the speedup):

1. ``strong_agents``: fixed total N (``--n``, default 64), one seed, the agents split over
   D devices (padded with dead agents to a multiple of D).
2. ``weak_agents``: fixed N per device (``--per-device``, default 16): N = 16 D.
3. ``strong_runs``: fixed N and ``--seeds`` runs (default 4), the runs split over D
   devices (each run whole on one device, no collectives).
4. ``single_device`` (``--big``, meant for a GPU): 1 device at N = 1,024 ... 65,536
   agents (K = 8 candidates, reference alignment, ``--big-mechanism``: take_it, so the
   figure is the market's kernels; the assignment auction's N x N Hungarian solve and its
   leave-one-out paths grow as N^3, ``--big-mechanism vcg_assignment`` times them too,
   ``bench_mechanisms`` alone): rounds/s and agent-steps/s, on
   :func:`~benchmarks.common.scaled_data` (20 gaussian rows per agent of mnist1d's shape,
   iid: mnist1d's 3,400 training rows hold at most 1,700 agents).
   Preparing a seed's data takes about 1.7 ms per agent on the host (the per-agent
   evaluation draws), so about 2 minutes at 65,536 agents before the first call. Every
   mechanism reads (N, N) bids, asks and masks, so memory grows as N^2 whatever K is
   (16 GiB per float32 array at 65,536 agents). ``--cases single_device`` runs it alone.

The market is ``many_agents_assignment`` (reference alignment, K = 8 candidates, the
assignment auction), trading every round, with optax's Hungarian solver on every device
count (split markets always use it; on one CPU device the default would be scipy's). On
CPU the devices are fake (``--xla_force_host_platform_device_count``, set here before JAX
starts when fewer than 4 devices exist) and share the machine's cores, so the ratios say
what the partitioning costs, not what more hardware buys: there is no target on CPU.

Run: ``python -m benchmarks.bench_scale`` (CPU: a few minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import jax  # noqa: E402

from benchmarks.common import emit, peak_mem_mb, scaled_data  # noqa: E402
from paramarket_jax import scenario as sc  # noqa: E402
from paramarket_jax.engines import batch  # noqa: E402
from paramarket_jax.experiment import build  # noqa: E402

BENCH = "scale"


def experiment(n: int, rounds: int, local_steps: int, seeds: int, mechanism: str = ""):
    """The scaling market; ``mechanism`` (the ``single_device`` case) also swaps the
    assignment auction for it and the data for :func:`~benchmarks.common.scaled_data`."""
    overrides = [
        f"agents.n={n}",
        *([*scaled_data(n), f"mechanism.name={mechanism!r}"] if mechanism else []),
        f"train.rounds={rounds}",
        f"train.local_steps={local_steps}",
        "trading.start=0",
        "trading.every=1",
        f"seeds={list(range(seeds))}",
        "baselines.siloed=false",
    ]
    exp = build(sc.load("many_agents_assignment", overrides))
    # the solver split markets use (optax's Hungarian), so that 1 device is a fair baseline
    # (on CPU, one device would otherwise call scipy's faster solver through a callback)
    return exp._replace(spec=dataclasses.replace(exp.spec, solver="optax"))


def time_call(exp, devices: int, shard: str, reps: int) -> tuple[float, float]:
    """(seconds per call after compilation, compile + first call seconds)."""
    b = batch.prepare([exp], devices=devices, shard=shard)
    args = b.call(0)
    t = time.perf_counter()
    jax.block_until_ready(batch.simulate_runs(b.spec, b.rounds, b.param_axes, *args))
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(batch.simulate_runs(b.spec, b.rounds, b.param_axes, *args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], first


def case(name: str, exp, devices_list, shard: str, reps: int, base_n=None) -> None:
    spec, sc_ = exp.spec, exp.scenario
    rounds, runs = sc_.train.rounds, len(sc_.seeds)
    baseline = None
    for d in devices_list:
        if d > jax.device_count():
            continue
        e = exp if base_n is None else base_n(d)
        n = e.spec.n
        secs, first = time_call(e, d, shard, reps)
        rounds_s = rounds / secs
        steps_s = n * spec.local_steps * rounds * runs / secs
        if baseline is None:
            baseline = (rounds_s, steps_s)
        emit(
            BENCH,
            name,
            n,
            "rounds_per_s",
            rounds_s,
            "1 device",
            baseline[0],
            devices=d,
            shard=shard,
            runs=runs,
            agent_steps_s=steps_s,
            agent_steps_ratio=steps_s / baseline[1],
            compile_s=first - secs,
            mechanism=spec.mechanism,
            peak_mem_mb=peak_mem_mb(),
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="agents (strong scaling)")
    parser.add_argument("--per-device", type=int, default=16, help="agents per device (weak)")
    parser.add_argument("--seeds", type=int, default=4, help="runs (strong_runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--devices", default="1,2,4", help="device counts to try")
    parser.add_argument("--big", default="", help="single-device N list, e.g. 1024,...,65536")
    parser.add_argument("--big-mechanism", default="take_it", help="mechanism of --big")
    parser.add_argument("--cases", default="strong_agents,weak_agents,strong_runs,single_device",
                        help="cases to run (single_device needs --big)")  # fmt: skip
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")]
    r, k = args.rounds, args.local_steps
    cases = args.cases.split(",")

    if "strong_agents" in cases:
        case("strong_agents", experiment(args.n, r, k, 1), devices, "agents", args.reps)
    if "weak_agents" in cases:
        case(
            "weak_agents",
            experiment(args.per_device, r, k, 1),
            devices,
            "agents",
            args.reps,
            base_n=lambda d: experiment(args.per_device * d, r, k, 1),
        )
    if "strong_runs" in cases:
        case("strong_runs", experiment(args.n, r, k, args.seeds), devices, "runs", args.reps)
    for n in [int(v) for v in args.big.split(",") if v] if "single_device" in cases else []:
        big = experiment(n, r, k, 1, args.big_mechanism)
        case("single_device", big, [1], "agents", args.reps)


if __name__ == "__main__":
    main()
