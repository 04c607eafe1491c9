"""Permutation weight matching, seller to buyer (Ainsworth et al., Git Re-Basin, ICLR 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.spec import (
    PermutationSpec,
    apply_permutation,
    flatten,
    identity_perms,
    permute_param,
)

BACKENDS = ("optax", "scipy")
# A coordinate step counts as an improvement only above this relative margin, so float
# round-off between equally good assignments cannot keep the descent going.
RTOL = 1e-6

Frozen = tuple[tuple[tuple[str, tuple[str | None, ...]], ...], tuple[tuple[str, int], ...]]


def freeze(spec: PermutationSpec) -> Frozen:
    """A hashable copy of ``spec`` (for ``jax.jit`` static arguments and caches)."""
    axes = tuple(sorted((path, tuple(names)) for path, names in spec.axes.items()))
    return axes, tuple(sorted(spec.sizes.items()))


def thaw(frozen: Frozen) -> PermutationSpec:
    """Inverse of :func:`freeze`."""
    return PermutationSpec(axes=dict(frozen[0]), sizes=dict(frozen[1]))


def similarity(
    spec: PermutationSpec,
    group: str,
    buyer_flat: Mapping[str, jax.Array],
    seller_flat: Mapping[str, jax.Array],
    perms: Mapping[str, jax.Array],
) -> jax.Array:
    """Similarity of the buyer's and the seller's units of one permutation group.

    Sums, over every (parameter, axis) the group acts on, the inner products of the
    buyer's unit slices with the seller's, the seller's other axes permuted by ``perms``.

    Args:
        spec: the model's permutation spec.
        group: name of the permutation group, of size n.
        buyer_flat: flat parameters of the buyer (``flatten(params)``).
        seller_flat: flat parameters of the seller.
        perms: current permutations of the seller, name -> (size,) int32.

    Returns:
        (n, n) float32; entry [i, j] is the similarity of buyer unit i and seller unit j.
    """
    n = spec.sizes[group]
    sim = jnp.zeros((n, n), jnp.float32)
    for path, axis in spec.perm_to_axes[group]:
        wa = jnp.moveaxis(buyer_flat[path], axis, 0).reshape(n, -1)
        wb = permute_param(spec, perms, path, seller_flat[path], except_axis=axis)
        wb = jnp.moveaxis(wb, axis, 0).reshape(n, -1)
        sim = sim + jnp.dot(wa, wb.T, precision=jax.lax.Precision.HIGHEST)
    return sim


def hungarian(sim: jax.Array) -> jax.Array:
    """Exact maximum-similarity assignment, jittable and vmappable (optax's Hungarian).

    Args:
        sim: (n, n) similarity matrix.

    Returns:
        (n,) int32 perm with ``perm[row] = col``, maximising ``sim[arange(n), perm].sum()``.
    """
    # optax minimises and returns (rows, cols) ordered by column: invert to perm[row] = col.
    rows, cols = optax.assignment.hungarian_algorithm(-sim)
    n = sim.shape[0]
    return jnp.zeros(n, jnp.int32).at[rows].set(cols.astype(jnp.int32))


def _step(spec, members, local, a, b, perms):
    """One coordinate step for one pair: re-solve group ``members[local]`` if that improves.

    All ``members`` have one size, so they share one compiled Hungarian solver; only the
    similarity is chosen per group. The new assignment replaces the old one only if its
    score is higher by more than ``RTOL`` (relative), so the descent is monotone and ends.
    """
    if len(members) == 1:
        sim = similarity(spec, members[0], a, b, perms)
    else:
        branches = [partial(similarity, spec, g) for g in members]
        sim = jax.lax.switch(local, branches, a, b, perms)
    old = jnp.stack([perms[g] for g in members])[local]
    new = hungarian(sim)
    rows = jnp.arange(sim.shape[0])
    old_score, new_score = sim[rows, old].sum(), sim[rows, new].sum()
    tol = RTOL * jnp.maximum(jnp.abs(old_score), jnp.abs(new_score))
    improved = new_score > old_score + tol
    chosen = jnp.where(improved, new, old)
    out = dict(perms)
    for i, g in enumerate(members):
        out[g] = jnp.where(local == i, chosen, perms[g])
    return out, improved


def _align_batch(frozen: Frozen, buyer_flat, seller_flat, key, max_sweeps):
    """Weight matching for P pairs at once: (P, ...) flat params -> perms (P, size) each.

    The sweep counter and the group order (drawn from ``fold_in(key, sweep)``) are shared
    by all pairs, so ``lax.switch`` picks one group per step instead of running all of
    them; a pair whose last sweep improved nothing is frozen (it is a fixed point of
    coordinate descent in any order) and the loop ends when every pair is frozen.
    """
    spec = thaw(frozen)
    groups = sorted(spec.sizes)
    n_pairs = jax.tree.leaves(buyer_flat)[0].shape[0]
    perms0 = {
        g: jnp.broadcast_to(p, (n_pairs, p.shape[0])) for g, p in identity_perms(spec).items()
    }
    if not groups:
        return perms0
    # Groups of equal size share a branch (and one compiled Hungarian solver).
    sizes = sorted({spec.sizes[g] for g in groups})
    members = [[g for g in groups if spec.sizes[g] == n] for n in sizes]
    branch_of = jnp.array([sizes.index(spec.sizes[g]) for g in groups], jnp.int32)
    local_of = jnp.array([members[sizes.index(spec.sizes[g])].index(g) for g in groups], jnp.int32)
    branches = [partial(_step, spec, m) for m in members]

    def sweep(order, a, b, perms):
        # A loop, not an unrolled sweep: every group's branch is compiled once, not G times.
        def step(t, carry):
            perms, changed = carry
            g = order[t]
            perms, improved = jax.lax.switch(branch_of[g], branches, local_of[g], a, b, perms)
            return perms, changed | improved

        return jax.lax.fori_loop(0, len(groups), step, (perms, jnp.zeros((), bool)))

    batched_sweep = jax.vmap(sweep, in_axes=(None, 0, 0, 0))

    def cond(carry):
        count, active, _ = carry
        return (count < max_sweeps) & active.any()

    def body(carry):
        count, active, perms = carry
        order = jax.random.permutation(jax.random.fold_in(key, count), len(groups))
        new, changed = batched_sweep(order, buyer_flat, seller_flat, perms)
        perms = jax.tree.map(lambda n, o: jnp.where(active[:, None], n, o), new, perms)
        return count + 1, active & changed, perms

    carry = (jnp.zeros((), jnp.int32), jnp.ones(n_pairs, bool), perms0)
    return jax.lax.while_loop(cond, body, carry)[2]


def _align_one(frozen: Frozen, buyer_flat, seller_flat, key, max_sweeps):
    a, b = (jax.tree.map(lambda x: x[None], p) for p in (buyer_flat, seller_flat))
    perms = _align_batch(frozen, a, b, key, max_sweeps)
    return {g: p[0] for g, p in perms.items()}


_align_one_jit = jax.jit(_align_one, static_argnums=0)


def _align_scipy(spec, buyer_params, seller_params, key, max_sweeps):
    """Host loop of :func:`align` with scipy's ``linear_sum_assignment`` (not jittable)."""
    frozen = freeze(spec)
    groups = sorted(spec.sizes)
    a = flatten(buyer_params)
    b = flatten(seller_params)
    perms = identity_perms(spec)
    for count in range(int(max_sweeps)):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, count), len(groups)))
        changed = False
        for t in order:
            g = groups[int(t)]
            sim = np.asarray(_similarity_jit(frozen, g, a, b, perms))
            new = linear_sum_assignment(sim, maximize=True)[1].astype(np.int32)
            old = np.asarray(perms[g])
            rows = np.arange(sim.shape[0])
            old_score, new_score = sim[rows, old].sum(), sim[rows, new].sum()
            if new_score > old_score + RTOL * max(abs(old_score), abs(new_score)):
                perms = {**perms, g: jnp.asarray(new)}
                changed = True
        if not changed:
            break
    return perms


_similarity_jit = jax.jit(
    lambda frozen, g, a, b, perms: similarity(thaw(frozen), g, a, b, perms), static_argnums=(0, 1)
)


def align(
    spec: PermutationSpec,
    buyer_params,
    seller_params,
    key: jax.Array,
    *,
    max_sweeps: int | jax.Array = 100,
    backend: str = "optax",
) -> dict[str, jax.Array]:
    """Permutations that align the seller's hidden units to the buyer's (weight matching).

    Coordinate descent over the permutation groups, in an order drawn from
    ``fold_in(key, sweep)`` each sweep; each step solves the group's exact linear assignment
    on the similarity of every parameter it touches (the other groups' current
    permutations applied); it stops after a sweep that improves nothing, or ``max_sweeps``.

    With ``backend="optax"`` this is traceable (jit, vmap; ``max_sweeps`` may be traced);
    under a vmap with a batched ``key`` every step evaluates all groups, so prefer
    :func:`align_pairs` for many pairs. ``backend="scipy"`` is a host loop for comparison.

    Args:
        spec: the model's permutation spec.
        buyer_params: the buyer's parameter pytree (no population axis).
        seller_params: the seller's parameter pytree, same structure.
        key: drives the order of the groups in each sweep.
        max_sweeps: most sweeps over all groups (the paper's code: 300).
        backend: ``optax`` (jittable Hungarian) or ``scipy`` (host loop).

    Returns:
        name -> (size,) int32 perms; ``apply_permutation(spec, perms, seller_params)`` is the
        seller's model (same function) in the buyer's basis.
    """
    if backend == "scipy":
        return _align_scipy(spec, buyer_params, seller_params, key, max_sweeps)
    if backend != "optax":
        raise unknown("alignment backend", backend, BACKENDS)
    sweeps = jnp.asarray(max_sweeps, jnp.int32)
    return _align_one_jit(freeze(spec), flatten(buyer_params), flatten(seller_params), key, sweeps)


def align_pairs(
    spec: PermutationSpec,
    pop_params,
    buyers: jax.Array,
    sellers: jax.Array,
    key: jax.Array,
    max_sweeps: int | jax.Array = 100,
    *,
    batch_size: int | None = None,
    backend: str = "optax",
) -> dict[str, jax.Array]:
    """Align seller ``sellers[p]`` to buyer ``buyers[p]`` for every candidate pair at once.

    One jittable call (``backend="optax"``): pairs are vmapped and share the group order of
    each sweep (drawn from ``key``), so pair p gets the perms of
    ``align(spec, buyer, seller, key)`` up to float round-off in near-ties.

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, every leaf with a leading axis N.
        buyers: (P,) int buyer index of each pair.
        sellers: (P,) int seller index of each pair.
        key: drives the group order of each sweep.
        max_sweeps: most sweeps over all groups.
        batch_size: align at most this many pairs at a time (``lax.map`` over chunks) to
            bound memory; None aligns all P together.
        backend: ``optax``, or ``scipy`` for a host loop over pairs (not jittable).

    Returns:
        name -> (P, size) int32 perms; vmap :func:`aligned` over pairs to permute sellers.
    """
    if backend == "scipy":
        rows = [
            align(
                spec,
                take(pop_params, b),
                take(pop_params, s),
                key,
                max_sweeps=max_sweeps,
                backend="scipy",
            )
            for b, s in zip(np.asarray(buyers), np.asarray(sellers), strict=True)
        ]
        return {g: jnp.stack([r[g] for r in rows]) for g in spec.sizes}
    if backend != "optax":
        raise unknown("alignment backend", backend, BACKENDS)
    idx = (jnp.asarray(buyers, jnp.int32), jnp.asarray(sellers, jnp.int32))
    sweeps = jnp.asarray(max_sweeps, jnp.int32)
    return _align_pairs_jit(freeze(spec), flatten(pop_params), idx, key, sweeps, batch_size)


def _align_pairs(frozen: Frozen, flat, idx, key, max_sweeps, batch_size):
    def chunk(pair_idx):
        b, s = pair_idx
        a = jax.tree.map(lambda x: x[b], flat)
        c = jax.tree.map(lambda x: x[s], flat)
        return _align_batch(frozen, a, c, key, max_sweeps)

    return map_chunks(chunk, idx, batch_size)


_align_pairs_jit = jax.jit(_align_pairs, static_argnums=(0, 5))


def aligned(spec: PermutationSpec, perms: Mapping[str, jax.Array], seller_params):
    """The seller's parameters in the buyer's basis: ``apply_permutation(spec, perms, seller)``.

    Args:
        spec: the model's permutation spec.
        perms: name -> (size,) int perms from :func:`align` (vmap for pairs).
        seller_params: the seller's parameter pytree.
    """
    return apply_permutation(spec, perms, seller_params)


def align_to(
    spec: PermutationSpec,
    buyer_params,
    seller_params,
    key: jax.Array,
    *,
    max_sweeps: int | jax.Array = 100,
    backend: str = "optax",
):
    """The seller's parameters aligned to the buyer's (:func:`align` then :func:`aligned`)."""
    perms = align(spec, buyer_params, seller_params, key, max_sweeps=max_sweeps, backend=backend)
    return aligned(spec, perms, seller_params)


def take(tree, index):
    """Member ``index`` of a population pytree (every leaf indexed on its leading axis)."""
    return jax.tree.map(lambda x: x[index], tree)


def map_chunks(fn, xs, batch_size: int | None):
    """``fn(xs)`` over the leading axis of ``xs`` in chunks of ``batch_size`` (``lax.map``).

    The last chunk is padded by repeating the first row; padded outputs are dropped, so the
    result equals ``fn(xs)`` whenever ``fn`` treats rows independently.

    Args:
        fn: maps a pytree with leading axis B to a pytree with leading axis B.
        xs: pytree whose leaves share a leading axis P.
        batch_size: rows per chunk; None (or >= P) calls ``fn`` once on all rows.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if batch_size is not None and batch_size < 1:
        raise ParamarketError(f"batch_size must be a positive integer or None, got {batch_size}")
    if batch_size is None or batch_size >= n:
        return fn(xs)
    n_chunks = -(-n // batch_size)
    pad = n_chunks * batch_size - n

    def split(x):
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
        return x.reshape(n_chunks, batch_size, *x.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, xs))
    return jax.tree.map(lambda y: y.reshape(n_chunks * batch_size, *y.shape[2:])[:n], out)
