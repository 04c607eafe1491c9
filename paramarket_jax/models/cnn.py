"""Small convolutional network (1-D or 2-D inputs); channels permute freely."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from paramarket_jax.errors import ParamarketError
from paramarket_jax.models.base import Model, build, int_option, ints_option


def as_spatial(x: jnp.ndarray, input_shape: tuple[int, ...]) -> jnp.ndarray:
    """(B, *input_shape) -> (B, *spatial, channels): flat 1-D signals get one channel."""
    if len(input_shape) == 1:
        return x.reshape((x.shape[0], input_shape[0], 1))
    return x


class CNN(nn.Module):
    """Conv-ReLU-pool blocks, global average pooling, a linear classifier."""

    channels: Sequence[int]
    num_classes: int
    input_shape: tuple[int, ...]
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = as_spatial(x, self.input_shape)
        nd = x.ndim - 2
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (self.kernel,) * nd, name=f"Conv_{i}")(x))
            if min(x.shape[1:-1]) >= 4:
                x = nn.avg_pool(x, (2,) * nd, strides=(2,) * nd)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        return nn.Dense(self.num_classes, name="Dense_0")(x)


def make_cnn(
    input_shape, num_classes: int, *, channels: Sequence[int] = (16, 32), kernel: int = 3
) -> Model:
    """A small CNN; flat inputs (D,) are treated as 1-D signals with one channel.

    Args:
        input_shape: (D,) for 1-D signals or (H, W, C) for images.
        num_classes: output classes.
        channels: output channels of each conv layer.
        kernel: kernel size along every spatial axis.
    """
    channels, kernel = cnn_options(channels=channels, kernel=kernel)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) not in (1, 3):
        raise ParamarketError(f"cnn needs (D,) or (H, W, C) inputs, got {input_shape}")
    nd = 1 if len(input_shape) == 1 else 2
    axes = {}
    for i in range(len(channels)):
        p_in = f"C_{i - 1}" if i > 0 else None
        axes[f"params/Conv_{i}/kernel"] = (None,) * nd + (p_in, f"C_{i}")
        axes[f"params/Conv_{i}/bias"] = (f"C_{i}",)
    axes["params/Dense_0/kernel"] = (f"C_{len(channels) - 1}", None)
    axes["params/Dense_0/bias"] = (None,)
    module = CNN(channels, num_classes, input_shape, kernel)
    return build("cnn", module, input_shape, num_classes, axes)


def cnn_options(*, channels: Sequence[int] = (16, 32), kernel: int = 3) -> tuple[tuple, int]:
    """:func:`make_cnn`'s options, checked: (channels, kernel).

    Raises:
        ParamarketError: naming the scenario key (``model.channels``, ``model.kernel``).
    """
    return ints_option("cnn", "channels", channels), int_option("cnn", "kernel", kernel)
