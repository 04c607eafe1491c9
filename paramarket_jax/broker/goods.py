"""What a seller sells (``broker.goods``) and what shipping it costs.

- ``model``: its whole model (today's market, bit for bit);
- ``delta``: its task vector, fine-tuned minus the shared base;
- ``adapter``: its LoRA adapter (the base frozen, :mod:`paramarket_jax.models.lora`).

The broker merges in the registered model's weights either way: a buyer is its effective
weights (an adapter's frozen weights plus its adapter), a seller is what it ships put on the
shared base (a model as it is; a task vector is exactly that; an adapter is the base plus
the adapter's own delta, never what its seller bought). A bought adapter is merged into the
buyer's frozen weights, so the buyer's own adapter keeps training and shapes never change.

Under a shared base a model and its task vector carry the same information, so they merge
to the same weights; they differ in what is shipped: a task vector's entries that a merge
drops (TIES' trim, DARE's drops) are never sent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from paramarket_jax.broker.merge import select_layers
from paramarket_jax.broker.methods import get_method
from paramarket_jax.models import lora
from paramarket_jax.models.spec import flatten


def views(spec, pop_params, offered, base):
    """(buyers, sellers): the weights the broker merges, in the registered model's layout,
    leaves (N, ...). ``offered`` is what each agent offers as a seller (None: its model)."""
    if spec.goods != "adapter":
        return pop_params, offered
    model = spec.make_model()
    buyers = jax.vmap(model.effective)(pop_params)
    sold = pop_params if offered is None else offered

    def on_base(p):
        return jax.tree.map(jnp.add, base, model.adapter_delta(p))

    return buyers, jax.vmap(on_base)(sold)


def settle(spec, pop_params, merged):
    """The agents' new parameters from the merged weights (``views``' layout): a model or
    task-vector buyer takes them; an adapter buyer's frozen weights become the merge less its
    own adapter's delta, so its effective weights are the merge and its adapter trains on."""
    if spec.goods != "adapter":
        return merged
    model = spec.make_model()

    def one(p, m):
        own = model.adapter_delta(p)
        return lora.with_frozen(p, jax.tree.map(jnp.subtract, m, own))

    return jax.vmap(one)(pop_params, merged)


def shipped(spec, second):
    """Parameters shipped to a buyer for each trade, an array like ``second`` (each trade's
    second knob): a model's traded parameters; a task vector's kept entries (TIES keeps
    ``ceil(density * size)`` of each tensor, DARE ``1 - drop`` of them on average); an
    adapter's parameters."""
    if spec.goods == "adapter":
        return jnp.full(jnp.shape(second), float(lora.adapter_size(spec.make_model())))
    shapes = jax.eval_shape(spec.make_base_model().init, jax.random.key(0))
    flat = flatten(shapes)
    chosen = select_layers(shapes, spec.layers or None)
    sizes = [math.prod(flat[p].shape) for p in sorted(chosen)]
    total = float(sum(sizes))
    second = jnp.asarray(second, jnp.float32)
    method = get_method(spec.merge)
    if spec.goods == "model":
        return jnp.full(second.shape, total)
    if method.second == "density":  # TIES keeps its top k of every tensor
        return sum(jnp.clip(jnp.ceil(second * n), 1, n) for n in sizes)
    return method.kept(second) * total
