"""Try before buy: score aligned merges on the buyer's validation split (Git Re-Basin, ICLR 2023).

The broker alone sees both models: valuation returns scores only, and :func:`merge_trades`
hands merged parameters to buyers whose trades settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paramarket_jax.broker.align import (
    _align_restarts,
    _reference_perms,
    check_restarts,
    compose,
    freeze,
    map_chunks,
    take,
    thaw,
)
from paramarket_jax.broker.merge import merge, select_layers
from paramarket_jax.broker.methods import get_method, layer_names, merge_with
from paramarket_jax.broker.modes import CHOICES, PAPER_ALPHAS, align_mode
from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.base import Model
from paramarket_jax.models.spec import PermutationSpec, apply_permutation, flatten, unflatten


def _options(align, restarts, choose) -> tuple[str, int, str]:
    """Checked static options of a valuation: (mode, restarts, choose)."""
    if choose not in CHOICES:
        raise unknown("restart choice", str(choose), CHOICES)
    return align_mode(align), check_restarts(restarts), choose


class Valuation(NamedTuple):
    """Scores of candidate trades, one entry per (buyer, seller) pair, all shaped (P,).

    Attributes:
        buyer: int32 buyer index.
        seller: int32 seller index.
        best_alpha: float32 seller weight of the merge with the lowest validation loss.
        loss_before: float32 buyer's validation loss before the trade.
        loss_after: float32 validation loss of the best merge.
        gain: float32 relative gain ``(loss_before - loss_after) / loss_before``.
        acc_after: float32 validation accuracy of the best merge.
        gain_se: float32 standard error of ``gain`` over the buyer's validation rows
            (:func:`gain_se`): per-row loss differences of the best merge, rows that
            repeat counted as one cluster.
        acc_gain: float32 relative validation-accuracy gain of the best merge,
            ``(acc_after - acc_before) / acc_before``.
        acc_gain_se: float32 its standard error, from per-row correctness differences.
        second: float32 the kept second knob (TIES' density, DARE's drop rate), or None.
        weights: (P, L) float32 the layer-wise fit's weights (``best_alpha`` is their
            mean), or None without the fit.
    """

    buyer: jax.Array
    seller: jax.Array
    best_alpha: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    gain: jax.Array
    acc_after: jax.Array
    gain_se: jax.Array | None = None
    acc_gain: jax.Array | None = None
    acc_gain_se: jax.Array | None = None
    second: jax.Array | None = None
    weights: jax.Array | None = None


def all_pairs(n: int) -> tuple[jax.Array, jax.Array]:
    """Every ordered (buyer, seller) pair with buyer != seller, buyer-major.

    Returns:
        buyers (n*(n-1),) int32 and sellers (n*(n-1),) int32.
    """
    b, s = np.nonzero(~np.eye(n, dtype=bool))
    return jnp.asarray(b, jnp.int32), jnp.asarray(s, jnp.int32)


def all_candidates(n: int) -> jax.Array:
    """(n, n-1) int32: row i lists every seller j != i in increasing order."""
    return all_pairs(n)[1].reshape(n, n - 1)


def sample_candidates(key: jax.Array, n: int, k: int) -> jax.Array:
    """K distinct sellers, none the buyer itself, drawn uniformly for every buyer.

    Floyd's sampling (k draws per buyer, no (n, n) intermediate) then a shuffle; buyer i
    uses ``fold_in(key, i)``.

    Args:
        key: random key.
        n: number of agents (static).
        k: candidates per buyer, 1 <= k <= n - 1 (static).

    Returns:
        (n, k) int32; row i holds distinct sellers != i in random order.
    """
    if not 1 <= k <= n - 1:
        raise ParamarketError(f"candidates per buyer must be in [1, {n - 1}] for n={n}, got {k}")
    return _sample_candidates(key, n, k)


def _floyd(key, universe: int, k: int):
    def body(t, chosen):
        j = universe - k + t
        r = jax.random.randint(jax.random.fold_in(key, t), (), 0, j + 1, jnp.int32)
        return chosen.at[t].set(jnp.where((chosen == r).any(), j, r))

    chosen = jax.lax.fori_loop(0, k, body, jnp.full(k, -1, jnp.int32))
    return jax.random.permutation(jax.random.fold_in(key, k), chosen)


def _sample_candidates_impl(key, n, k):
    def one(i):
        others = _floyd(jax.random.fold_in(key, i), n - 1, k)
        return others + (others >= i)

    return jax.vmap(one)(jnp.arange(n, dtype=jnp.int32))


_sample_candidates = jax.jit(_sample_candidates_impl, static_argnums=(1, 2))


def loss_and_accuracy(model: Model, params, x: jax.Array, y: jax.Array):
    """Mean softmax cross-entropy and accuracy of one model.

    Args:
        model: the model.
        params: its parameter pytree.
        x: (m, *input_shape) inputs.
        y: (m,) int labels.

    Returns:
        (loss, accuracy), float32 scalars.
    """
    loss, correct = model.losses(params, x, y)
    return loss.mean(), correct.mean()


def row_counts(rows: jax.Array) -> jax.Array:
    """(m,) float32: how often each entry of ``rows`` (m,) occurs in ``rows`` (a
    validation set draws rows again when a class has too few; O(m log m))."""
    ordered = jnp.sort(rows)
    hi = jnp.searchsorted(ordered, rows, side="right")
    lo = jnp.searchsorted(ordered, rows, side="left")
    return (hi - lo).astype(jnp.float32)


def gain_se(diffs: jax.Array, counts: jax.Array, before: jax.Array) -> jax.Array:
    """Standard error of a relative validation gain from per-row differences.

    The gain is ``mean(diffs) / before``, e.g. with ``diffs = loss_before - loss_after`` per
    validation row (or the change in correctness, for an accuracy gain). Rows drawn more
    than once (a short class) are one observation, not several: the variance of the mean
    is the cluster-robust ``sum_u (sum_{r in u} e_r)^2 / m^2 * U / (U - 1)`` over the U
    distinct rows u (residuals ``e = diffs - mean``), which is ``sum_r c_r e_r^2 / m^2 *
    U / (U - 1)`` with ``c_r`` the count of row r's copies. With every row distinct it is
    the usual ``std(ddof=1) / sqrt(m)``.

    Args:
        diffs: (..., m) per-row differences.
        counts: (m,) copies of each row (:func:`row_counts`).
        before: (...) the mean before (the gain's denominator).

    Returns:
        (...) float32, 0 where ``before`` is not positive.
    """
    m = diffs.shape[-1]
    e = diffs - diffs.mean(-1, keepdims=True)
    distinct = (1.0 / counts).sum()
    var = (counts * e**2).sum(-1) / m**2 * distinct / jnp.maximum(distinct - 1.0, 1.0)
    return jnp.where(before > 0, jnp.sqrt(var) / jnp.where(before > 0, before, 1.0), 0.0)


def _rows(model, params, x, y):
    """Per-row loss and correctness (m,) of one model."""
    return model.losses(params, x, y)


class Mix(NamedTuple):
    """How the broker merges a buyer with a seller (static: decides the compilation).

    Attributes:
        method: a merge method of :data:`~paramarket_jax.broker.methods.METHODS`.
        layers: prefix or glob patterns of the traded layers (None: the whole model).
        fit: ``none`` (the grid's best knob) or ``layerwise`` (one weight per layer fitted
            on the buyer's validation rows from the grid's best, AdaMerging-style).
        fit_steps: gradient steps of the layer-wise fit.
        second: the grid of the method's second knob has entries (TIES' density, DARE's
            drop rate); 0: the method has none.
    """

    method: str = "linear"
    layers: tuple[str, ...] | None = None
    fit: str = "none"
    fit_steps: int = 10
    second: int = 0


class MixInputs(NamedTuple):
    """The traced inputs of a merge beyond the two models (None where not needed).

    Attributes:
        base: the shared base (one model's parameters): task vectors are taken from it.
        second: (D,) the second knob's grid.
        fisher: each agent's diagonal Fisher, flat leaves (N, ...), computed on its own
            training rows (:func:`~paramarket_jax.broker.methods.diagonal_fisher`).
        key: the round's key: DARE's drops of pair (b, s) use ``fold_in(fold_in(key, b), s)``,
            so the settled merge drops exactly what was scored.
        fit_lr: () the layer-wise fit's learning rate (Adam).
    """

    base: Any = None
    second: jax.Array | None = None
    fisher: Any = None
    key: jax.Array | None = None
    fit_lr: jax.Array | None = None


class Side(NamedTuple):
    """One party of a merge: its parameters, its Fisher (or None) and its agent index."""

    params: Any
    fisher: Any
    id: jax.Array


LINEAR = Mix()


def combiner(mix: Mix, inputs: MixInputs | None):
    """``combine(buyer: Side, seller: Side, knob) -> params``: the merge ``mix`` names.

    ``knob`` is (weight, second): the weight a scalar or (under the layer-wise fit) one per
    layer (:func:`~paramarket_jax.broker.methods.layer_names`); second None when the method
    has no second knob. A linear merge without a fit is :func:`merge` itself (bit for bit
    today's valuation).
    """
    if mix.method == "linear" and mix.fit == "none":
        return lambda b, s, knob: merge(b.params, s.params, knob[0], mix.layers)
    method = get_method(mix.method)
    inputs = inputs or MixInputs()

    def combine(b, s, knob):
        weight, second = knob
        key = None
        if method.needs_key:
            key = jax.random.fold_in(jax.random.fold_in(inputs.key, b.id), s.id)
        fisher = (b.fisher, s.fisher) if method.needs_fisher else None
        return merge_with(
            method, b.params, s.params, weight, base=inputs.base,
            second=0.0 if second is None else second, key=key, fisher=fisher,
            layers=mix.layers,
        )  # fmt: skip

    return combine


def knob_grid(alphas, mix: Mix, inputs: MixInputs | None):
    """Every (weight, second) try-before-buy tries: (A * D,) each, weight-major; second None
    for a method without a second knob (then the grid is ``alphas`` itself)."""
    if not mix.second:
        return alphas, None
    d, a = inputs.second.shape[0], alphas.shape[0]
    return jnp.repeat(alphas, d), jnp.tile(inputs.second, a)


def _at(knobs, idx):
    w, second = knobs
    return w[idx], None if second is None else second[idx]


def _kept_stats(model, combine, buyer, kept, knob, x, y, counts, before):
    """Per-row statistics of each kept merge: ``kept`` sellers (K, ...) at ``knob`` (K,).

    Returns (K,) each: the :func:`gain_se` of the relative loss gain; the relative accuracy
    gain ``(acc_after - acc_before) / acc_before`` (0 where the buyer's accuracy is 0); and
    its standard error, from the per-row correctness differences.

    The buyer's rows are computed behind an optimization barrier, so XLA does not share
    them with the mean loss ``before``: the scores stay bit for bit what they were before
    these statistics existed (fused together, the mean's rounding changed).
    """
    buyer, x = jax.lax.optimization_barrier((buyer, x))
    loss0, right0 = _rows(model, buyer.params, x, y)
    loss1, right1 = jax.vmap(lambda s, k: _rows(model, combine(buyer, s, k), x, y))(kept, knob)
    acc0 = right0.mean()
    diffs = right1 - right0[None]
    acc_gain = jnp.where(acc0 > 0, diffs.mean(-1) / jnp.where(acc0 > 0, acc0, 1.0), 0.0)
    return (
        gain_se(loss0[None] - loss1, counts, before),
        acc_gain,
        gain_se(diffs, counts, acc0),
    )


def _best_finite(losses: jax.Array) -> jax.Array:
    """(K,) column of each row's lowest finite loss (argmin would pick a NaN). A row with
    no finite loss keeps a non-finite one, and such a candidate is never offered."""
    return jnp.where(jnp.isfinite(losses), losses, jnp.inf).argmin(axis=1)


def fit_layerwise(model, combine, layers, buyer, seller, knob, loss0, acc0, x, y, steps, lr,
                  top):  # fmt: skip
    """One weight per layer, fitted by ``steps`` Adam steps on the buyer's validation loss
    from the grid's best ``knob`` (AdaMerging on try-before-buy's rows), weights kept in
    [0, ``top``]. The fit is kept only where it lowers the loss below the grid's ``loss0``
    (whose accuracy is ``acc0``), so it never raises the buyer's validation loss over its
    starting weight.

    Returns:
        (weights (L,), their validation loss and accuracy).
    """
    w0, second = knob
    n_layers = len(layer_names(buyer.params, layers))
    start = jnp.full((n_layers,), w0, jnp.float32)
    opt = optax.adam(lr)

    def loss(w):
        return loss_and_accuracy(model, combine(buyer, seller, (w, second)), x, y)[0]

    def step(carry, _):
        w, state = carry
        g = jax.grad(loss)(w)
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        upd, state = opt.update(g, state, w)
        return (jnp.clip(optax.apply_updates(w, upd), 0.0, top), state), None

    (w, _), _ = jax.lax.scan(step, (start, opt.init(start)), None, length=steps)
    fitted, acc_fit = loss_and_accuracy(model, combine(buyer, seller, (w, second)), x, y)
    better = jnp.isfinite(fitted) & (fitted < loss0)
    return (
        jnp.where(better, w, start),
        jnp.where(better, fitted, loss0),
        jnp.where(better, acc_fit, acc0),
    )


def _score(model, mix, combine, alphas, inputs, buyer, sellers, x, y, counts):
    """One buyer against K aligned sellers at every knob of the grid -> per-seller scores
    (K,), the last the gain's standard error (``counts``: copies of each validation row).
    Under the layer-wise fit the grid's best is refined per layer and the (K, L) weights
    come last."""
    before, _ = loss_and_accuracy(model, buyer.params, x, y)
    knobs = knob_grid(alphas, mix, inputs)

    def one(seller, knob):
        return loss_and_accuracy(model, combine(buyer, seller, knob), x, y)

    losses, accs = jax.vmap(jax.vmap(one, (None, 0)), (0, None))(sellers, knobs)  # (K, A)
    best = _best_finite(losses)
    after = jnp.take_along_axis(losses, best[:, None], 1)[:, 0]
    acc = jnp.take_along_axis(accs, best[:, None], 1)[:, 0]
    kept = _at(knobs, best)
    return _finish(model, mix, combine, inputs, buyer, sellers, kept, after, acc, before, alphas,
                   x, y, counts)  # fmt: skip


def _finish(model, mix, combine, inputs, buyer, sellers, kept, after, acc, before, alphas, x, y,
            counts):  # fmt: skip
    """The scores of the kept knobs (and the layer-wise fit from them, if on)."""
    k = after.shape[0]
    weights = None
    if mix.fit == "layerwise":
        top = jnp.maximum(alphas.max(), 1.0)
        weights, after, acc = jax.vmap(
            lambda s, w, sec, l0, a0: fit_layerwise(
                model,
                combine,
                mix.layers,
                buyer,
                s,
                (w, sec),
                l0,
                a0,
                x,
                y,
                mix.fit_steps,
                inputs.fit_lr,
                top,
            )  # fmt: skip
        )(sellers, *kept, after, acc)
        kept = (weights, kept[1])
    gain = jnp.where(before > 0, (before - after) / before, 0.0)
    stats = _kept_stats(model, combine, buyer, sellers, kept, x, y, counts, before)
    scores = (
        kept[0] if weights is None else kept[0].mean(-1),
        jnp.broadcast_to(before, (k,)), after, gain, acc, *stats,
    )  # fmt: skip
    extra = {}
    if mix.second:
        extra["second"] = kept[1]
    if weights is not None:
        extra["weights"] = weights
    return scores, extra


def _score_restarts(model, mix, combine, alphas, inputs, buyer, sellers, x, y, counts):
    """:func:`_score` over R alignments of each seller (leaves (K, R, ...)): the best
    (restart, knob) of each seller, by validation loss (the first on ties, restart-major).

    Returns:
        :func:`_score`'s (K,) scores and the (K,) int32 restart kept for each seller.
    """
    before, _ = loss_and_accuracy(model, buyer.params, x, y)
    knobs = knob_grid(alphas, mix, inputs)

    def one(seller, knob):
        return loss_and_accuracy(model, combine(buyer, seller, knob), x, y)

    over_knobs = jax.vmap(one, (None, 0))
    losses, accs = jax.vmap(jax.vmap(over_knobs, (0, None)), (0, None))(sellers, knobs)
    k, r, a = losses.shape  # (K, R, A)
    losses, accs = losses.reshape(k, r * a), accs.reshape(k, r * a)
    best = _best_finite(losses)
    after = jnp.take_along_axis(losses, best[:, None], 1)[:, 0]
    acc = jnp.take_along_axis(accs, best[:, None], 1)[:, 0]
    restart = (best // a).astype(jnp.int32)
    kept = jax.tree.map(lambda v: jnp.take_along_axis(
        v, restart.reshape(-1, *(1,) * (v.ndim - 1)), 1)[:, 0], sellers)  # fmt: skip
    scores, extra = _finish(model, mix, combine, inputs, buyer, kept, _at(knobs, best % a),
                            after, acc, before, alphas, x, y, counts)  # fmt: skip
    return scores, extra, restart


def _permute(spec, perms, sellers_flat):
    """Apply per-pair perms (name -> (P, size)) to flat (P, ...) sellers."""
    if not perms:
        return sellers_flat
    permute = jax.vmap(lambda p, s: flatten(apply_permutation(spec, p, unflatten(s))))
    return permute(perms, sellers_flat)


def _value(
    model,
    mode,
    restarts,
    choose,
    layers,
    batch_size,
    pop,
    x_val,
    y_val,
    val_idx,
    ids,
    cands,
    key,
    alphas,
    max_sweeps,
    reference,
    offers=None,
    solver="auto",
    mix=None,
    inputs=None,
):
    """Scores of buyer ids[b] against sellers cands[b, :]; chunks of ``batch_size`` buyers.

    ``offers`` (a population like ``pop``, or None: ``pop`` itself) is what each agent
    offers as a seller; buyers are always ``pop``. ``solver``: the assignment solver of
    the weight matching (:func:`~paramarket_jax.broker.align.hungarian`). ``mix`` (static,
    :class:`Mix`; None: a linear merge of ``layers``) and ``inputs`` (traced,
    :class:`MixInputs`) say how pairs are merged.

    ``mode`` is one of :data:`~paramarket_jax.broker.modes.ALIGN_MODES`; with
    ``choose="validation"`` and R > 1 restarts every restart's merges are scored and the
    (restart, knob) with the lowest validation loss is kept (perms of the kept restart).
    Under ``reference`` those R candidates are the compositions of the buyer's and the
    seller's reference alignments of equal objective rank (candidate 0 is the objective's
    choice).
    """
    spec = model.spec
    mix = mix or Mix(layers=layers)
    combine = combiner(mix, inputs)
    fisher = None if inputs is None else inputs.fisher
    frozen = freeze(spec)
    flat = flatten(pop)
    offered = flat if offers is None else flatten(offers)
    x_val, y_val = jnp.asarray(x_val), jnp.asarray(y_val)
    keep_all = mode != "none" and choose == "validation" and restarts > 1
    if mode == "reference":
        k = cands.shape[1]
        n = jax.tree.leaves(flat)[0].shape[0]
        both = flat if offers is None else jax.tree.map(
            lambda u, v: jnp.concatenate([u, v]), flat, offered)  # fmt: skip
        to_ref = _reference_perms(
            frozen, both, reference, key, max_sweeps, solver, restarts,
            None if batch_size is None else batch_size * k, keep_all,
        )  # fmt: skip
        # sellers' offers matched to the (honest) reference, buyers as they are
        to_ref_offered = to_ref if offers is None else jax.tree.map(lambda p: p[n:], to_ref)
        to_ref = to_ref if offers is None else jax.tree.map(lambda p: p[:n], to_ref)

    def chunk(idx):
        b_ids, c_ids = idx  # (B,), (B, K)
        n_b, k = c_ids.shape
        s_ids = c_ids.reshape(-1)
        buyers = take(flat, b_ids)
        sellers = take(offered, s_ids)
        if mode == "none":
            perms = {}
        elif mode == "reference":
            perms = compose(take(to_ref, jnp.repeat(b_ids, k)), take(to_ref_offered, s_ids))
        else:
            repeated = jax.tree.map(lambda v: jnp.repeat(v, k, axis=0), buyers)
            perms = _align_restarts(
                frozen, repeated, sellers, key, max_sweeps, solver, restarts, keep_all
            )
            perms = perms[0] if keep_all else perms
        rows = val_idx[b_ids]  # (B, m)
        x, y = x_val[rows], y_val[rows]
        counts = jax.vmap(row_counts)(rows)  # (B, m)
        f_buyers = None if fisher is None else take(fisher, b_ids)
        f_sellers = None if fisher is None else take(fisher, s_ids)

        def split(v):
            return v.reshape(n_b, k, *v.shape[1:])

        def side(p, f, i):
            return Side(unflatten(p), None if f is None else unflatten(f), i)

        if keep_all:  # perms (B * K, R, size): every restart's seller, then the best
            permute_r = jax.vmap(lambda p, v: _permute(spec, p, v), (0, None), 1)
            swapped = jax.tree.map(lambda p: p.swapaxes(0, 1), perms)
            every = jax.tree.map(split, permute_r(swapped, sellers))
            f_every = None
            if f_sellers is not None:
                f_every = jax.tree.map(split, permute_r(swapped, f_sellers))
            # every restart of a seller is the same seller: its id repeats on the R axis
            r_ids = jnp.broadcast_to(split(s_ids)[..., None], (n_b, k, restarts))
            score = jax.vmap(
                lambda b, fb, bi, s, fs, si, x, y, c: _score_restarts(
                    model,
                    mix,
                    combine,
                    alphas,
                    inputs,
                    side(b, fb, bi),
                    side(s, fs, si),
                    x,
                    y,
                    c,
                )  # fmt: skip
            )
            scores, extra, kept = score(
                buyers, f_buyers, b_ids, every, f_every, r_ids, x, y, counts
            )  # kept: (B, K)
            at = kept.reshape(-1)[:, None, None]
            perms = jax.tree.map(lambda p: jnp.take_along_axis(p, at, 1)[:, 0], perms)
            return scores, extra, jax.tree.map(split, perms)
        sellers = jax.tree.map(split, _permute(spec, perms, sellers))
        if f_sellers is not None:
            f_sellers = jax.tree.map(split, _permute(spec, perms, f_sellers))
        score = jax.vmap(
            lambda b, fb, bi, s, fs, si, x, y, c: _score(
                model, mix, combine, alphas, inputs, side(b, fb, bi), side(s, fs, si), x, y, c
            )
        )
        scores, extra = score(buyers, f_buyers, b_ids, sellers, f_sellers, split(s_ids), x, y,
                              counts)  # fmt: skip
        return scores, extra, jax.tree.map(split, perms)

    scores, extra, perms = map_chunks(chunk, (ids, cands), batch_size)
    buyer = jnp.repeat(ids, cands.shape[1])
    flat_extra = {k: v.reshape(-1, *v.shape[2:]) for k, v in extra.items()}
    val = Valuation(buyer, cands.reshape(-1), *(v.reshape(-1) for v in scores), **flat_extra)
    return val, perms


def value_with_perms(
    model: Model,
    pop_params,
    x_val,
    y_val,
    val_idx,
    candidates,
    key,
    alphas,
    *,
    align: bool | str,
    layers: tuple[str, ...] | None,
    max_sweeps,
    batch_size: int | None,
    restarts: int = 1,
    choose: str = "objective",
    reference=0,
    offers=None,
    solver: str = "auto",
    mix: Mix | None = None,
    inputs: MixInputs | None = None,
):
    """:func:`value_candidates` for callers already inside a trace (the market round).

    ``offers``: what each agent offers as a seller (a population like ``pop_params``), when
    it is not its own model (hostile sellers); None: every seller offers its model.
    ``mix`` and ``inputs``: the merge method (:class:`Mix`, static; None: linear) and its
    traced inputs (:class:`MixInputs`). ``solver``: the weight matching's assignment
    solver (``auto``: scipy through a host callback on CPU, optax's Hungarian elsewhere;
    a market split over several devices uses ``optax``, which stays inside the
    partitioned computation).

    Besides the scores it returns the permutations found for every pair (small int arrays,
    not weights), so the trades that settle merge exactly what was scored without aligning
    again (:func:`merge_settled`). Traceable under jit and under a vmap over seeds (keys,
    and ``reference``, batched); see :func:`value_candidates` for the arguments.

    Returns:
        (Valuation with P = N * K entries, perms: name -> (N, K, size) int32, empty without
        alignment).
    """
    mode, restarts, choose = _options(align, restarts, choose)
    ids = jnp.arange(candidates.shape[0], dtype=jnp.int32)
    return _value(
        model, mode, restarts, choose, layers, batch_size, pop_params, x_val, y_val, val_idx,
        ids, candidates, key, alphas, max_sweeps, jnp.asarray(reference, jnp.int32), offers,
        solver, mix, inputs,
    )  # fmt: skip


def merge_settled(
    spec: PermutationSpec,
    pop_params,
    sellers,
    alphas,
    mask,
    perms,
    *,
    layers: tuple[str, ...] | None = None,
    batch_size: int | None = None,
    offers=None,
    mix: Mix | None = None,
    inputs: MixInputs | None = None,
    second=None,
    weights=None,
):
    """Settled trades merged with the permutations found during valuation.

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, leading axis N (the pre-trade population:
            settlement is simultaneous).
        sellers: (N,) int seller of buyer i (ignored where ``mask`` is False).
        alphas: (N,) float seller weight of each trade.
        mask: (N,) bool, True where buyer i's trade settled.
        perms: name -> (N, size) int32 perms of seller i's units into buyer i's basis (empty:
            merge raw weights).
        layers: prefix or glob patterns of the traded layers; None trades the whole model.
        batch_size: buyers per chunk; None does all in one vmap.
        offers: what each seller offered (as valued), leaves (N, ...); None: its model.
        mix, inputs: the merge method and its traced inputs, as valued (None: linear).
        second: (N,) each trade's second knob (the method has one); weights: (N, L) each
            trade's layer-wise weights (the fit is on; then ``alphas`` is unused).

    Returns:
        New population params; buyers without a trade keep theirs exactly.
    """
    mix = mix or Mix(layers=layers)
    combine = combiner(mix, inputs)
    fisher = None if inputs is None else inputs.fisher
    flat = flatten(pop_params)
    offered = flat if offers is None else flatten(offers)
    n = sellers.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    sellers = jnp.where(mask, jnp.clip(sellers, 0, n - 1), ids)
    knob = (alphas if weights is None else weights, second)

    def chunk(idx):
        b_ids, s_ids, k, m, p = idx
        buyers = take(flat, b_ids)
        aligned = _permute(spec, p, take(offered, s_ids))
        fb = fs = None
        if fisher is not None:
            fb, fs = take(fisher, b_ids), _permute(spec, p, take(fisher, s_ids))

        def one(b, fb, bi, s, fs, si, knob, keep):
            buyer = Side(unflatten(b), None if fb is None else unflatten(fb), bi)
            seller = Side(unflatten(s), None if fs is None else unflatten(fs), si)
            merged = flatten(combine(buyer, seller, knob))
            return jax.tree.map(lambda u, v: jnp.where(keep, u, v), merged, b)

        return jax.vmap(one)(buyers, fb, b_ids, aligned, fs, s_ids, k, m)

    return unflatten(map_chunks(chunk, (ids, sellers, knob, mask, perms), batch_size))


_value_jit = jax.jit(_value, static_argnums=(0, 1, 2, 3, 4, 5))


def _check_rows(pop_params, val_idx, rows, what: str) -> None:
    """Raise ParamarketError unless ``rows`` and ``val_idx`` have one row per agent."""
    n = jax.tree.leaves(pop_params)[0].shape[0]
    if val_idx.ndim != 2 or val_idx.shape[0] != n:
        raise ParamarketError(f"val_idx must be (N={n}, m), got shape {tuple(val_idx.shape)}")
    if rows is not None and rows != n:
        raise ParamarketError(f"{what} must have N={n} rows, got {rows}")


def _layers_key(params, layers):
    if layers is None:
        return None
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    select_layers(params, layers)  # fail early, by name, on a pattern that names nothing
    return layers


def _call_value(
    model, pop_params, x_val, y_val, val_idx, ids, cands, key, alphas, align, layers,
    max_sweeps, batch_size, restarts, choose, reference,
) -> Valuation:  # fmt: skip
    """The shared jitted call behind :func:`value_candidates` and :func:`value_pairs`."""
    mode, restarts, choose = _options(align, restarts, choose)
    val, _ = _value_jit(
        model,
        mode,
        restarts,
        choose,
        _layers_key(pop_params, layers),
        batch_size,
        pop_params,
        x_val,
        y_val,
        val_idx,
        ids,
        cands,
        key,
        jnp.asarray(alphas, jnp.float32),
        jnp.asarray(max_sweeps, jnp.int32),
        jnp.asarray(reference, jnp.int32),
    )
    return val


def value_candidates(
    model: Model,
    pop_params,
    x_val,
    y_val,
    val_idx,
    candidates,
    key: jax.Array,
    *,
    alphas=PAPER_ALPHAS,
    align: bool | str = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
    restarts: int = 1,
    choose: str = "objective",
    reference: int | jax.Array = 0,
) -> Valuation:
    """Try-before-buy scores of every buyer against its candidate sellers.

    For each buyer i and candidate j = ``candidates[i, k]``, the broker aligns j to i
    (unless ``align=False``), merges at every alpha and scores each merge on i's validation
    rows ``x_val[val_idx[i]]``; a chunk of ``batch_size`` buyers at a time (``lax.map``)
    keeps memory bounded, each chunk vmapped over its buyers, their sellers and the alphas.
    Only scores come back, never the sellers' weights. Jit-compiled once per model,
    ``align``, ``layers``, ``batch_size`` and array shapes; traceable inside a caller's jit.

    Args:
        model: the population's model.
        pop_params: population parameter pytree, every leaf with a leading axis N.
        x_val: (n_val, *input_shape) shared validation inputs.
        y_val: (n_val,) int labels.
        val_idx: (N, m) int32; agent i's validation rows are ``x_val[val_idx[i]]``.
        candidates: (N, K) int sellers per buyer (:func:`sample_candidates`,
            :func:`all_candidates`).
        key: drives the alignment's group order (shared by all pairs; restart r > 0 uses
            ``fold_in(key, r)``).
        alphas: (A,) seller weights to try; the paper's 0.05, ..., 0.95 by default.
        align: how sellers are aligned to buyers before merging
            (:data:`~paramarket_jax.broker.modes.ALIGN_MODES`): ``pairwise`` (or True)
            matches every (buyer, candidate) pair, N * K weight matchings; ``reference``
            aligns every agent once to agent ``reference`` and composes (N weight
            matchings, :func:`~paramarket_jax.broker.align.compose`); ``none`` (or False)
            merges raw seller weights.
        layers: prefix or glob patterns of the traded layers; None trades the whole model.
        max_sweeps: most alignment sweeps.
        batch_size: buyers per chunk; None scores all buyers in one vmap.
        restarts: R >= 1 weight matchings per alignment with different group orders, all
            vmapped (static). R = 1 is plain weight matching.
        choose: which restart each pair keeps (static): ``objective``, the best matching
            objective (under ``reference``: per agent, before composing); ``validation``,
            the (restart, alpha) whose merge has the lowest loss on the buyer's validation
            rows, every restart's merges scored at every alpha (R times the scoring).
            Under ``reference`` the R candidates of a pair compose the buyer's and the
            seller's reference alignments of equal objective rank, so candidate 0 is the
            objective's choice and validation can only lower the kept loss.
        reference: int32 scalar (may be traced), the reference agent of ``reference``.

    Returns:
        :class:`Valuation` with P = N * K entries, buyer-major (entry i * K + k).
    """
    cands = jnp.asarray(candidates, jnp.int32)
    val_idx = jnp.asarray(val_idx, jnp.int32)
    if cands.ndim != 2:
        raise ParamarketError(f"candidates must be (N, K), got shape {tuple(cands.shape)}")
    _check_rows(pop_params, val_idx, cands.shape[0], "candidates")
    ids = jnp.arange(cands.shape[0], dtype=jnp.int32)
    return _call_value(
        model, pop_params, x_val, y_val, val_idx, ids, cands, key,
        alphas, align, layers, max_sweeps, batch_size, restarts, choose, reference,
    )  # fmt: skip


def value_pairs(
    model: Model,
    pop_params,
    x_val,
    y_val,
    val_idx,
    buyers,
    sellers,
    key: jax.Array,
    *,
    alphas=PAPER_ALPHAS,
    align: bool | str = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
    restarts: int = 1,
    choose: str = "objective",
    reference: int | jax.Array = 0,
) -> Valuation:
    """Try-before-buy scores of arbitrary (buyer, seller) pairs, e.g. :func:`all_pairs`.

    Same as :func:`value_candidates` (see there for the arguments) with one seller per
    row; ``batch_size`` counts pairs per chunk (and, under ``reference``, agents per chunk
    of the reference alignments).

    Args:
        buyers: (P,) int buyer of each pair.
        sellers: (P,) int seller of each pair.

    Returns:
        :class:`Valuation` with P entries in the order of the pairs.
    """
    ids = jnp.asarray(buyers, jnp.int32)
    cands = jnp.asarray(sellers, jnp.int32)[:, None]
    val_idx = jnp.asarray(val_idx, jnp.int32)
    _check_rows(pop_params, val_idx, None, "pairs")
    return _call_value(
        model, pop_params, x_val, y_val, val_idx, ids, cands, key,
        alphas, align, layers, max_sweeps, batch_size, restarts, choose, reference,
    )  # fmt: skip


def _merge_trades(
    spec_key, mode, restarts, layers, batch_size, pop, sellers, alphas, mask, key, max_sweeps,
    reference,
):  # fmt: skip
    spec = thaw(spec_key)
    flat = flatten(pop)
    n = sellers.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    # Buyers without a trade align to themselves: cheap, fixed shapes, result discarded.
    pick = jnp.where(mask, jnp.clip(sellers, 0, n - 1), ids)
    if mode == "none":
        perms = {}
    elif mode == "reference":
        to_ref = _reference_perms(
            spec_key, flat, reference, key, max_sweeps, "auto", restarts, batch_size
        )
        perms = compose(take(to_ref, ids), take(to_ref, pick))
    else:

        def chunk(idx):
            b_ids, s_ids = idx
            a, b = take(flat, b_ids), take(flat, s_ids)
            return _align_restarts(spec_key, a, b, key, max_sweeps, "auto", restarts)

        perms = map_chunks(chunk, (ids, pick), batch_size)
    return merge_settled(spec, pop, pick, alphas, mask, perms, layers=layers, batch_size=batch_size)


_merge_trades_jit = jax.jit(_merge_trades, static_argnums=(0, 1, 2, 3, 4))


def merge_trades(
    spec: PermutationSpec,
    pop_params,
    sellers,
    alphas,
    mask,
    key: jax.Array,
    *,
    align: bool | str = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
    restarts: int = 1,
    reference: int | jax.Array = 0,
):
    """Settled trades: each buyer with ``mask[i]`` takes its merge with ``sellers[i]``.

    The settlement API for callers that hold no permutations (a valuation run elsewhere,
    or trades chosen by hand): it aligns the settled pairs itself. The market round keeps
    the valuation's permutations and settles with :func:`merge_settled` instead (no second
    weight matching); ``tests/market/test_round.py`` checks that both give the same merge.
    All trades use the pre-trade population (simultaneous settlement). With the same
    ``key``, ``align``, ``layers``, ``max_sweeps``, ``restarts`` and ``reference`` as a
    valuation that chose restarts by objective, buyer i gets the merge that was scored
    (the alignment is recomputed: valuation hands out no weights). A valuation with
    ``choose="validation"`` cannot be recomputed without the validation data: settle it
    with :func:`merge_settled` and the perms of :func:`value_with_perms`.

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, leading axis N.
        sellers: (N,) int seller of buyer i (ignored where ``mask`` is False).
        alphas: (N,) float seller weight of each trade.
        mask: (N,) bool, True where buyer i's trade settled.
        key: the alignment key used for the valuation.
        align: ``pairwise`` (or True), ``reference`` or ``none`` (or False), as in
            :func:`value_candidates`.
        layers: prefix or glob patterns of the traded layers; None trades the whole model.
        max_sweeps: most alignment sweeps.
        batch_size: buyers per chunk; None does all in one vmap.
        restarts: weight-matching restarts, the best objective kept (static).
        reference: the reference agent under ``align="reference"``.

    Returns:
        New population params; buyers without a trade keep theirs exactly.
    """
    mode, restarts, _ = _options(align, restarts, "objective")
    return _merge_trades_jit(
        freeze(spec),
        mode,
        restarts,
        _layers_key(pop_params, layers),
        batch_size,
        pop_params,
        jnp.asarray(sellers, jnp.int32),
        jnp.asarray(alphas, jnp.float32),
        jnp.asarray(mask, bool),
        key,
        jnp.asarray(max_sweeps, jnp.int32),
        jnp.asarray(reference, jnp.int32),
    )
