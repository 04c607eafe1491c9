"""Permutation weight matching, seller to buyer (Ainsworth et al., Git Re-Basin, ICLR 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.spec import (
    PermutationSpec,
    apply_permutation,
    blocked,
    flatten,
    identity_perms,
    permute_param,
    random_perms,
    unit_rows,
)

# ``auto``: jitted, the assignment solver chosen per platform when lowered (scipy through a
# callback on CPU, optax's Hungarian elsewhere); ``optax`` / ``callback``: jitted, that
# solver on every platform; ``scipy``: a host loop over steps and pairs, for comparison.
BACKENDS = ("auto", "optax", "callback", "scipy")
SOLVERS = ("auto", "optax", "callback")  # the jitted backends: solvers of hungarian()
# A coordinate step counts as an improvement only above this relative margin, so float
# round-off between equally good assignments cannot keep the descent going.
RTOL = 1e-6

Frozen = tuple[
    tuple[tuple[str, tuple[str | None, ...]], ...],
    tuple[tuple[str, int], ...],
    tuple[tuple[str, tuple[str, int]], ...],
    bool,
]


def freeze(spec: PermutationSpec) -> Frozen:
    """A hashable copy of ``spec`` (for ``jax.jit`` static arguments and caches)."""
    axes = tuple(sorted((path, tuple(names)) for path, names in spec.axes.items()))
    blocks = tuple(sorted((g, tuple(b)) for g, b in spec.blocks.items()))
    return axes, tuple(sorted(spec.sizes.items())), blocks, bool(spec.grouped)


def thaw(frozen: Frozen) -> PermutationSpec:
    """Inverse of :func:`freeze`."""
    axes, sizes, blocks, grouped = frozen
    spec = PermutationSpec(axes=dict(axes), sizes=dict(sizes))
    if blocks:
        spec = spec._replace(blocks=MappingProxyType(dict(blocks)), grouped=grouped)
    return spec


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
        wa = unit_rows(spec, group, buyer_flat[path], axis)
        wb = permute_param(spec, perms, path, seller_flat[path], except_axis=axis)
        wb = unit_rows(spec, group, wb, axis)
        sim = sim + jnp.dot(wa, wb.T, precision=jax.lax.Precision.HIGHEST)
    return sim


def descent_units(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """What one coordinate step re-solves: every ordinary group alone (sorted), then every
    head set's blocked groups together (:attr:`PermutationSpec.blocks`; sorted by set).
    Without blocked groups these are the groups, in the order weight matching always
    used; so they are when the spec is not ``grouped`` (``broker.heads = "flat"``)."""
    if not spec.grouped:
        return [(g,) for g in sorted(spec.sizes)]
    plain = [(g,) for g in sorted(spec.sizes) if g not in spec.blocks]
    return plain + [groups for _, groups in sorted(spec.head_sets.items())]


def solve_heads(sims, shapes, solver: str = "auto", where=None) -> list[jax.Array]:
    """The best blocked permutations of one head set, in two levels (exact).

    For every (buyer head i, seller head j) pair and every group of the set, the best
    assignment of j's units to i's (one batched :func:`hungarian` of heads^2 matrices per
    group); then one assignment over heads scored by the sum of those inner optima. Given
    the head assignment the inner problems are independent, so this maximises the set's
    similarity over every blocked permutation.

    Args:
        sims: one (heads * d, heads * d) similarity per group of the set (:func:`similarity`).
        shapes: (heads, d) per group.
        solver: as for :func:`hungarian`.
        where: as for :func:`hungarian` (scalar: whether to solve at all).

    Returns:
        one flattened blocked perm (heads * d,) per group.
    """
    inner, cost = [], 0.0
    for sim, (h, d) in zip(sims, shapes, strict=True):
        blocks = sim.reshape(h, d, h, d).transpose(0, 2, 1, 3)  # [buyer head, seller head]
        p = hungarian(blocks, solver, where=where)  # (h, h, d)
        inner.append(p)
        cost = cost + jnp.take_along_axis(blocks, p[..., None], -1)[..., 0].sum(-1)
    head = hungarian(cost, solver, where=where)
    rows = jnp.arange(shapes[0][0])
    return [blocked(head, p[rows, head]) for p in inner]


def hungarian(sim: jax.Array, solver: str = "auto", where: jax.Array | None = None) -> jax.Array:
    """Exact maximum-similarity assignment, jittable and vmappable.

    Both solvers return the same perm wherever the optimum is unique (no ties); they
    differ in cost per platform: optax's Hungarian is an XLA while-loop, 4-9x slower than
    scipy's C++ solver on CPU, while a callback on an accelerator costs a device-host
    round trip per call.

    Args:
        sim: (..., n, n) similarity matrix (vmap or leading axes for a batch).
        solver: ``optax`` (``optax.assignment.hungarian_algorithm`` inside the
            computation), ``callback`` (scipy's ``linear_sum_assignment`` through
            ``jax.pure_callback``; under vmap one host call solves the whole batch), or
            ``auto``: ``jax.lax.platform_dependent`` keeps the callback when lowered for
            CPU and optax for any other platform, so one traced function (jit, vmap,
            ``while_loop``, AOT lowering) uses the faster solver wherever it is compiled.
        where: optional bool, broadcast against ``sim.shape[:-2]``: only the matrices
            where it is True need solving. The callback skips the others (their perm is
            the identity); optax solves every matrix.

    Returns:
        (..., n) int32 perm with ``perm[row] = col``, maximising ``sim[arange(n), perm].sum()``
        (wherever ``where`` is True).
    """
    where = jnp.ones((), bool) if where is None else jnp.asarray(where, bool)
    if solver == "optax":
        return _hungarian_optax(sim, where)
    if solver == "callback":
        return _hungarian_callback(sim, where)
    if solver != "auto":
        raise unknown("assignment solver", solver, SOLVERS)
    return jax.lax.platform_dependent(sim, where, cpu=_hungarian_callback, default=_hungarian_optax)


def _hungarian_optax(sim: jax.Array, where: jax.Array) -> jax.Array:
    del where  # a vmapped while_loop runs until its slowest member is done anyway
    if sim.ndim > 2:
        return jax.vmap(_hungarian_optax, (0, None))(sim, None)
    # optax minimises and returns (rows, cols) ordered by column: invert to perm[row] = col.
    rows, cols = optax.assignment.hungarian_algorithm(-sim)
    n = sim.shape[0]
    return jnp.zeros(n, jnp.int32).at[rows].set(cols.astype(jnp.int32))


def _hungarian_callback(sim: jax.Array, where: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(sim.shape[:-1], jnp.int32)
    where = jnp.broadcast_to(where, sim.shape[:-2])
    # expand_dims: under (nested) vmap the callback gets every batch axis in front, once
    # (size 1 where an argument is not batched).
    return jax.pure_callback(_lsa_host, out, sim, where, vmap_method="expand_dims")


def _scipy_lsa():
    """scipy's ``linear_sum_assignment``, imported when a host solve first needs it (SciPy
    costs most of a second to import, and the market's own program solves inside XLA)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment


def _lsa_host(sim, where) -> np.ndarray:
    """Host side of the callback: scipy's solver on each (n, n) matrix of a (..., n, n) batch.

    Only the matrices marked in ``where`` are solved, one at a time in their own dtype (no
    copy of the whole batch). Non-finite entries (a diverged model) are clamped so scipy
    does not raise inside the computation; the descent's score test then decides as it
    would for optax's answer.
    """
    sim, where = np.asarray(sim), np.asarray(where, bool)
    n = sim.shape[-1]
    # Under vmap either argument may hold size-1 axes where the other is batched.
    batch = np.broadcast_shapes(sim.shape[:-2], where.shape)
    flat = np.broadcast_to(sim, (*batch, n, n)).reshape(-1, n, n)
    perms = np.broadcast_to(np.arange(n, dtype=np.int32), flat.shape[:2]).copy()
    for i in np.flatnonzero(np.broadcast_to(where, batch)):
        m = flat[i]
        if not np.isfinite(m).all():
            big = np.finfo(np.float32).max
            m = np.nan_to_num(m.astype(np.float64), nan=-big, posinf=big, neginf=-big)
        perms[i] = _scipy_lsa()(m, maximize=True)[1]
    return perms.reshape(*batch, n)


def _step(spec, members, solver, branch, chosen_branch, local, a, b, perms, live):
    """One coordinate step for one pair: re-solve group ``members[local]`` if that improves.

    All ``members`` have one size, so they share one compiled Hungarian solver; only the
    similarity is chosen per group. The new assignment replaces the old one only if its
    score is higher by more than ``RTOL`` (relative), so the descent is monotone and ends.
    A pair that is not ``live`` (already converged) keeps its perms; the callback solver
    skips its assignment. So does a pair for which this ``branch`` is not the
    ``chosen_branch``: under a vmap with batched keys (seeds) ``lax.switch`` runs every
    branch and selects, and the host then solves only the assignments that are kept.
    """
    if len(members) == 1:
        sim = similarity(spec, members[0], a, b, perms)
    else:
        branches = [partial(similarity, spec, g) for g in members]
        sim = jax.lax.switch(local, branches, a, b, perms)
    old = jnp.stack([perms[g] for g in members])[local]
    live = live & (chosen_branch == branch)
    new = hungarian(sim, solver, where=live)
    rows = jnp.arange(sim.shape[0])
    improved = live & _improves(sim[rows, old].sum(), sim[rows, new].sum())
    chosen = jnp.where(improved, new, old)
    out = dict(perms)
    for i, g in enumerate(members):
        out[g] = jnp.where(local == i, chosen, perms[g])
    return out, improved


def _improves(old_score, new_score):
    """Whether a new assignment beats the old by more than ``RTOL`` (relative)."""
    tol = RTOL * jnp.maximum(jnp.abs(old_score), jnp.abs(new_score))
    return new_score > old_score + tol


def _head_step(spec, sets, solver, branch, chosen_branch, local, a, b, perms, live):
    """:func:`_step` for a head set: re-solve the blocked groups of ``sets[local]`` together
    (:func:`solve_heads`) if that improves their summed score. All ``sets`` have one shape
    (heads and d_head of each group), so they share the compiled solvers."""

    def sims(groups):
        return [similarity(spec, g, a, b, perms) for g in groups]

    if len(sets) == 1:
        sim = sims(sets[0])
    else:
        sim = jax.lax.switch(local, [partial(sims, t) for t in sets])
    old = [jnp.stack([perms[t[m]] for t in sets])[local] for m in range(len(sets[0]))]
    live = live & (chosen_branch == branch)
    new = solve_heads(sim, [spec.heads(g) for g in sets[0]], solver, where=live)

    def score(ps):
        return sum(s[jnp.arange(s.shape[0]), p].sum() for s, p in zip(sim, ps, strict=True))

    improved = live & _improves(score(old), score(new))
    out = dict(perms)
    for i, groups in enumerate(sets):
        for m, g in enumerate(groups):
            out[g] = jnp.where((local == i) & improved, new[m], perms[g])
    return out, improved


def _branches(spec: PermutationSpec, solver: str):
    """The descent's step branches and, per unit of :func:`descent_units`, its branch and
    its index inside the branch: ordinary groups of one size share a branch (and one
    compiled solver), as do head sets of one shape."""
    units = descent_units(spec)
    keys = []
    for unit in units:
        if len(unit) > 1 or (unit[0] in spec.blocks and spec.grouped):
            keys.append((1, tuple(spec.heads(g) for g in unit)))
        else:
            keys.append((0, spec.sizes[unit[0]]))
    kinds = sorted(set(keys))
    members = [[u for u, k in zip(units, keys, strict=True) if k == kind] for kind in kinds]
    branches = [
        partial(_head_step, spec, m, solver, i)
        if kind[0]
        else partial(_step, spec, [u[0] for u in m], solver, i)
        for i, (kind, m) in enumerate(zip(kinds, members, strict=True))
    ]
    branch_of = [kinds.index(k) for k in keys]
    local_of = [members[b].index(u) for b, u in zip(branch_of, units, strict=True)]
    return units, branches, jnp.array(branch_of, jnp.int32), jnp.array(local_of, jnp.int32)


def _align_batch(
    frozen: Frozen,
    buyer_flat,
    seller_flat,
    key,
    max_sweeps,
    solver="auto",
    restart_of=None,
    init=None,
):
    """Weight matching for P pairs at once: (P, ...) flat params -> perms (P, size) each.

    The sweep counter and the group order (drawn from ``fold_in(key, sweep)``) are shared
    by all pairs, so ``lax.switch`` picks one group per step instead of running all of
    them; a pair whose last sweep improved nothing is frozen (it is a fixed point of
    coordinate descent in any order) and the loop ends when every pair is frozen. The
    pairs' assignments of one step are one batched :func:`hungarian` call with ``solver``
    (with the callback: one host call per step for all P pairs).

    Frozen pairs cost nothing once few pairs are left: each sweep runs on the smallest of
    a few static batch sizes (:func:`_buckets`: P, P/4, P/16) that holds the live pairs,
    gathered in front and scattered back (a ``lax.switch`` over the sizes).

    Restarts (:func:`_align_restarts`): with ``restart_of`` ((P,) int32) ``key`` holds R
    keys and pair p draws its group orders from ``key[restart_of[p]]``. The group then
    differs between pairs, so every step evaluates the similarity of every group (the
    switch over groups runs all branches and selects); the callback still solves only the
    assignment each pair uses (``_step``'s ``chosen_branch``). ``init`` (name -> (P, size))
    replaces the identity as the descent's starting perms.
    """
    spec = thaw(frozen)
    groups = sorted(spec.sizes)
    n_pairs = jax.tree.leaves(buyer_flat)[0].shape[0]
    perms0 = {
        g: jnp.broadcast_to(p, (n_pairs, p.shape[0])) for g, p in identity_perms(spec).items()
    }
    if not groups:
        return perms0
    if init is not None:
        perms0 = {g: jnp.asarray(init[g], jnp.int32) for g in groups}
    # Groups of equal size share a branch (and one compiled Hungarian solver); so do head
    # sets of one shape. A head set is one unit of the descent (one step solves it).
    units, branches, branch_of, local_of = _branches(spec, solver)

    def sweep(order, a, b, perms, live):
        # A loop, not an unrolled sweep: every group's branch is compiled once, not G times.
        def step(t, carry):
            perms, changed = carry
            g, i = branch_of[order[t]], local_of[order[t]]
            perms, improved = jax.lax.switch(g, branches, g, i, a, b, perms, live)
            return perms, changed | improved

        return jax.lax.fori_loop(0, len(units), step, (perms, jnp.zeros((), bool)))

    per_pair = restart_of is not None  # one group order per pair, not one for all
    batched_sweep = jax.vmap(sweep, in_axes=(0 if per_pair else None, 0, 0, 0, 0))

    def sweep_all(order, active, perms):
        # Converged pairs keep their perms (and the callback skips their assignments).
        return batched_sweep(order, buyer_flat, seller_flat, perms, active)

    def sweep_live(k, order, active, perms):
        # The live pairs in front, padded with out-of-range indices: gathered clipped,
        # masked out of the sweep, dropped on the way back.
        idx = jnp.nonzero(active, size=k, fill_value=n_pairs)[0]
        live = idx < n_pairs
        clipped = jnp.minimum(idx, n_pairs - 1)
        a, b, p = (take(t, clipped) for t in (buyer_flat, seller_flat, perms))
        new, changed = batched_sweep(order[clipped] if per_pair else order, a, b, p, live)
        perms = jax.tree.map(lambda x, y: x.at[idx].set(y, mode="drop"), perms, new)
        return perms, jnp.zeros(n_pairs, bool).at[idx].set(changed, mode="drop")

    buckets = _buckets(n_pairs)
    sweeps = [sweep_all] + [partial(sweep_live, k) for k in buckets[1:]]

    def cond(carry):
        count, active, _ = carry
        return (count < max_sweeps) & active.any()

    def body(carry):
        count, active, perms = carry

        def draw(k):
            return jax.random.permutation(jax.random.fold_in(k, count), len(units))

        order = jax.vmap(draw)(key)[restart_of] if per_pair else draw(key)
        n_live = active.sum()
        bucket = sum((n_live <= k).astype(jnp.int32) for k in buckets[1:])
        if len(sweeps) == 1:
            perms, changed = sweep_all(order, active, perms)
        else:
            perms, changed = jax.lax.switch(bucket, sweeps, order, active, perms)
        return count + 1, changed, perms

    carry = (jnp.zeros((), jnp.int32), jnp.ones(n_pairs, bool), perms0)
    return jax.lax.while_loop(cond, body, carry)[2]


def _buckets(n_pairs: int, factor: int = 4, smallest: int = 8, most: int = 3) -> list[int]:
    """Static batch sizes of :func:`_align_batch`'s sweeps: P, then P/4, P/16 (rounded up)
    while they are at least ``smallest``; at most ``most`` of them (each is compiled)."""
    out = [n_pairs]
    while len(out) < most and -(-out[-1] // factor) >= smallest:
        out.append(-(-out[-1] // factor))
    return out


def restart_keys(key: jax.Array, restarts: int) -> jax.Array:
    """(R,) keys of R weight-matching restarts: restart 0 uses ``key`` itself (so one restart
    is the plain alignment, bit for bit), restart r > 0 uses ``fold_in(key, r)``."""
    rest = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(1, restarts))
    return jnp.concatenate([key[None], rest])


def restart_starts(spec: PermutationSpec, keys: jax.Array) -> dict[str, jax.Array]:
    """Starting perms of R restarts (keys from :func:`restart_keys`): the identity for
    restart 0 (plain weight matching), uniformly random perms drawn from
    ``split(keys[r])[0]`` for restart r > 0. name -> (R, size) int32."""
    drawn = jax.vmap(lambda k: random_perms(jax.random.split(k)[0], spec))(keys)
    return {g: p.at[0].set(jnp.arange(p.shape[1], dtype=p.dtype)) for g, p in drawn.items()}


def matching_objective(
    spec: PermutationSpec,
    buyer_flat: Mapping[str, jax.Array],
    seller_flat: Mapping[str, jax.Array],
    perms: Mapping[str, jax.Array],
) -> jax.Array:
    """What weight matching maximises: sum over the permuted parameters of <buyer, permuted
    seller> (flat params of one pair, perms name -> (size,)); a float32 scalar."""
    total = jnp.zeros((), jnp.float32)
    for path, names in spec.axes.items():
        if any(n is not None for n in names):
            b = permute_param(spec, perms, path, seller_flat[path])
            total = total + jnp.sum(buyer_flat[path] * b, dtype=jnp.float32)
    return total


def _align_restarts(
    frozen: Frozen,
    buyer_flat,
    seller_flat,
    key,
    max_sweeps,
    solver="auto",
    restarts: int = 1,
    keep_all: bool = False,
):
    """:func:`_align_batch` with R independent restarts, all R * P descents in one batched
    loop (no Python loop).

    Restart r draws its group orders from ``restart_keys(key, R)[r]`` and starts from
    :func:`restart_starts`: restart 0 is plain weight matching (identity start, ``key``'s
    orders), the others start from random perms. Random group orders alone explore little
    (a model with G groups has few distinct descents from the identity): on planted
    permutations of freshly initialised MLPs with a narrow layer beside a wide one they
    stalled as often with 64 restarts as with 8, while random starts recovered every one
    of 32 (hidden widths 3-33 and 16-3-16, 16 restarts; 6 and 8 of 32 with one). A 7-wide
    layer beside a 130-wide one stays hard: 10, 20, 26 of 32 with 64, 128, 256 restarts
    (1 of 32 with group orders alone). Drawing the orders per restart makes every step
    evaluate every group's similarity (see :func:`_align_batch`); shared orders with random
    starts alone recovered the 3-33 and 16-3-16 cases as well but none of the 7-130 ones.

    Returns:
        ``keep_all`` False: perms name -> (P, size) of each pair's restart with the best
        :func:`matching_objective` (the first such restart on ties; R = 1 is
        :func:`_align_batch` itself). ``keep_all`` True: (perms name -> (P, R, size),
        objective (P, R) float32).
    """
    if restarts == 1 and not keep_all:
        return _align_batch(frozen, buyer_flat, seller_flat, key, max_sweeps, solver)
    spec = thaw(frozen)
    n_pairs = jax.tree.leaves(seller_flat)[0].shape[0]
    if restarts == 1:
        perms = _align_batch(frozen, buyer_flat, seller_flat, key, max_sweeps, solver)
        perms = jax.tree.map(lambda p: p[:, None], perms)
    else:
        # Restart-major rows r * P + p: every restart's copy of the pairs, its own orders.
        def tile(x):
            return jnp.broadcast_to(x, (restarts, *x.shape)).reshape(-1, *x.shape[1:])

        a, b = jax.tree.map(tile, buyer_flat), jax.tree.map(tile, seller_flat)
        restart_of = jnp.repeat(jnp.arange(restarts, dtype=jnp.int32), n_pairs)
        keys = restart_keys(key, restarts)
        init = {g: p[restart_of] for g, p in restart_starts(spec, keys).items()}
        perms = _align_batch(frozen, a, b, keys, max_sweeps, solver, restart_of, init)
        perms = jax.tree.map(lambda p: p.reshape(restarts, n_pairs, -1).swapaxes(0, 1), perms)
    score = partial(matching_objective, spec)
    objective = jax.vmap(jax.vmap(score, (None, None, 0)))(buyer_flat, seller_flat, perms)
    if keep_all:
        return perms, objective
    best = jnp.argmax(jnp.where(jnp.isnan(objective), -jnp.inf, objective), axis=1)
    return jax.tree.map(lambda p: jnp.take_along_axis(p, best[:, None, None], 1)[:, 0], perms)


def _reference_perms(
    frozen: Frozen,
    flat,
    reference,
    key,
    max_sweeps,
    solver="auto",
    restarts: int = 1,
    batch_size: int | None = None,
    ranked: bool = False,
):
    """Every agent of a flat (N, ...) population aligned to agent ``reference``.

    Returns:
        name -> (N, size) int32 perms (agent j's units into the reference's basis; the
        identity for the reference itself), restarts chosen by objective; with ``ranked``
        name -> (N, R, size): every agent's R restarts sorted by decreasing objective
        (stable: ties keep restart order), so rank 0 is the objective's choice.
    """
    spec = thaw(frozen)
    ref = take(flat, jnp.asarray(reference, jnp.int32))
    ids = jnp.arange(jax.tree.leaves(flat)[0].shape[0], dtype=jnp.int32)

    def chunk(rows):
        buyers = jax.tree.map(lambda x: jnp.broadcast_to(x, (rows.shape[0], *x.shape)), ref)
        out = _align_restarts(
            frozen, buyers, take(flat, rows), key, max_sweeps, solver, restarts, ranked
        )
        if not ranked:
            return out
        perms, objective = out
        objective = jnp.where(jnp.isnan(objective), -jnp.inf, objective)
        rank = jnp.argsort(-objective, axis=1, stable=True)
        return jax.tree.map(lambda p: jnp.take_along_axis(p, rank[..., None], 1), perms)

    perms = map_chunks(chunk, ids, batch_size)
    is_ref = ids == reference
    return {
        g: jnp.where(is_ref.reshape(-1, *(1,) * (p.ndim - 1)), jnp.arange(spec.sizes[g]), p)
        for g, p in perms.items()
    }


def compose(
    buyer_to_ref: Mapping[str, jax.Array], seller_to_ref: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Perms of the seller's units into the buyer's basis, through a shared reference basis.

    With the repo's convention (``perm[k]`` is the unit of the original model that goes to
    position k; :func:`~paramarket_jax.models.spec.permute_param`), ``P_b`` and ``P_s``
    aligning buyer and seller to the reference give ``Q = P_s o inverse(P_b)``, i.e.
    ``Q[m] = P_s[inverse(P_b)[m]]``: seller unit ``Q[m]`` sits on the reference unit that
    buyer unit m sits on. ``aligned(spec, Q, seller)`` is the seller in the buyer's basis.

    Args:
        buyer_to_ref: name -> (..., size) int perms of the buyer(s), e.g. from
            :func:`align_to_reference`.
        seller_to_ref: name -> (..., size) int perms of the seller(s); leading axes
            broadcast against the buyers'.

    Returns:
        name -> (..., size) int32 perms.
    """
    out = {}
    for g, pb in buyer_to_ref.items():
        ps = seller_to_ref[g]
        shape = jnp.broadcast_shapes(pb.shape, ps.shape)
        inv = jnp.argsort(jnp.broadcast_to(pb, shape), axis=-1)
        out[g] = jnp.take_along_axis(jnp.broadcast_to(ps, shape), inv, axis=-1).astype(jnp.int32)
    return out


def align_to_reference(
    spec: PermutationSpec,
    pop_params,
    reference: int | jax.Array,
    key: jax.Array,
    max_sweeps: int | jax.Array = 100,
    *,
    restarts: int = 1,
    batch_size: int | None = None,
    backend: str = "auto",
) -> dict[str, jax.Array]:
    """Every agent aligned once to a shared reference agent (N alignments, not N * K).

    Row j aligns agent j (the seller) to agent ``reference`` (the buyer): the perms of
    ``align(spec, ref, agent_j, key)``; the reference's own row is the identity. The perms
    of any pair follow by :func:`compose`. Jittable and vmappable (``reference``, ``key``
    and ``max_sweeps`` may be traced).

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, every leaf with a leading axis N.
        reference: int32 scalar, the reference agent.
        key: drives the group orders (restart r > 0 uses ``fold_in(key, r)``).
        max_sweeps: most sweeps over all groups.
        restarts: R >= 1 weight matchings per agent (static, see :func:`align_pairs`);
            each agent keeps the one with the best :func:`matching_objective`.
        batch_size: align at most this many agents at a time; None aligns all together.
        backend: ``auto``, ``optax`` or ``callback`` (see :func:`align`).

    Returns:
        name -> (N, size) int32 perms of every agent's units into the reference's basis.
    """
    if backend not in SOLVERS:
        raise unknown("alignment backend", backend, SOLVERS)
    restarts = check_restarts(restarts)
    return _reference_jit(
        freeze(spec),
        flatten(pop_params),
        jnp.asarray(reference, jnp.int32),
        key,
        jnp.asarray(max_sweeps, jnp.int32),
        backend,
        restarts,
        batch_size,
    )


_reference_jit = jax.jit(_reference_perms, static_argnums=(0, 5, 6, 7))


def check_restarts(restarts) -> int:
    """``restarts`` as a Python int >= 1 (it is static: a shape), else ParamarketError."""
    if isinstance(restarts, bool) or not isinstance(restarts, int | np.integer) or restarts < 1:
        raise ParamarketError(f"restarts must be an integer >= 1, got {restarts!r}")
    return int(restarts)


def _align_one(frozen: Frozen, buyer_flat, seller_flat, key, max_sweeps, solver="auto", restarts=1):
    a, b = (jax.tree.map(lambda x: x[None], p) for p in (buyer_flat, seller_flat))
    perms = _align_restarts(frozen, a, b, key, max_sweeps, solver, restarts)
    return {g: p[0] for g, p in perms.items()}


_align_one_jit = jax.jit(_align_one, static_argnums=(0, 5, 6))


def _align_scipy(spec, buyer_params, seller_params, key, max_sweeps):
    """Host loop of :func:`align` with scipy's ``linear_sum_assignment`` (not jittable); a
    head set is solved in two levels on the host (:func:`_solve_heads_host`)."""
    frozen = freeze(spec)
    units = descent_units(spec)
    a = flatten(buyer_params)
    b = flatten(seller_params)
    perms = identity_perms(spec)
    for count in range(int(max_sweeps)):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, count), len(units)))
        changed = False
        for t in order:
            unit = units[int(t)]
            sims = [np.asarray(_similarity_jit(frozen, g, a, b, perms)) for g in unit]
            if spec.grouped and unit[0] in spec.blocks:
                new = _solve_heads_host(sims, [spec.heads(g) for g in unit])
            else:
                new = [_scipy_lsa()(sims[0], maximize=True)[1].astype(np.int32)]
            old = [np.asarray(perms[g]) for g in unit]

            def score(ps, sims=sims):
                return sum(m[np.arange(m.shape[0]), p].sum() for m, p in zip(sims, ps, strict=True))

            old_score, new_score = score(old), score(new)
            if new_score > old_score + RTOL * max(abs(old_score), abs(new_score)):
                perms = {**perms, **{g: jnp.asarray(p) for g, p in zip(unit, new, strict=True)}}
                changed = True
        if not changed:
            break
    return perms


def _solve_heads_host(sims, shapes) -> list[np.ndarray]:
    """:func:`solve_heads` on the host: a scipy solve per (buyer head, seller head) pair and
    group, then one over heads."""
    inner, cost = [], 0.0
    for sim, (h, d) in zip(sims, shapes, strict=True):
        blocks = sim.reshape(h, d, h, d).transpose(0, 2, 1, 3)
        p = np.empty((h, h, d), np.int64)
        for i in range(h):
            for j in range(h):
                p[i, j] = _scipy_lsa()(blocks[i, j], maximize=True)[1]
        inner.append(p)
        cost = cost + np.take_along_axis(blocks, p[..., None], -1)[..., 0].sum(-1)
    head = _scipy_lsa()(cost, maximize=True)[1]
    rows = np.arange(shapes[0][0])
    return [
        (head[:, None] * p.shape[-1] + p[rows, head]).reshape(-1).astype(np.int32) for p in inner
    ]


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
    backend: str = "auto",
    restarts: int = 1,
) -> dict[str, jax.Array]:
    """Permutations that align the seller's hidden units to the buyer's (weight matching).

    Coordinate descent over the permutation groups, in an order drawn from
    ``fold_in(key, sweep)`` each sweep; each step solves the group's exact linear assignment
    on the similarity of every parameter it touches (the other groups' current
    permutations applied); it stops after a sweep that improves nothing, or ``max_sweeps``.

    Every backend but ``scipy`` is traceable (jit, vmap; ``max_sweeps`` may be traced);
    under a vmap with a batched ``key`` every step evaluates all groups, so prefer
    :func:`align_pairs` for many pairs. ``backend="scipy"`` is a host loop for comparison.

    Args:
        spec: the model's permutation spec.
        buyer_params: the buyer's parameter pytree (no population axis).
        seller_params: the seller's parameter pytree, same structure.
        key: drives the order of the groups in each sweep.
        max_sweeps: most sweeps over all groups (the paper's code: 300).
        backend: ``auto`` (jittable; each step's assignment solved by scipy through a
            callback where the computation is lowered for CPU, by optax's Hungarian
            elsewhere), ``optax`` or ``callback`` (jittable, that solver on every
            platform; see :func:`hungarian`), or ``scipy`` (host loop). All give the same
            perms when no assignment has ties.
        restarts: R >= 1 descents (static; jitted backends only): restart 0 as above, the
            others from random starts with their own group orders (see
            :func:`align_pairs`); the best :func:`matching_objective` is kept.

    Returns:
        name -> (size,) int32 perms; ``apply_permutation(spec, perms, seller_params)`` is the
        seller's model (same function) in the buyer's basis.
    """
    restarts = check_restarts(restarts)
    if backend == "scipy":
        if restarts > 1:
            raise ParamarketError("backend 'scipy' aligns with one restart only")
        return _align_scipy(spec, buyer_params, seller_params, key, max_sweeps)
    if backend not in SOLVERS:
        raise unknown("alignment backend", backend, BACKENDS)
    sweeps = jnp.asarray(max_sweeps, jnp.int32)
    a, b = flatten(buyer_params), flatten(seller_params)
    return _align_one_jit(freeze(spec), a, b, key, sweeps, backend, restarts)


def align_pairs(
    spec: PermutationSpec,
    pop_params,
    buyers: jax.Array,
    sellers: jax.Array,
    key: jax.Array,
    max_sweeps: int | jax.Array = 100,
    *,
    batch_size: int | None = None,
    backend: str = "auto",
    restarts: int = 1,
    reference: int | jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Align seller ``sellers[p]`` to buyer ``buyers[p]`` for every candidate pair at once.

    One jittable call (every backend but ``scipy``): pairs are vmapped and share the group
    order of each sweep (drawn from ``key``), so pair p gets the perms of
    ``align(spec, buyer, seller, key)`` up to float round-off in near-ties.

    With ``reference`` the pairs are not matched directly: every agent is aligned once to
    agent ``reference`` (:func:`align_to_reference`) and pair p gets
    ``compose(P[buyers[p]], P[sellers[p]])``.

    Args:
        spec: the model's permutation spec.
        pop_params: population parameter pytree, every leaf with a leading axis N.
        buyers: (P,) int buyer index of each pair.
        sellers: (P,) int seller index of each pair.
        key: drives the group order of each sweep.
        max_sweeps: most sweeps over all groups.
        batch_size: align at most this many pairs (or agents, with ``reference``) at a
            time (``lax.map`` over chunks) to bound memory; None aligns all together.
        backend: ``auto``, ``optax`` or ``callback`` (jittable; see :func:`align`), or
            ``scipy`` for a host loop over pairs (not jittable; one restart, no reference).
        restarts: R >= 1 weight matchings per alignment (static), all in one batched
            descent: restart 0 is plain weight matching (identity start, ``key``'s group
            orders), restart r > 0 starts from random perms and draws its group orders
            from ``fold_in(key, r)`` (:func:`restart_keys`, :func:`restart_starts`); each
            alignment keeps the restart with the best :func:`matching_objective`. R = 1 is
            plain weight matching, bit for bit.
        reference: None (pairwise matching) or an int32 scalar agent index (may be traced).

    Returns:
        name -> (P, size) int32 perms; vmap :func:`aligned` over pairs to permute sellers.
    """
    restarts = check_restarts(restarts)
    if backend == "scipy" and (restarts > 1 or reference is not None):
        raise ParamarketError("backend 'scipy' aligns pairwise with one restart only")
    if reference is not None:
        if backend not in SOLVERS:
            raise unknown("alignment backend", backend, BACKENDS)
        to_ref = align_to_reference(
            spec, pop_params, reference, key, max_sweeps,
            restarts=restarts, batch_size=batch_size, backend=backend,
        )  # fmt: skip
        b, s = (jnp.asarray(i, jnp.int32) for i in (buyers, sellers))
        return compose(take(to_ref, b), take(to_ref, s))
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
    if backend not in SOLVERS:
        raise unknown("alignment backend", backend, BACKENDS)
    idx = (jnp.asarray(buyers, jnp.int32), jnp.asarray(sellers, jnp.int32))
    sweeps = jnp.asarray(max_sweeps, jnp.int32)
    flat = flatten(pop_params)
    return _align_pairs_jit(freeze(spec), flat, idx, key, sweeps, batch_size, backend, restarts)


def _align_pairs(frozen: Frozen, flat, idx, key, max_sweeps, batch_size, solver="auto", restarts=1):
    def chunk(pair_idx):
        b, s = pair_idx
        a = jax.tree.map(lambda x: x[b], flat)
        c = jax.tree.map(lambda x: x[s], flat)
        return _align_restarts(frozen, a, c, key, max_sweeps, solver, restarts)

    return map_chunks(chunk, idx, batch_size)


_align_pairs_jit = jax.jit(_align_pairs, static_argnums=(0, 5, 6, 7))


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
    backend: str = "auto",
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
