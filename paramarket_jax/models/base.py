"""A model: a Flax module, the input it takes, and its permutation spec."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from paramarket_jax.errors import ParamarketError
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
        fan_in: flat kernel path -> how many of its leading axes are inputs (the rest are
            outputs), for the kernels where that is not ``ndim - 1`` (the transformers'
            query, key and value kernels (d_model, heads, d_head): 1). The default, ``ndim
            - 1``, is right for Dense (in, out), Conv (kh, kw, cin, cout) and the attention
            output (heads, d_head, d_model). See :meth:`fan_in_axes`.
        trainable: ``params -> pytree like params of Python bools``, True where the
            optimizer may update a leaf (:func:`~paramarket_jax.population.make_trainer`
            keeps the others exactly as they are); None: every leaf is trained.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    spec: PermutationSpec
    fan_in: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    trainable: Callable | None = None

    def fan_in_axes(self, path: str, ndim: int) -> int:
        """How many leading axes of the kernel at flat ``path`` (of rank ``ndim``) are its
        inputs: ``fan_in[path]``, else ``ndim - 1``."""
        return int(self.fan_in.get(path, ndim - 1))

    def init(self, key: jax.Array):
        """Parameters of one model from ``key``."""
        return self.module.init(key, jnp.zeros((1, *self.input_shape), jnp.float32))

    def apply(self, params, x: jax.Array) -> jax.Array:
        """Logits (B, num_classes) for inputs (B, *input_shape); (B, T, num_classes) for a
        model with one target per position."""
        return self.module.apply(params, x)

    def losses(self, params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-example (loss, correct), each (B,) float32 (:func:`example_losses`)."""
        return example_losses(self.apply(params, x), y)

    @property
    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def example_losses(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy and correctness of every example: the one loss of training,
    valuation and evaluation.

    Args:
        logits: (B, K) for one target per example, or (B, T, K) for one per position
            (next-token language modelling).
        y: (B,) or (B, T) int targets; a negative target (a padded position) counts in
            neither the loss nor the accuracy.

    Returns:
        (loss, correct), each (B,) float32: per example, the mean over its counted
        positions (0 where none counts).
    """
    counted = y >= 0
    target = jnp.where(counted, y, 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    correct = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
    if y.ndim == 1:
        return jnp.where(counted, loss, 0.0), jnp.where(counted, correct, 0.0)
    weight = counted.astype(jnp.float32)
    total = jnp.maximum(weight.sum(-1), 1.0)
    return (loss * weight).sum(-1) / total, (correct * weight).sum(-1) / total


# ---- option checks: bad model options are user input (scenario keys ``model.<option>``) ----

MAX_UNITS = 1 << 16  # most units (widths, channels) of one layer
MAX_PARAMS = 1 << 30  # most parameters of one model (4 GiB of float32 per agent and copy)
# most layers a list option names (model.widths, model.channels): compiling takes longer with
# each (32 layers of 4 units: a minute more than 4; 300: over ten minutes)
MAX_LAYERS = 64


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def option_error(model: str, option: str, allowed: str, value) -> ParamarketError:
    """``scenario key 'model.<option>' must be <allowed> for model '<model>', got <value>``."""
    shown = repr(_shown(value))
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return ParamarketError(
        f"scenario key 'model.{option}' must be {allowed} for model {model!r}, got {shown}"
    )


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def int_option(model: str, option: str, value, low: int = 1, high: int = MAX_UNITS) -> int:
    """The integer option ``value``, checked to lie in [low, high]."""
    if not (_is_int(value) and low <= value <= high):
        raise option_error(model, option, f"an integer in [{low}, {high}]", value)
    return int(value)


def ints_option(model: str, option: str, value, low: int = 1, high: int = MAX_UNITS) -> tuple:
    """The option ``value``: a non-empty list of at most ``MAX_LAYERS`` integers in
    [low, high] (one per layer), as a tuple."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > MAX_LAYERS:
        raise ParamarketError(
            f"scenario key 'model.{option}' takes at most {MAX_LAYERS} layers for model "
            f"{model!r} (compiling takes longer with each), got {len(value)}"
        )
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(_is_int(v) and low <= v <= high for v in value)
    )
    if not ok:
        raise option_error(model, option, f"a non-empty list of integers in [{low}, {high}]", value)
    return tuple(int(v) for v in value)


def build(
    name: str,
    module: nn.Module,
    input_shape,
    num_classes: int,
    axes: dict[str, tuple],
    blocks: dict[str, tuple[str, int]] | None = None,
    fan_in: Mapping[str, int] | None = None,
) -> Model:
    """Make a :class:`Model`, reading permutation sizes off the initialised shapes.

    ``blocks`` names the blocked groups (heads then units inside each head; see
    :class:`~paramarket_jax.models.spec.PermutationSpec`): group -> (head set, d_head).
    ``fan_in``: :attr:`Model.fan_in` (kernel path -> leading input axes, where not
    ``ndim - 1``).

    Raises:
        ParamarketError: the model would have more than ``MAX_PARAMS`` parameters.
    """
    input_shape = tuple(int(d) for d in input_shape)
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, *input_shape), jnp.float32)), jax.random.key(0)
    )
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    if n_params > MAX_PARAMS:
        raise ParamarketError(
            f"model {name!r} would have {n_params} parameters for inputs {input_shape}, more "
            f"than {MAX_PARAMS}; choose smaller model options"
        )
    flat = flatten(shapes)
    blocks = dict(blocks or {})
    sizes: dict[str, int] = {}
    for path, names in axes.items():
        for axis, perm in enumerate(names):
            if perm is not None:
                units = flat[path].shape[axis] * (blocks[perm][1] if perm in blocks else 1)
                sizes.setdefault(perm, units)
    spec = PermutationSpec(axes=dict(axes), sizes=sizes)
    if blocks:
        spec = spec._replace(blocks=MappingProxyType(blocks))
    check_spec(spec, shapes)
    unknown_paths = sorted(set(fan_in or {}) - set(flat))
    if unknown_paths:
        raise ValueError(f"fan_in names parameters the model lacks: {unknown_paths}")
    fan = MappingProxyType(dict(fan_in or {}))
    return Model(name, module, input_shape, num_classes, spec, fan_in=fan)
