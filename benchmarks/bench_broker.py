"""Broker throughput: all-pairs weight matching and try-before-buy valuation, against baselines.

Prints one JSON object per line (keys: bench, case, n, device, metric, value, baseline,
baseline_value, ratio, peak_mem_mb, plus details; peak_mem_mb is the device's peak so far
in this process where the backend reports it (GPU), else the process's peak resident
memory, both in MiB; rows are written by ``benchmarks.common.emit``). The model is the
reference probes' 64-128-128-10 MLP. Cases:

  ``align_all_pairs``: pairs/s of one jitted, vmapped ``align_pairs`` call over all
      N*(N-1) pairs, until convergence, with the default ``backend="auto"`` (the
      assignment solver chosen per platform: scipy through ``jax.pure_callback`` on CPU,
      optax's Hungarian elsewhere; ``solver`` names it) against a host loop of
      ``align(..., backend="scipy")`` (timed on at most 64 pairs, per pair).
  ``align_all_pairs_<backend>``: the same call with the solver forced (``optax``,
      ``callback``; ``--align-backends``, for N up to ``--align-backends-max-n``), same
      baseline.
  ``align_all_pairs_vs_anchor``: the default call stopped at ``--anchor-sweeps`` against
      ``match_jax`` of ``align_anchor.py`` (fixed sweeps), vmapped over the same pairs.
  ``valuation``: merged models scored per second (11 alphas x 256 validation rows, all
      N*(N-1) pairs, no alignment: the anchor's work) against ``bench_valuation`` of
      ``population_anchor.py`` (N*N pairs) run in this process.
  ``valuation_aligned``: the full try-before-buy (alignment, merge, score), same baseline.
  ``reference_vs_pairwise``: valued pairs/s (after compilation) of ``value_candidates``
      with ``align="reference"`` (every agent aligned once to agent 0, pairs by
      composition: N weight matchings) against ``align="pairwise"`` (N*K weight
      matchings), K random candidates per buyer (``--ref-candidates``), on the paper's MLP
      (32-32-32-16) trained briefly on digits (``--ref-steps`` SGD steps per agent by the
      population trainer, from different initialisations, so the agents differ); ``ratio``
      is the speed-up, ``loss_ratio`` the ratio of the mean (over buyers) best merge
      validation loss, reference / pairwise (above 1: reference alignment merges worse).
      ``--ref-restarts`` sets the weight-matching restarts of both (best objective).

``--only align,value,reference`` runs a subset of the cases (default: all).

Anchors are imported from ``--anchor-dir`` (default ``../shared/bench`` beside the repo);
a missing one prints an ``anchor`` line with an ``error`` and its comparison is skipped.

Defaults finish in a few minutes on 2 CPU cores (N=64 all-pairs alignment, 4032 pairs, is
minutes on a CPU, so the default align sizes are 8,16). On a GPU, e.g.:
``python -m benchmarks.bench_broker --align-sizes 8,16,64 --val-sizes 64,256
--val-aligned-sizes 16,64 --ref-sizes 256,1024``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import DEFAULT_ANCHOR_DIR, emit, load_anchor, peak_mem_mb, timeit
from paramarket_jax.broker import align as align_mod  # align: a local name below too
from paramarket_jax.broker.align import align_pairs
from paramarket_jax.broker.modes import PAPER_ALPHAS
from paramarket_jax.broker.value import (
    all_candidates,
    all_pairs,
    sample_candidates,
    value_candidates,
)
from paramarket_jax.data import load_dataset, partition
from paramarket_jax.models import make_model
from paramarket_jax.population import agent_data, make_trainer

D_IN, HIDDEN, CLASSES, N_ALPHA, N_VAL = 64, 128, 10, 11, 256
BENCH = "broker"


def population(model, n: int, seed: int = 0):
    return jax.jit(jax.vmap(model.init))(jax.random.split(jax.random.key(seed), n))


def bench_align(
    model, sizes, max_sweeps, scipy_pairs, anchor, anchor_sweeps, reps, backends, backends_max_n
):
    spec, key = model.spec, jax.random.key(1)
    solver = "scipy callback" if jax.default_backend() == "cpu" else "optax"
    for n in sizes:
        pop = population(model, n)
        buyers, sellers = all_pairs(n)
        n_pairs = int(buyers.shape[0])

        def run(pop, buyers, sellers, sweeps, backend="auto"):
            return align_pairs(spec, pop, buyers, sellers, key, sweeps, backend=backend)

        t = timeit(run, pop, buyers, sellers, max_sweeps, reps=reps)
        forced = {}
        for backend in backends if n <= backends_max_n else ():
            forced[backend] = timeit(run, pop, buyers, sellers, max_sweeps, backend, reps=reps)
        k = min(n_pairs, scipy_pairs)
        host = jax.tree.map(np.asarray, pop)

        def scipy_align(b, s, host=host):
            pair = [jax.tree.map(lambda x, i=i: x[i], host) for i in (b, s)]
            return align_mod.align(spec, *pair, key, max_sweeps=max_sweeps, backend="scipy")

        scipy_align(1, 0)  # compiles the jitted similarity products outside the timing
        start = time.perf_counter()
        for b, s in zip(np.asarray(buyers)[:k], np.asarray(sellers)[:k], strict=True):
            scipy_align(b, s)
        per_pair = (time.perf_counter() - start) / k
        for case, backend, seconds in [("align_all_pairs", "auto", t)] + [
            (f"align_all_pairs_{b}", b, s) for b, s in forced.items()
        ]:
            emit(
                BENCH,
                case,
                n,
                "pairs_per_s",
                n_pairs / seconds,
                f"align(backend='scipy') host loop over {k} pairs, per pair",
                1 / per_pair,
                pairs=n_pairs,
                max_sweeps=max_sweeps,
                backend=backend,
                solver=solver if backend == "auto" else backend,
                seconds=seconds,
                peak_mem_mb=peak_mem_mb(),
            )
        if anchor is None:
            continue
        t_ours = timeit(run, pop, buyers, sellers, anchor_sweeps, reps=reps)
        apop = jax.vmap(anchor.init)(jax.random.split(jax.random.PRNGKey(3), n))
        ii, jj = np.asarray(buyers), np.asarray(sellers)
        a_b, a_s = (jax.tree.map(lambda x, i=i: x[i], apop) for i in (ii, jj))
        match = jax.jit(jax.vmap(anchor.match_jax, (0, 0, None)), static_argnums=2)
        t_anchor = timeit(match, a_b, a_s, anchor_sweeps, reps=reps)
        emit(
            BENCH,
            "align_all_pairs_vs_anchor",
            n,
            "pairs_per_s",
            n_pairs / t_ours,
            f"align_anchor.match_jax vmapped, {anchor_sweeps} fixed sweeps",
            n_pairs / t_anchor,
            pairs=n_pairs,
            max_sweeps=anchor_sweeps,
            seconds=t_ours,
            peak_mem_mb=peak_mem_mb(),
        )


def bench_value(model, sizes, aligned_sizes, batch, max_sweeps, anchor, reps):
    alphas = jnp.linspace(0.0, 1.0, N_ALPHA)
    key = jax.random.key(2)
    anchor_seconds = {}
    for n, align in [(n, False) for n in sizes] + [(n, True) for n in aligned_sizes]:
        pop = population(model, n)
        x_val = jax.random.normal(jax.random.key(3), (n * N_VAL, D_IN))
        y_val = jax.random.randint(jax.random.key(4), (n * N_VAL,), 0, CLASSES)
        val_idx = jnp.arange(n * N_VAL, dtype=jnp.int32).reshape(n, N_VAL)
        cands = all_candidates(n)

        def run(pop, x_val, y_val, val_idx, cands, align=align):
            return value_candidates(
                model,
                pop,
                x_val,
                y_val,
                val_idx,
                cands,
                key,
                alphas=alphas,
                align=align,
                max_sweeps=max_sweeps,
                batch_size=batch,
            )

        t = timeit(run, pop, x_val, y_val, val_idx, cands, reps=reps)
        merged = n * (n - 1) * N_ALPHA
        base, base_value = "population_anchor.bench_valuation (no alignment)", None
        if anchor is not None:
            if n not in anchor_seconds:
                anchor_seconds[n] = anchor.bench_valuation(n, N_ALPHA, N_VAL)[0]
            base_value = n * n * N_ALPHA / anchor_seconds[n]
        emit(
            BENCH,
            "valuation_aligned" if align else "valuation",
            n,
            "merged_models_per_s",
            merged / t,
            base,
            base_value,
            pairs=n * (n - 1),
            alphas=N_ALPHA,
            val_rows=N_VAL,
            align=align,
            batch_size=batch,
            seconds=t,
            peak_mem_mb=peak_mem_mb(),
        )


def trained_digits_population(n: int, steps: int, seed: int = 0):
    """The paper's MLP, N agents trained ``steps`` SGD steps each on the digits training set.

    Every agent trains on the whole training set (shards of N=256 agents would hold ~5
    rows each: overfit models whose merges are ruled by calibration, not by alignment), so
    agents differ by their initialisation and minibatch draws, Git Re-Basin's setting;
    each validates on 64 rows of its own.
    """
    k_data, k_split, k_init, k_train = jax.random.split(jax.random.key(seed), 4)
    ds = load_dataset("digits", k_data)
    part = partition("iid", k_split, ds, n, eval_size=64, eval_mix="global")
    rows = len(ds.y_train)
    data = agent_data(ds, part)._replace(
        train_rows=jnp.arange(rows, dtype=jnp.int32),
        train_start=jnp.zeros(n, jnp.int32),
        train_size=jnp.full(n, rows, jnp.int32),
    )
    model = make_model("mlp", ds.x_train.shape[1:], ds.num_classes, preset="paper")
    trainer = make_trainer(model, "sgd", 32)
    pop, _ = trainer.train(trainer.init(k_init, n, 0.1), k_train, data, steps)
    return model, jax.block_until_ready(pop.params), data


def bench_reference(sizes, k, steps, batch, max_sweeps, restarts, reps):
    alphas = jnp.asarray(PAPER_ALPHAS, jnp.float32)
    key = jax.random.key(5)
    for n in sizes:
        model, pop, data = trained_digits_population(n, steps)
        cands = sample_candidates(jax.random.key(6), n, min(k, n - 1))
        n_pairs = int(cands.size)
        out = {}
        for mode in ("pairwise", "reference"):

            def run(pop, cands, mode=mode, model=model, data=data):
                return value_candidates(
                    model,
                    pop,
                    data.x_val,
                    data.y_val,
                    data.val_idx,
                    cands,
                    key,
                    alphas=alphas,
                    align=mode,
                    max_sweeps=max_sweeps,
                    batch_size=batch,
                    restarts=restarts,
                )

            seconds = timeit(run, pop, cands, reps=reps)
            best = np.asarray(run(pop, cands).loss_after).reshape(n, -1).min(axis=1)
            out[mode] = seconds, float(best.mean())
        (t_pair, loss_pair), (t_ref, loss_ref) = out["pairwise"], out["reference"]
        emit(
            BENCH,
            "reference_vs_pairwise",
            n,
            "pairs_per_s",
            n_pairs / t_ref,
            "value_candidates(align='pairwise'), same candidates",
            n_pairs / t_pair,
            pairs=n_pairs,
            k=int(cands.shape[1]),
            train_steps=steps,
            max_sweeps=max_sweeps,
            restarts=restarts,
            batch_size=batch,
            alphas=len(PAPER_ALPHAS),
            seconds=t_ref,
            baseline_seconds=t_pair,
            mean_best_loss=loss_ref,
            baseline_mean_best_loss=loss_pair,
            loss_ratio=loss_ref / loss_pair,
            peak_mem_mb=peak_mem_mb(),
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--align-sizes", default="8,16", help="N for all-pairs alignment")
    ap.add_argument("--max-sweeps", type=int, default=100)
    ap.add_argument("--scipy-pairs", type=int, default=64, help="pairs timed on the host loop")
    ap.add_argument("--anchor-sweeps", type=int, default=4, help="align_anchor's fixed sweeps")
    ap.add_argument(
        "--align-backends",
        default="optax,callback",
        help="jitted backends also timed with the solver forced (empty: none)",
    )
    ap.add_argument(
        "--align-backends-max-n",
        type=int,
        default=16,
        help="largest N timed with forced backends (optax on CPU: minutes at N=64)",
    )
    ap.add_argument("--val-sizes", default="16,64", help="N for valuation without alignment")
    ap.add_argument("--val-aligned-sizes", default="8", help="N for valuation with alignment")
    ap.add_argument(
        "--val-batch",
        type=int,
        default=None,
        help="buyers per valuation chunk (default: 2 on CPU, where small chunks "
        "stay in cache, 16 on accelerators)",
    )
    ap.add_argument(
        "--ref-sizes", default="64,256", help="N for reference_vs_pairwise (empty: skip)"
    )
    ap.add_argument("--ref-candidates", type=int, default=8, help="K candidates per buyer")
    ap.add_argument("--ref-steps", type=int, default=300, help="SGD steps per agent")
    ap.add_argument("--ref-restarts", type=int, default=1, help="alignment restarts")
    ap.add_argument(
        "--only", default="", help="comma-separated: align,value,reference (default: all)"
    )
    ap.add_argument("--reps", type=int, default=2, help="timed valuation calls after a warm-up")
    ap.add_argument("--align-reps", type=int, default=1, help="timed alignment calls (slow on CPU)")
    ap.add_argument("--anchor-dir", default=str(DEFAULT_ANCHOR_DIR))
    args = ap.parse_args()
    if args.val_batch is None:
        args.val_batch = 2 if jax.devices()[0].platform == "cpu" else 16

    sizes = lambda text: [int(s) for s in text.split(",") if s]  # noqa: E731
    anchor_dir = args.anchor_dir
    model = make_model("mlp", (D_IN,), CLASSES, widths=(HIDDEN, HIDDEN))
    only = {c for c in args.only.split(",") if c} or {"align", "value", "reference"}
    if "align" in only:
        bench_align(
            model,
            sizes(args.align_sizes),
            args.max_sweeps,
            args.scipy_pairs,
            load_anchor(anchor_dir, "align_anchor"),
            args.anchor_sweeps,
            args.align_reps,
            [b for b in args.align_backends.split(",") if b],
            args.align_backends_max_n,
        )
    if "value" in only:
        bench_value(
            model,
            sizes(args.val_sizes),
            sizes(args.val_aligned_sizes),
            args.val_batch,
            args.max_sweeps,
            load_anchor(anchor_dir, "population_anchor"),
            args.reps,
        )
    if "reference" in only:
        bench_reference(
            sizes(args.ref_sizes),
            args.ref_candidates,
            args.ref_steps,
            args.val_batch,
            args.max_sweeps,
            args.ref_restarts,
            args.reps,
        )


if __name__ == "__main__":
    main()
