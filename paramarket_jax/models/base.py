"""A model: a Flax module, the input it takes, and its permutation spec."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from paramarket_jax.models.spec import PermutationSpec, check_spec, flatten


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A classifier and the permutation structure of its parameters.

    Attributes:
        name: registry name (``mlp``, ``cnn``, ``wrn``).
        module: the Flax module; ``module.apply(params, x)`` maps (B, *input_shape) to
            (B, num_classes) logits.
        input_shape: shape of one example.
        num_classes: number of output classes.
        spec: the permutation spec of ``init``'s parameter pytree.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    spec: PermutationSpec

    def init(self, key: jax.Array):
        """Parameters of one model from ``key``."""
        return self.module.init(key, jnp.zeros((1, *self.input_shape), jnp.float32))

    def apply(self, params, x: jax.Array) -> jax.Array:
        """Logits (B, num_classes) for inputs (B, *input_shape)."""
        return self.module.apply(params, x)

    @property
    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return sum(int(jnp.prod(jnp.array(s.shape))) for s in jax.tree.leaves(shapes))


def build(
    name: str, module: nn.Module, input_shape, num_classes: int, axes: dict[str, tuple]
) -> Model:
    """Make a :class:`Model`, reading permutation sizes off the initialised shapes."""
    input_shape = tuple(int(d) for d in input_shape)
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, *input_shape), jnp.float32)), jax.random.key(0)
    )
    flat = flatten(shapes)
    sizes: dict[str, int] = {}
    for path, names in axes.items():
        for axis, perm in enumerate(names):
            if perm is not None:
                sizes.setdefault(perm, flat[path].shape[axis])
    spec = PermutationSpec(axes=dict(axes), sizes=sizes)
    check_spec(spec, shapes)
    return Model(name, module, input_shape, num_classes, spec)
