"""Population kernels: determinism, jit equivalence, N=1 vs alone, no recompiles, isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paramarket_jax import ParamarketError
from paramarket_jax.models import make_model
from paramarket_jax.population import (
    OPTIMIZERS,
    AgentData,
    agent_keys,
    make_optimizer,
    make_trainer,
    sample_batch,
)

D, C, B, STEPS = 12, 4, 8, 5


@pytest.fixture(scope="module")
def model():
    return make_model("mlp", (D,), C, widths=(16, 8))


def synthetic_data(n_agents, seed=7):
    """Shared arrays with shards of different sizes, padded with the agent's own first row."""
    kx, ky = jax.random.split(jax.random.key(seed))
    n_train = 60
    x = jax.random.normal(kx, (n_train, D))
    y = jax.random.randint(ky, (n_train,), 0, C)
    sizes = np.array([5 + 7 * (i % 4) for i in range(n_agents)], np.int32)
    starts = (np.cumsum(sizes) - sizes).astype(np.int32)
    shards = [(np.arange(sizes[i]) * (i + 3) + i) % n_train for i in range(n_agents)]
    rows = np.concatenate([*shards, np.zeros(7, np.int64)]).astype(np.int32)  # padded
    ev = np.tile(np.arange(10, dtype=np.int32), (n_agents, 1))
    return AgentData(
        x, y, jnp.asarray(rows), jnp.asarray(starts), jnp.asarray(sizes), x, y, ev, x, y, ev
    )


def leaves_equal(a, b):
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_same_key_same_numbers_and_distinct_agents(model):
    trainer = make_trainer(model, "adam", B)
    data = synthetic_data(3)
    pop = trainer.init(jax.random.key(0), 3, 1e-2)
    a, la = trainer.train(pop, jax.random.key(1), data, STEPS)
    b, lb = trainer.train(pop, jax.random.key(1), data, STEPS)
    c, _ = trainer.train(pop, jax.random.key(2), data, STEPS)
    assert leaves_equal(a, b) and np.array_equal(la, lb)
    assert not leaves_equal(a.params, c.params)
    kernel = pop.params["params"]["Dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # N distinct initialisations
    assert la.shape == (3, STEPS)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_jit_equals_no_jit(model, optimizer):
    trainer = make_trainer(model, optimizer, B)
    data = synthetic_data(2)
    pop = trainer.init(jax.random.key(0), 2, 0.05)
    jitted, lj = trainer.train(pop, jax.random.key(3), data, 3)
    with jax.disable_jit():
        eager, le = trainer.train(pop, jax.random.key(3), data, 3)
    for u, v in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lj, le, rtol=1e-5)


def test_population_of_one_matches_an_agent_trained_alone(model):
    """N=1 through vmap/scan equals a plain per-step optax loop with the same key and data."""
    trainer = make_trainer(model, "sgd", B)
    data = synthetic_data(1)
    key, lr = jax.random.key(11), 0.1
    pop = trainer.init(key, 1, lr)
    trained, _ = trainer.train(pop, jax.random.key(12), data, STEPS)

    params = model.init(jax.random.fold_in(key, 0))
    tx = optax.sgd(lr)
    opt = tx.init(params)
    start, size = data.train_start[0], data.train_size[0]
    for k in jax.random.split(jax.random.fold_in(jax.random.key(12), 0), STEPS):
        rows = data.train_rows[start + jax.random.randint(k, (B,), 0, size)]

        def loss(p, rows=rows):
            logits = model.apply(p, data.x_train[rows])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, data.y_train[rows]
            ).mean()

        updates, opt = tx.update(jax.grad(loss)(params), opt)
        params = optax.apply_updates(params, updates)
    alone = jax.tree.map(lambda v: v[0], trained.params)
    for u, v in zip(jax.tree.leaves(alone), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_second_call_does_not_recompile(model, compiles):
    trainer = make_trainer(model, "adam", B)
    data = synthetic_data(4)
    pop = trainer.init(jax.random.key(0), 4, 1e-2)
    pop, _ = trainer.train(pop, jax.random.key(1), data, STEPS)
    trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
    pop = trainer.reset_optimizer(pop, jnp.array([True, False, True, False]))
    with compiles() as events:
        for r in range(2, 4):
            pop, losses = trainer.train(pop, jax.random.key(r), data, STEPS)
            trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
            pop = trainer.reset_optimizer(pop, jnp.array([r % 2 == 0] * 4))
        jax.block_until_ready(losses)
    assert events == []


def test_shard_sampling_never_reads_another_agents_rows():
    n = 6
    sizes = np.array([1, 2, 3, 5, 8, 9], np.int32)
    starts = (np.cumsum(sizes) - sizes).astype(np.int32)
    # agent i owns rows 100*i .. 100*i+size-1, stored one shard after another; the padding
    # at the end holds another agent's rows as bait
    rows = np.concatenate([100 * i + np.arange(sizes[i]) for i in range(n)] + [np.full(5, 100)])
    keys = agent_keys(jax.random.key(0), n)
    draws = jax.vmap(jax.vmap(sample_batch, (0, None, None, None, None)), (0, None, 0, 0, None))(
        jax.vmap(lambda k: jax.random.split(k, 200))(keys),
        jnp.asarray(rows, jnp.int32),
        jnp.asarray(starts),
        jnp.asarray(sizes),
        16,
    )
    draws = np.asarray(draws)
    for i in range(n):
        own = set(range(100 * i, 100 * i + int(sizes[i])))
        assert set(draws[i].ravel().tolist()) == own  # every own row drawn, no other


def test_per_agent_learning_rate_and_masked_reset(model):
    trainer = make_trainer(model, "adam", B)
    data = synthetic_data(3)
    pop = trainer.init(jax.random.key(0), 3, jnp.array([0.0, 1e-2, 1e-2]))
    trained, _ = trainer.train(pop, jax.random.key(1), data, STEPS)
    k0, k1 = (trained.params["params"]["Dense_0"]["kernel"][i] for i in (0, 1))
    np.testing.assert_array_equal(k0, pop.params["params"]["Dense_0"]["kernel"][0])
    assert not np.allclose(k1, pop.params["params"]["Dense_0"]["kernel"][1])

    reset = trainer.reset_optimizer(trained, jnp.array([False, True, False]))
    fresh = jax.vmap(optax.adam(1.0).init)(trained.params)
    for r, t, f in zip(
        *(jax.tree.leaves(s) for s in (reset.opt_state, trained.opt_state, fresh)), strict=True
    ):
        np.testing.assert_array_equal(r[1], f[1])
        np.testing.assert_array_equal(r[0], t[0])
        np.testing.assert_array_equal(r[2], t[2])
    assert not leaves_equal(trained.opt_state, fresh)


def test_evaluate_matches_direct_computation(model):
    trainer = make_trainer(model, "sgd", B)
    data = synthetic_data(2)
    pop = trainer.init(jax.random.key(0), 2, 0.1)
    loss, acc = trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
    p1 = jax.tree.map(lambda v: v[1], pop.params)
    rows = data.val_idx[1]
    logits = model.apply(p1, data.x_val[rows])
    np.testing.assert_allclose(
        loss[1], trainer.loss(p1, data.x_val[rows], data.y_val[rows]), rtol=1e-5
    )
    np.testing.assert_allclose(acc[1], np.mean(np.argmax(logits, -1) == data.y_val[rows]))


def test_optimizer_registry_and_errors(model):
    params = model.init(jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)
    for name in OPTIMIZERS:
        tx = make_optimizer(name)
        updates, _ = tx.update(grads, tx.init(params), params)
        moved = [np.abs(u).max() for u in jax.tree.leaves(updates)]
        assert all(np.isfinite(m) and m > 0 for m in moved), name
    with pytest.raises(ParamarketError, match="allowed: adam"):
        make_trainer(model, "lbfgs++", B)
    with pytest.raises(ParamarketError, match="batch_size"):
        make_trainer(model, "sgd", 0)
