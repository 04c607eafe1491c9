"""LoRA adapters for any registered model (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022).

:func:`lora` wraps a :class:`~paramarket_jax.models.base.Model` into a
:class:`LoraModel` whose parameters are

    {"frozen": <the model's parameters>,
     "lora": {<kernel path, "/" -> ".">: {"a": (fan_in, rank), "b": (rank, fan_out)}}}

and which computes the model with every targeted kernel ``W`` replaced by
``W + scale * (a @ b).reshape(W.shape)``. A kernel's leading
:meth:`~paramarket_jax.models.base.Model.fan_in_axes` axes are its inputs (``fan_in`` is
their product), the rest its outputs: Dense (in, out) and Conv (kh, kw, cin, cout) kernels
are adapted as (in, out) and (kh * kw * cin, cout) matrices, the attention's query, key and
value kernels (d_model, heads, d_head) as (d_model, heads * d_head), its output
(heads, d_head, d_model) as (heads * d_head, d_model).

``b`` starts at zero, so a fresh LoRA model computes exactly its frozen model. The frozen
part is under ``stop_gradient`` and the model's :attr:`~Model.trainable` marks only the
``"lora"`` subtree, so :func:`~paramarket_jax.population.make_trainer` trains the adapters
and leaves the frozen weights bit for bit as they were. The adapters are not permuted: the
permutation spec covers every parameter and has no permutation group.

Everything here is pure and per model (no leading population axis; ``jax.vmap`` for that).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.errors import ParamarketError
from paramarket_jax.models.base import Model, _is_int
from paramarket_jax.models.spec import (
    SEP,
    PermutationSpec,
    _matches,
    check_spec,
    flatten,
    unflatten,
)
from paramarket_jax.models.transformer import bmm

FROZEN, LORA = "frozen", "lora"


class Adapter(NamedTuple):
    """One targeted kernel.

    Attributes:
        path: the kernel's flat path in the frozen parameters (``params/Dense_0/kernel``).
        name: its key under ``"lora"`` (the path with ``/`` replaced by ``.``).
        shape: the kernel's shape.
        fan_in, fan_out: rows of ``a`` and columns of ``b`` (products of the kernel's input
            and output axes).
    """

    path: str
    name: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class LoraModel(Model):
    """A :class:`~paramarket_jax.models.base.Model` with low-rank adapters (see the module
    docstring; made by :func:`lora`).

    ``name``, ``input_shape`` and ``num_classes`` are the inner model's, ``module`` is the
    inner model's module (it takes :meth:`effective` parameters, not these).

    Attributes:
        inner: the adapted model.
        rank: the adapters' rank r.
        scale: the factor of every adapter's product ``a @ b``.
        adapters: the targeted kernels, sorted by path.
        shapes: flat path -> shape of every parameter of the inner model.
    """

    inner: Model
    rank: int
    scale: float
    adapters: tuple[Adapter, ...]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def paths(self) -> tuple[str, ...]:
        """Flat paths (in the frozen parameters) of the targeted kernels."""
        return tuple(ad.path for ad in self.adapters)

    def init(self, key: jax.Array):
        """The inner model's ``init(key)``, frozen, and fresh adapters: ``attach(self,
        self.inner.init(key), key)``."""
        return attach(self, self.inner.init(key), key)

    def fresh_adapters(self, key: jax.Array) -> dict:
        """New adapters: ``a`` normal / sqrt(fan_in), ``b`` zero (so every delta is 0), one
        key per adapter split from ``fold_in(key, 1)``."""
        keys = jax.random.split(jax.random.fold_in(key, 1), len(self.adapters))
        return {
            ad.name: {
                "a": jax.random.normal(k, (ad.fan_in, self.rank)) / math.sqrt(ad.fan_in),
                "b": jnp.zeros((self.rank, ad.fan_out)),
            }
            for ad, k in zip(self.adapters, keys, strict=True)
        }

    def adapter_delta(self, params):
        """A pytree like the inner parameters: ``scale * a @ b`` reshaped to the kernel on
        every targeted kernel, zeros elsewhere."""
        deltas = self._deltas(params[LORA])
        return unflatten(
            {
                p: deltas[p].astype(v.dtype) if p in deltas else jnp.zeros_like(v)
                for p, v in flatten(params[FROZEN]).items()
            }
        )

    def effective(self, params):
        """The inner model's parameters these stand for: frozen + ``scale * a @ b``
        (reshaped) on every targeted kernel, the frozen value elsewhere."""
        flat = flatten(params[FROZEN])
        for path, delta in self._deltas(params[LORA]).items():
            flat[path] = flat[path] + delta.astype(flat[path].dtype)
        return unflatten(flat)

    def apply(self, params, x: jax.Array) -> jax.Array:
        """The inner model on :meth:`effective` parameters; no gradient reaches the frozen
        part."""
        frozen = jax.lax.stop_gradient(params[FROZEN])
        return self.inner.apply(self.effective({FROZEN: frozen, LORA: params[LORA]}), x)

    def _deltas(self, adapters) -> dict[str, jax.Array]:
        # bmm: a rank-3 product under any number of vmaps (the CPU backend's rank limit,
        # see models.transformer)
        out = {}
        for ad in self.adapters:
            a, b = adapters[ad.name]["a"], adapters[ad.name]["b"]
            out[ad.path] = self.scale * bmm(a[None], b[None])[0].reshape(ad.shape)
        return out


def lora(model: Model, *, rank: int, targets: Sequence[str], scale: float = 1.0) -> LoraModel:
    """``model`` with rank-``rank`` adapters on the kernels that ``targets`` name.

    Args:
        model: any model (e.g. from :func:`~paramarket_jax.models.make_model`).
        rank: the adapters' rank, in [1, min(fan_in, fan_out)] of every targeted kernel.
        targets: layer patterns as for :func:`~paramarket_jax.models.spec.select_layers`
            (prefixes or globs: ``"Dense_0"``, ``"attn"``, ``"fc_*"``); of the parameters
            they name, the kernels (leaves named ``kernel``, rank >= 2) get adapters.
        scale: the factor of every adapter's product (LoRA's alpha / r).

    Raises:
        ParamarketError: no target, a pattern that names no kernel, or a bad rank.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ParamarketError("LoRA needs at least one target layer pattern, got none")
    shapes = {
        p: tuple(s.shape) for p, s in flatten(jax.eval_shape(model.init, jax.random.key(0))).items()
    }
    kernels = [p for p, s in shapes.items() if p.split(SEP)[-1] == "kernel" and len(s) >= 2]
    chosen: set[str] = set()
    for pattern in targets:
        hit = {p for p in kernels if _matches(p, pattern)}
        if not hit:
            raise ParamarketError(
                f"LoRA target pattern {pattern!r} names no kernel of model {model.name!r}; "
                f"kernels: {', '.join(kernels)}"
            )
        chosen |= hit
    adapters = []
    for path in sorted(chosen):
        shape = shapes[path]
        n_in = model.fan_in_axes(path, len(shape))
        adapters.append(
            Adapter(
                path,
                path.replace(SEP, "."),
                shape,
                math.prod(shape[:n_in]),
                math.prod(shape[n_in:]),
            )
        )
    most = min(min(ad.fan_in, ad.fan_out) for ad in adapters)
    if not (_is_int(rank) and 1 <= rank <= most):
        smallest = min(adapters, key=lambda ad: min(ad.fan_in, ad.fan_out))
        raise ParamarketError(
            f"scenario key 'broker.rank' must be an integer in [1, {most}] (the smallest side "
            f"of the targeted kernels: {smallest.path} is {smallest.fan_in} x "
            f"{smallest.fan_out}), got {rank!r}"
        )
    axes = {f"{FROZEN}{SEP}{p}": (None,) * len(s) for p, s in shapes.items()}
    for ad in adapters:
        axes[f"{LORA}{SEP}{ad.name}{SEP}a"] = (None, None)
        axes[f"{LORA}{SEP}{ad.name}{SEP}b"] = (None, None)
    out = LoraModel(
        name=model.name,
        module=model.module,
        input_shape=model.input_shape,
        num_classes=model.num_classes,
        spec=PermutationSpec(axes=MappingProxyType(axes), sizes=MappingProxyType({})),
        fan_in=MappingProxyType({f"{FROZEN}{SEP}{p}": n for p, n in model.fan_in.items()}),
        trainable=_trainable,
        inner=model,
        rank=int(rank),
        scale=float(scale),
        adapters=tuple(adapters),
        shapes=MappingProxyType(shapes),
    )
    check_spec(out.spec, jax.eval_shape(out.init, jax.random.key(0)))
    return out


def _trainable(params):
    """:attr:`Model.trainable` of a LoRA model: the adapters only."""
    return {
        FROZEN: jax.tree.map(lambda _: False, params[FROZEN]),
        LORA: jax.tree.map(lambda _: True, params[LORA]),
    }


def attach(model: LoraModel, frozen_params, key: jax.Array):
    """LoRA parameters of ``model`` with the given frozen weights (one model's, e.g. a
    pretrained base every agent starts from) and fresh adapters from ``key``.

    Raises:
        ParamarketError: ``frozen_params`` are not the inner model's (paths or shapes).
    """
    got = {p: tuple(v.shape) for p, v in flatten(frozen_params).items()}
    if got != dict(model.shapes):
        bad = sorted(set(got) ^ set(model.shapes)) or sorted(
            p for p in got if got[p] != model.shapes[p]
        )
        raise ParamarketError(
            f"frozen parameters do not fit model {model.name!r} (one model's, no leading "
            f"axis): they differ at {', '.join(bad[:5])}"
        )
    return {FROZEN: frozen_params, LORA: model.fresh_adapters(key)}


def with_frozen(params, frozen):
    """``params`` with their frozen part replaced by ``frozen`` (adapters kept)."""
    return {**params, FROZEN: frozen}


def adapter_size(model: LoraModel) -> int:
    """Number of adapter parameters: the sum over targeted kernels of rank * (in + out)."""
    return sum(model.rank * (ad.fan_in + ad.fan_out) for ad in model.adapters)
