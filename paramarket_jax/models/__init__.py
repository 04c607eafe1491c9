"""Flax models with permutation specs, behind one registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.base import Model
from paramarket_jax.models.cnn import cnn_options, make_cnn
from paramarket_jax.models.mlp import make_mlp, mlp_widths
from paramarket_jax.models.spec import (
    PermutationSpec,
    apply_permutation,
    flatten,
    identity_perms,
    invert,
    random_perms,
    unflatten,
)
from paramarket_jax.models.transformer import gpt_options, make_gpt, make_vit, vit_options
from paramarket_jax.models.wrn import make_wrn, wrn_options

MODELS: dict[str, Callable[..., Model]] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "wrn": make_wrn,
    "gpt": make_gpt,
    "vit": make_vit,
}
# each model's option checker: same keyword options as its factory, no input shape needed
OPTION_CHECKS: dict[str, Callable] = {
    "mlp": mlp_widths,
    "cnn": cnn_options,
    "wrn": wrn_options,
    "gpt": gpt_options,
    "vit": vit_options,
}
# factory keywords the dataset sets (never scenario options): input token ids and whether
# the targets are one per sequence (``last``) or one per position (``all``)
DATA_KEYS = ("vocab", "targets")


def check_options(name: str, **options) -> None:
    """Check a model's name and options without building it (no dataset needed).

    Raises:
        ParamarketError: unknown model or option, or a bad option value (naming the
            scenario key ``model.<option>`` and the allowed values).
    """
    _check_names(name, options)
    OPTION_CHECKS[name](**options)


def _check_names(name: str, options) -> None:
    if name not in MODELS:
        raise unknown("model", name, MODELS)
    allowed = [
        p.name
        for p in inspect.signature(MODELS[name]).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in DATA_KEYS
    ]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ParamarketError(
            f"unknown option {bad[0]!r} for model {name!r}; allowed: {', '.join(allowed)}"
        )


def make_model(
    name: str, input_shape, num_classes: int, *, vocab: int = 0, targets: str = "last", **options
) -> Model:
    """Build a registered model for inputs of ``input_shape`` and ``num_classes`` outputs.

    ``vocab`` (input token ids, 0 for feature data) and ``targets`` (``last``: one target
    per example; ``all``: one per position) describe the dataset; the models that need
    them (``gpt``) take them, the others ignore them.

    Raises:
        ParamarketError: unknown model name or option.
    """
    _check_names(name, options)
    data = {"vocab": vocab, "targets": targets}
    wanted = inspect.signature(MODELS[name]).parameters
    return MODELS[name](
        input_shape, num_classes, **options, **{k: v for k, v in data.items() if k in wanted}
    )


__all__ = [
    "MODELS",
    "Model",
    "PermutationSpec",
    "apply_permutation",
    "check_options",
    "flatten",
    "identity_perms",
    "invert",
    "make_model",
    "random_perms",
    "unflatten",
]
