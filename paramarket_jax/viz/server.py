"""``paramarket viz``'s checks and server: everything the page needs is checked here, in one
line each, before the server starts; then Solara's Starlette app is served by uvicorn in
this process on ``127.0.0.1:PORT`` (a socket bound here first, so a port in use is an error,
not another port), serving :mod:`paramarket_jax.viz.page`.

The target (a scenario's experiment, or a run folder's tables) is kept in :data:`TARGET`
for the page; ``$PARAMARKET_VIZ`` (JSON: ``{"source": ..., "overrides": [...]}``) names it
too, so that ``solara run paramarket_jax.viz.page`` with that variable set serves the same.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import pathlib
import socket
import sys
import warnings
from typing import NamedTuple

from paramarket_jax import scenario as sc
from paramarket_jax.errors import ParamarketError
from paramarket_jax.viz import require_solara

ENV = "PARAMARKET_VIZ"
HOST = "127.0.0.1"
DEFAULT_PORT = 8765
APP = "paramarket_jax.viz.page"


class Scenario(NamedTuple):
    """A scenario to step live: its experiment (built once; every model rebuild reuses its
    dataset)."""

    experiment: object  # paramarket_jax.experiment.Experiment (imported late: JAX)


TARGET = None  # the Scenario or Replay being served


def is_folder(source: str) -> bool:
    return pathlib.Path(source).is_dir()


def check_source(source: str, overrides: list[str]) -> None:
    """The cheap checks, before JAX or pandas: a scenario's keys, or a folder's kind."""
    if is_folder(source):
        from paramarket_jax.results.report import folder_kind  # deferred: pandas

        if overrides:
            raise ParamarketError(
                f"--set changes a scenario; {source} is a run folder, replayed as it was "
                "written: drop --set"
            )
        folder_kind(source)
    else:
        sc.check(source, list(overrides))


def prepare(source: str, overrides: list[str] = ()):
    """The target of ``paramarket viz SOURCE``: a run folder's checked tables
    (:func:`~paramarket_jax.viz.replay.load`), or a scenario (bundled name or TOML file,
    with ``--set`` overrides) and its experiment; bad input is a ParamarketError."""
    check_source(source, list(overrides))
    if is_folder(source):
        from paramarket_jax.viz.replay import load  # deferred: pandas

        return load(source)
    from paramarket_jax.experiment import build  # deferred: JAX

    return Scenario(build(sc.load(source, list(overrides))))


def target():
    """What is served: :data:`TARGET`, else the one ``$PARAMARKET_VIZ`` names."""
    global TARGET
    if TARGET is None:
        named = json.loads(os.environ.get(ENV, "{}"))
        TARGET = prepare(named.get("source"), named.get("overrides", []))
    return TARGET


def bind(port: int, host: str = HOST) -> socket.socket:
    """A listening-ready socket on ``host:port`` (as uvicorn binds it); a port in use or
    not ours to take is a one-line error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ParamarketError(
                f"port {port} on {host} is in use; pick another with --port"
            ) from None
        raise ParamarketError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port"
        ) from None
    return sock


def serve(source: str, overrides: list[str], port: int) -> int:
    """``paramarket viz``: check the source, bind the port, check that Solara is there,
    prepare the target, then serve until Ctrl-C or SIGTERM."""
    global TARGET
    check_source(source, list(overrides))  # before the port, and before JAX
    sock = bind(port)
    try:
        require_solara()
        if not is_folder(source):
            from paramarket_jax.engines import cache  # deferred: JAX

            cache.enable()
        TARGET = prepare(source, overrides)
        os.environ[ENV] = json.dumps({"source": source, "overrides": list(overrides)})
        os.environ["SOLARA_APP"] = APP
        os.environ.setdefault("SOLARA_TELEMETRY_MIXPANEL_ENABLE", "False")
        # Mesa 3.3's ComponentsView trips Solara's hook check (a use_state after an early
        # return that never happens for a page with components): not ours to fix
        warnings.filterwarnings(
            "ignore", message=".*found despite early return", category=UserWarning
        )
        # served on 127.0.0.1 over http: Solara's note that its cookies fall back to lax
        warnings.filterwarnings(
            "ignore", message="Cookies with samesite=none", category=UserWarning
        )
        importlib.import_module(APP)  # here, so a broken install fails before serving
        import uvicorn  # deferred: the viz extra

        config = uvicorn.Config(
            "solara.server.starlette:app",
            host=HOST,
            port=port,
            log_level="warning",
            lifespan="on",
        )
        what = f"replay of {source}" if is_folder(source) else f"scenario {source}"
        print(f"paramarket viz: {what} at http://{HOST}:{port}/ (Ctrl-C stops)", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("paramarket viz: stopped", file=sys.stderr)
    return 0
