"""The Solara app that ``paramarket viz`` serves (``SOLARA_APP=paramarket_jax.viz.page``).

For a scenario, Mesa's own ``SolaraViz`` over a
:class:`~paramarket_jax.engines.mesa.MarketModel`:
Mesa's controls (Reset, play/pause, Step: one jitted market round per click) and its
"Model Parameters" sliders (:func:`~paramarket_jax.viz.live.knobs`: a change rebuilds the
model on Reset, with nothing recompiled), and one panel per figure, the round counter and
headline numbers and the per-agent table (components of the model, redrawn after every
step). For a run folder, a page of its own: a round slider (and a seed selector for several
seeds) over the same panels, drawn from the folder's tables.

What is served is :data:`paramarket_jax.viz.server.TARGET` (set by the server before it
starts, or read from ``$PARAMARKET_VIZ``).
"""

from __future__ import annotations

import math

import pandas as pd
import solara
from mesa.visualization import SolaraViz

from paramarket_jax.engines.mesa import MarketModel
from paramarket_jax.viz import live, panels, server
from paramarket_jax.viz.replay import Replay

STYLE = """
.pm-panel img { max-width: 100%; height: auto; }
.agents-table { border-collapse: collapse; font-size: 0.9em; }
.agents-table th, .agents-table td { padding: 2px 10px; text-align: right; }
.agents-table tr:nth-child(even) { background: #f3f3f3; }
"""


def _num(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


@solara.component
def Status(rounds: pd.DataFrame, trades: pd.DataFrame, done: int, total: int, note: str = ""):
    """The round counter, the headline numbers after it and a note."""
    h = panels.headline(rounds, trades)
    with solara.Card("Market", classes=["pm-panel", "pm-status"]), solara.Column(gap="6px"):
        solara.Text(f"round {done} of {total}", classes=["pm-round"], style={"font-size": "1.2em"})
        solara.Text(
            f"welfare {_num(h['welfare'])} (siloed {_num(h['siloed_welfare'])}); mean "
            f"accuracy {_num(h['accuracy'])} (siloed {_num(h['siloed_accuracy'])}); trades so "
            f"far {h['trades']}",
            classes=["pm-headline"],
        )
        if note:
            solara.Text(note, style={"color": "#666", "font-size": "0.85em"})


@solara.component
def Figure(title: str, rounds: pd.DataFrame, trades: pd.DataFrame, n: int):
    """One figure of :data:`~paramarket_jax.viz.panels.FIGURES` (a note before round 1)."""
    slug = title.lower().replace(" ", "-")
    with solara.Card(title, classes=["pm-panel", f"pm-{slug}"]):
        if len(rounds):
            solara.Image(panels.FIGURES[title](rounds, trades, n), classes=[f"pm-img-{slug}"])
        else:
            solara.Text("no round yet: press Step or play")


@solara.component
def Agents(rounds: pd.DataFrame, trades: pd.DataFrame, n: int):
    """The per-agent table: cash, accuracy, in the market, bought, sold."""
    with solara.Card("Agents", classes=["pm-panel", "pm-agents"]):
        if len(rounds):
            solara.HTML(tag="div", unsafe_innerHTML=panels.agents_html(
                panels.agents(rounds, trades, n)))  # fmt: skip
        else:
            solara.Text("no round yet")


# ---- live: Mesa's SolaraViz, a component per panel ----


def _tables(model: MarketModel):
    """The model's tables after its last round, computed once per round for every panel."""
    cached = getattr(model, "_viz_tables", None)
    if cached is None or cached[0] != model.round:
        cached = (model.round, live.tables(model))
        model._viz_tables = cached
    return cached[1]


LIVE_NOTE = (
    "Step runs one market round (one jitted call); a change of Model Parameters rebuilds "
    "the market on Reset, with nothing recompiled"
)


def _status(model):
    rounds, trades = _tables(model)
    return Status(rounds, trades, model.round, model.config.train.rounds, LIVE_NOTE)


def _figure(title: str):
    def component(model):
        rounds, trades = _tables(model)
        return Figure(title, rounds, trades, model.spec.n)

    component.__name__ = title.replace(" ", "")
    return component


def _agents(model):
    rounds, trades = _tables(model)
    return Agents(rounds, trades, model.spec.n)


LIVE_COMPONENTS = [_status, *(_figure(t) for t in panels.FIGURES), _agents]


@solara.component
def LivePage(target: server.Scenario):
    """Mesa's SolaraViz over a fresh model of ``target`` (one per browser session)."""
    experiment = target.experiment
    model = solara.use_memo(lambda: MarketModel(experiment=experiment), [])
    solara.Style(STYLE)
    SolaraViz(
        model,
        components=[(c, 0) for c in LIVE_COMPONENTS],
        model_params=live.model_params(experiment),
        name=f"paramarket viz: {experiment.scenario.name}",
        play_interval=200,
    )


# ---- replay: a round slider over the tables ----


@solara.component
def ReplayPage(replay: Replay):
    """A round slider (and a seed selector) over the same panels, from the tables."""
    done, set_done = solara.use_state(replay.total)
    seed, set_seed = solara.use_state(replay.seeds[0])
    rounds, trades = replay.at(seed, done)
    solara.Style(STYLE)
    solara.Title(f"paramarket viz: {replay.folder.name}")
    with solara.AppBar():
        solara.AppBarTitle(f"paramarket viz: replay of {replay.folder}")
    with solara.Sidebar(), solara.Card("Replay"):
        solara.SliderInt("round", value=done, on_value=set_done, min=0, max=replay.total, step=1)
        if len(replay.seeds) > 1:
            solara.Select("seed", value=seed, values=list(replay.seeds), on_value=set_seed)
    with solara.Column():
        Status(rounds, trades, done, replay.total, "replayed from the folder's tables")
        with solara.ColumnsResponsive(12, large=6):
            for title in panels.FIGURES:
                Figure(title, rounds, trades, replay.n)
        Agents(rounds, trades, replay.n)


@solara.component
def Page():
    target = server.target()
    if isinstance(target, Replay):
        ReplayPage(target)
    else:
        LivePage(target)
