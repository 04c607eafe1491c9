"""``paramarket viz``: a live page over a scenario's Mesa model, or a replay of a run folder.

- :mod:`~paramarket_jax.viz.live`: the knobs the page offers for the
  :class:`~paramarket_jax.engines.mesa.MarketModel` it steps, and the tables of the rounds
  so far;
- :mod:`~paramarket_jax.viz.replay`: a run folder's tables, cut at a round;
- :mod:`~paramarket_jax.viz.panels`: what every panel shows, from those tables (figures
  and the per-agent table; no Solara);
- :mod:`~paramarket_jax.viz.page`: the Solara components (Mesa's ``SolaraViz`` for the live
  page), the app that ``solara`` serves;
- :mod:`~paramarket_jax.viz.server`: the checks before anything starts and the server.

Only :mod:`~paramarket_jax.viz.page` and the server's start need Solara, which comes with
the ``viz`` extra (Mesa's own ``mesa[viz]``); without it ``paramarket viz`` says in one line
how to install it (:func:`require_solara`).
"""

from __future__ import annotations

import importlib.util

from paramarket_jax.errors import ParamarketError

NEEDS = ("solara", "altair", "networkx")  # what the viz extra brings that the base lacks
INSTALL = (
    "paramarket viz needs the viz extra (Solara, with mesa[viz]): pip install "
    '"paramarket_jax[viz]" (from a checkout: pip install ".[viz]")'
)


def has_solara() -> bool:
    """Solara, and what Mesa's pages import beside it (Altair, networkx), can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in NEEDS)


def require_solara() -> None:
    """ParamarketError saying how to install the ``viz`` extra, unless Solara is there."""
    if not has_solara():
        raise ParamarketError(INSTALL)
