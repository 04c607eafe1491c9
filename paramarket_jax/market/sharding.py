"""Runs beyond one device: the agent axis or the run axis over a ``jax.sharding.Mesh``.

A market with ``MarketSpec.devices = D > 1`` runs on a one-dimensional mesh of the first D
devices (axis :data:`AXIS`; every device of every process under ``jax.distributed``), in
one of two layouts (``MarketSpec.shard``):

- ``agents``: the population is split over the devices. Every per-agent leaf of
  ``MarketState`` is constrained to ``PartitionSpec(..., AXIS)`` on its agent axis at
  every round, so training and evaluation stay local to a device; the broker's valuation
  reads other agents' parameters, and XLA (GSPMD, axes of ``AxisType.Auto``) inserts the
  collectives. N need not divide D: the population is padded with dead agents
  (:func:`pad_agents`, ``MarketSpec.pad``) that never train, trade or earn, and every
  random draw of the real agents is independent of the padding, so their numbers are the
  unpadded run's.
- ``runs``: the batch path's run axis (seeds x cells) is split over the devices (each run
  whole on one device, no collectives); the batch is padded to a multiple of D.

Results are gathered (replicated) before they leave the device, so every process of a
multi-process run holds the same records. Runs over several processes or hosts start
JAX's distributed runtime first (:func:`paramarket_jax.cli.processes.initialize`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.market.types import MarketParams

AXIS = "devices"
SHARDS = ("auto", "agents", "runs")


def available() -> int:
    """Devices JAX sees (every process's, under ``jax.distributed``)."""
    return jax.device_count()


def check_devices(devices: int) -> int:
    """``devices`` if this JAX has that many (0: all of them), else a ParamarketError."""
    have = available()
    if devices == 0:
        return have
    if not 1 <= devices <= have:
        platform = jax.devices()[0].platform
        raise ParamarketError(
            f"--devices must be between 1 and {have} (the {platform} devices JAX sees; 0: "
            f"all of them), got {devices}"
        )
    return devices


def mesh(devices: int) -> Mesh:
    """The one-dimensional mesh of the first ``devices`` devices (axis :data:`AXIS`)."""
    devs = np.asarray(jax.devices()[:devices])
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is None:  # an older JAX: every axis is automatic
        return Mesh(devs, (AXIS,))
    # automatic: XLA's partitioner places the collectives the valuation needs
    return Mesh(devs, (AXIS,), axis_types=(auto.Auto,))


def padded(n: int, devices: int) -> int:
    """N rounded up to a multiple of the device count."""
    return math.ceil(n / devices) * devices


def choose(shard: str, runs: int, devices: int) -> str:
    """The layout for ``runs`` runs on ``devices`` devices: ``auto`` splits the run axis
    when there are at least as many runs as devices (no collectives), else the agents."""
    if shard not in SHARDS:
        raise unknown("shard", shard, SHARDS)
    if devices == 1:
        return "agents"
    if shard == "auto":
        return "runs" if runs >= devices else "agents"
    return shard


# ---------------------------------------------------------------------------------------
# padding the population with dead agents


def _param_axes(params):
    """A MarketParams-shaped tree of True where a leaf has a leading agent axis."""
    per_agent = {"learning_rate", "seller_only", "initial_alive", "hostile"}
    out = {}
    for name, value in params._asdict().items():
        if name == "knobs":
            out[name] = value._replace(reserve=False, beta=False, posted=True, roles=True)
        elif name == "economy":
            out[name] = jax.tree.map(lambda _: False, value)._replace(value_per_quality=True)
        elif name == "strategy":
            out[name] = value._replace(
                kind=True, shade=True, markup=True, grid=False, eta=False, explore=False
            )
        else:
            out[name] = name in per_agent
    return MarketParams(**out)


def pad_params(params, pad: int):
    """MarketParams for N + ``pad`` agents: the padded agents are dead (never alive), in no
    role, and copy agent 0's other settings (never used)."""
    if not pad:
        return params

    def grow(is_agent, leaf):
        leaf = np.asarray(leaf)
        if not is_agent:
            return leaf
        return np.concatenate([leaf, np.repeat(leaf[:1], pad, axis=0)])

    def dead(leaf):  # in no role, never alive
        return np.concatenate([np.asarray(leaf), np.zeros(pad, bool)])

    out = jax.tree.map(grow, _param_axes(params), params)
    return out._replace(
        seller_only=dead(params.seller_only),
        initial_alive=dead(params.initial_alive),
        hostile=dead(params.hostile),
        knobs=out.knobs._replace(roles=dead(params.knobs.roles)),
    )


def pad_data(data, pad: int):
    """MarketData for N + ``pad`` agents: the padded agents read agent 0's rows (dead, so
    never trained or scored for anything that is recorded)."""
    if not pad:
        return data
    agents = data.agents

    def grow(leaf):
        leaf = np.asarray(leaf)
        return np.concatenate([leaf, np.repeat(leaf[:1], pad, axis=0)])

    return data._replace(
        agents=agents._replace(
            train_start=grow(agents.train_start),
            train_size=grow(agents.train_size),
            val_idx=grow(agents.val_idx),
            test_idx=grow(agents.test_idx),
        )
    )


def unpad_records(records, n: int):
    """Host records (leading axes runs, rounds) of a padded market, cut back to N agents:
    every leaf with an agent axis has it last."""
    return jax.tree.map(lambda x: x if np.ndim(x) < 3 else x[..., :n], records)


def with_padding(spec, devices: int, shard: str):
    """The spec of a market run on ``devices`` devices in layout ``shard``: padded with
    dead agents to a multiple of the devices when the agents are split."""
    if devices == 1:
        return spec
    n = spec.real
    total = padded(n, devices) if shard == "agents" else n
    # a host callback (scipy's assignment on CPU) would pull the split work onto one device
    return dataclasses.replace(
        spec, n=total, pad=total - n, devices=devices, shard=shard, solver="optax"
    )


# ---------------------------------------------------------------------------------------
# shardings


def constrain_state(spec, state):
    """Pin every per-agent leaf of a MarketState to the agent-split layout (a no-op
    unless ``spec`` splits its agents over several devices)."""
    if spec.devices == 1 or spec.shard != "agents":
        return state
    m = mesh(spec.devices)

    def pin(leaf, axis):
        parts = [None] * leaf.ndim
        parts[axis] = AXIS
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(m, P(*parts)))

    def agent_first(tree):
        return jax.tree.map(lambda v: pin(v, 0), tree)

    def twin_then_agent(tree):
        return jax.tree.map(lambda v: pin(v, 1), tree)

    return state._replace(
        twins=twin_then_agent(state.twins),
        cash=pin(state.cash, 1),
        strategy=agent_first(state.strategy),
        trade_count=pin(state.trade_count, 0),
        alive=pin(state.alive, 1),
        endowment=pin(state.endowment, 1),
        diverged=pin(state.diverged, 1),
        initial_loss=pin(state.initial_loss, 1),
        initial_params=None if state.initial_params is None else agent_first(state.initial_params),
    )


def replicate(spec, tree):
    """Gather a result on every device (a no-op on one device), so that every process can
    read it."""
    if spec.devices == 1:
        return tree
    s = NamedSharding(mesh(spec.devices), P())
    return jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, s), tree)


def put(spec, tree, batched: Any = None):
    """Host arrays onto ``spec``'s mesh: leaves of ``batched`` (a matching tree of 0/None,
    or None: nothing batched) split on their run axis when ``spec`` splits runs; every
    other leaf replicated. On one device the tree is returned as it is. Works with
    several processes (each provides its own devices' pieces of the same host arrays)."""
    if spec.devices == 1:
        return tree
    m = mesh(spec.devices)
    whole = NamedSharding(m, P())
    split = NamedSharding(m, P(AXIS)) if spec.shard == "runs" else whole
    if batched is None:
        batched = jax.tree.map(lambda _: None, tree)

    def one(axis, leaf):
        leaf = np.asarray(leaf)
        s = whole if axis is None else split
        if jax.process_count() == 1:
            return jax.device_put(leaf, s)
        return jax.make_array_from_callback(leaf.shape, s, lambda idx: leaf[idx])

    return jax.tree.map(one, batched, tree, is_leaf=lambda x: x is None)
