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
  ``align_transformer_pairs``: the same all-pairs call (``align_pairs``, ``backend="auto"``)
      on N small transformers, one line per model (``gpt``: GPTs on modular arithmetic mod
      23; ``vit``: vision transformers, 2x2 patches, class token, on digits) and head mode
      (``heads_mode``: ``grouped``, each head set solved in two levels, whole heads then
      units inside each head; ``flat``, ``spec.unblocked()``, each head set's units one
      ordinary group), against a host loop of ``align(..., backend="scipy")`` (the same
      two-level matching on the host, scipy per (head, head) pair and over heads; timed on
      at most ``--scipy-pairs`` pairs, per pair, its similarity products compiled first).
      ``perms_agree`` is the fraction of those pairs whose perms (every group) are
      identical on both sides, ``non_identity`` the fraction of (pair, group) perms that
      are not the identity. The agents are trained ``--transformer-steps`` Adam steps each
      (lr 0.003, batch 32, the whole training set) from different initialisations, so the
      matching is not trivial (``--transformer-steps 0``: random init).
  ``valuation_transformer``: merged transformers scored per second (all N*(N-1) pairs x
      5 alphas, the scenarios' 0.1..0.9, x 128 validation rows of the buyer's), the full
      try-before-buy of ``value_candidates`` (``align=True``, grouped heads; weight
      matching, merge, validation loss and accuracy at every alpha, best alpha, plus the
      library's gain statistics: the standard errors, one more forward pass of the buyer
      and of each kept merge) in chunks of ``--transformer-val-batch`` buyers, against a
      per-pair jitted function called in a Python loop over the pairs (``align`` of the
      pair, the seller permuted, merge and validation loss and accuracy at every alpha,
      best alpha; per-agent parameters and validation rows sliced outside the timing).
      ``best_alpha_agree`` and ``max_loss_diff`` compare the two sides' best alpha and loss.

The transformer cases use ``--transformer-sizes`` (N, default 6), ``--transformer-models``
(gpt,vit), ``--transformer-heads`` (grouped,flat), ``--transformer-sweeps`` (30, the
scenarios'), ``--transformer-reps`` and ``--transformer-shape`` (key=value overrides of the
bundled scenarios' layers=2,heads=4,d_model=32,d_head=8,d_mlp=64; the line's ``shape``).

``--only align,value,reference,transformer`` runs a subset of the cases (default: all;
``transformer`` is ``transformer_align`` and ``transformer_value``).

Anchors are imported from ``--anchor-dir`` (default ``../shared/bench`` beside the repo);
a missing one prints an ``anchor`` line with an ``error`` and its comparison is skipped.

Defaults finish in a few minutes on 2 CPU cores (N=64 all-pairs alignment, 4032 pairs, is
minutes on a CPU, so the default align sizes are 8,16). On a GPU, e.g.:
``python -m benchmarks.bench_broker --align-sizes 8,16,64 --val-sizes 64,256
--val-aligned-sizes 16,64 --ref-sizes 256,1024``; transformers only, larger:
``--only transformer --transformer-sizes 16,64 --transformer-shape
layers=4,heads=8,d_model=128,d_head=16,d_mlp=512 --scipy-pairs 32``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    ARITHMETIC,
    DEFAULT_ANCHOR_DIR,
    TRANSFORMER_LR,
    emit,
    load_anchor,
    peak_mem_mb,
    timeit,
    transformer_shape,
)
from paramarket_jax.broker import align as align_mod  # align: a local name below too
from paramarket_jax.broker.align import align_pairs
from paramarket_jax.broker.merge import merge
from paramarket_jax.broker.modes import PAPER_ALPHAS
from paramarket_jax.broker.value import (
    all_candidates,
    all_pairs,
    loss_and_accuracy,
    sample_candidates,
    value_candidates,
)
from paramarket_jax.data import load_dataset, partition
from paramarket_jax.models import make_model
from paramarket_jax.population import agent_data, make_trainer

D_IN, HIDDEN, CLASSES, N_ALPHA, N_VAL = 64, 128, 10, 11, 256
BENCH = "broker"
T_ALPHAS, T_VAL = (0.1, 0.3, 0.5, 0.7, 0.9), 128  # the transformer scenarios' alphas, eval_size


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


def value_on(model, pop, data, cands, key, **options):
    """:func:`value_candidates` on a population's own validation rows (``data``)."""
    return value_candidates(model, pop, data.x_val, data.y_val, data.val_idx, cands, key, **options)


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
                return value_on(
                    model, pop, data, cands, key, alphas=alphas, align=mode,
                    max_sweeps=max_sweeps, batch_size=batch, restarts=restarts,
                )  # fmt: skip

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


def transformer_population(kind: str, n: int, steps: int, shape: dict, seed: int = 0):
    """N small transformers (``gpt`` on modular arithmetic mod 23, ``vit`` on digits), each
    trained ``steps`` Adam steps (learning rate 0.003, batch 32: the bundled scenarios')
    on the whole training set from its own initialisation, so the agents differ (and
    their matching is not the identity); each validates on 128 rows of its own.

    Returns:
        (model, params with leading axis N, AgentData).
    """
    k_data, k_split, k_init, k_train = jax.random.split(jax.random.key(seed), 4)
    if kind == "gpt":
        ds = load_dataset("arithmetic", k_data, **ARITHMETIC)
        model = make_model("gpt", ds.x_train.shape[1:], ds.num_classes, vocab=ds.vocab, **shape)
    else:
        ds = load_dataset("digits", k_data)
        model = make_model("vit", ds.x_train.shape[1:], ds.num_classes, patch=2, **shape)
    part = partition("iid", k_split, ds, n, eval_size=T_VAL, eval_mix="global")
    rows = len(ds.y_train)
    data = agent_data(ds, part)._replace(
        train_rows=jnp.arange(rows, dtype=jnp.int32),
        train_start=jnp.zeros(n, jnp.int32),
        train_size=jnp.full(n, rows, jnp.int32),
    )
    trainer = make_trainer(model, "adam", 32)
    pop = trainer.init(k_init, n, TRANSFORMER_LR)
    if steps:
        pop, _ = trainer.train(pop, k_train, data, steps)
    return model, jax.block_until_ready(pop.params), data


def bench_transformer_align(populations, shape, modes, steps, max_sweeps, scipy_pairs, reps):
    key = jax.random.key(1)
    solver = "scipy callback" if jax.default_backend() == "cpu" else "optax"
    for (kind, n), (model, pop, _) in populations.items():
        buyers, sellers = all_pairs(n)
        n_pairs = int(buyers.shape[0])
        k = min(n_pairs, scipy_pairs)
        host = jax.tree.map(np.asarray, pop)
        for mode in modes:
            spec = model.spec if mode == "grouped" else model.spec.unblocked()

            def run(pop, buyers, sellers, spec=spec):
                return align_pairs(spec, pop, buyers, sellers, key, max_sweeps)

            t = timeit(run, pop, buyers, sellers, reps=reps)
            perms = jax.tree.map(np.asarray, run(pop, buyers, sellers))

            def scipy_align(b, s, spec=spec, host=host):
                pair = [jax.tree.map(lambda x, i=i: x[i], host) for i in (b, s)]
                return align_mod.align(spec, *pair, key, max_sweeps=max_sweeps, backend="scipy")

            scipy_align(1, 0)  # compiles the jitted similarity products outside the timing
            start = time.perf_counter()
            host_perms = [
                scipy_align(b, s)
                for b, s in zip(np.asarray(buyers)[:k], np.asarray(sellers)[:k], strict=True)
            ]
            per_pair = (time.perf_counter() - start) / k
            agree = np.mean(
                [
                    all(np.array_equal(np.asarray(h[g]), perms[g][p]) for g in perms)
                    for p, h in enumerate(host_perms)
                ]
            )
            moved = [(v != np.arange(v.shape[1])).any(1).mean() for v in perms.values()]
            emit(
                BENCH,
                "align_transformer_pairs",
                n,
                "pairs_per_s",
                n_pairs / t,
                f"align(backend='scipy') host loop over {k} pairs, per pair",
                1 / per_pair,
                model=kind,
                heads_mode=mode,
                shape=shape,
                pairs=n_pairs,
                train_steps=steps,
                max_sweeps=max_sweeps,
                solver=solver,
                compared=k,
                perms_agree=float(agree),
                non_identity=float(np.mean(moved)),
                seconds=t,
                peak_mem_mb=peak_mem_mb(),
            )


def bench_transformer_value(populations, shape, steps, batch, max_sweeps, reps):
    alphas = jnp.asarray(T_ALPHAS, jnp.float32)
    key = jax.random.key(2)
    for (kind, n), (model, pop, data) in populations.items():
        spec = model.spec
        cands = all_candidates(n)
        n_pairs = int(cands.size)

        def run(pop, cands, model=model, data=data):
            return value_on(
                model, pop, data, cands, key, alphas=alphas, align=True,
                max_sweeps=max_sweeps, batch_size=batch,
            )  # fmt: skip

        t = timeit(run, pop, cands, reps=reps)
        val = run(pop, cands)

        @jax.jit
        def one_pair(buyer, seller, x, y, spec=spec, model=model):
            perms = align_mod.align(spec, buyer, seller, key, max_sweeps=max_sweeps)
            seller = align_mod.aligned(spec, perms, seller)
            before = loss_and_accuracy(model, buyer, x, y)[0]
            losses, accs = jax.vmap(
                lambda a: loss_and_accuracy(model, merge(buyer, seller, a), x, y)
            )(alphas)
            best = jnp.argmin(losses)
            return alphas[best], before, losses[best], accs[best]

        # per agent: its parameters, its validation rows; sliced outside the timing
        agents = [jax.tree.map(lambda v, i=i: v[i], pop) for i in range(n)]
        rows = [(data.x_val[data.val_idx[i]], data.y_val[data.val_idx[i]]) for i in range(n)]
        pairs = list(zip(np.asarray(val.buyer), np.asarray(val.seller), strict=True))

        def loop(agents=agents, rows=rows, pairs=pairs, one_pair=one_pair):
            return [one_pair(agents[b], agents[s], *rows[b]) for b, s in pairs]

        t_loop = timeit(loop, reps=reps)
        out = np.asarray(loop())  # (P, 4): best alpha, loss before, loss after, acc after
        merged = n_pairs * len(T_ALPHAS)
        emit(
            BENCH,
            "valuation_transformer",
            n,
            "merged_models_per_s",
            merged / t,
            "per-pair jitted align + merge + loss, Python loop over pairs",
            merged / t_loop,
            model=kind,
            heads_mode="grouped",
            shape=shape,
            pairs=n_pairs,
            alphas=len(T_ALPHAS),
            val_rows=T_VAL,
            train_steps=steps,
            max_sweeps=max_sweeps,
            batch_size=batch,
            best_alpha_agree=float(np.mean(out[:, 0] == np.asarray(val.best_alpha))),
            max_loss_diff=float(np.abs(out[:, 2] - np.asarray(val.loss_after)).max()),
            seconds=t,
            baseline_seconds=t_loop,
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
        "--transformer-sizes", default="6", help="N for the transformer cases (empty: skip)"
    )
    ap.add_argument(
        "--transformer-models", default="gpt,vit", help="transformer kinds: gpt and/or vit"
    )
    ap.add_argument(
        "--transformer-shape",
        default="",
        help="key=value overrides of layers=2,heads=4,d_model=32,d_head=8,d_mlp=64 "
        "(the bundled scenarios' shape), e.g. d_model=128,d_head=32,d_mlp=256",
    )
    ap.add_argument(
        "--transformer-heads",
        default="grouped,flat",
        help="head modes of align_transformer_pairs: grouped (two-level) and/or flat",
    )
    ap.add_argument(
        "--transformer-steps", type=int, default=200, help="Adam steps per agent (0: random init)"
    )
    ap.add_argument(
        "--transformer-sweeps", type=int, default=30, help="max sweeps (the scenarios' 30)"
    )
    ap.add_argument(
        "--transformer-val-batch",
        type=int,
        default=None,
        help="buyers per chunk of valuation_transformer (0: all at once; default 1 on CPU, "
        "fastest there for these models, 16 on accelerators)",
    )
    ap.add_argument(
        "--transformer-reps", type=int, default=5, help="timed transformer calls after a warm-up"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated: align,value,reference,transformer (transformer_align and "
        "transformer_value separately; default: all)",
    )
    ap.add_argument("--reps", type=int, default=2, help="timed valuation calls after a warm-up")
    ap.add_argument("--align-reps", type=int, default=1, help="timed alignment calls (slow on CPU)")
    ap.add_argument("--anchor-dir", default=str(DEFAULT_ANCHOR_DIR))
    args = ap.parse_args()
    if args.val_batch is None:
        args.val_batch = 2 if jax.devices()[0].platform == "cpu" else 16

    if args.transformer_val_batch is None:
        args.transformer_val_batch = 1 if jax.devices()[0].platform == "cpu" else 16

    sizes = lambda text: [int(s) for s in text.split(",") if s]  # noqa: E731
    anchor_dir = args.anchor_dir
    model = make_model("mlp", (D_IN,), CLASSES, widths=(HIDDEN, HIDDEN))
    only = {c for c in args.only.split(",") if c} or {"align", "value", "reference", "transformer"}
    if "transformer" in only:
        only |= {"transformer_align", "transformer_value"}
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
    kinds = [k for k in args.transformer_models.split(",") if k]
    modes = [m for m in args.transformer_heads.split(",") if m]
    if not set(kinds) <= {"gpt", "vit"} or not set(modes) <= {"grouped", "flat"}:
        raise SystemExit("--transformer-models takes gpt,vit; --transformer-heads grouped,flat")
    shape = transformer_shape(args.transformer_shape)
    steps = args.transformer_steps
    populations = {}  # (kind, N) -> (model, params, data): one trained population per case
    if only & {"transformer_align", "transformer_value"}:
        populations = {
            (kind, n): transformer_population(kind, n, steps, shape)
            for kind in kinds
            for n in sizes(args.transformer_sizes)
        }
    if "transformer_align" in only:
        bench_transformer_align(
            populations,
            shape,
            modes,
            args.transformer_steps,
            args.transformer_sweeps,
            args.scipy_pairs,
            args.transformer_reps,
        )
    if "transformer_value" in only:
        bench_transformer_value(
            populations,
            shape,
            args.transformer_steps,
            args.transformer_val_batch or None,
            args.transformer_sweeps,
            args.transformer_reps,
        )


if __name__ == "__main__":
    main()
