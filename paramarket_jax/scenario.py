"""Scenarios: TOML files validated into frozen dataclasses, with dotted ``--set`` overrides."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import pathlib
import stat
import tomllib
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping
from typing import Any

import tomli_w

from paramarket_jax.broker.modes import (
    ALIGN_MODES,
    BASE_METHODS,
    FITS,
    GOODS,
    MERGE_METHODS,
    PAPER_ALPHAS,
    VALUATIONS,
)
from paramarket_jax.economics.kinds import QUALITIES, REVENUES, STRATEGIES
from paramarket_jax.errors import ParamarketError

# Installed: the bundled TOMLs ship as paramarket_jax/scenarios; in a checkout they sit in
# the top-level scenarios/ folder.
_HERE = pathlib.Path(__file__).resolve().parent
SCENARIO_DIR = next(
    (d for d in (_HERE / "scenarios", _HERE.parent / "scenarios") if d.is_dir()),
    _HERE / "scenarios",
)


# ---- field rules: (description of allowed values, predicate) ----


# JAX computes in 32 bits: integer keys must fit int32 (seeds, which only seed random keys,
# int64) and numbers float32 (larger ones would become inf).
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_REAL = 3.0e38


def _int(low: int) -> tuple[str, Callable]:
    return f"an integer >= {low}", lambda v: type(v) is int and low <= v <= MAX_INT


def _finite(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and abs(v) <= MAX_REAL


def _real(desc: str, ok: Callable[[float], bool]) -> tuple[str, Callable]:
    return desc, lambda v: _finite(v) and ok(v)


def _choice(names: Callable[[], Mapping]) -> tuple[Callable[[], str], Callable]:
    return (
        lambda: "one of " + ", ".join(sorted(names()))
    ), lambda v: type(v) is str and v in names()


def _reals(desc: str, ok: Callable[[float], bool]) -> tuple[str, Callable]:
    """A number, or a non-empty list of numbers (one per agent)."""

    def check(v):
        items = v if isinstance(v, list) else [v]
        return items != [] and all(_finite(x) and ok(x) for x in items)

    return f"a number or a list of {desc} (one per agent)", check


BOOL = ("true or false", lambda v: type(v) is bool)
STR = ("a string", lambda v: type(v) is str)
SEEDS = (
    "a non-empty list of distinct integers >= 0",
    lambda v: (
        isinstance(v, list)
        and v != []
        and all(type(x) is int and 0 <= x <= MAX_SEED for x in v)
        and len(set(v)) == len(v)
    ),
)
NAME = (
    "a string without /, \\, control characters or a leading dot (it names the run folder)",
    lambda v: (
        type(v) is str
        and not v.startswith(".")
        and not any(c in "/\\" or not c.isprintable() for c in v)
    ),
)
INDICES = (
    "a list of agent indices",
    lambda v: isinstance(v, list) and all(type(x) is int and 0 <= x <= MAX_INT for x in v),
)
# what a hostile seller offers the broker instead of its model (see round.offers)
HOSTILE_KINDS = ("poisoned", "random", "stale")
STRS = ("a list of strings", lambda v: isinstance(v, list) and all(type(x) is str for x in v))
ALPHAS = (
    "a non-empty list of numbers in [0, 1]",
    lambda v: (
        isinstance(v, list) and v != [] and all(type(x) in (int, float) and 0 <= x <= 1 for x in v)
    ),
)

# merge weights: alpha of a linear or Fisher merge (in [0, 1]), lambda of a task-vector
# merge (task arithmetic, TIES, DARE may scale a task vector beyond 1)
MAX_WEIGHT = 4.0
WEIGHTS = (
    f"a non-empty list of numbers in [0, {MAX_WEIGHT:g}]",
    lambda v: (
        isinstance(v, list)
        and v != []
        and all(type(x) in (int, float) and 0 <= x <= MAX_WEIGHT for x in v)
    ),
)
DENSITIES = (
    "a non-empty list of numbers in (0, 1]",
    lambda v: (
        isinstance(v, list) and v != [] and all(type(x) in (int, float) and 0 < x <= 1 for x in v)
    ),
)
DROPS = (
    "a non-empty list of numbers in [0, 1)",
    lambda v: (
        isinstance(v, list) and v != [] and all(type(x) in (int, float) and 0 <= x < 1 for x in v)
    ),
)


# The registries, imported when a rule first asks for their names: each imports its kernels
# (and so JAX), which a misspelt key or a listing of the bundled scenarios never needs.


def _datasets():
    from paramarket_jax.data import DATASETS  # deferred: JAX

    return DATASETS


def _partitioners():
    from paramarket_jax.data import PARTITIONERS  # deferred: JAX

    return PARTITIONERS


def _models():
    from paramarket_jax.models import MODELS  # deferred: JAX

    return MODELS


def _optimizers():
    from paramarket_jax.population import OPTIMIZERS  # deferred: JAX

    return OPTIMIZERS


def _mechanisms():
    from paramarket_jax.mechanisms import MECHANISMS  # deferred: JAX

    return MECHANISMS


# ---- sections ----


@dataclasses.dataclass(frozen=True)
class AgentsConfig:
    n: int = 2
    initial: int = 0
    entry: bool = False
    entry_profit: float = 0.0
    entry_max: int = 1
    hostile: tuple[int, ...] = ()
    hostile_kind: str = "random"
    noisy: tuple[int, ...] = ()
    noise: float = 0.0


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    name: str = "class_split"
    eval_size: int = 256
    eval_mix: str = "shard"
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"d": 0.1})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    path: str = ""
    seed: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"
    learning_rate: float | tuple[float, ...] = 1e-2  # one for everyone, or one per agent
    batch_size: int = 32
    local_steps: int = 40
    rounds: int = 30
    diverge_loss: float = 100.0


@dataclasses.dataclass(frozen=True)
class TradingConfig:
    start: int = 5
    every: int = 1


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    align: bool | str = True
    restarts: int = 1
    choose: str = "objective"
    alphas: tuple[float, ...] = PAPER_ALPHAS
    max_alpha: float = 1.0
    layers: tuple[str, ...] = ()
    candidates: int = 0
    pick: str = "random"
    max_sweeps: int = 100
    sellers: tuple[int, ...] = ()
    batch_size: int = 0
    min_gain: float = 0.0
    confidence: float = 0.0
    solver: str = "optax"
    heads: str = "grouped"
    goods: str = "model"
    merge: str = "linear"
    density: tuple[float, ...] = (0.2,)
    drop: tuple[float, ...] = (0.5,)
    rank: int = 4
    adapt: tuple[str, ...] = ("*kernel",)
    fit: str = "none"
    fit_steps: int = 10
    fit_lr: float = 0.05
    fisher_rows: int = 64
    valuation: str = "myopic"
    passes: int = 3


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The shared base (the foundation regime): trained once per seed inside ``init``, on
    ``rows`` public training rows (a uniform draw from the training split, so a low-volume
    mixture of every task), for ``steps`` steps; 0 steps: no base, every agent starts from
    its own random initialisation."""

    steps: int = 0
    rows: int = 256
    learning_rate: float = 1e-3
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class MechanismConfig:
    name: str = "take_it"
    reserve: float = 0.0
    beta: float = 0.5
    posted: float = 0.0
    roles: str = "first_half"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EconomicsConfig:
    revenue: str = "independent"
    quality: str = "likelihood"
    value_per_quality: tuple[float, ...] = (1.0,)
    market_size: float = 1.0
    gamma: float = 1.0
    outside_option: float = 0.0
    horizon: float = 1.0
    step_cost: float = 0.0
    query_fee: float = 0.0
    trade_fee: float = 0.0
    fee_share: float = 0.0
    initial_cash: float = 100.0
    bankruptcy: bool = False
    transfer_cost: float = 0.0
    compensation: float = 0.0


@dataclasses.dataclass(frozen=True)
class StrategiesConfig:
    kind: tuple[str, ...] = ("truthful",)
    shade: tuple[float, ...] = (0.2,)
    markup: tuple[float, ...] = (0.2,)
    grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    eta: float = 0.1
    explore: float = 0.1


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    siloed: bool = True
    centralized: bool = False
    fedavg: bool = False


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A whole market run. Every random choice flows from each seed in ``seeds``, except
    the dataset itself (its generation and train/validation/test carving), which every
    seed shares and ``data.seed`` draws, so that seeds stack into one batched call."""

    name: str = "custom"
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    agents: AgentsConfig = dataclasses.field(default_factory=AgentsConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    trading: TradingConfig = dataclasses.field(default_factory=TradingConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    broker: BrokerConfig = dataclasses.field(default_factory=BrokerConfig)
    mechanism: MechanismConfig = dataclasses.field(default_factory=MechanismConfig)
    economics: EconomicsConfig = dataclasses.field(default_factory=EconomicsConfig)
    strategies: StrategiesConfig = dataclasses.field(default_factory=StrategiesConfig)
    baselines: BaselinesConfig = dataclasses.field(default_factory=BaselinesConfig)


# Rules per dotted key; tables with an "options" field also take the registered item's
# own keyword options (checked against its signature, values checked when it is built).
RULES: dict[str, tuple] = {
    "name": NAME,
    "description": STR,
    "seeds": SEEDS,
    "agents.n": _int(2),
    "agents.initial": _int(0),
    "agents.entry": BOOL,
    "agents.entry_profit": _real("a number", lambda v: True),
    "agents.entry_max": _int(1),
    "agents.hostile": INDICES,
    "agents.hostile_kind": (
        "one of " + ", ".join(HOSTILE_KINDS),
        lambda v: type(v) is str and v in HOSTILE_KINDS,
    ),
    "agents.noisy": INDICES,
    "agents.noise": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "data.dataset": _choice(_datasets),
    "data.path": STR,
    "data.seed": ("an integer >= 0", lambda v: type(v) is int and 0 <= v <= MAX_SEED),
    "data.split.name": _choice(_partitioners),
    "data.split.eval_size": _int(1),
    "data.split.eval_mix": ("one of shard, global", lambda v: v in ("shard", "global")),
    "model.name": _choice(_models),
    "train.optimizer": _choice(_optimizers),
    "train.learning_rate": (
        "a number > 0, or a list of numbers > 0 (one per agent)",
        _reals("", lambda v: v > 0)[1],
    ),
    "train.batch_size": _int(1),
    "train.local_steps": _int(1),
    "train.rounds": _int(1),
    "train.diverge_loss": _real("a number > 1", lambda v: v > 1),
    "trading.start": _int(0),
    "trading.every": _int(1),
    "broker.align": (
        "true, false, or one of none, pairwise, reference",
        lambda v: type(v) is bool or v in ALIGN_MODES,
    ),
    "broker.restarts": _int(1),
    "broker.choose": ("one of objective, validation", lambda v: v in ("objective", "validation")),
    "broker.pick": ("one of random, top", lambda v: v in ("random", "top")),
    "broker.solver": ("one of callback, optax", lambda v: v in ("callback", "optax")),
    "broker.heads": ("one of grouped, flat", lambda v: v in ("grouped", "flat")),
    "broker.alphas": WEIGHTS,
    "broker.goods": ("one of " + ", ".join(GOODS), lambda v: v in GOODS),
    "broker.merge": ("one of " + ", ".join(MERGE_METHODS), lambda v: v in MERGE_METHODS),
    "broker.density": DENSITIES,
    "broker.drop": DROPS,
    "broker.rank": _int(1),
    "broker.adapt": ("a non-empty list of strings", lambda v: STRS[1](v) and v != []),
    "broker.fit": ("one of " + ", ".join(FITS), lambda v: v in FITS),
    "broker.fit_steps": _int(1),
    "broker.fit_lr": _real("a number > 0", lambda v: v > 0),
    "broker.fisher_rows": _int(1),
    "broker.valuation": ("one of " + ", ".join(VALUATIONS), lambda v: v in VALUATIONS),
    "broker.passes": _int(1),
    "pretrain.steps": _int(0),
    "pretrain.rows": _int(1),
    "pretrain.learning_rate": _real("a number > 0", lambda v: v > 0),
    "pretrain.batch_size": _int(1),
    "broker.max_alpha": _real("a number in (0, 1]", lambda v: 0 < v <= 1),
    "broker.layers": STRS,
    "broker.candidates": _int(0),
    "broker.max_sweeps": _int(1),
    "broker.batch_size": _int(0),
    "broker.sellers": INDICES,
    "broker.min_gain": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "broker.confidence": _real("0 (off) or a number in [0.5, 1)", lambda v: v == 0 or 0.5 <= v < 1),
    "mechanism.name": _choice(_mechanisms),
    "mechanism.reserve": _real("a number >= 0", lambda v: v >= 0),
    "mechanism.beta": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "mechanism.posted": _real("a number >= 0", lambda v: v >= 0),
    "mechanism.roles": ("one of first_half, random", lambda v: v in ("first_half", "random")),
    "economics.revenue": ("one of competitive, independent", lambda v: v in REVENUES),
    "economics.quality": ("one of accuracy, likelihood", lambda v: v in QUALITIES),
    "economics.value_per_quality": _reals("numbers >= 0", lambda v: v >= 0),
    "economics.market_size": _real("a number > 0", lambda v: v > 0),
    "economics.gamma": _real("a number > 0", lambda v: v > 0),
    "economics.outside_option": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "economics.horizon": _real("a number > 0", lambda v: v > 0),
    "economics.step_cost": _real("a number >= 0", lambda v: v >= 0),
    "economics.query_fee": _real("a number >= 0", lambda v: v >= 0),
    "economics.trade_fee": _real("a number >= 0", lambda v: v >= 0),
    "economics.fee_share": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "economics.initial_cash": _real("a number >= 0", lambda v: v >= 0),
    "economics.bankruptcy": BOOL,
    "economics.transfer_cost": _real("a number >= 0", lambda v: v >= 0),
    "economics.compensation": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "strategies.kind": (
        "one of adaptive, markup, shade, truthful, or a list of those (one per agent)",
        lambda v: all(x in STRATEGIES for x in (v if isinstance(v, list) else [v])) and v != [],
    ),
    "strategies.shade": _reals("numbers in [0, 1]", lambda v: 0 <= v <= 1),
    "strategies.markup": _reals("numbers >= 0", lambda v: v >= 0),
    "strategies.grid": ALPHAS,
    "strategies.eta": _real("a number > 0", lambda v: v > 0),
    "strategies.explore": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "baselines.siloed": BOOL,
    "baselines.centralized": BOOL,
    "baselines.fedavg": BOOL,
}
SECTIONS = {
    "": Scenario,
    "agents": AgentsConfig,
    "data": DataConfig,
    "data.split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "trading": TradingConfig,
    "pretrain": PretrainConfig,
    "broker": BrokerConfig,
    "mechanism": MechanismConfig,
    "economics": EconomicsConfig,
    "strategies": StrategiesConfig,
    "baselines": BaselinesConfig,
}
# table -> (registry-name key, registry getter) whose item's keyword options the table takes
OPEN_TABLES = {
    "data": ("dataset", _datasets),
    "data.split": ("name", _partitioners),
    "model": ("name", _models),
    "mechanism": ("name", _mechanisms),
}
OPEN_KINDS = {
    "data": "dataset",
    "data.split": "partitioner",
    "model": "model",
    "mechanism": "mechanism",
}
NOT_OPTIONS = {"data": {"path", "seed"}}
# keys that take one value for every agent or a list with one value per agent
PER_AGENT = {
    "economics.value_per_quality",
    "strategies.kind",
    "strategies.shade",
    "strategies.markup",
    "train.learning_rate",
}
# per-agent keys whose one number stays a number (not a list of one) in the scenario
KEPT_SCALAR = {"train.learning_rate"}


# ---- open tables: the registered item's options, typed by its factory's annotations ----

_KINDS = {  # annotation -> (one, many, check)
    bool: ("true or false", "booleans", lambda v: type(v) is bool),
    int: ("an integer", "integers", lambda v: type(v) is int and abs(v) <= MAX_INT),
    float: ("a number", "numbers", _finite),
    str: ("a string", "strings", lambda v: type(v) is str),
    pathlib.Path: ("a string", "strings", lambda v: type(v) is str),
    os.PathLike: ("a string", "strings", lambda v: type(v) is str),
}
_SEQUENCES = (list, tuple, abc.Sequence)


def _option_kind(annotation) -> tuple[str, str, Callable] | None:
    """(one, many, check) for values of a factory option's annotation; None: unchecked."""
    if annotation in _KINDS:
        return _KINDS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [_option_kind(a) for a in args if a is not type(None)]
        if not kinds or None in kinds:
            return None
        unique = list({k[0]: k for k in kinds}.values())
        one = " or ".join(k[0] for k in unique)
        many = " or ".join(k[1] for k in unique)
        return one, many, lambda v: any(k[2](v) for k in unique)
    if origin in _SEQUENCES:
        inner = _option_kind(args[0]) if args else ("a value", "values", lambda v: True)
        if inner is None:
            return None
        return (
            f"a list of {inner[1]}",
            f"lists of {inner[1]}",
            lambda v: isinstance(v, list | tuple) and all(inner[2](x) for x in v),
        )
    return None


def _option_kinds(fn: Callable) -> dict[str, tuple]:
    """Option name -> (one, many, check) from a registered factory's annotations."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: leave its options unchecked
        return {}
    kinds = {name: _option_kind(hint) for name, hint in hints.items()}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def _check_option_types(prefix: str, name: str, fn: Callable, options) -> None:
    """Each option's value must have its factory's annotated type and fit 32-bit arithmetic
    (a safety net behind the registries' own checkers, which also check ranges)."""
    if isinstance(fn, Mapping | tuple | list | frozenset | set):
        return
    kinds = _option_kinds(fn)
    for key, value in options.items():
        kind = kinds.get(key)
        if kind is not None and not kind[2](value):
            raise ParamarketError(
                f"scenario key {_join(prefix, key)!r} must be {kind[0]}"
                f"{_range_hint(_join(prefix, key), value)} (an option of "
                f"{OPEN_KINDS[prefix]} {name!r}), got {_shown(value)}"
            )


def keyword_options(fn: Callable) -> list[str]:
    """Names of a registered factory's keyword-only options (what a table may add)."""
    if isinstance(fn, Mapping | tuple | list | frozenset | set):
        return sorted(fn)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.default is not p.empty]


def dotted(table: Mapping, prefix: str = "") -> dict:
    """A nested table as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(desc) -> str:
    return desc() if callable(desc) else desc


def _leaves(value) -> list:
    return [x for v in value for x in _leaves(v)] if isinstance(value, list) else [value]


def _range_hint(key: str, value) -> str:
    """What a value that looks right but does not fit 32/64-bit arithmetic breaks."""
    leaves = _leaves(value)
    most = MAX_SEED if key in ("seeds", "data.seed") else MAX_INT
    if any(type(x) is int and abs(x) > most for x in leaves):
        return f" (integers at most {most})"
    if any(type(x) is float and math.isfinite(x) and abs(x) > MAX_REAL for x in leaves):
        return f" (numbers at most {MAX_REAL:g} in size: float32)"
    return ""


def _shown(value, most: int = 200) -> str:
    """repr(value), cut to ``most`` characters (an error message stays readable)."""
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


# Lists whose length a run's memory and time grow with, beyond what the batch engine's
# memory budget splits: longer ones are refused (docs/reliability.md).
MAX_ENTRIES = {
    # every alpha is merged and evaluated at once, for every candidate pair of every buyer
    "broker.alphas": 1024,
    # an adaptive agent keeps a weight per grid point and role, in every run
    "strategies.grid": 1024,
    # one run each; every seed's records are held on the host until the tables are written
    "seeds": 10_000,
}
_ENTRIES_WHY = {
    "broker.alphas": "each is tried on every candidate pair at once",
    "strategies.grid": "each is a weight of every adaptive agent",
    "seeds": "one run each: sweep a list of seed lists for more",
}


def _check(key: str, value) -> None:
    most = MAX_ENTRIES.get(key)
    if most is not None and isinstance(value, list) and len(value) > most:
        raise ParamarketError(
            f"scenario key {key!r} takes at most {most} entries ({_ENTRIES_WHY[key]}), got "
            f"{len(value)}"
        )
    desc, ok = RULES[key]
    if not ok(value):
        raise ParamarketError(
            f"scenario key {key!r} must be {_describe(desc)}{_range_hint(key, value)}, "
            f"got {_shown(value)}"
        )


def _table(table, prefix: str) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise ParamarketError(f"scenario key {prefix!r} must be a table, got {table!r}")
    return table


def _unknown_key(full: str, prefix: str, known) -> ParamarketError:
    allowed = ", ".join(sorted(known))
    return ParamarketError(
        f"unknown scenario key {full!r}; allowed in [{prefix or 'top'}]: {allowed}"
    )


# a swept key's placeholder in :func:`check` (a sweep's grid sets its value cell by cell)
_SWEPT = object()


def _check_fields(cls, table, prefix: str) -> None:
    """What needs no registry, over a whole TOML table and its sub-tables: every key of a
    table that takes no registered item's options is known, and every value that is not a
    registry name keeps its rule. :func:`from_dict` runs this before :func:`_build`, which
    imports the registries (and so JAX): a misspelt key fails at once."""
    known = {f.name for f in dataclasses.fields(cls)} - {"options"}
    for key, value in _table(table, prefix).items():
        full = _join(prefix, key)
        if full not in SECTIONS and key not in known and prefix not in OPEN_TABLES:
            raise _unknown_key(full, prefix, known)
        if value is _SWEPT:
            continue
        if full in SECTIONS:
            _check_fields(SECTIONS[full], value, full)
        elif key in known and not callable(RULES[full][0]):  # callable: a registry's names
            _check(full, value)


def _build(cls, table: Mapping[str, Any], prefix: str):
    """Validate one TOML table into its dataclass, recursing into sub-tables."""
    table = _table(table, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {k for k in fields if k != "options"}
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    open_table = OPEN_TABLES.get(prefix)
    for key, value in table.items():
        full = _join(prefix, key)
        if full in SECTIONS:
            kwargs[key] = _build(SECTIONS[full], value, full)
        elif key in known:
            _check(full, value)
            if full in PER_AGENT and full not in KEPT_SCALAR and not isinstance(value, list):
                value = [value]
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif open_table is not None:
            options[key] = value
        else:
            raise _unknown_key(full, prefix, known)
    if open_table is not None:
        name_key, registry = open_table
        name = kwargs.get(name_key, fields[name_key].default)
        default_opts = fields["options"].default_factory()
        if name_key in kwargs and name != fields[name_key].default:
            default_opts = {}
        merged = {**default_opts, **options}
        allowed = [
            a for a in keyword_options(registry()[name]) if a not in NOT_OPTIONS.get(prefix, set())
        ]
        bad = sorted(set(merged) - set(allowed))
        if bad:
            listed = ", ".join(sorted(known | set(allowed)))
            raise ParamarketError(
                f"unknown scenario key {_join(prefix, bad[0])!r} for "
                f"{name_key} {name!r}; allowed in [{prefix}]: {listed}"
            )
        kwargs["options"] = merged
    return cls(**kwargs)


def from_dict(table: Mapping[str, Any]) -> Scenario:
    """Validate a parsed TOML document into a :class:`Scenario` (errors name the key)."""
    _check_fields(Scenario, table, "")
    table = _regime_defaults(table)
    scenario = _build(Scenario, table, "")
    n = scenario.agents.n
    if scenario.agents.initial > n:
        raise ParamarketError(
            f"scenario key 'agents.initial' must be in [0, agents.n = {n}] (0: all), "
            f"got {scenario.agents.initial}"
        )
    for key, agents in (
        ("broker.sellers", scenario.broker.sellers),
        ("agents.hostile", scenario.agents.hostile),
        ("agents.noisy", scenario.agents.noisy),
    ):
        bad = [i for i in agents if i >= n]
        if bad:
            raise ParamarketError(
                f"scenario key {key!r} must list agents in [0, {n - 1}], got {bad[0]}"
            )
    _check_regime(scenario)
    if min(scenario.broker.alphas) > scenario.broker.max_alpha:
        raise ParamarketError(
            f"scenario key 'broker.max_alpha' ({scenario.broker.max_alpha}) is below every "
            f"merge weight in broker.alphas (smallest {min(scenario.broker.alphas)})"
        )
    if len(set(scenario.broker.sellers)) == n:
        raise ParamarketError("scenario key 'broker.sellers' must leave at least one buyer")
    for key in sorted(PER_AGENT):
        section, field = key.split(".")
        value = getattr(getattr(scenario, section), field)
        if isinstance(value, tuple) and len(value) not in (1, n):
            raise ParamarketError(
                f"scenario key {key!r} must have 1 or agents.n = {n} entries, got {len(value)}"
            )
    _check_registered(scenario)
    return scenario


def _regime_defaults(table: Mapping[str, Any]) -> Mapping[str, Any]:
    """With a shared base (``pretrain.steps > 0``) alignment is unnecessary: ``broker.align``
    defaults to ``none`` there (a scenario may still set it)."""
    pretrain, broker = table.get("pretrain"), table.get("broker", {})
    steps = pretrain.get("steps", 0) if isinstance(pretrain, Mapping) else 0
    if type(steps) is int and steps > 0 and isinstance(broker, Mapping) and "align" not in broker:
        table = {**table, "broker": {**broker, "align": "none"}}
    return table


def _check_regime(scenario: Scenario) -> None:
    """The foundation regime's keys agree: task vectors, adapters and the task-vector merges
    need the shared base; adapters are never permuted; linear and Fisher merges weigh the
    seller by alpha in [0, 1]."""
    b, base = scenario.broker, scenario.pretrain.steps > 0
    if not base:
        if b.goods != "model":
            raise ParamarketError(
                f"scenario key 'broker.goods' = {b.goods!r} needs a shared base: set "
                "pretrain.steps > 0 (or broker.goods = 'model')"
            )
        if b.merge in BASE_METHODS:
            raise ParamarketError(
                f"scenario key 'broker.merge' = {b.merge!r} merges task vectors and needs a "
                "shared base: set pretrain.steps > 0 (or broker.merge = 'linear' or 'fisher')"
            )
    if b.goods == "adapter" and b.align not in (False, "none"):
        raise ParamarketError(
            "scenario key 'broker.align' must be 'none' with broker.goods = 'adapter' "
            f"(adapters share the base's basis and are never permuted), got {b.align!r}"
        )
    if b.merge not in BASE_METHODS and max(b.alphas) > 1:
        raise ParamarketError(
            f"scenario key 'broker.alphas' must be numbers in [0, 1] for broker.merge = "
            f"{b.merge!r} (the seller's weight), got {max(b.alphas)}"
        )


def _check_registered(scenario: Scenario) -> None:
    """Option values of the chosen dataset, partitioner, model and mechanism, checked by
    their registries without loading data or building anything heavy, then against the
    factories' annotations."""
    # deferred: JAX (the registries import their kernels)
    from paramarket_jax.data import check_partition_options
    from paramarket_jax.data.datasets import check_dataset_options, dataset_num_strata
    from paramarket_jax.mechanisms import make_mechanism
    from paramarket_jax.models import check_options

    d, m = scenario.data, scenario.model
    check_dataset_options(d.dataset, **dict(d.options), **({"path": d.path} if d.path else {}))
    k = dataset_num_strata(d.dataset, **dict(d.options))
    check_partition_options(d.split.name, scenario.agents.n, k, **dict(d.split.options))
    check_options(m.name, **dict(m.options))
    make_mechanism(scenario.mechanism.name, **dict(scenario.mechanism.options))
    for prefix, (name_key, registry) in OPEN_TABLES.items():
        section = scenario
        for part in prefix.split("."):
            section = getattr(section, part)
        name = getattr(section, name_key)
        _check_option_types(prefix, name, registry()[name], section.options)


def per_agent(values: tuple, n: int) -> list:
    """A per-agent setting as a list of N values (one value repeats for everyone)."""
    if not isinstance(values, tuple | list):
        values = (values,)
    return list(values) * n if len(values) == 1 else list(values)


def to_dict(scenario: Scenario) -> dict[str, Any]:
    """A scenario as a TOML-ready nested dict (options inlined into their tables)."""

    def convert(obj) -> dict[str, Any]:
        out: dict[str, Any] = {}
        subtables: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                subtables[f.name] = convert(value)
            elif f.name == "options":
                out.update({k: list(v) if isinstance(v, tuple) else v for k, v in value.items()})
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return {**out, **subtables}

    return convert(scenario)


def dumps(scenario: Scenario) -> str:
    """The resolved scenario as TOML text (loads back to an equal scenario)."""
    return tomli_w.dumps(to_dict(scenario))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"data.split.d=0.2"`` -> (["data", "split", "d"], 0.2); values parse as TOML."""
    if "=" not in text:
        raise ParamarketError(f"--set {text!r} must look like key=value (e.g. agents.n=3)")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ParamarketError(f"--set {text!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string such as a dataset name
    except RecursionError:
        raise ParamarketError(f"--set {key}=...: the value is nested too deeply") from None
    return key.split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a parsed TOML document (returns a copy).

    Overriding the name of a registered item (``data.split.name``, ``model.name``,
    ``data.dataset``, ``mechanism.name``) drops the file's options for the old item, so
    ``--set data.split.name=dirichlet --set data.split.alpha=0.3`` works on any scenario.
    """
    table = copy.deepcopy(table)
    set_by_user: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamarketError(f"--set {text!r}: {part!r} is not a table")
        prefix, key = ".".join(path[:-1]), path[-1]
        if OPEN_TABLES.get(prefix, (None,))[0] == key and node.get(key) != value:
            fields = {f.name for f in dataclasses.fields(SECTIONS[prefix])}
            for old in [k for k in node if k not in fields and _join(prefix, k) not in SECTIONS]:
                if _join(prefix, old) not in set_by_user:
                    del node[old]
        node[key] = value
        set_by_user.add(".".join(path))
    return table


def bundled() -> dict[str, pathlib.Path]:
    """Bundled scenario name -> file."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


MAX_SCENARIO_BYTES = 1 << 20  # a scenario TOML is a few KiB; refuse anything over 1 MiB


def read_table(name_or_path: str) -> dict[str, Any]:
    """Parse a bundled scenario by name, or a TOML file by path.

    Raises:
        ParamarketError: unknown name, or a path that is not a regular file of at most
            ``MAX_SCENARIO_BYTES`` bytes of UTF-8 TOML (checked before reading it).
    """
    path = pathlib.Path(name_or_path)
    if not path.suffix and name_or_path in bundled():
        path = bundled()[name_or_path]
    try:
        info = path.stat() if name_or_path else None
    except (OSError, ValueError):
        info = None
    if info is None:
        raise ParamarketError(
            f"no scenario {name_or_path!r}: not a file, and bundled scenarios are "
            f"{', '.join(bundled())}"
        )
    if not stat.S_ISREG(info.st_mode):
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ParamarketError(f"scenario {path}: {what}; expected a TOML file")
    if info.st_size > MAX_SCENARIO_BYTES:
        raise ParamarketError(
            f"scenario {path}: {info.st_size} bytes, more than a scenario's limit of "
            f"{MAX_SCENARIO_BYTES}; expected a TOML file"
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ParamarketError(f"{path}: cannot read: {err.strerror}") from None
    if len(data) > MAX_SCENARIO_BYTES:
        raise ParamarketError(
            f"scenario {path}: more than a scenario's limit of {MAX_SCENARIO_BYTES} bytes"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        hint = (
            "; it looks like UTF-16: save it as UTF-8"
            if data[:2] in (b"\xff\xfe", b"\xfe\xff")
            else ""
        )
        raise ParamarketError(
            f"{path}: invalid TOML: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}){hint}"
        ) from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ParamarketError(f"{path}: invalid TOML: nested too deeply") from None
    except tomllib.TOMLDecodeError as err:
        raise ParamarketError(f"{path}: invalid TOML: {' '.join(str(err).split())}") from None


def check(name_or_path: str, overrides: list[str] = (), swept: list[str] = ()) -> None:
    """What :func:`load` checks before it imports a registry (and so JAX): the file, the
    overrides, every key's name and every value that is not a registry name. ``swept``
    keys (a sweep's grid sets them cell by cell) are checked by name only."""
    table = apply_overrides(read_table(name_or_path), list(overrides))
    for key in swept:
        *parents, last = parts = key.split(".")
        node = table if all(parts) else None  # a malformed key: loading the cell says why
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = _SWEPT
    try:
        _check_fields(Scenario, table, "")
    except RecursionError:  # as in load
        raise ParamarketError("scenario values are nested too deeply") from None


def load(name_or_path: str, overrides: list[str] = ()) -> Scenario:
    """Load, override and validate a scenario."""
    table = read_table(name_or_path)
    try:
        return from_dict(apply_overrides(table, list(overrides)))
    except RecursionError:  # a value nested deeper than copying or checking it allows
        raise ParamarketError("scenario values are nested too deeply") from None
