"""Try before buy: score aligned merges on the buyer's validation split (Git Re-Basin, ICLR 2023).

The broker alone sees both models: valuation returns scores only, and :func:`merge_trades`
hands merged parameters to buyers whose trades settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paramarket_jax.broker.align import _align_batch, freeze, map_chunks, take, thaw
from paramarket_jax.broker.merge import PAPER_ALPHAS, merge, select_layers
from paramarket_jax.errors import ParamarketError
from paramarket_jax.models.base import Model
from paramarket_jax.models.spec import PermutationSpec, apply_permutation, flatten, unflatten


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
    """

    buyer: jax.Array
    seller: jax.Array
    best_alpha: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    gain: jax.Array
    acc_after: jax.Array


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
    logits = model.apply(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean(dtype=jnp.float32)


def _score(model, layers, alphas, buyer, sellers, x, y):
    """One buyer against K aligned sellers at A alphas -> per-seller scores (K,)."""
    before, _ = loss_and_accuracy(model, buyer, x, y)

    def one(seller, alpha):
        return loss_and_accuracy(model, merge(buyer, seller, alpha, layers), x, y)

    losses, accs = jax.vmap(jax.vmap(one, (None, 0)), (0, None))(sellers, alphas)  # (K, A)
    best = losses.argmin(axis=1)
    after = jnp.take_along_axis(losses, best[:, None], 1)[:, 0]
    gain = jnp.where(before > 0, (before - after) / before, 0.0)
    acc = jnp.take_along_axis(accs, best[:, None], 1)[:, 0]
    k = losses.shape[0]
    return alphas[best], jnp.broadcast_to(before, (k,)), after, gain, acc


def _aligned_sellers(spec, align_on, buyers_flat, sellers_flat, key, max_sweeps):
    """Flat (P, ...) sellers -> (P, ...) sellers in their buyers' bases, and the perms.

    Without alignment the sellers come back as they are and the perms are empty.
    """
    if not align_on:
        return sellers_flat, {}
    perms = _align_batch(freeze(spec), buyers_flat, sellers_flat, key, max_sweeps)
    return _permute(spec, perms, sellers_flat), perms


def _permute(spec, perms, sellers_flat):
    """Apply per-pair perms (name -> (P, size)) to flat (P, ...) sellers."""
    if not perms:
        return sellers_flat
    permute = jax.vmap(lambda p, s: flatten(apply_permutation(spec, p, unflatten(s))))
    return permute(perms, sellers_flat)


def _value(
    model,
    align_on,
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
):
    """Scores of buyer ids[b] against sellers cands[b, :]; chunks of ``batch_size`` buyers."""
    flat = flatten(pop)
    x_val, y_val = jnp.asarray(x_val), jnp.asarray(y_val)

    def chunk(idx):
        b_ids, c_ids = idx  # (B,), (B, K)
        n_b, k = c_ids.shape
        buyers = take(flat, b_ids)
        sellers = take(flat, c_ids.reshape(-1))
        repeated = jax.tree.map(lambda v: jnp.repeat(v, k, axis=0), buyers)
        sellers, perms = _aligned_sellers(model.spec, align_on, repeated, sellers, key, max_sweeps)
        sellers = jax.tree.map(lambda v: v.reshape(n_b, k, *v.shape[1:]), sellers)
        perms = jax.tree.map(lambda v: v.reshape(n_b, k, *v.shape[1:]), perms)
        rows = val_idx[b_ids]  # (B, m)
        score = jax.vmap(
            lambda b, s, x, y: _score(model, layers, alphas, unflatten(b), unflatten(s), x, y)
        )
        return score(buyers, sellers, x_val[rows], y_val[rows]), perms

    scores, perms = map_chunks(chunk, (ids, cands), batch_size)
    best_alpha, before, after, gain, acc = scores
    buyer = jnp.repeat(ids, cands.shape[1])
    val = Valuation(
        buyer, cands.reshape(-1), *(v.reshape(-1) for v in (best_alpha, before, after, gain, acc))
    )
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
    align: bool,
    layers: tuple[str, ...] | None,
    max_sweeps,
    batch_size: int | None,
):
    """:func:`value_candidates` for callers already inside a trace (the market round).

    Besides the scores it returns the permutations found for every pair (small int arrays,
    not weights), so the trades that settle merge exactly what was scored without aligning
    again (:func:`merge_settled`).

    Returns:
        (Valuation with P = N * K entries, perms: name -> (N, K, size) int32, empty without
        alignment).
    """
    ids = jnp.arange(candidates.shape[0], dtype=jnp.int32)
    return _value(
        model, bool(align), layers, batch_size, pop_params, x_val, y_val, val_idx, ids,
        candidates, key, alphas, max_sweeps,
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

    Returns:
        New population params; buyers without a trade keep theirs exactly.
    """
    flat = flatten(pop_params)
    n = sellers.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    sellers = jnp.where(mask, jnp.clip(sellers, 0, n - 1), ids)

    def chunk(idx):
        b_ids, s_ids, a, m, p = idx
        buyers = take(flat, b_ids)
        aligned = _permute(spec, p, take(flat, s_ids))

        def one(b, s, alpha, keep):
            merged = flatten(merge(unflatten(b), unflatten(s), alpha, layers))
            return jax.tree.map(lambda u, v: jnp.where(keep, u, v), merged, b)

        return jax.vmap(one)(buyers, aligned, a, m)

    return unflatten(map_chunks(chunk, (ids, sellers, alphas, mask, perms), batch_size))


_value_jit = jax.jit(_value, static_argnums=(0, 1, 2, 3))


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
    max_sweeps, batch_size,
) -> Valuation:  # fmt: skip
    """The shared jitted call behind :func:`value_candidates` and :func:`value_pairs`."""
    val, _ = _value_jit(
        model,
        bool(align),
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
    align: bool = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
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
        key: drives the alignment's group order (shared by all pairs).
        alphas: (A,) seller weights to try; the paper's 0.05, ..., 0.95 by default.
        align: align sellers to buyers first (off: merge raw seller weights).
        layers: prefix or glob patterns of the traded layers; None trades the whole model.
        max_sweeps: most alignment sweeps.
        batch_size: buyers per chunk; None scores all buyers in one vmap.

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
        alphas, align, layers, max_sweeps, batch_size,
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
    align: bool = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
) -> Valuation:
    """Try-before-buy scores of arbitrary (buyer, seller) pairs, e.g. :func:`all_pairs`.

    Same as :func:`value_candidates` (see there for the arguments) with one seller per
    row; ``batch_size`` counts pairs per chunk.

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
        alphas, align, layers, max_sweeps, batch_size,
    )  # fmt: skip


def _merge_trades(
    spec_key, align_on, layers, batch_size, pop, sellers, alphas, mask, key, max_sweeps
):
    spec = thaw(spec_key)
    flat = flatten(pop)
    n = sellers.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    # Buyers without a trade align to themselves: cheap, fixed shapes, result discarded.
    pick = jnp.where(mask, jnp.clip(sellers, 0, n - 1), ids)

    def chunk(idx):
        b_ids, s_ids = idx
        _, perms = _aligned_sellers(
            spec, align_on, take(flat, b_ids), take(flat, s_ids), key, max_sweeps
        )
        return perms

    perms = map_chunks(chunk, (ids, pick), batch_size)
    return merge_settled(spec, pop, pick, alphas, mask, perms, layers=layers, batch_size=batch_size)


_merge_trades_jit = jax.jit(_merge_trades, static_argnums=(0, 1, 2, 3))


def merge_trades(
    spec: PermutationSpec,
    pop_params,
    sellers,
    alphas,
    mask,
    key: jax.Array,
    *,
    align: bool = True,
    layers: Sequence[str] | None = None,
    max_sweeps: int | jax.Array = 100,
    batch_size: int | None = None,
):
    """Settled trades: each buyer with ``mask[i]`` takes its merge with ``sellers[i]``.

    All trades use the pre-trade population (simultaneous settlement). With the same
    ``key``, ``align``, ``layers`` and ``max_sweeps`` as the valuation, buyer i gets the
    merge that was scored (the alignment is recomputed: valuation hands out no weights).

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, leading axis N.
        sellers: (N,) int seller of buyer i (ignored where ``mask`` is False).
        alphas: (N,) float seller weight of each trade.
        mask: (N,) bool, True where buyer i's trade settled.
        key: the alignment key used for the valuation.
        align: align sellers first (off: merge raw seller weights).
        layers: prefix or glob patterns of the traded layers; None trades the whole model.
        max_sweeps: most alignment sweeps.
        batch_size: buyers per chunk; None does all in one vmap.

    Returns:
        New population params; buyers without a trade keep theirs exactly.
    """
    return _merge_trades_jit(
        freeze(spec),
        bool(align),
        _layers_key(pop_params, layers),
        batch_size,
        pop_params,
        jnp.asarray(sellers, jnp.int32),
        jnp.asarray(alphas, jnp.float32),
        jnp.asarray(mask, bool),
        key,
        jnp.asarray(max_sweeps, jnp.int32),
    )
