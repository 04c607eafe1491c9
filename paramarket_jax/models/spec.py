"""Permutation specs: which hidden-unit permutation acts on each axis of each parameter.

After Ainsworth, Hayase and Srinivasa, "Git Re-Basin" (ICLR 2023), `weight_matching.py`:
a network is described declaratively so that alignment and merging work for any model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from paramarket_jax.errors import ParamarketError

SEP = "/"


class PermutationSpec(NamedTuple):
    """Permutation structure of a parameter pytree.

    Attributes:
        axes: flat parameter path (``"params/Dense_0/kernel"``) -> one entry per array axis,
            the name of the permutation acting on that axis or None.
        sizes: permutation name -> number of units it permutes.
        blocks: the groups that permute attention heads and the units inside each head:
            group name -> (head set, d_head). Such a group names two adjacent axes of a
            parameter, (heads, d_head), and permutes them as one flattened axis of
            ``heads * d_head`` units (its size) by a *blocked* permutation: whole heads
            move, then units inside each head, ``perm[h * d_head + k] = H[h] * d_head +
            I[h, k]``. Every group of one head set moves its heads by the same ``H`` (a
            block's query and key share one inner permutation, its value and output
            another, and both follow the head permutation). Blocked permutations are
            permutations of their flattened axis, so applying, inverting and composing
            them is the same as for any group; :func:`random_perms` draws blocked ones and
            weight matching solves them in two levels
            (:mod:`~paramarket_jax.broker.align`). Empty for models without attention.
        grouped: whether weight matching keeps the blocked groups blocked (True; heads as
            units) or solves each as one ordinary group of ``heads * d_head`` units, mixing
            units across heads as a per-matrix matcher does (False; ``broker.heads =
            "flat"``, :meth:`unblocked`). Applying permutations does not depend on it.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    sizes: Mapping[str, int]
    blocks: Mapping[str, tuple[str, int]] = MappingProxyType({})
    grouped: bool = True

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> every (parameter path, axis) it acts on (for a blocked group,
        the first of its two axes)."""
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.sizes}
        for path, names in self.axes.items():
            for axis, name in _named_axes(self, names):
                out[name].append((path, axis))
        return out

    @property
    def head_sets(self) -> dict[str, tuple[str, ...]]:
        """Head set -> its blocked groups (sorted), for :attr:`blocks`."""
        out: dict[str, list[str]] = {}
        for group, (head_set, _) in sorted(self.blocks.items()):
            out.setdefault(head_set, []).append(group)
        return {s: tuple(g) for s, g in out.items()}

    def heads(self, group: str) -> tuple[int, int]:
        """(heads, d_head) of a blocked group."""
        d_head = self.blocks[group][1]
        return self.sizes[group] // d_head, d_head

    def unblocked(self) -> PermutationSpec:
        """The same spec with every blocked group an ordinary one (``broker.heads = "flat"``:
        weight matching as a per-matrix matcher does it, mixing units across heads)."""
        return self._replace(grouped=False)


def _named_axes(spec: PermutationSpec, names) -> list[tuple[int, str]]:
    """(axis, name) of every permuted axis of one parameter; a blocked group's two axes
    count once, as their first."""
    out = []
    for axis, name in enumerate(names):
        if name is None or (axis > 0 and name in spec.blocks and names[axis - 1] == name):
            continue
        out.append((axis, name))
    return out


def unit_rows(spec: PermutationSpec, group: str, value: jax.Array, axis: int) -> jax.Array:
    """``value`` as (units of ``group``, everything else): its unit axis (or a blocked
    group's two axes, flattened) moved to the front."""
    span = 2 if group in spec.blocks else 1
    moved = jnp.moveaxis(value, tuple(range(axis, axis + span)), tuple(range(span)))
    return moved.reshape(spec.sizes[group], -1)


def flatten(params) -> dict[str, jax.Array]:
    """Nested parameter dict -> flat dict keyed by ``"a/b/c"`` paths."""
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten(flat: Mapping[str, jax.Array]):
    """Inverse of :func:`flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def _matches(path: str, pattern: str) -> bool:
    """A flat path matches a prefix (``params/Dense_0``) or a glob (``*/Dense_[01]/*``).

    Patterns are tried on the full path and on every tail of it that starts at a component
    (the path without its leading collection ``params/``, and so on), so ``Dense_0`` names
    ``params/Dense_0/kernel`` and ``params/Dense_0/bias``, and ``block_1/*`` or ``block_1``
    every parameter of a transformer's ``params/trunk/block_1``.
    """
    parts = path.split(SEP)
    candidates = [SEP.join(parts[i:]) for i in range(len(parts))]
    prefix = pattern.rstrip(SEP) + SEP
    return any(
        c == pattern or c.startswith(prefix) or fnmatch.fnmatchcase(c, pattern) for c in candidates
    )


def select_layers(params, layers: Iterable[str] | None) -> frozenset[str]:
    """Flat parameter paths named by ``layers`` (prefixes or glob patterns; None = all).

    Args:
        params: a parameter pytree (any leading axes).
        layers: patterns such as ``"params/Dense_0"``, ``"Dense_1"`` or ``"*conv*"``.

    Raises:
        ParamarketError: a pattern names no parameter.
    """
    paths = list(flatten(params))
    if layers is None:
        return frozenset(paths)
    if isinstance(layers, str):
        layers = (layers,)
    chosen = set()
    for pattern in layers:
        hit = {p for p in paths if _matches(p, pattern)}
        if not hit:
            raise ParamarketError(
                f"layer pattern {pattern!r} names no parameter; parameters: {', '.join(paths)}"
            )
        chosen |= hit
    return frozenset(chosen)


def identity_perms(spec: PermutationSpec) -> dict[str, jax.Array]:
    """The identity permutation for every group: name -> (size,) int32."""
    return {name: jnp.arange(n, dtype=jnp.int32) for name, n in spec.sizes.items()}


def random_perms(key: jax.Array, spec: PermutationSpec) -> dict[str, jax.Array]:
    """A uniformly random permutation for every group the spec allows.

    Groups are independent, except that the blocked groups of one head set
    (:attr:`PermutationSpec.blocks`) share one random head permutation (drawn from the key
    of the set's first group folded with 1), each with its own random permutations inside
    the heads.
    """
    names = sorted(spec.sizes)
    keys = dict(zip(names, jax.random.split(key, len(names)), strict=True))
    out = {
        name: jax.random.permutation(keys[name], spec.sizes[name]).astype(jnp.int32)
        for name in names
        if name not in spec.blocks
    }
    for groups in spec.head_sets.values():
        heads = spec.heads(groups[0])[0]
        head_perm = jax.random.permutation(jax.random.fold_in(keys[groups[0]], 1), heads)
        for g in groups:
            d_head = spec.heads(g)[1]
            inner = jax.vmap(lambda k, n=d_head: jax.random.permutation(k, n))(
                jax.random.split(keys[g], heads)
            )
            out[g] = blocked(head_perm, inner)
    return {name: out[name] for name in names}


def blocked(head_perm: jax.Array, inner: jax.Array) -> jax.Array:
    """The flattened permutation ``perm[h * d + k] = head_perm[h] * d + inner[h, k]`` of a
    blocked group, from a head permutation (heads,) and one inner permutation per head
    position (heads, d). Broadcasts over leading axes."""
    d = inner.shape[-1]
    return (head_perm[..., None] * d + inner).reshape(*inner.shape[:-2], -1).astype(jnp.int32)


def is_blocked(perm: jax.Array, heads: int) -> jax.Array:
    """True where a flattened permutation (..., heads * d) moves whole heads (keeps every
    head's units together): a bool of the leading shape."""
    d = perm.shape[-1] // heads
    blocks = perm.reshape(*perm.shape[:-1], heads, d) // d
    return (blocks == blocks[..., :1]).all(axis=(-2, -1))


def permute_param(
    spec: PermutationSpec,
    perms: Mapping[str, jax.Array],
    path: str,
    value: jax.Array,
    except_axis: int | None = None,
) -> jax.Array:
    """Apply every permutation of ``path`` (except on ``except_axis``) to one parameter.

    ``perms[name][k]`` is the unit of the *original* model that goes to position ``k``,
    so the permuted parameter is ``value.take(perm, axis)`` on every permuted axis.
    """
    for axis, name in _named_axes(spec, spec.axes[path]):
        if axis == except_axis:
            continue
        if name in spec.blocks:
            shape = value.shape
            joint = value.reshape(*shape[:axis], -1, *shape[axis + 2 :])
            value = jnp.take(joint, perms[name], axis=axis).reshape(shape)
        else:
            value = jnp.take(value, perms[name], axis=axis)
    return value


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, jax.Array], params):
    """Permute every hidden unit of ``params``; the function it computes is unchanged.

    Args:
        spec: the model's permutation spec.
        perms: permutation name -> (size,) int array.
        params: the model's parameter pytree (no leading population axis; vmap for that).
    """
    flat = flatten(params)
    missing = set(flat) - set(spec.axes)
    if missing:
        raise KeyError(f"parameters not covered by the permutation spec: {sorted(missing)}")
    return unflatten({p: permute_param(spec, perms, p, v) for p, v in flat.items()})


def invert(perm: jax.Array) -> jax.Array:
    """Inverse permutation: ``invert(p)[p] == arange``."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def check_spec(spec: PermutationSpec, params) -> None:
    """Raise ValueError if ``spec`` disagrees with ``params`` in paths, ranks or sizes."""
    flat = flatten(params)
    if set(flat) != set(spec.axes):
        raise ValueError(
            f"spec/params mismatch: only in params {sorted(set(flat) - set(spec.axes))}, "
            f"only in spec {sorted(set(spec.axes) - set(flat))}"
        )
    for path, names in spec.axes.items():
        shape = flat[path].shape
        if len(names) != len(shape):
            raise ValueError(f"{path}: spec has {len(names)} axes, parameter has shape {shape}")
        for axis, name in _named_axes(spec, names):
            units = shape[axis]
            if name in spec.blocks:
                heads, d_head = spec.heads(name)
                if names[axis + 1 : axis + 2] != (name,) or shape[axis + 1] != d_head:
                    raise ValueError(
                        f"{path}: blocked group {name} needs two axes (heads, {d_head}), "
                        f"got {names} for shape {shape}"
                    )
                units = heads * d_head if units == heads else -1
            if spec.sizes[name] != units:
                raise ValueError(
                    f"{path}: axis {axis} has {shape[axis]} units, {name} permutes "
                    f"{spec.sizes[name]}"
                )
    for head_set, groups in spec.head_sets.items():
        if len({spec.heads(g)[0] for g in groups}) != 1:
            raise ValueError(f"head set {head_set}: its groups {groups} differ in heads")
