"""The ``paramarket`` command line's options: one parser, usage errors in one line.

Light on purpose (argparse only): ``paramarket --help`` and a usage error answer without
importing JAX.
"""

from __future__ import annotations

import argparse
import sys

from paramarket_jax.errors import ParamarketError
from paramarket_jax.scenario import MAX_ENTRIES


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` -> a list of seeds (a range of at most the scenario's
    limit, checked before the list is made)."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            seeds = None
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ParamarketError(f"--seeds {text!r} must look like 0,1,2 or 0-4") from None
    if seeds is None:
        most = MAX_ENTRIES["seeds"]
        if hi - lo >= most:  # 0-99999999 would take gigabytes before any check
            raise ParamarketError(
                f"--seeds {text!r} names {hi - lo + 1} seeds; a run takes at most {most} "
                "(scenario key 'seeds')"
            )
        seeds = list(range(lo, hi + 1))
    if not seeds:
        raise ParamarketError(f"--seeds {text!r} names no seed")
    return seeds


def _at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _at_least(1, "a positive integer")
nonnegative_int = _at_least(0, "an integer >= 0")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("auto", "batch", "mesa"),
        default="auto",
        help="batch: every seed (and every cell differing only in numeric knobs) in one "
        "compiled call; mesa: step each seed's Mesa model round by round (the same numbers); "
        "auto (default): batch",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="RUNS",
        help="most runs per compiled call of the batch engine (default: what fits memory)",
    )
    add_device_options(parser)
    add_cache_options(parser)


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """JAX's persistent compilation cache (docs/fast-start.md)."""
    group = parser.add_argument_group("compilation cache").add_mutually_exclusive_group()
    group.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="keep compiled programs in DIR, so the next run of the same shapes compiles "
        "nothing (default: $PARAMARKET_CACHE_DIR, else $XDG_CACHE_HOME/paramarket or "
        "~/.cache/paramarket)",
    )
    group.add_argument(
        "--no-cache",
        action="store_true",
        help="compile every program afresh and write no cache (also: PARAMARKET_CACHE_DIR=off)",
    )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """Devices and processes (batch engine): see docs/scaling.md."""
    group = parser.add_argument_group("devices and hosts")
    group.add_argument(
        "--devices",
        type=nonnegative_int,
        default=None,
        metavar="D",
        help="run on the first D devices JAX sees, 0 for all (default: 1, or all of them "
        "in a multi-process run); the numbers do not depend on D",
    )
    group.add_argument(
        "--shard",
        choices=("auto", "agents", "runs"),
        default="auto",
        help="what is split over the devices: the agents of every run (padded with dead "
        "agents to a multiple of D), or the runs (seeds x cells); auto (default): runs "
        "when there are at least D of them, else agents",
    )
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process run: address of process 0, which every process reaches "
        "(default: $JAX_COORDINATOR_ADDRESS); needs --num-processes and --process-id",
    )
    group.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        metavar="P",
        help="processes in a multi-process run (one per host, usually)",
    )
    group.add_argument(
        "--process-id",
        type=nonnegative_int,
        default=None,
        metavar="I",
        help="this process's index, 0 .. P-1; process 0 writes the results",
    )
    group.add_argument(
        "--heartbeat",
        type=positive_int,
        default=60,
        metavar="S",
        help="multi-process run: seconds without word from a process before the others "
        "stop with an error (default 60)",
    )
    group.add_argument(
        "--connect-timeout",
        type=positive_int,
        default=300,
        metavar="S",
        help="multi-process run: seconds to wait for every process to join (default 300)",
    )


DEFAULT_SCENARIO = "paper_two_agent"


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit code 2 (like every other bad input)."""

    def error(self, message: str):
        command = " ".join(self.prog.split()[1:2])  # "paramarket run" -> "run"; top level: ""
        see = f"paramarket {command} --help" if command else "paramarket --help"
        print(f"paramarket: error: {message} (see {see})", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="paramarket", description="Simulate parameter markets of Flax models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario: market against siloed twins")
    run.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help=f"bundled scenario name or TOML file (default {DEFAULT_SCENARIO})",
    )
    run.add_argument(
        "--out", default=None, help="run folder to create (default runs/<scenario>-<time>)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key, e.g. --set data.split.d=0.2 (repeatable)",
    )
    run.add_argument("--seeds", default=None, help="seeds to run, e.g. 0,1,2 or 0-4")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_report_option(run)
    run.add_argument(
        "--check",
        action="store_true",
        help="check the market's invariants on every round (money conserved, no payment "
        "without a trade, purchase counts) before writing; a violation exits 2",
    )
    add_engine_options(run)
    run.set_defaults(engine=None)  # auto; None tells --resume that --engine was not given
    run.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="K",
        help="save every run's state every K rounds into the --out folder, so a killed run "
        "goes on with --resume (batch engine only)",
    )
    run.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="go on with a run started with --checkpoint-every that was killed or "
        "interrupted: DIR is its --out; the scenario and options come from DIR/run.json",
    )
    sweep = sub.add_parser("sweep", help="run a grid of overrides x seeds into one folder")
    sweep.add_argument("scenario", help="bundled scenario name or TOML file")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept key and its values, e.g. mechanism.beta=0,0.5,1 (TOML values, bare "
        "words are strings; each key once and each value once; repeatable: the grid is "
        "their product)",
    )
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every cell",
    )
    sweep.add_argument("--seeds", default=None, help="seeds of every cell, e.g. 0-4")
    sweep.add_argument("--out", required=True, help="sweep folder (resumes if it exists)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_report_option(sweep)
    sweep.add_argument(
        "--force",
        action="store_true",
        help="rerun finished cells whose scenario differs from the one requested now",
    )
    add_engine_options(sweep)
    sweep.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="K",
        help="save the state of the cells being run every K rounds under "
        "DIR/.checkpoints, so the same command run again after a kill goes on from there "
        "instead of from round 0 (batch engine only)",
    )
    sub.add_parser("scenarios", help="list bundled scenarios")
    for name, text in (
        ("plot", "draw a run's or sweep's figures as PNG files into its folder"),
        ("report", "write DIR/report.html: one self-contained page with the figures and tables"),
    ):
        cmd = sub.add_parser(name, help=text, description=text + " (reads the tables only)")
        cmd.add_argument("folder", metavar="DIR", help="a run folder or a sweep folder")
    viz = sub.add_parser(
        "viz",
        help="a live page over a scenario's Mesa model, or a replay of a run folder (needs "
        "the viz extra)",
        description="serve a page on 127.0.0.1: for a scenario, Mesa's SolaraViz (step, "
        "play, reset, knobs); for a run folder (or a sweep cell), a replay of its tables",
    )
    viz.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_SCENARIO,
        metavar="SCENARIO | RUN_DIR",
        help=f"bundled scenario name, TOML file or run folder (default {DEFAULT_SCENARIO})",
    )
    viz.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key (repeatable; not for a run folder)",
    )
    viz.add_argument(
        "--port", type=port_number, default=8765, help="port on 127.0.0.1 (default 8765)"
    )
    return parser


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1 to 65535, got {text!r}")
    return value


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="write the tables only: no figures and no report.html (paramarket report DIR "
        "draws them later)",
    )
