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
from paramarket_jax.market.types import (
    DATA_AXES,
    PARAM_AXES,
    STATE_AXES,
    MarketData,
    MarketParams,
    MarketState,
    over_axes,
)

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


def _grow(leaf, pad: int, axis: int = 0):
    """``pad`` copies of agent 0 appended on the agent axis (False for a per-agent flag: a
    padded agent is never alive, in no role, not hostile, sells nothing)."""
    leaf = np.asarray(leaf)
    first = np.take(leaf, [0], axis=axis)
    fill = np.zeros_like(first) if leaf.dtype == bool else first
    return np.concatenate([leaf, np.repeat(fill, pad, axis=axis)], axis=axis)


def pad_params(params: MarketParams, pad: int) -> MarketParams:
    """MarketParams for N + ``pad`` agents: every per-agent knob (:data:`PARAM_AXES`) grows
    by agent 0's value (never used: the padded agents are dead, in no role)."""
    if not pad:
        return params
    return over_axes(
        lambda a, leaf: leaf if a.agent is None else _grow(leaf, pad, a.agent), PARAM_AXES, params
    )


def pad_data(data: MarketData, pad: int) -> MarketData:
    """MarketData for N + ``pad`` agents: the padded agents read agent 0's rows (dead, so
    never trained or scored for anything that is recorded)."""
    if not pad:
        return data
    return over_axes(
        lambda a, leaf: leaf if a.agent is None else _grow(leaf, pad, a.agent), DATA_AXES, data
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


def constrain_state(spec, state: MarketState) -> MarketState:
    """Pin every per-agent leaf of a MarketState (:data:`STATE_AXES`) to the agent-split
    layout (a no-op unless ``spec`` splits its agents over several devices)."""
    if spec.devices == 1 or spec.shard != "agents":
        return state
    m = mesh(spec.devices)

    def pin(axes, leaf):
        if axes.agent is None:
            return leaf
        parts = [None] * leaf.ndim
        parts[axes.agent] = AXIS
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(m, P(*parts)))

    return over_axes(pin, STATE_AXES, state)


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
        if leaf is None:  # an absent part of a state (no centralized model, ...)
            return None
        leaf = np.asarray(leaf)
        s = whole if axis is None else split
        if jax.process_count() == 1:
            return jax.device_put(leaf, s)
        return jax.make_array_from_callback(leaf.shape, s, lambda idx: leaf[idx])

    return jax.tree.map(one, batched, tree, is_leaf=lambda x: x is None)
