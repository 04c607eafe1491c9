"""Market benchmark: the paper-shaped trading round, and seeds as a vmap axis.

Cases (JSON lines, DESIGN.md section 8):

1. ``paper_round``: the paper's MNIST-shaped round (gaussian data with 784 features and 10
   classes, about 60,000 training rows, 2 agents by ``class_split`` d=0.1, the paper's MLP,
   SGD lr 1e-2, batch 512, 64 local steps, 10 alphas, 10,000 validation rows per buyer);
   seconds per trading round (median after compilation) with the siloed twin on and off,
   against the paper's released code (2.0 s on a 2-core CPU, 2.4 s on an H200: measured
   outside this repository, see ../shared/PAPER.md; the constant is the yardstick).
2. ``seeds_vmap``: S seeds of ``paper_two_agent`` through the batch path (one compiled call)
   against the Mesa path stepping seeds one after another: runs per minute, both warm.
3. ``many_agents``: seconds per trading round of ``many_agents_assignment`` (K = 8) at
   N in {8, 32, 128, 256}, split into train / value / settle / record (each part jitted
   alone; record is the rest of the round: evaluation, earnings, the copy to the host),
   for pairwise and reference alignment. Past N = 512 the market trains on
   :func:`~benchmarks.common.scaled_data` (mnist1d's rows would give each agent about
   three), and the line's ``data`` says which.
4. ``naive_mesa``: the same market at N = 32 (pairwise alignment, take-it rule, no twins)
   as a naive Mesa model where each agent owns its parameters and calls its own jitted
   train, align, score and merge, against one jitted round of the pure path.
5. ``anticipating``: seconds per trading round of ``rival_market`` at N in {5, 32, 128}
   with ``broker.valuation = "anticipating"`` (``broker.passes`` revaluations against the
   tentative allocation) against the myopic round in the same run; each pass is one quote
   and one mechanism run (no training, no evaluation), so the ratio is the cost of the
   passes, split as in ``many_agents``.
6. ``paper_100_seeds`` (``--paper-seeds 100``, meant for a GPU): 100 seeds of the
   paper-shaped run (50 rounds) in one batch call, total wall time including compilation,
   against the paper's code needing about 140 s for one seed on an H200.
7. ``parallel_markets``: S markets (seeds) of N agents each advanced by one trading round
   (``--market-rounds``) in the batch engine's compiled call (``batch.prepare``, then
   ``batch.simulate_runs_chunk``: ``round.simulate_chunk`` vmapped over seeds, chunked to
   the engine's memory budget or ``--market-batch`` runs per call) at every S in
   ``--markets`` and N in ``--market-sizes``: markets per second and agent-rounds per
   second, against a Python loop over the seeds calling the jitted single-seed round
   (``round.step_jit``) in the same process. The market is ``many_agents_assignment``
   (reference alignment, K = 8 candidates) with ``--market-mechanism`` (take_it), no
   siloed twins, ``--market-steps`` local steps, on :func:`~benchmarks.common.scaled_data`
   (20 gaussian rows per agent, iid). Both sides start from the state after ``init`` (not
   timed) and take medians of ``--market-reps`` after a compiling call. Past
   ``--market-budget`` seconds a side stops and is extrapolated: the loop from the seeds
   it ran (``baseline`` says so), the batch from its ``calls_timed`` of ``calls`` (every
   call has one shape). ``max_abs_diff_test_acc``: batch against loop on the seeds both
   ran. ``peak_mem_mb`` is the process's peak so far (host RSS on CPU,
   ``peak_bytes_in_use`` on an accelerator), so the grid runs from small to large.
   Points with S x N above ``--market-cap`` print a ``skipped`` line: 1,024 keeps two CPU
   cores to a few minutes (mostly compiling); 4,096 adds S = 256 at N = 8 and S = 16 at
   N = 128 (13 minutes on a loaded 2-core machine). On a GPU pass e.g. ``--market-cap 0
   --markets 1,16,256,1024 --market-sizes 8,128,1024,4096``; preparing a seed's data
   costs about 1.7 ms per agent on the host (``prepare_s``: the per-agent evaluation
   draws), so S = 1,024 at N = 4,096 spends about 2 hours there before its first call.

Run: ``python -m benchmarks.bench_market`` (CPU defaults take a few minutes).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, emit, peak_mem_mb, scaled_data, timeit
from paramarket_jax import scenario as sc
from paramarket_jax.engines import batch
from paramarket_jax.experiment import build, seed_data
from paramarket_jax.market import round as market_round
from paramarket_jax.market import trade as market_trade
from paramarket_jax.market.round import init_jit, step_jit

BENCH = "market"
PAPER_ROUND_S = {"cpu": 2.0, "gpu": 2.4}  # the paper's released code, one trading round
PAPER_RUN_S = 140.0  # the paper's code, one seed of 50 rounds on an H200


def paper_shaped(rounds: int, siloed: bool, seeds=(0,)) -> list[str]:
    """Overrides turning ``paper_two_agent`` into the paper's MNIST-shaped market."""
    return [
        "data.dataset=gaussian",
        "data.dim=784",
        "data.num_classes=10",
        "data.n_train=70600",  # 15% carved for validation: 60,010 training rows
        "data.n_test=10000",
        "data.split.d=0.1",
        "data.split.eval_size=10000",
        "train.batch_size=512",
        "train.local_steps=64",
        "train.learning_rate=0.01",
        f"train.rounds={rounds}",
        "trading.start=0",
        "baselines.centralized=false",
        f"baselines.siloed={'true' if siloed else 'false'}",
        f"seeds={list(seeds)}",
    ]


def round_times(exp, reps: int) -> tuple[list[float], list[int]]:
    """Seconds of each of ``reps`` trading rounds (after one that compiles), shard sizes."""
    data, key = seed_data(exp, 0)
    k_init, k_rounds = jax.random.split(key)
    state = init_jit(exp.spec, k_init, exp.params, data)
    times = []
    for r in range(reps + 1):
        t = time.perf_counter()
        k = jax.random.fold_in(k_rounds, r)
        state, rec = step_jit(exp.spec, k, state, exp.params, data, jnp.asarray(r, jnp.int32))
        jax.block_until_ready(rec)
        times.append(time.perf_counter() - t)
        assert bool(rec.traded)
    return times[1:], np.asarray(data.agents.train_size).tolist()


def paper_round(reps: int) -> None:
    for siloed in (True, False):
        exp = build(sc.load("paper_two_agent", paper_shaped(1, siloed)))
        times, sizes = round_times(exp, reps)
        ref = PAPER_ROUND_S["cpu" if device_name() == "cpu" else "gpu"]
        median = float(np.median(times))
        emit(
            BENCH,
            f"paper_round_siloed_{'on' if siloed else 'off'}",
            2,
            "seconds_per_trading_round",
            median,
            "paper_code_reference_s",
            ref,
            ratio_note="ratio = ours / paper; below 1 is faster",
            speedup_vs_paper=ref / median,
            shard_sizes=sizes,
            reps=reps,
            peak_mem_mb=peak_mem_mb(),
        )


def seeds_vmap(seeds: int, mesa_seeds: int, rounds: int | None, reps: int) -> None:
    from paramarket_jax.engines.mesa import MarketModel

    extra = [f"train.rounds={rounds}"] if rounds else []
    scen = sc.load("paper_two_agent", [*extra, f"seeds={list(range(seeds))}"])
    exp = build(scen)
    t = time.perf_counter()
    out = batch.run_cells([exp])
    cold = time.perf_counter() - t
    assert out.calls == 1
    mem = peak_mem_mb()
    warmup = MarketModel(exp, seeds)  # the Mesa path's round compiled too
    warmup.step()
    # Both paths warm, timed alternately so that a noisy neighbour slows both alike; the
    # Mesa path steps its seeds one after another (seed s of each repetition differs).
    batch_s, mesa_s = [], []
    for rep in range(reps):
        t = time.perf_counter()
        batch.run_cells([exp])
        batch_s.append((time.perf_counter() - t) / seeds)
        t = time.perf_counter()
        for s in range(rep * mesa_seeds, (rep + 1) * mesa_seeds):
            MarketModel(exp, s % seeds).run()
        mesa_s.append((time.perf_counter() - t) / mesa_seeds)
    batch_rate, mesa_rate = 60 / np.median(batch_s), 60 / np.median(mesa_s)
    emit(
        BENCH,
        "seeds_vmap",
        seeds,
        "runs_per_minute",
        batch_rate,
        f"mesa_sequential_runs_per_minute (medians of {reps} alternating repetitions, "
        f"{mesa_seeds} Mesa runs each)",
        mesa_rate,
        batch_cold_s=cold,
        batch_warm_s=[round(x * seeds, 2) for x in batch_s],
        mesa_s_per_run=[round(x, 3) for x in mesa_s],
        rounds=scen.train.rounds,
        peak_mem_mb=mem,
    )


def paper_many_seeds(seeds: int, rounds: int) -> None:
    exp = build(sc.load("paper_two_agent", paper_shaped(rounds, True, range(seeds))))
    t = time.perf_counter()
    out = batch.run_cells([exp])
    wall = time.perf_counter() - t
    acc = np.asarray(out.records[0].test_acc)[:, -1, 0].mean()
    emit(
        BENCH,
        "paper_100_seeds",
        seeds,
        "wall_seconds_one_batch_call",
        wall,
        "paper_code_one_seed_h200_s",
        PAPER_RUN_S,
        ratio_note="ratio = ours (all seeds) / paper (one seed)",
        seeds_per_paper_seed_time=seeds * PAPER_RUN_S / wall,
        calls=out.calls,
        rounds=rounds,
        final_market_accuracy=float(acc),
        peak_mem_mb=peak_mem_mb(),
    )


def _first_round(exp, seed: int = 0):
    """A trading round's inputs: seed data, the state after init, the round key."""
    data, key = seed_data(exp, seed)
    k_init, k_rounds = jax.random.split(key)
    return data, init_jit(exp.spec, k_init, exp.params, data), jax.random.fold_in(k_rounds, 0)


def round_parts(exp, reps: int) -> dict[str, float]:
    """Median seconds of one trading round and of its parts, each jitted alone."""
    spec, params = exp.spec, exp.params
    data, state, key = _first_round(exp)
    trainer = spec.make_trainer()
    r0 = jnp.asarray(0, jnp.int32)

    def whole(state, key):
        return jax.device_get(step_jit(spec, key, state, params, data, r0))

    @jax.jit
    def train(state, key):
        return market_round.train(spec, key, state, params, data)

    @jax.jit
    def value(state, key):
        pop = state.twins.params
        pop = jax.tree.map(lambda v: v[market_round.MARKET], pop)
        alive = state.alive[market_round.MARKET]
        agents = data.agents
        loss_v, _ = trainer.evaluate(pop, agents.x_val, agents.y_val, agents.val_idx)
        keys = market_trade.TradeKeys.of(key)
        return market_trade.value(spec, keys, params, data, pop, alive, loss_v)

    @jax.jit
    def trade(state, key):
        return market_trade.trade(spec, key, state, params, data)

    t = {name: timeit(fn, state, key, reps=reps) for name, fn in
         (("round", whole), ("train", train), ("value", value), ("trade", trade))}  # fmt: skip
    return dict(
        round=t["round"],
        train=t["train"],
        value=t["value"],
        settle=max(t["trade"] - t["value"], 0.0),
        record=max(t["round"] - t["train"] - t["trade"], 0.0),
    )


SCALED_FROM = 512  # many_agents: larger markets use benchmarks.common.scaled_data


def many_agents(sizes: list[int], aligns: list[str], reps: int) -> None:
    for n in sizes:
        for align in aligns:
            # past 512 agents mnist1d's rows run short (3 a shard at 1,024): scaled_data
            data = scaled_data(n) if n > SCALED_FROM else []
            scen = sc.load("many_agents_assignment", [f"agents.n={n}", f"broker.align={align!r}",
                                                      "trading.start=0", *data])  # fmt: skip
            parts = round_parts(build(scen), reps)
            emit(
                BENCH,
                f"many_agents_{align}",
                n,
                "seconds_per_trading_round",
                parts["round"],
                "none (split of the same round)",
                None,
                parts={k: round(v, 4) for k, v in parts.items() if k != "round"},
                candidates=scen.broker.candidates,
                twins=list(build(scen).spec.twin_names),
                data="scaled_data (gaussian, iid)" if data else "mnist1d (dirichlet)",
                peak_mem_mb=peak_mem_mb(),
            )


def anticipating(sizes: list[int], passes: int, reps: int) -> None:
    for n in sizes:
        parts = {}
        for valuation in ("myopic", "anticipating"):
            scen = sc.load("rival_market", [f"agents.n={n}", f"broker.valuation={valuation!r}",
                                           f"broker.passes={passes}", "trading.start=0",
                                           "seeds=[0]"])  # fmt: skip
            parts[valuation] = round_parts(build(scen), reps)
        emit(
            BENCH,
            "anticipating",
            n,
            "seconds_per_trading_round",
            parts["anticipating"]["round"],
            "myopic_round_s",
            parts["myopic"]["round"],
            ratio_note="ratio = anticipating / myopic; the passes' cost",
            passes=passes,
            settle_s={k: round(v["settle"], 4) for k, v in parts.items()},
            value_s={k: round(v["value"], 4) for k, v in parts.items()},
            peak_mem_mb=peak_mem_mb(),
        )


def naive_mesa(n: int, reps: int) -> None:
    """Each agent a Mesa agent with its own params and its own jitted calls, seed 0."""
    import mesa

    from paramarket_jax.broker import align as align_mod
    from paramarket_jax.broker import merge as merge_mod  # merge: a local name below
    from paramarket_jax.broker.value import loss_and_accuracy, sample_candidates

    overrides = [f"agents.n={n}", "broker.align='pairwise'", "trading.start=0",
                 "mechanism.name=take_it", "baselines.siloed=false"]  # fmt: skip
    exp = build(sc.load("many_agents_assignment", overrides))
    spec, params = exp.spec, exp.params
    data, state, key = _first_round(exp)
    model = spec.make_model()
    trainer = spec.make_trainer()
    agents = data.agents
    alphas = params.alphas
    train_one = jax.jit(trainer.train_one, static_argnums=9)

    @jax.jit
    def score(buyer, seller, rows):
        x, y = agents.x_val[rows], agents.y_val[rows]
        merged = jax.vmap(lambda a: merge_mod.merge(buyer, seller, a))(alphas)
        losses = jax.vmap(lambda p: loss_and_accuracy(model, p, x, y)[0])(merged)
        before = loss_and_accuracy(model, buyer, x, y)[0]
        return (before - losses.min()) / before, alphas[losses.argmin()]

    permute = jax.jit(lambda perms, p: align_mod.aligned(model.spec, perms, p))
    merge = jax.jit(merge_mod.merge)

    class Trader(mesa.Agent):
        def __init__(self, market, i):
            super().__init__(market)
            self.i = i
            take = lambda v: v[market_round.MARKET, i]  # noqa: E731
            self.params = jax.tree.map(take, state.twins.params)
            self.opt = jax.tree.map(take, state.twins.opt_state)

        def train(self, k):
            self.params, self.opt, _ = train_one(
                self.params, self.opt, params.learning_rate[self.i], k,
                agents.train_start[self.i], agents.train_size[self.i], agents.train_rows,
                agents.x_train, agents.y_train, spec.local_steps,
            )  # fmt: skip

        def shop(self, k, sellers):
            best = (0.0, None, None)
            for j in sellers:
                other = self.model.traders[int(j)].params
                perms = align_mod.align(
                    model.spec, self.params, other, k, max_sweeps=spec.max_sweeps
                )
                seller = permute(perms, other)
                gain, alpha = score(self.params, seller, agents.val_idx[self.i])
                if float(gain) > best[0]:
                    best = (float(gain), seller, alpha)
            self.offer = best

        def buy(self):
            if self.offer[1] is not None:
                self.params = merge(self.params, self.offer[1], self.offer[2])

    class Naive(mesa.Model):
        def __init__(self):
            super().__init__(seed=0)
            self.traders = [Trader(self, i) for i in range(n)]

        def step(self, k):
            for t in self.traders:
                t.train(jax.random.fold_in(k, t.i))
            cands = sample_candidates(k, n, min(spec.candidates, n - 1))
            for t in self.traders:
                t.shop(jax.random.fold_in(k, n + t.i), np.asarray(cands[t.i]))
            for t in self.traders:
                t.buy()
            jax.block_until_ready([t.params for t in self.traders])

    naive = Naive()
    naive_s = timeit(naive.step, key, reps=reps)
    ours = round_parts(exp, reps)["round"]
    emit(
        BENCH,
        "naive_mesa",
        n,
        "seconds_per_trading_round",
        ours,
        "naive Mesa model, per-agent jitted train/align/score/merge (s per round)",
        naive_s,
        ratio_note="ratio = ours / naive; the speed-up is its inverse",
        speedup=naive_s / ours,
        candidates=spec.candidates,
        peak_mem_mb=peak_mem_mb(),
    )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parallel_experiment(n: int, markets: int, local_steps: int, mechanism: str):
    """``many_agents_assignment`` made cheap and scalable for ``parallel_markets``."""
    overrides = [
        f"agents.n={n}",
        *scaled_data(n),
        f"train.local_steps={local_steps}",
        "trading.start=0",
        f"mechanism.name={mechanism!r}",
        "baselines.siloed=false",
        f"seeds={list(range(markets))}",
    ]
    return build(sc.load("many_agents_assignment", overrides))


def batch_rounds(b, rounds: int, reps: int, budget_s: float):
    """(seconds for ``rounds`` rounds of every run of the batch: each call's median of
    ``reps`` after a compiling call, summed, extrapolated to every call past the calls
    timed once ``budget_s`` is spent; calls timed; the first call's compile + run seconds;
    its records, host). Each call's states come from ``batch.init_runs`` (not timed); one
    call's inputs are on the device at a time."""
    medians, first, records, spent = [], None, None, 0.0
    for i in range(b.calls):
        params, data, keys = b.call(i)
        states = jax.block_until_ready(batch.init_runs(b.spec, b.param_axes, params, data, keys))
        args = (b.spec, rounds, b.param_axes, params, data, states, keys, np.int32(0))
        t = time.perf_counter()
        out = jax.block_until_ready(batch.simulate_runs_chunk(*args))
        if i == 0:
            first, records = time.perf_counter() - t, jax.device_get(out[1])
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(batch.simulate_runs_chunk(*args))
            times.append(time.perf_counter() - t)
        medians.append(float(np.median(times)))
        spent += sum(times)
        del params, data, keys, states, args, out
        if spent > budget_s:
            break
    return float(np.mean(medians)) * b.calls, len(medians), first, records


def sequential_rounds(exp, seeds: int, rounds: int, reps: int, budget_s: float):
    """(seconds for ``rounds`` rounds of one seed after another, extrapolated to ``seeds``
    seeds, seeds measured, per measured seed its records): ``round.step_jit`` for each
    round of each seed, as ``round.simulate`` keys them, from the state after ``init``."""
    spec, params = exp.spec, exp.params

    def inputs(s):
        data, key = seed_data(exp, s)
        k_init, k_rounds = jax.random.split(key)
        return data, init_jit(spec, k_init, params, data), k_rounds

    def run(data, state, k_rounds):
        recs = []
        for r in range(rounds):
            k = jax.random.fold_in(k_rounds, r)
            state, rec = step_jit(spec, k, state, params, data, jnp.asarray(r, jnp.int32))
            recs.append(jax.block_until_ready(rec))
        return recs

    first = inputs(0)
    run(*first)  # compiles
    t = time.perf_counter()
    run(*first)
    one = time.perf_counter() - t
    k = max(1, min(seeds, int(budget_s / max(one * reps, 1e-9))))
    runs = [first, *(inputs(s) for s in range(1, k))]
    times, records = [], None
    for _ in range(reps):
        t = time.perf_counter()
        records = [run(*r) for r in runs]
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * seeds / k, k, records


def parallel_markets(markets: list[int], sizes: list[int], local_steps: int, rounds: int,
                     reps: int, budget_s: float, max_batch: int, mechanism: str,
                     cap: int) -> None:  # fmt: skip
    settings = dict(rounds=rounds, local_steps=local_steps, mechanism=mechanism)
    for n in sizes:
        for s in markets:
            if cap and s * n > cap:
                print(json.dumps(dict(bench=BENCH, case="parallel_markets", n=n, markets=s,
                                      device=device_name(), skipped=f"S x N = {s * n} > "
                                      f"--market-cap {cap}")), flush=True)  # fmt: skip
                continue
            exp = parallel_experiment(n, s, local_steps, mechanism)
            t = time.perf_counter()
            b = batch.prepare([exp], max_batch or None)
            prepare_s = time.perf_counter() - t
            batch_s, timed, first, rec = batch_rounds(b, rounds, reps, budget_s)
            seq_s, k, seq_rec = sequential_rounds(exp, s, rounds, reps, budget_s)
            both = min(k, b.chunk)
            diff = max(float(np.abs(rec.test_acc[j, r] - seq_rec[j][r].test_acc).max())
                       for j in range(both) for r in range(rounds))  # fmt: skip
            how = "measured, all" if k == s else "extrapolated from"
            eval_rows = int(b.data.agents.val_idx.shape[-1])
            chunk_from = "none (one call)" if b.chunk == s else "memory budget"
            if max_batch and b.chunk == max_batch < s:
                chunk_from = "--market-batch"
            emit(
                BENCH,
                "parallel_markets",
                n,
                "markets_per_s",
                s * rounds / batch_s,
                f"sequential round.step_jit markets_per_s, {how} {k} of {s} seeds",
                s * rounds / seq_s,
                ratio_note="ratio = batch / sequential; the seed vmap's speed-up",
                markets=s,
                agent_rounds_per_s=s * n * rounds / batch_s,
                baseline_agent_rounds_per_s=s * n * rounds / seq_s,
                batch_s=batch_s,
                sequential_s=seq_s,
                baseline_seeds_measured=k,
                chunk=b.chunk,
                calls=b.calls,
                calls_timed=timed,
                chunk_from=chunk_from,
                est_chunk_mb=b.chunk * batch.run_bytes(b.spec, eval_rows) / 2**20,
                compile_s=first - batch_s / b.calls,
                prepare_s=prepare_s,
                **settings,
                max_abs_diff_test_acc=diff,
                peak_mem_mb=peak_mem_mb(),
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="paper_round,seeds_vmap",
                    help="comma-separated: paper_round, seeds_vmap, many_agents, naive_mesa, "
                         "anticipating, paper_100_seeds, parallel_markets")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5, help="timed trading rounds (median)")
    ap.add_argument("--seeds", type=int, default=32, help="seeds of the seeds_vmap case")
    ap.add_argument("--mesa-seeds", type=int, default=4, help="seeds the Mesa baseline runs")
    ap.add_argument("--seed-reps", type=int, default=3, help="alternating repetitions")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of paper_two_agent")
    ap.add_argument("--sizes", default="8,32,128,256", help="N of the many_agents case")
    ap.add_argument("--aligns", default="pairwise,reference", help="many_agents alignments")
    ap.add_argument("--naive-n", type=int, default=32, help="N of the naive_mesa case")
    ap.add_argument("--rival-sizes", default="5,32,128", help="N of the anticipating case")
    ap.add_argument("--passes", type=int, default=3, help="passes of the anticipating case")
    ap.add_argument("--paper-seeds", type=int, default=100)
    ap.add_argument("--paper-rounds", type=int, default=50)
    ap.add_argument("--markets", default="1,16,256", help="S of parallel_markets (seeds)")
    ap.add_argument("--market-sizes", default="8,32,128", help="N of parallel_markets")
    ap.add_argument("--market-steps", type=int, default=5, help="parallel_markets local steps")
    ap.add_argument("--market-rounds", type=int, default=1, help="rounds per timed call")
    ap.add_argument("--market-mechanism", default="take_it", help="parallel_markets mechanism")
    ap.add_argument("--market-budget", type=float, default=20.0,
                    help="seconds each side's timed calls may take (reps included); past "
                         "it the other seeds (loop) or calls (batch) are extrapolated")  # fmt: skip
    ap.add_argument(
        "--market-batch",
        type=int,
        default=0,
        help="most runs per compiled call (0: the batch engine's memory budget)",
    )
    ap.add_argument("--market-reps", type=int, default=3, help="parallel_markets timed calls")
    ap.add_argument("--market-cap", type=int, default=1024,
                    help="skip (JSON line 'skipped') grid points with S x N above this "
                         "(0: none; the default keeps two CPU cores to a few minutes)")  # fmt: skip
    args = ap.parse_args()
    cases = args.cases.split(",")
    if "paper_round" in cases:
        paper_round(args.reps)
    if "seeds_vmap" in cases:
        seeds_vmap(args.seeds, args.mesa_seeds, args.rounds, args.seed_reps)
    if "many_agents" in cases:
        sizes = _ints(args.sizes)
        many_agents(sizes, args.aligns.split(","), args.reps)
    if "naive_mesa" in cases:
        naive_mesa(args.naive_n, args.reps)
    if "anticipating" in cases:
        anticipating(_ints(args.rival_sizes), args.passes, args.reps)
    if "paper_100_seeds" in cases:
        paper_many_seeds(args.paper_seeds, args.paper_rounds)
    if "parallel_markets" in cases:
        parallel_markets(_ints(args.markets), _ints(args.market_sizes), args.market_steps,
                         args.market_rounds, args.market_reps, args.market_budget,
                         args.market_batch, args.market_mechanism, args.market_cap)  # fmt: skip


if __name__ == "__main__":
    main()
