"""From a validated Scenario to the pure round's inputs: MarketSpec, MarketParams, data, keys.

Every seed of a scenario shares one dataset (drawn from ``data.seed``); each seed draws its
own partition, initialisation and training randomness from ``jax.random.key(seed)``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tomli_w

from paramarket_jax import scenario as sc
from paramarket_jax.broker.methods import get_method
from paramarket_jax.broker.value import align_mode
from paramarket_jax.data import Dataset, add_label_noise, load_dataset, partition, wrong_labels
from paramarket_jax.data.partition import Partition
from paramarket_jax.economics.revenue import Economy
from paramarket_jax.economics.strategies import STRATEGIES, StrategyParams
from paramarket_jax.errors import ParamarketError
from paramarket_jax.market.types import PARAM_AXES, MarketData, MarketParams, MarketSpec, over_axes
from paramarket_jax.mechanisms import Knobs, make_mechanism
from paramarket_jax.population import agent_data, row_capacity
from paramarket_jax.scenario import Scenario, per_agent

# the stream label noise draws from (folded into the data key and each seed's split key)
NOISE_STREAM = 0x6E6F6973
# the stream the shared base's public rows are drawn from (folded into each seed's split key)
PUBLIC_STREAM = 0x70756272


class LabelNoise(NamedTuple):
    """Which agents' training labels are noisy, and the fraction of their rows that are.

    It changes the data a seed gets (:func:`seed_data`), not the round: not in the
    ``MarketSpec`` (it never decides a compilation), but cells that differ in it never
    share a batch (their training arrays differ).
    """

    agents: tuple[int, ...] = ()
    fraction: float = 0.0


class Experiment(NamedTuple):
    """What every seed of a scenario shares: the scenario, its spec, knobs and dataset, and
    the label noise of its data."""

    scenario: Scenario
    spec: MarketSpec
    params: MarketParams
    dataset: Dataset
    noise: LabelNoise = LabelNoise()


def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def dataset_key(scenario: Scenario) -> tuple:
    """Scenarios with equal keys load the same dataset."""
    d = scenario.data
    return (d.dataset, d.path, d.seed, _hashable(dict(d.options)))


def load_shared_dataset(scenario: Scenario) -> Dataset:
    """The dataset every seed of ``scenario`` uses (drawn from ``data.seed``)."""
    d = scenario.data
    k_data = jax.random.split(jax.random.key(d.seed), 3)[0]
    options = dict(d.options) | ({"path": d.path} if d.path else {})
    return load_dataset(d.dataset, k_data, **options)


def spec_of(scenario: Scenario, dataset: Dataset) -> MarketSpec:
    """The scenario's static part (shapes, names, counts)."""
    s = scenario
    return MarketSpec(
        n=s.agents.n,
        input_shape=tuple(dataset.input_shape),
        num_classes=dataset.num_classes,
        model=s.model.name,
        model_options=_hashable(dict(s.model.options)),
        optimizer=s.train.optimizer,
        batch_size=s.train.batch_size,
        local_steps=s.train.local_steps,
        siloed=s.baselines.siloed,
        fedavg=s.baselines.fedavg,
        centralized=s.baselines.centralized,
        mechanism=s.mechanism.name,
        mechanism_options=_hashable(dict(s.mechanism.options)),
        roles=s.mechanism.roles,
        revenue=s.economics.revenue,
        quality=s.economics.quality,
        align=align_mode(s.broker.align),
        restarts=s.broker.restarts,
        choose=s.broker.choose,
        layers=tuple(s.broker.layers),
        candidates=s.broker.candidates,
        pick=s.broker.pick,
        max_sweeps=s.broker.max_sweeps,
        chunk=s.broker.batch_size,
        solver=s.broker.solver,
        heads=s.broker.heads,
        vocab=dataset.vocab,
        targets="all" if np.ndim(dataset.y_train) == 2 else "last",
        alphas=len(s.broker.alphas),
        pretrain=s.pretrain.steps,
        pretrain_batch=s.pretrain.batch_size,
        goods=s.broker.goods,
        merge=s.broker.merge,
        second=len(_second_grid(s)),
        rank=s.broker.rank,
        adapt=tuple(s.broker.adapt),
        fit=s.broker.fit,
        fit_steps=s.broker.fit_steps,
        fisher_rows=s.broker.fisher_rows,
        valuation=s.broker.valuation,
        passes=s.broker.passes,
        entry=s.agents.entry,
        strategy_grid=len(s.strategies.grid),
        # without hostile agents the kind is moot: such scenarios share one compilation
        hostile=s.agents.hostile_kind if s.agents.hostile else "",
    )


def _second_grid(scenario: Scenario) -> tuple[float, ...]:
    """The merge method's second knob's grid (TIES: ``broker.density``; DARE and DARE-TIES:
    ``broker.drop``); empty for a method without one."""
    b = scenario.broker
    return {"density": b.density, "drop": b.drop}.get(get_method(b.merge).second, ())


def noise_of(scenario: Scenario) -> LabelNoise:
    """The scenario's label noise (none unless both agents and a fraction are given)."""
    a = scenario.agents
    if not (a.noisy and a.noise > 0):
        return LabelNoise()
    return LabelNoise(tuple(sorted(set(a.noisy))), float(a.noise))


def params_of(scenario: Scenario) -> MarketParams:
    """The scenario's numeric knobs as arrays; every per-agent knob
    (:data:`~paramarket_jax.market.types.PARAM_AXES`) broadcast to (N,)."""
    s, n = scenario, scenario.agents.n
    e, m, st = s.economics, s.mechanism, s.strategies
    seller_only = np.zeros(n, bool)
    seller_only[list(s.broker.sellers)] = True
    hostile = np.zeros(n, bool)
    hostile[list(s.agents.hostile)] = True
    alphas = np.asarray(s.broker.alphas)
    values = MarketParams(
        learning_rate=s.train.learning_rate,
        # weights above the cap become 0 (the buyer's own model: never a gain, never bought),
        # so capped and uncapped cells share one compiled call
        alphas=np.where(alphas <= s.broker.max_alpha, alphas, 0),
        knobs=Knobs(
            reserve=m.reserve,
            beta=m.beta,
            posted=m.posted,
            roles=~seller_only if s.broker.sellers else np.arange(n) < (n + 1) // 2,
        ),
        economy=Economy(
            value_per_quality=e.value_per_quality,
            market_size=e.market_size,
            gamma=e.gamma,
            outside=e.outside_option,
            horizon=e.horizon,
            step_cost=e.step_cost,
            query_fee=e.query_fee,
            trade_fee=e.trade_fee,
            fee_share=e.fee_share,
        ),
        strategy=StrategyParams(
            kind=np.int32([STRATEGIES.index(k) for k in per_agent(st.kind, n)]),
            shade=st.shade,
            markup=st.markup,
            grid=st.grid,
            eta=st.eta,
            explore=st.explore,
        ),
        initial_cash=e.initial_cash,
        trade_start=np.int32(s.trading.start),
        trade_every=np.int32(s.trading.every),
        seller_only=seller_only,
        initial_alive=np.arange(n) < (s.agents.initial or n),
        bankruptcy=e.bankruptcy,
        diverge_loss=s.train.diverge_loss,
        hostile=hostile,
        min_gain=s.broker.min_gain,
        confidence=s.broker.confidence,
        second=np.asarray(_second_grid(s) or (0.0,)),
        fit_lr=s.broker.fit_lr,
        pretrain_lr=s.pretrain.learning_rate,
        transfer_cost=e.transfer_cost,
        compensation=e.compensation,
        entry=s.agents.entry,
        entry_profit=s.agents.entry_profit,
        entry_max=np.int32(s.agents.entry_max),
    )
    # flags stay bool and counts int32 (schedule, strategy kinds); every other number float32

    def array(axes, value):
        value = np.asarray(value)
        if value.dtype not in (np.bool_, np.int32):
            value = value.astype(np.float32)
        if axes.agent is not None:  # one value for everyone, or one per agent
            value = np.broadcast_to(value, (n,))
        return jnp.asarray(value)

    # a per-agent list is one value, not a subtree
    is_list = lambda v: type(v) in (tuple, list)  # noqa: E731
    values = jax.tree.map(np.asarray, values, is_leaf=is_list)
    return over_axes(array, PARAM_AXES, values)


def build(scenario: Scenario, dataset: Dataset | None = None) -> Experiment:
    """Load (or reuse) the dataset and derive the spec and knobs; bad input raises
    ParamarketError (the model is built once here, so its options are checked early)."""
    dataset = dataset if dataset is not None else load_shared_dataset(scenario)
    spec = spec_of(scenario, dataset)
    spec.make_trainer()  # validates model and optimizer options now, not inside a trace
    make_mechanism(spec.mechanism, **dict(spec.mechanism_options))  # and the mechanism's
    return Experiment(scenario, spec, params_of(scenario), dataset, noise_of(scenario))


def seed_partition(exp: Experiment, seed: int) -> Partition:
    """One seed's partition of the shared dataset (drawn from the seed's split key)."""
    d = exp.scenario.data
    k_split = jax.random.split(jax.random.key(seed), 3)[1]
    return partition(
        d.split.name,
        k_split,
        exp.dataset,
        exp.scenario.agents.n,
        eval_size=d.split.eval_size,
        eval_mix=d.split.eval_mix,
        **dict(d.split.options),
    )


def loss_floors(exp: Experiment, seed: int) -> np.ndarray | None:
    """(N,) the lowest test loss each agent's test rows allow (the mean of their groups'
    ``Dataset.group_floor``: the entropy rates of a Markov dataset's chains), or None
    where the dataset does not know it."""
    data = exp.dataset
    if data.group_floor is None or data.groups is None:
        return None
    test_idx = seed_partition(exp, seed).test_idx
    return np.asarray(data.group_floor)[np.asarray(data.groups[2])[test_idx]].mean(axis=1)


def seed_data(exp: Experiment, seed: int) -> tuple[MarketData, jax.Array]:
    """One seed's partition of the shared dataset as device data, and the run key.

    The training rows are padded to a length fixed by the dataset and N (see
    ``population.row_capacity``), so every seed and every split option has one shape.

    With label noise (``agents.noisy``, ``agents.noise``) the training arrays get a second
    copy of the training set whose labels are all wrong (:func:`~paramarket_jax.data.
    wrong_labels`, drawn from ``data.seed``: every seed shares the feature arrays), and
    each noisy agent's chosen rows point into it (:func:`~paramarket_jax.data.
    add_label_noise`, drawn from the run seed's split key). Validation and test rows stay
    clean.
    """
    sc, dataset = exp.scenario, exp.dataset
    _, k_split, k_run = jax.random.split(jax.random.key(seed), 3)
    d = sc.data
    part = seed_partition(exp, seed)
    n_train = len(dataset.y_train)
    capacity = row_capacity(part, n_train)
    noise = exp.noise
    if noise.agents:
        k_wrong = jax.random.fold_in(jax.random.key(d.seed), NOISE_STREAM)
        wrong = wrong_labels(k_wrong, dataset.y_train, dataset.num_classes)
        part = add_label_noise(
            jax.random.fold_in(k_split, NOISE_STREAM), part, n_train, noise.agents, noise.fraction
        )
        dataset = dataset._replace(
            x_train=np.concatenate([dataset.x_train, dataset.x_train]),
            y_train=np.concatenate([np.asarray(dataset.y_train, np.int32), wrong]),
            groups=None
            if dataset.groups is None
            else (np.concatenate([dataset.groups[0]] * 2), *dataset.groups[1:]),
        )
    agents = agent_data(dataset, part, capacity)
    # the centralized baseline pools every row as its owners hold it (noisy labels too)
    pool = np.unique(np.asarray(part.train_rows))
    pool_rows = np.concatenate([pool, np.repeat(pool[:1], len(dataset.y_train) - len(pool))])
    data = MarketData(
        agents=agents,
        pool_rows=jnp.asarray(pool_rows, jnp.int32),
        pool_size=jnp.asarray(len(pool), jnp.int32),
        public_rows=public_rows(exp, k_split) if sc.pretrain.steps > 0 else None,
    )
    return data, k_run


def public_rows(exp: Experiment, k_split: jax.Array) -> jax.Array:
    """The shared base's public rows: ``pretrain.rows`` training rows drawn uniformly
    without replacement (all of them if there are fewer) from the seed's split key, so a
    low-volume mixture of every task. Public data is public: an agent's private shard may
    hold some of the same rows."""
    n_train = len(exp.dataset.y_train)
    take = min(exp.scenario.pretrain.rows, n_train)
    key = jax.random.fold_in(k_split, PUBLIC_STREAM)
    return jax.random.permutation(key, n_train)[:take].astype(jnp.int32)


def toml_value(value: Any) -> str:
    """A Python value as one line of TOML for a ``--set`` override: ``"a"``, ``0.5``,
    ``true``, ``[16, 8]``, ``{d = 0.2}`` (numpy scalars and arrays become Python values)."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    try:
        text = tomli_w.dumps({"v": value})
    except TypeError as err:
        raise ParamarketError(f"cannot write {value!r} as a scenario value: {err}") from None
    return text.removeprefix("v = ").strip()


def experiment_of(source, overrides: dict[str, Any] | None = None) -> Experiment:
    """An Experiment from an Experiment, a Scenario, or a bundled name / TOML path, with
    dotted overrides (``{"train.rounds": 3}``) applied as ``--set`` strings."""
    texts = [f"{k}={toml_value(v)}" for k, v in (overrides or {}).items()]
    if isinstance(source, Experiment):
        if not texts:
            return source
        scenario = sc.from_dict(sc.apply_overrides(sc.to_dict(source.scenario), texts))
        same = dataset_key(scenario) == dataset_key(source.scenario)
        return build(scenario, source.dataset if same else None)
    if isinstance(source, Scenario):
        return build(sc.from_dict(sc.apply_overrides(sc.to_dict(source), texts)))
    if isinstance(source, str | os.PathLike):
        return build(sc.load(os.fspath(source), texts))
    raise ParamarketError(
        f"a market needs an Experiment, a Scenario, or a scenario name or path, got {source!r}"
    )
