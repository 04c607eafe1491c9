"""Multi-layer perceptron; the paper's MNIST model is 784-32-32-32-16-10."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from paramarket_jax.models.base import Model, build, ints_option, option_error

PAPER_WIDTHS = (32, 32, 32, 16)
PRESETS = {"paper": PAPER_WIDTHS, "paper_cifar": (256, 256, 256, 128)}


class MLP(nn.Module):
    """ReLU MLP on flattened inputs; hidden layers ``Dense_0..Dense_{L-1}``."""

    widths: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Dense(w, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name=f"Dense_{len(self.widths)}")(x)


def mlp_axes(n_hidden: int, prefix: str = "params/") -> dict[str, tuple]:
    """Permutation spec of an MLP: hidden layer k's units are permuted by ``P_k``."""
    axes = {}
    for k in range(n_hidden + 1):
        p_in = f"P_{k - 1}" if k > 0 else None
        p_out = f"P_{k}" if k < n_hidden else None
        axes[f"{prefix}Dense_{k}/kernel"] = (p_in, p_out)
        axes[f"{prefix}Dense_{k}/bias"] = (p_out,)
    return axes


def make_mlp(
    input_shape, num_classes: int, *, widths: Sequence[int] | None = None, preset: str = "paper"
) -> Model:
    """An MLP; ``preset="paper"`` gives the paper's hidden widths 32-32-32-16.

    Args:
        input_shape: shape of one example (flattened by the model).
        num_classes: output classes.
        widths: hidden widths; overrides ``preset``.
        preset: ``paper`` (32-32-32-16) or ``paper_cifar`` (256-256-256-128).
    """
    widths = mlp_widths(widths=widths, preset=preset)
    return build("mlp", MLP(widths, num_classes), input_shape, num_classes, mlp_axes(len(widths)))


def mlp_widths(*, widths: Sequence[int] | None = None, preset: str = "paper") -> tuple[int, ...]:
    """The hidden widths that :func:`make_mlp`'s options give, checked.

    Raises:
        ParamarketError: naming the scenario key (``model.widths``, ``model.preset``).
    """
    if not (isinstance(preset, str) and preset in PRESETS):
        raise option_error("mlp", "preset", "one of " + ", ".join(PRESETS), preset)
    if widths is None:
        return PRESETS[preset]
    return ints_option("mlp", "widths", widths)
