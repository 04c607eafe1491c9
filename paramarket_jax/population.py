"""The agent population: one pytree whose every leaf has a leading axis N, and its kernels.

Every kernel is written for one agent and ``jax.vmap``-ed over the population (as in
evosax); local training is a ``lax.scan`` over steps, so K steps of N agents are one
jitted call with no Python loop over agents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.models.base import Model

# Each factory maps a learning rate to an optax optimizer whose last step scales by it,
# so an update at learning rate lr equals lr times the update at learning rate 1.
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
}


class Population(NamedTuple):
    """N agents' state; every leaf has a leading axis N.

    Attributes:
        params: model parameters, leaves (N, ...).
        opt_state: optimizer states, leaves (N, ...).
        learning_rate: (N,) float32 per-agent learning rates.
    """

    params: Any
    opt_state: Any
    learning_rate: jax.Array


class AgentData(NamedTuple):
    """Shared dataset arrays on the device plus each agent's index views into them.

    Minibatches and evaluation rows are index draws into the shared arrays, never
    per-agent copies of the data. Training shards are slices of one index array grouped
    by owner, so memory grows as rows + N, never as N x rows.

    Attributes:
        x_train, y_train: (n_train, *input_shape) float32, (n_train,) int32.
        train_rows: (R,) int32 indices into the training arrays, grouped by owner (padded
            beyond the last shard; padding is never read).
        train_start: (N,) int32, agent i's shard is ``train_rows[start[i]:][:size[i]]``.
        train_size: (N,) int32, shard lengths (>= 1).
        x_val, y_val, val_idx: validation arrays and (N, m_val) per-agent rows.
        x_test, y_test, test_idx: test arrays and (N, m_test) per-agent rows.
    """

    x_train: jax.Array
    y_train: jax.Array
    train_rows: jax.Array
    train_start: jax.Array
    train_size: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    val_idx: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    test_idx: jax.Array


def row_capacity(part, n_train: int) -> int:
    """Length to pad ``train_rows`` to, fixed by the dataset and N only (not by the draw).

    Disjoint partitions own at most the whole training set; overlapping ones (such as
    ``class_split``) at most N copies of it. Padding to that bound keeps one shape for every
    seed and every value of ``d``, Dirichlet alpha or shard weights, so nothing recompiles.
    """
    total = int(np.asarray(part.train_size).sum())
    return n_train if total <= n_train else n_train * len(part.train_size)


def agent_data(dataset, part, capacity: int | None = None) -> AgentData:
    """Put a :class:`~paramarket_jax.data.Dataset` and its Partition on the device.

    Args:
        dataset: the shared dataset.
        part: its Partition among N agents.
        capacity: pad ``train_rows`` to this length (default :func:`row_capacity`).
    """
    rows = np.asarray(part.train_rows, np.int32)
    capacity = capacity or row_capacity(part, len(dataset.y_train))
    rows = np.concatenate([rows, np.zeros(capacity - len(rows), np.int32)])
    return AgentData(
        x_train=jnp.asarray(dataset.x_train, jnp.float32),
        y_train=jnp.asarray(dataset.y_train, jnp.int32),
        train_rows=jnp.asarray(rows),
        train_start=jnp.asarray(part.train_start, jnp.int32),
        train_size=jnp.asarray(part.train_size, jnp.int32),
        x_val=jnp.asarray(dataset.x_val, jnp.float32),
        y_val=jnp.asarray(dataset.y_val, jnp.int32),
        val_idx=jnp.asarray(part.val_idx, jnp.int32),
        x_test=jnp.asarray(dataset.x_test, jnp.float32),
        y_test=jnp.asarray(dataset.y_test, jnp.int32),
        test_idx=jnp.asarray(part.test_idx, jnp.int32),
    )


def agent_keys(key: jax.Array, n: int) -> jax.Array:
    """One key per agent: agent i gets ``fold_in(key, i)`` whatever N is."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))


def sample_batch(
    key: jax.Array, rows: jax.Array, start: jax.Array, size: jax.Array, batch_size: int
) -> jax.Array:
    """Draw ``batch_size`` rows uniformly, with replacement, from one agent's shard.

    Args:
        key: the agent's key for this step.
        rows: (R,) int32 training rows of every agent, grouped by owner.
        start: () int32 where this agent's shard begins in ``rows``.
        size: () int32 shard length.
        batch_size: static minibatch size.

    Returns:
        (batch_size,) int32 indices into the shared training arrays.
    """
    return rows[start + jax.random.randint(key, (batch_size,), 0, size)]


class Trainer(NamedTuple):
    """Pure, jitted population kernels for one model and optimizer (see :func:`make_trainer`).

    Attributes:
        init: ``(key, n, learning_rate) -> Population``; learning_rate scalar or (n,).
        train: ``(pop, key, data, steps) -> (pop, loss (N, steps))``: ``steps`` local
            minibatch steps for every agent; ``steps`` is static.
        evaluate: ``(params, x, y, idx) -> (loss (N,), accuracy (N,))`` on rows ``idx (N, m)``.
        reset_optimizer: ``(pop, mask (N,) bool) -> pop`` with fresh optimizer states where
            ``mask``.
        train_one: the unbatched per-agent kernel
            ``(params, opt_state, lr, key, start, size, rows, x, y, steps)
            -> (params, opt_state, loss)``.
        loss: ``(params, x, y) -> ()`` mean cross-entropy of one model.
    """

    init: Callable
    train: Callable
    evaluate: Callable
    reset_optimizer: Callable
    train_one: Callable
    loss: Callable


def make_optimizer(name: str) -> optax.GradientTransformation:
    """The optimizer ``name`` at learning rate 1 (the per-agent rate scales its updates)."""
    if name not in OPTIMIZERS:
        raise unknown("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name](1.0)


def partial_optimizer(
    tx: optax.GradientTransformation, trainable: Callable
) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``trainable(params)`` is True, nothing on the others.

    ``optax.multi_transform`` of ``tx`` (label ``"train"``) and ``optax.set_to_zero()``
    (``"frozen"``): the frozen leaves get zero updates and no optimizer state (the
    optimizer's moments hold ``optax.MaskedNode`` there).
    """

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_trainer(model: Model, optimizer: str = "adam", batch_size: int = 32) -> Trainer:
    """Build the population kernels for ``model`` trained with ``optimizer``.

    A model with :attr:`~paramarket_jax.models.base.Model.trainable` set (a LoRA model,
    :mod:`~paramarket_jax.models.lora`) is trained with :func:`partial_optimizer`, and its
    frozen leaves are carried through every step untouched, bit for bit (whatever the
    learning rate, so not even ``p + lr * 0``); any other model gets the optimizer itself.

    Args:
        model: the model every agent uses.
        optimizer: a name in :data:`OPTIMIZERS`.
        batch_size: minibatch size of every local step.
    """
    if batch_size < 1:
        raise ParamarketError(f"batch_size must be >= 1, got {batch_size}")
    tx = make_optimizer(optimizer)
    trainable = model.trainable
    if trainable is not None:
        tx = partial_optimizer(tx, trainable)

    def loss_fn(params, x, y):
        return model.losses(params, x, y)[0].mean()

    def metrics_fn(params, x, y):
        loss, correct = model.losses(params, x, y)
        return loss.mean(), correct.mean()

    def train_one(params, opt_state, lr, key, start, size, rows, x, y, steps):
        def step(carry, k):
            p, o = carry
            batch = sample_batch(k, rows, start, size, batch_size)
            loss, grads = jax.value_and_grad(loss_fn)(p, x[batch], y[batch])
            updates, o = tx.update(grads, o, p)
            updates = jax.tree.map(lambda u: lr * u, updates)
            new = optax.apply_updates(p, updates)
            if trainable is not None:  # the frozen leaves, exactly as they were
                new = jax.tree.map(lambda t, n, old: n if t else old, trainable(p), new, p)
            return (new, o), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, steps)
        )
        return params, opt_state, losses

    def init(key, n, learning_rate):
        params = jax.vmap(model.init)(agent_keys(key, n))
        lr = jnp.broadcast_to(jnp.asarray(learning_rate, jnp.float32), (n,))
        return Population(params, jax.vmap(tx.init)(params), lr)

    def train(pop, key, data, steps):
        n = pop.learning_rate.shape[0]
        per_agent = jax.vmap(train_one, (0, 0, 0, 0, 0, 0, None, None, None, None))
        params, opt_state, losses = per_agent(
            pop.params,
            pop.opt_state,
            pop.learning_rate,
            agent_keys(key, n),
            data.train_start,
            data.train_size,
            data.train_rows,
            data.x_train,
            data.y_train,
            steps,
        )
        return Population(params, opt_state, pop.learning_rate), losses

    def evaluate(params, x, y, idx):
        return jax.vmap(lambda p, rows: metrics_fn(p, x[rows], y[rows]))(params, idx)

    def reset_optimizer(pop, mask):
        fresh = jax.vmap(tx.init)(pop.params)

        def pick(new, old):
            m = mask.reshape(mask.shape + (1,) * (old.ndim - 1))
            return jnp.where(m, new, old)

        return pop._replace(opt_state=jax.tree.map(pick, fresh, pop.opt_state))

    return Trainer(
        init=jax.jit(init, static_argnums=1),
        train=jax.jit(train, static_argnums=3),
        evaluate=jax.jit(evaluate),
        reset_optimizer=jax.jit(reset_optimizer),
        train_one=train_one,
        loss=loss_fn,
    )
