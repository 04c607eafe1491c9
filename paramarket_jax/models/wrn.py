"""Wide ResNet (Zagoruyko and Komodakis, 2016), pre-activation, GroupNorm instead of BatchNorm.

GroupNorm uses a single group: its statistics span all channels, so permuting channels
commutes with normalisation (with several groups a permutation across groups would change
the statistics and alignment could not be exact). Residual streams share one permutation
per stage, as in Git Re-Basin's ResNet spec.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from paramarket_jax.errors import ParamarketError
from paramarket_jax.models.base import Model, build, int_option, option_error
from paramarket_jax.models.cnn import as_spatial


def _stage_layout(depth: int, widen: int, base: int):
    """Yield (stage, block, in_channels, out_channels, stride, has_shortcut_conv)."""
    n = (depth - 4) // 6
    in_ch = base
    for s in range(3):
        out_ch = base * (2**s) * widen
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            yield s, b, in_ch, out_ch, stride, (in_ch != out_ch or stride != 1)
            in_ch = out_ch


class WideResNet(nn.Module):
    depth: int
    widen: int
    base: int
    num_classes: int
    input_shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        x = as_spatial(x, self.input_shape)
        nd = x.ndim - 2
        k3, k1 = (3,) * nd, (1,) * nd
        x = nn.Conv(self.base, k3, use_bias=False, name="stem")(x)
        for s, b, _, out_ch, stride, short in _stage_layout(self.depth, self.widen, self.base):
            # Tiny inputs (8x8 digits, 1-D signals) stop downsampling at 2 positions.
            st = stride if min(x.shape[1:-1]) >= 4 else 1
            name = f"s{s}b{b}"
            h = nn.relu(nn.GroupNorm(num_groups=1, name=f"{name}_norm1")(x))
            shortcut = x
            if short:
                shortcut = nn.Conv(out_ch, k1, (st,) * nd, use_bias=False, name=f"{name}_short")(h)
            h = nn.Conv(out_ch, k3, (st,) * nd, use_bias=False, name=f"{name}_conv1")(h)
            h = nn.relu(nn.GroupNorm(num_groups=1, name=f"{name}_norm2")(h))
            h = nn.Conv(out_ch, k3, use_bias=False, name=f"{name}_conv2")(h)
            x = shortcut + h
        x = nn.relu(nn.GroupNorm(num_groups=1, name="final_norm")(x))
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return nn.Dense(self.num_classes, name="head")(x)


def make_wrn(
    input_shape, num_classes: int, *, depth: int = 10, widen: int = 1, base: int = 16
) -> Model:
    """A wide ResNet; the paper used depth 22, widen 6 (preset by passing those).

    Args:
        input_shape: (D,) for 1-D signals or (H, W, C) for images.
        num_classes: output classes.
        depth: 6n + 4 layers (10, 16, 22, 28, ...).
        widen: width multiplier k.
        base: channels of the stem (16 in the WRN paper).
    """
    depth, widen, base = wrn_options(depth=depth, widen=widen, base=base)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) not in (1, 3):
        raise ParamarketError(f"wrn needs (D,) or (H, W, C) inputs, got {input_shape}")
    nd = 1 if len(input_shape) == 1 else 2
    sp = (None,) * nd
    p = "params/"
    res = "R_stem"
    axes = {f"{p}stem/kernel": sp + (None, res)}
    for s, b, _, _, _, short in _stage_layout(depth, widen, base):
        name = f"s{s}b{b}"
        inner, out = f"H_{name}", (f"R_{name}" if short else res)
        axes[f"{p}{name}_norm1/scale"] = (res,)
        axes[f"{p}{name}_norm1/bias"] = (res,)
        if short:
            axes[f"{p}{name}_short/kernel"] = sp + (res, out)
        axes[f"{p}{name}_conv1/kernel"] = sp + (res, inner)
        axes[f"{p}{name}_norm2/scale"] = (inner,)
        axes[f"{p}{name}_norm2/bias"] = (inner,)
        axes[f"{p}{name}_conv2/kernel"] = sp + (inner, out)
        res = out
    axes[f"{p}final_norm/scale"] = (res,)
    axes[f"{p}final_norm/bias"] = (res,)
    axes[f"{p}head/kernel"] = (res, None)
    axes[f"{p}head/bias"] = (None,)
    module = WideResNet(depth, widen, base, num_classes, input_shape)
    return build("wrn", module, input_shape, num_classes, axes)


MAX_DEPTH = 994  # 6 * 165 + 4


def wrn_options(*, depth: int = 10, widen: int = 1, base: int = 16) -> tuple[int, int, int]:
    """:func:`make_wrn`'s options, checked: (depth, widen, base).

    Raises:
        ParamarketError: naming the scenario key (``model.depth``, ``model.widen``, ...).
    """
    ok = isinstance(depth, int | np.integer) and not isinstance(depth, bool)
    if not (ok and 10 <= depth <= MAX_DEPTH and (depth - 4) % 6 == 0):
        raise option_error(
            "wrn", "depth", f"an integer 6n+4 in [10, {MAX_DEPTH}] (10, 16, 22, ...)", depth
        )
    return int(depth), int_option("wrn", "widen", widen), int_option("wrn", "base", base)
