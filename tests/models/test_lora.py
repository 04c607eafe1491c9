"""LoRA adapters (models/lora.py): exact start, frozen base, rank, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paramarket_jax import ParamarketError
from paramarket_jax.models import apply_permutation, flatten, make_model, random_perms
from paramarket_jax.models.lora import LoraModel, adapter_size, attach, lora, with_frozen
from paramarket_jax.population import AgentData, make_trainer

D, C = 12, 4
GPT = {"vocab": 25, "layers": 1, "heads": 2, "d_model": 8, "d_head": 4, "d_mlp": 16}


def mlp():
    return make_model("mlp", (D,), C, widths=(16, 8))


def cnn():
    return make_model("cnn", (6, 6, 2), C, channels=(4, 6))


def gpt():
    return make_model("gpt", (5,), 23, **GPT)


# model, targets, inputs
CASES = {
    "mlp": (mlp, ["Dense_0", "Dense_1"], lambda k: jax.random.normal(k, (3, D))),
    "cnn": (cnn, ["Conv_*"], lambda k: jax.random.normal(k, (3, 6, 6, 2))),
    "gpt": (gpt, ["attn", "fc_*"], lambda k: jax.random.randint(k, (3, 5), 0, 25) * 1.0),
}


def bits(x):
    return np.asarray(x).view(np.uint32)


def randomised(model: LoraModel, params, key):
    """``params`` with every adapter's a and b drawn at random (b non-zero)."""
    leaves, tree = jax.tree.flatten(params["lora"])
    keys = jax.random.split(key, len(leaves))
    drawn = [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    return {**params, "lora": jax.tree.unflatten(tree, drawn)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_adapters_compute_the_frozen_model_exactly(case):
    make, targets, inputs = CASES[case]
    inner = make()
    model = lora(inner, rank=2, targets=targets)
    key = jax.random.key(3)
    params = model.init(key)
    assert (model.name, model.input_shape, model.num_classes) == (
        inner.name,
        inner.input_shape,
        inner.num_classes,
    )
    base = inner.init(key)
    for u, v in zip(jax.tree.leaves(params["frozen"]), jax.tree.leaves(base), strict=True):
        assert np.array_equal(bits(u), bits(v))  # frozen = the inner model's init(key)
    for leaf in jax.tree.leaves(model.adapter_delta(params)):
        assert not np.any(np.asarray(leaf))
    eff = model.effective(params)
    assert jax.tree.structure(eff) == jax.tree.structure(base)
    for u, v in zip(jax.tree.leaves(eff), jax.tree.leaves(base), strict=True):
        assert np.array_equal(bits(u), bits(v))
    x = inputs(jax.random.key(4))
    assert np.array_equal(bits(model.apply(params, x)), bits(inner.apply(base, x)))
    again = attach(model, base, key)  # init(key) is attach(inner.init(key), key)
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        assert np.array_equal(bits(u), bits(v))


def test_adapter_shapes_follow_the_fan_in_axes():
    model = lora(gpt(), rank=3, targets=["attn", "fc_*"])
    p = "params/trunk/block_0"
    assert model.paths == tuple(
        sorted(f"{p}/{n}/kernel" for n in ("attn/query", "attn/key", "attn/value", "attn/out",
                                             "fc_in", "fc_out"))
    )  # fmt: skip
    shapes = jax.tree.map(lambda s: s.shape, jax.eval_shape(model.init, jax.random.key(0)))
    ad = shapes["lora"]
    for name in ("query", "key", "value"):  # (d_model, heads, d_head): one input axis
        assert ad[f"params.trunk.block_0.attn.{name}.kernel"] == {"a": (8, 3), "b": (3, 8)}
    assert ad["params.trunk.block_0.attn.out.kernel"] == {"a": (8, 3), "b": (3, 8)}
    assert ad["params.trunk.block_0.fc_in.kernel"] == {"a": (8, 3), "b": (3, 16)}
    assert adapter_size(model) == sum(
        a * b for a, b in jax.tree.leaves(ad, is_leaf=tuple.__instancecheck__)
    )
    assert adapter_size(model) == 3 * (4 * (8 + 8) + (8 + 16) + (16 + 8))
    conv = lora(cnn(), rank=2, targets=["Conv_1"])  # (3, 3, 4, 6): 36 inputs
    assert conv.adapters[0].shape == (3, 3, 4, 6)
    assert (conv.adapters[0].fan_in, conv.adapters[0].fan_out) == (36, 6)
    assert gpt().fan_in == {f"{p}/attn/{n}/kernel": 1 for n in ("query", "key", "value")}


@pytest.mark.parametrize("case", ["cnn", "gpt"])
def test_delta_has_at_most_the_adapters_rank(case):
    make, targets, _ = CASES[case]
    model = lora(make(), rank=2, targets=targets)
    params = randomised(model, model.init(jax.random.key(0)), jax.random.key(1))
    delta = flatten(model.adapter_delta(params))
    for ad in model.adapters:
        matrix = np.asarray(delta[ad.path]).reshape(ad.fan_in, ad.fan_out)
        top = np.linalg.svd(matrix, compute_uv=False)[0]
        assert np.linalg.matrix_rank(matrix, tol=1e-5 * top) == 2  # float32 rounding only
    untouched = set(delta) - set(model.paths)
    assert untouched and all(not np.any(np.asarray(delta[p])) for p in untouched)


@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_adapter_gradients_follow_the_chain_rule(case):
    make, targets, inputs = CASES[case]
    inner = make()
    model = lora(inner, rank=2, targets=targets, scale=0.5)
    params = randomised(model, model.init(jax.random.key(0)), jax.random.key(1))
    x = inputs(jax.random.key(2))
    y = jax.random.randint(jax.random.key(3), (3,), 0, model.num_classes)
    grads = jax.grad(lambda p: model.losses(p, x, y)[0].mean())(params)
    inner_grads = flatten(
        jax.grad(lambda p: inner.losses(p, x, y)[0].mean())(model.effective(params))
    )
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["frozen"]))
    for ad in model.adapters:
        g = np.asarray(inner_grads[ad.path]).reshape(ad.fan_in, ad.fan_out)
        a, b = (np.asarray(params["lora"][ad.name][k]) for k in "ab")
        got = grads["lora"][ad.name]
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(got["a"], 0.5 * g @ b.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["b"], 0.5 * a.T @ g, rtol=1e-4, atol=1e-6)


def tiny_task(n_agents, n_train=64):
    """A learnable task (the label is the argmax of the first C features), one shard each."""
    x = jax.random.normal(jax.random.key(7), (n_train, D))
    y = jnp.argmax(x[:, :C], axis=1).astype(jnp.int32)
    rows = jnp.tile(jnp.arange(n_train, dtype=jnp.int32), n_agents)
    starts = jnp.arange(n_agents, dtype=jnp.int32) * n_train
    sizes = jnp.full((n_agents,), n_train, jnp.int32)
    ev = jnp.tile(jnp.arange(n_train, dtype=jnp.int32), (n_agents, 1))
    return AgentData(x, y, rows, starts, sizes, x, y, ev, x, y, ev)


def test_training_moves_only_the_adapters():
    model = lora(mlp(), rank=2, targets=["Dense_0", "Dense_2"])
    trainer = make_trainer(model, "adam", 16)
    data = tiny_task(2)
    pop = trainer.init(jax.random.key(0), 2, jnp.array([3e-2, jnp.inf]))
    before, _ = trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
    after_pop, losses = trainer.train(pop, jax.random.key(1), data, 60)
    after, _ = trainer.evaluate(after_pop.params, data.x_val, data.y_val, data.val_idx)
    # frozen leaves bit for bit, even at an infinite learning rate (agent 1)
    frozen = zip(
        jax.tree.leaves(pop.params["frozen"]),
        jax.tree.leaves(after_pop.params["frozen"]),
        strict=True,
    )
    for u, v in frozen:
        assert np.array_equal(bits(u), bits(v))
    for u, v in zip(
        jax.tree.leaves(pop.params["lora"]), jax.tree.leaves(after_pop.params["lora"]), strict=True
    ):
        assert not np.array_equal(u[0], v[0])  # every adapter leaf moved
    assert after[0] < 0.8 * before[0] and losses[0, -10:].mean() < losses[0, :10].mean()
    # the optimizer holds state for the adapters only (adam: two moments) and step counts
    state = sum(leaf.size for leaf in jax.tree.leaves(after_pop.opt_state))
    assert 2 * 2 * adapter_size(model) <= state <= 2 * 2 * adapter_size(model) + 2 * 4


def test_trainer_without_trainable_is_the_optimizer_itself():
    model = mlp()
    assert model.trainable is None
    trainer = make_trainer(model, "adam", 8)
    pop = trainer.init(jax.random.key(0), 2, 1e-2)
    reference = jax.vmap(optax.adam(1.0).init)(pop.params)
    assert jax.tree.structure(pop.opt_state) == jax.tree.structure(reference)
    assert all(
        u.shape == v.shape
        for u, v in zip(jax.tree.leaves(pop.opt_state), jax.tree.leaves(reference), strict=True)
    )


def test_attach_with_frozen_and_an_empty_spec():
    inner = mlp()
    model = lora(inner, rank=2, targets=["Dense_1"])
    base = inner.init(jax.random.key(9))
    agents = jax.vmap(lambda k: attach(model, base, k))(jax.random.split(jax.random.key(1), 3))
    a = agents["lora"]["params.Dense_1.kernel"]["a"]
    assert a.shape == (3, 16, 2) and not np.allclose(a[0], a[1])
    for u, v in zip(jax.tree.leaves(agents["frozen"]), jax.tree.leaves(base), strict=True):
        assert np.array_equal(u[2], v)  # every agent starts from the one base
    other = inner.init(jax.random.key(10))
    swapped = with_frozen(agents, jax.tree.map(lambda v: jnp.stack([v] * 3), other))
    assert swapped["lora"] is agents["lora"]
    assert np.array_equal(swapped["frozen"]["params"]["Dense_0"]["kernel"][1],
                          other["params"]["Dense_0"]["kernel"])  # fmt: skip
    with pytest.raises(ParamarketError, match="do not fit model 'mlp'"):
        attach(model, agents["frozen"], jax.random.key(0))  # a leading axis: not one model's
    # no permutation group, every parameter covered: permuting is the identity
    params = model.init(jax.random.key(0))
    assert dict(model.spec.sizes) == {} and set(model.spec.axes) == set(flatten(params))
    perms = random_perms(jax.random.key(0), model.spec)
    assert perms == {}
    for u, v in zip(
        jax.tree.leaves(apply_permutation(model.spec, perms, params)),
        jax.tree.leaves(params),
        strict=True,
    ):
        assert np.array_equal(u, v)


def test_bad_rank_or_target_is_one_clear_line():
    model = mlp()  # Dense_1 is (16, 8): rank at most 8
    for rank in (0, 9, 2.0, True, "2"):
        with pytest.raises(ParamarketError, match=r"'broker\.rank' must be an integer in \[1, 8\]"):
            lora(model, rank=rank, targets=["Dense_0", "Dense_1"])
    lora(model, rank=8, targets=["Dense_1"])
    with pytest.raises(ParamarketError) as err:
        lora(gpt(), rank=1, targets=["attn", "ln_1"])  # names parameters, but no kernel
    message = str(err.value)
    assert "'ln_1' names no kernel" in message and "\n" not in message
    assert "params/unembed/kernel" in message and "ln_1/scale" not in message
    with pytest.raises(ParamarketError, match="'nothing' names no kernel"):
        lora(model, rank=1, targets=["nothing"])
    with pytest.raises(ParamarketError, match="at least one target"):
        lora(model, rank=1, targets=[])


def test_layer_patterns_live_with_the_models():
    from paramarket_jax.broker import merge
    from paramarket_jax.models import spec

    assert merge.select_layers is spec.select_layers and merge._matches is spec._matches
