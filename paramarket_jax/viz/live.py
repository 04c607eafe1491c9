"""The live page's knobs and tables: the sliders Mesa's ``SolaraViz`` offers for a
:class:`~paramarket_jax.engines.mesa.MarketModel` (which it rebuilds on Reset as
``MarketModel(experiment=..., seed=..., **{"train.learning_rate": 0.02})``: the model takes
dotted scenario keys as keywords), and the tables of the rounds so far.

Every knob offered is a numeric scenario key that lives in ``MarketParams`` (traced) or
the seed (data of the same shapes): a model rebuilt with another value has the same
``MarketSpec``, so its jitted step (``round.step_jit``, the spec static) is the one already
compiled. Nothing here imports Solara.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pandas as pd

from paramarket_jax.engines.mesa import MarketModel
from paramarket_jax.experiment import Experiment
from paramarket_jax.results.tables import rounds_table, trades_table

# the price knob of each mechanism (a MarketParams field): key, label, upper end
PRICE_KNOBS = {
    "posted_price": ("mechanism.posted", "posted price", 2.0),
    "nash_bargaining": ("mechanism.beta", "seller's bargaining power", 1.0),
    "first_price": ("mechanism.reserve", "reserve price", 2.0),
    "second_price": ("mechanism.reserve", "reserve price", 2.0),
    "k_vickrey": ("mechanism.reserve", "reserve price", 2.0),
    "vcg_assignment": ("mechanism.reserve", "reserve price", 2.0),
    "mcafee_double": ("mechanism.reserve", "reserve price", 2.0),
}
SEEDS_OFFERED = 10  # the seed slider runs over 0 .. 9 (and the scenario's first seed)


def _slider(kind: str, label: str, value, low, high, step) -> dict:
    return {"type": kind, "label": label, "value": value, "min": low, "max": high, "step": step}


def knobs(experiment: Experiment) -> dict[str, dict]:
    """The sliders the live page offers for ``experiment``'s scenario, in Mesa's
    ``model_params`` form (key -> ``{"type": "SliderFloat", "value": ..., ...}``): the
    seed, the learning rate (when it is one for every agent), the broker's cap on the
    seller's weight (``broker.max_alpha``) and least predicted gain (``broker.min_gain``),
    the trade fee, and the mechanism's price knob (posted price, reserve or bargaining
    power) where it has one."""
    s = experiment.scenario
    seed = s.seeds[0]
    out = {"seed": _slider("SliderInt", "seed", seed, 0, max(SEEDS_OFFERED - 1, seed), 1)}
    lr = s.train.learning_rate
    if isinstance(lr, int | float):
        step = float(f"{lr / 10:.3g}")
        out["train.learning_rate"] = _slider(
            "SliderFloat", "learning rate", float(lr), step, float(f"{lr * 5:.3g}"), step
        )
    b, e = s.broker, s.economics
    out["broker.max_alpha"] = _slider(
        "SliderFloat", "broker: largest seller weight", float(b.max_alpha), 0.05, 1.0, 0.05
    )
    out["broker.min_gain"] = _slider(
        "SliderFloat", "broker: least predicted gain", float(b.min_gain), 0.0, 0.5, 0.01
    )
    out["economics.trade_fee"] = _slider(
        "SliderFloat", "trade fee", float(e.trade_fee), 0.0, max(1.0, 2 * e.trade_fee), 0.05
    )
    if s.mechanism.name in PRICE_KNOBS:
        key, label, high = PRICE_KNOBS[s.mechanism.name]
        value = float(getattr(s.mechanism, key.split(".")[1]))
        out[key] = _slider("SliderFloat", label, value, 0.0, max(high, 2 * value), 0.05)
    return out


def model_params(experiment: Experiment) -> dict[str, Any]:
    """Mesa's ``model_params`` for ``SolaraViz``: the experiment (fixed: its dataset is
    reused by every rebuild) and the knobs' sliders."""
    return {"experiment": experiment, **knobs(experiment)}


def tables(model: MarketModel) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rounds and trades tables of the rounds ``model`` has run so far, in the run
    folder's format (:func:`~paramarket_jax.results.tables.rounds_table`, ``trades_table``;
    one seed); empty before the first round."""
    if model.round == 0:
        return empty_tables()
    records = jax.tree.map(lambda a: np.asarray(a)[None], model.records())
    seeds = [model.seed_value]
    return rounds_table(records, seeds, model.spec.twin_names), trades_table(records, seeds)


def empty_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A rounds and a trades table with no rows."""
    rounds = pd.DataFrame(
        {c: pd.Series(dtype=float) for c in ("seed", "round", "agent", "utility")}
    )
    trades = pd.DataFrame({c: pd.Series(dtype=float) for c in ("seed", "round", "buyer", "seller")})
    return rounds, trades
