"""Merge methods beyond linear interpolation, by the names mergekit gives them.

Every agent fine-tuned one shared pretrained ``base``, so each holds a *task vector*
``tau = theta - base``; the methods combine the buyer's and the seller's parameters (or
task vectors) leaf by leaf. ``w`` is the seller's weight on a leaf (one scalar, or one per
layer, see :func:`layer_names`); ``tb = b - base`` and ``ts = s - base``.

- ``linear``: ``b + w (s - b)``, bit for bit :func:`~paramarket_jax.broker.merge.merge`.
- ``task_arithmetic`` (Ilharco et al., ICLR 2023): ``b + w ts``, the buyer keeps its own
  task vector and adds ``w`` times the seller's.
- ``ties`` (Yadav et al., NeurIPS 2023): trim ``tb`` and ``ts`` to their top-``density``
  magnitudes within each tensor, elect a sign per entry (the sign of the trimmed sum),
  average the trimmed entries that carry the elected sign (the disjoint mean ``tau_m``);
  ``base + w tau_m``.
- ``dare`` (Yu et al., ICML 2024; mergekit's ``dare_linear`` without a buyer term):
  ``b + w drop(ts)``, where ``drop`` keeps every entry with probability ``1 - p`` and
  rescales the kept ones by ``1 / (1 - p)``, so ``E[drop(t)] = t``.
- ``dare_ties``: ``drop`` both task vectors (independent keys), then sign election and
  disjoint mean as ``ties`` (no trim); ``base + w tau_m``.
- ``fisher`` (Matena and Raffel, NeurIPS 2022): ``((1-w) Fb b + w Fs s) / ((1-w) Fb + w
  Fs)`` with the diagonal Fisher informations (:func:`diagonal_fisher`) plus ``1e-8``.

Every method is a pure function of traced values (weight, second knob, key), so a merge
jits and vmaps over weight grids, densities or keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.broker.merge import select_layers
from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.spec import SEP, flatten, unflatten

FISHER_EPS = 1e-8  # added to both Fisher informations: no 0 / 0 where neither is informed


class MergeMethod(NamedTuple):
    """One merge method: its knobs, what it needs, and its leaf kernel.

    Attributes:
        name: the registry name (mergekit's).
        second: the method's second knob besides the weight: ``""`` (none), ``"density"``
            (ties: the fraction of each task vector kept by magnitude) or ``"drop"`` (dare,
            dare_ties: the probability of dropping each entry).
        needs_base: the method reads the shared pretrained base (task vectors).
        needs_fisher: the method reads the two diagonal Fisher informations.
        leaf: ``(b, s, base, weight, second, key, fb, fs) -> merged leaf`` of ``b``'s
            shape and dtype; ``weight`` and ``second`` are scalars, ``key`` the leaf's key,
            and the arguments a method does not need may be None.
    """

    name: str
    second: str
    needs_base: bool
    needs_fisher: bool
    leaf: Callable

    @property
    def needs_key(self) -> bool:
        """The method draws random masks (its second knob is a drop rate)."""
        return self.second == "drop"

    def kept(self, second) -> jax.Array:
        """Fraction of a task vector's entries that survive (traced ``second`` is fine).

        ``ties``: the density (clipped to [0, 1]; the trim keeps at least one entry and may
        keep a few more at a tied threshold); ``dare``, ``dare_ties``: ``1 - p`` (the
        expected fraction, p clipped to [0, 1]); every other method: 1.
        """
        x = jnp.asarray(second, jnp.float32)
        if self.second == "density":
            return jnp.clip(x, 0.0, 1.0)
        if self.second == "drop":
            return 1.0 - _drop_rate(x)
        return jnp.ones_like(x)


def _weight(w, dtype) -> jax.Array:
    return jnp.asarray(w, dtype)


def _drop_rate(p) -> jax.Array:
    """The drop rate clipped to [0, 1] (float32); p = 1 drops every entry."""
    return jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)


def trim(t: jax.Array, density) -> jax.Array:
    """``t`` with all but its ``k`` largest magnitudes zeroed, ``k = clip(ceil(density *
    size), 1, size)`` (TIES's trim; ``density`` may be traced).

    The threshold is the k-th largest magnitude and every entry at or above it is kept, so
    entries tied at the threshold may keep a few more than ``k``.
    """
    n = t.size
    if n == 0:
        return t
    d = jnp.asarray(density, jnp.float32)
    k = jnp.clip(jnp.ceil(d * n), 1, n).astype(jnp.int32)
    mag = jnp.abs(t)
    threshold = jnp.sort(mag.ravel())[n - k]
    return jnp.where(mag >= threshold, t, jnp.zeros_like(t))


def drop(t: jax.Array, p, key: jax.Array) -> jax.Array:
    """DARE's drop and rescale: each entry kept with probability ``q = 1 - p`` (a
    ``jax.random.bernoulli(key, q, t.shape)`` mask, ``q`` float32) and divided by ``q``.

    ``p`` is clipped to [0, 1]. At ``p = 0`` the result is exactly ``t`` (no division); at
    ``p = 1`` it is all zeros (no division by zero).
    """
    p = _drop_rate(p)
    q = 1.0 - p
    keep = jax.random.bernoulli(key, q, t.shape)
    safe_q = jnp.where(q > 0, q, 1.0).astype(t.dtype)
    dropped = jnp.where(keep, t / safe_q, jnp.zeros_like(t))
    return jnp.where(p > 0, dropped, t)


def disjoint_mean(ta: jax.Array, tb: jax.Array) -> jax.Array:
    """TIES's sign election and disjoint mean of two task vectors.

    The elected sign of an entry is ``sign(ta + tb)``; the result is the mean of the
    nonzero entries whose sign is the elected one, 0 where none is (both zero, or equal
    and opposite).
    """
    elected = jnp.sign(ta + tb)
    total = jnp.zeros_like(ta)
    count = jnp.zeros_like(ta)
    for t in (ta, tb):
        agree = (jnp.sign(t) == elected) & (t != 0)
        total = total + jnp.where(agree, t, jnp.zeros_like(t))
        count = count + agree.astype(t.dtype)
    return total / jnp.maximum(count, 1)


def _linear(b, s, base, w, second, key, fb, fs):
    a = _weight(w, b.dtype)
    return b + a * (s - b)


def _task_arithmetic(b, s, base, w, second, key, fb, fs):
    return b + _weight(w, b.dtype) * (s - base)


def _ties(b, s, base, w, second, key, fb, fs):
    tau = disjoint_mean(trim(b - base, second), trim(s - base, second))
    return base + _weight(w, b.dtype) * tau


def _dare(b, s, base, w, second, key, fb, fs):
    return b + _weight(w, b.dtype) * drop(s - base, second, key)


def _dare_ties(b, s, base, w, second, key, fb, fs):
    tb = drop(b - base, second, jax.random.fold_in(key, 0))
    ts = drop(s - base, second, jax.random.fold_in(key, 1))
    return base + _weight(w, b.dtype) * disjoint_mean(tb, ts)


def _fisher(b, s, base, w, second, key, fb, fs):
    a = _weight(w, b.dtype)
    f_b = (fb + FISHER_EPS).astype(b.dtype) * (1 - a)
    f_s = (fs + FISHER_EPS).astype(b.dtype) * a
    return (f_b * b + f_s * s) / (f_b + f_s)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", "", False, False, _linear),
        MergeMethod("task_arithmetic", "", True, False, _task_arithmetic),
        MergeMethod("ties", "density", True, False, _ties),
        MergeMethod("dare", "drop", True, False, _dare),
        MergeMethod("dare_ties", "drop", True, False, _dare_ties),
        MergeMethod("fisher", "", False, True, _fisher),
    )
}


def get_method(name: str) -> MergeMethod:
    """The merge method called ``name``.

    Raises:
        ParamarketError: no method has that name.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise unknown("merge method", name, METHODS) from None


def _layer_of(path: str) -> str:
    """A leaf's layer: its flat path without the last component (``""`` at top level)."""
    return path.rpartition(SEP)[0]


def layer_names(params, layers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The distinct layers (``params/Dense_0`` for ``params/Dense_0/kernel``) among the
    leaves ``layers`` chooses, sorted: the order of a per-layer weight vector.

    Args:
        params: a parameter pytree.
        layers: prefix or glob patterns (:func:`~paramarket_jax.broker.merge.select_layers`);
            None chooses every leaf.
    """
    return tuple(sorted({_layer_of(p) for p in select_layers(params, layers)}))


def _check_paths(what: str, flat: dict, paths) -> None:
    missing = [p for p in sorted(paths) if p not in flat]
    if missing:
        raise ParamarketError(f"{what} lacks parameter(s) {', '.join(missing)}")


def merge_with(
    method: str | MergeMethod,
    buyer,
    seller,
    weight,
    *,
    base=None,
    second=0.0,
    key: jax.Array | None = None,
    fisher=None,
    layers: Sequence[str] | None = None,
):
    """Merge the seller into the buyer by ``method`` on the chosen layers.

    Args:
        method: a name of :data:`METHODS` or a :class:`MergeMethod`.
        buyer: the buyer's parameter pytree (one model, no leading axis).
        seller: the seller's, aligned to the buyer.
        weight: the seller's weight: a scalar, or an (L,) array with one weight per entry
            of ``layer_names(buyer, layers)``; traced is fine.
        base: the shared pretrained parameters (every method but linear and fisher).
        second: the second knob, scalar (traced is fine): the density for ties, the drop
            rate p for dare and dare_ties; ignored by the others.
        key: a JAX key (dare and dare_ties). Leaf ``i`` of the buyer's sorted flat paths
            (all leaves, chosen or not, so a leaf's mask does not depend on ``layers``)
            uses ``fold_in(key, i)``; dare_ties drops the buyer's and the seller's task
            vectors with ``fold_in`` of that by 0 and 1.
        fisher: ``(fb, fs)``, the buyer's and the seller's diagonal Fisher pytrees
            (fisher only; :func:`diagonal_fisher`).
        layers: prefix or glob patterns of the traded layers; None trades all of them.

    Returns:
        A parameter pytree like ``buyer``; the leaves not chosen are the buyer's own.

    Raises:
        ParamarketError: an unknown method, a missing base, key or fisher, a weight vector
            of the wrong length, or a pytree lacking a traded parameter.
    """
    m = get_method(method) if isinstance(method, str) else method
    if m.needs_base and base is None:
        raise ParamarketError(f"merge method {m.name!r} needs the shared base parameters (base=)")
    if m.needs_key and key is None:
        raise ParamarketError(f"merge method {m.name!r} needs a random key (key=)")
    if m.needs_fisher and fisher is None:
        raise ParamarketError(f"merge method {m.name!r} needs the Fisher pair (fisher=(fb, fs))")

    chosen = select_layers(buyer, layers)
    names = layer_names(buyer, layers)
    ndim = jnp.ndim(weight)
    if ndim > 1:
        raise ParamarketError(
            f"weight must be a scalar or a (layers,) vector, got shape {jnp.shape(weight)}"
        )
    if ndim == 1 and jnp.shape(weight)[0] != len(names):
        raise ParamarketError(
            f"weight vector has {jnp.shape(weight)[0]} entries but the merge trades "
            f"{len(names)} layer(s): {', '.join(names)}"
        )
    w = weight if ndim == 0 else jnp.asarray(weight)  # a scalar as given: merge's casts
    index = {n: i for i, n in enumerate(names)}

    b = flatten(buyer)
    s = flatten(seller)
    _check_paths("seller", s, chosen)
    z = flatten(base) if m.needs_base else {}
    if m.needs_base:
        _check_paths("base", z, chosen)
    fb, fs = (flatten(fisher[0]), flatten(fisher[1])) if m.needs_fisher else ({}, {})
    if m.needs_fisher:
        _check_paths("buyer's Fisher", fb, chosen)
        _check_paths("seller's Fisher", fs, chosen)

    out = {}
    for i, path in enumerate(sorted(b)):
        x = b[path]
        if path not in chosen:
            out[path] = x
            continue
        w_leaf = w if ndim == 0 else w[index[_layer_of(path)]]
        leaf_key = jax.random.fold_in(key, i) if m.needs_key else None
        out[path] = m.leaf(
            x, s[path], z.get(path), w_leaf, second, leaf_key, fb.get(path), fs.get(path)
        )
    return unflatten(out)


def diagonal_fisher(losses_fn: Callable, params, x: jax.Array, y: jax.Array):
    """Empirical diagonal Fisher information: the mean over the examples of the squared
    per-example gradient of the loss.

    Args:
        losses_fn: ``(params, x, y) -> (B,)`` per-example losses, e.g.
            ``lambda p, x, y: model.losses(p, x, y)[0]``.
        params: the parameter pytree at which to take the gradients.
        x: (m, ...) inputs.
        y: (m, ...) targets.

    Returns:
        A pytree like ``params``: ``mean_i (d loss_i / d theta)^2``, the per-example
        gradients vmapped over the m examples (memory m times the parameters).
    """

    def one(p, xi, yi):
        return losses_fn(p, xi[None], yi[None])[0]

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)
