"""Permutation specs: which hidden-unit permutation acts on each axis of each parameter.

After Ainsworth, Hayase and Srinivasa, "Git Re-Basin" (ICLR 2023), `weight_matching.py`:
a network is described declaratively so that alignment and merging work for any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

SEP = "/"


class PermutationSpec(NamedTuple):
    """Permutation structure of a parameter pytree.

    Attributes:
        axes: flat parameter path (``"params/Dense_0/kernel"``) -> one entry per array axis,
            the name of the permutation acting on that axis or None.
        sizes: permutation name -> number of units it permutes.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    sizes: Mapping[str, int]

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> every (parameter path, axis) it acts on."""
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.sizes}
        for path, names in self.axes.items():
            for axis, name in enumerate(names):
                if name is not None:
                    out[name].append((path, axis))
        return out


def flatten(params) -> dict[str, jax.Array]:
    """Nested parameter dict -> flat dict keyed by ``"a/b/c"`` paths."""
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten(flat: Mapping[str, jax.Array]):
    """Inverse of :func:`flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def identity_perms(spec: PermutationSpec) -> dict[str, jax.Array]:
    """The identity permutation for every group: name -> (size,) int32."""
    return {name: jnp.arange(n, dtype=jnp.int32) for name, n in spec.sizes.items()}


def random_perms(key: jax.Array, spec: PermutationSpec) -> dict[str, jax.Array]:
    """An independent uniformly random permutation for every group."""
    names = sorted(spec.sizes)
    keys = jax.random.split(key, len(names))
    return {
        name: jax.random.permutation(k, spec.sizes[name]).astype(jnp.int32)
        for name, k in zip(names, keys, strict=True)
    }


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
    for axis, name in enumerate(spec.axes[path]):
        if name is not None and axis != except_axis:
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
        for axis, name in enumerate(names):
            if name is not None and spec.sizes[name] != shape[axis]:
                raise ValueError(
                    f"{path}: axis {axis} has {shape[axis]} units, {name} permutes "
                    f"{spec.sizes[name]}"
                )
