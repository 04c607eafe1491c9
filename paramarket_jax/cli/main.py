"""The ``paramarket`` command: ``run`` a scenario, list bundled ``scenarios``."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys

from paramarket_jax.errors import ParamarketError


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` -> a list of seeds."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ParamarketError(f"--seeds {text!r} must look like 0,1,2 or 0-4") from None
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
        "compiled call; mesa: step each seed's Mesa model round by round; auto (default): "
        "batch unless agents enter the market (agents.entry), a Mesa-side rule",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="RUNS",
        help="most runs per compiled call of the batch engine (default: what fits memory)",
    )
    add_device_options(parser)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """Devices and processes (batch engine): see README "Running on many GPUs and hosts"."""
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
        help="a swept key and its values, e.g. mechanism.beta=0,0.5,1 "
        "(repeatable; the grid is their product)",
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
    return parser


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="write the tables only: no figures and no report.html (paramarket report DIR "
        "draws them later)",
    )


def jax_processes() -> int:
    import jax

    return jax.process_count()


def jax_process() -> int:
    import jax

    return jax.process_index()


def device_count(args) -> int:
    """``--devices`` checked against the devices JAX sees (default: 1, or every device
    of a multi-process run)."""
    from paramarket_jax.market import sharding

    if args.devices is None:
        return sharding.available() if jax_processes() > 1 else 1
    return sharding.check_devices(args.devices)


def cmd_scenarios(args) -> int:
    from paramarket_jax.scenario import bundled, load

    for name in bundled():
        print(f"{name:<24} {load(name).description}")
    return 0


def cmd_run(args) -> int:
    from tqdm import tqdm

    from paramarket_jax import scenario as sc
    from paramarket_jax.engines import checkpoint
    from paramarket_jax.results.folders import check_out_dir, write_run
    from paramarket_jax.runs import CHECKPOINT_ENGINE, resolve_engine, run_scenario

    if args.resume is not None:
        return resume_run(args)
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={parse_seeds(args.seeds)}")
    scenario = sc.load(args.scenario or DEFAULT_SCENARIO, overrides)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out if args.out is not None else f"runs/{scenario.name}-{stamp}")
    writer = jax_process() == 0  # in a multi-process run only process 0 writes
    if writer:
        check_out_dir(out)
    engine = resolve_engine(scenario, args.engine or "auto")
    devices = device_count(args)
    if args.checkpoint_every is not None:
        if engine != "batch":
            raise ParamarketError(CHECKPOINT_ENGINE)
        if jax_processes() > 1:
            raise ParamarketError(
                "--checkpoint-every works in one process only (each host would need the "
                "others' checkpoints); run the processes without it"
            )
        existed = out.exists()
        checkpoint.start(out, scenario, engine=engine, every=args.checkpoint_every,
                         max_batch=args.batch, report=args.report,
                         command=shlex.join(["paramarket", *args.argv]))  # fmt: skip
        args.checkpoint_out = out
        try:
            result = run_checkpointed(args, out, scenario, args.checkpoint_every, args.batch,
                                      args.report, resume=False)  # fmt: skip
        except ParamarketError:  # bad input found late (a data file) or every agent diverged
            checkpoint.discard(out, keep_folder=existed)
            raise
    else:
        total = scenario.train.rounds * len(scenario.seeds)
        quiet = args.quiet or not writer
        with tqdm(total=total, desc="rounds", disable=quiet, file=sys.stderr) as bar:
            result = run_scenario(
                scenario,
                engine=engine,
                max_batch=args.batch,
                progress=bar.update,
                check=args.check,
                devices=devices,
                shard=args.shard,
            )
        if not writer:
            print(f"process {jax_process()} of {jax_processes()}: done (process 0 writes)")
            return 0
        write_run(out, result.files(report=args.report))
    print_summary(scenario, result.summary)
    print(f"wrote {out}/" + (f" (open {out}/report.html)" if args.report else ""))
    return 0


def resume_run(args) -> int:
    """``run --resume DIR``: the scenario and options from DIR/run.json, then on from the
    newest usable checkpoint in DIR/.checkpoints (round 0 without one)."""
    from paramarket_jax.engines import checkpoint

    others = {
        "SCENARIO": args.scenario,
        "--set": args.overrides,
        "--seeds": args.seeds,
        "--engine": args.engine,
        "--batch": args.batch,
        "--checkpoint-every": args.checkpoint_every,
        "--out": args.out,
    }
    given = [name for name, value in others.items() if value]
    if given:
        raise ParamarketError(
            f"--resume DIR goes on with the run saved in DIR, with the scenario and options "
            f"of its run.json; drop {', '.join(given)}"
        )
    if not args.resume:
        raise ParamarketError("--resume must name a run folder, got an empty path")
    out = pathlib.Path(args.resume)
    saved = checkpoint.load(out)
    info = saved.info
    args.checkpoint_out = out
    report = info["report"] and args.report
    result = run_checkpointed(args, out, saved.scenario, info["checkpoint_every"], info["batch"],
                              report, resume=True)  # fmt: skip
    print_summary(saved.scenario, result.summary)
    print(f"wrote {out}/" + (f" (open {out}/report.html)" if report else ""))
    return 0


def run_checkpointed(args, out, scenario, every: int, max_batch, report: bool, *, resume: bool):
    """Run (or go on with) a checkpointed run in ``out`` and write its files there."""
    from tqdm import tqdm

    from paramarket_jax.engines import checkpoint
    from paramarket_jax.runs import run_scenario

    total = scenario.train.rounds * len(scenario.seeds)
    with checkpoint.lock(out):
        with tqdm(total=total, desc="rounds", disable=args.quiet, file=sys.stderr) as bar:
            note = lambda text: bar.write(text, file=sys.stderr)  # noqa: E731
            with checkpoint.Checkpoints(out, every, resume=resume, note=note) as saves:
                result = run_scenario(
                    scenario,
                    engine="batch",
                    max_batch=max_batch,
                    progress=bar.update,
                    checkpoints=saves,
                    check=getattr(args, "check", False),
                    devices=device_count(args),
                    shard=args.shard,
                )
        checkpoint.finish(out, result.files(report=report))
    return result


def print_summary(scenario, summary: dict) -> None:
    seeds = summary["seeds"]
    print(
        f"{scenario.name}: {scenario.agents.n} agents, {scenario.data.dataset}/"
        f"{scenario.data.split.name}, {scenario.model.name}, {summary['rounds']} rounds, "
        f"mechanism {scenario.mechanism.name}, seeds {seeds}"
    )
    head = ("agent", "market_acc", "siloed_acc", "acc_gain", "utility", "siloed_util", "bought",
            "sold")  # fmt: skip
    print(" ".join(f"{h:>11}" for h in head))
    for a in summary["agents"]:
        cells = (a["agent"], f"{a['market_accuracy']:.3f}", f"{a['siloed_accuracy']:.3f}",
                 f"{a['gain']:+.3f}", f"{a['utility']:.3f}", f"{a['siloed_utility']:.3f}",
                 f"{a['trades']:.1f}", f"{a['sales']:.1f}")  # fmt: skip
        print(" ".join(f"{c:>11}" for c in cells))
    acc_gain = summary["market_accuracy"] - summary["siloed_accuracy"]
    print(
        f"mean accuracy {summary['market_accuracy']:.3f} market vs "
        f"{summary['siloed_accuracy']:.3f} siloed ({acc_gain:+.3f}); welfare "
        f"{summary['welfare']:.3f} vs {summary['siloed_welfare']:.3f} siloed; broker take "
        f"{summary['broker_take']:.3f}"
    )
    k = len(seeds)
    bad = {seed: s["diverged_agents"] for seed, s in summary["per_seed"].items()
           if s.get("diverged_agents")}  # fmt: skip
    if bad:
        where = "; ".join(
            f"seed {seed}: agent(s) {', '.join(map(str, a))}" for seed, a in bad.items()
        )
        print(f"diverged (frozen, out of trading; see train.diverge_loss): {where}")
    print(
        f"every agent beats its siloed twin: accuracy "
        f"{summary['accuracy_gain_all_fraction'] * k:.0f}/{k} seeds, utility (mutual gain) "
        f"{summary['mutual_gain_fraction'] * k:.0f}/{k} seeds"
    )


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from paramarket_jax.results.folders import check_out_dir
    from paramarket_jax.sweep import knob_text, parse_grid, run_sweep

    if not args.grid:
        raise ParamarketError("sweep needs at least one --grid KEY=V1,V2")
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={parse_seeds(args.seeds)}")

    grid = [parse_grid(g) for g in args.grid]
    writer = jax_process() == 0  # in a multi-process run only process 0 writes
    if writer:
        check_out_dir(args.out, resume=True)  # a usable folder, before any compute
    devices = device_count(args)
    # one bar over every round x seed of the cells to run, with an ETA; cell lines above it.
    # It is made once every cell is checked, so a bad cell's error is the only line.
    bars = []

    def make_bar(total):
        bars.append(tqdm(total=total, desc="sweep rounds", disable=args.quiet, file=sys.stderr))
        return bars[-1]

    def progress(name, done):
        tqdm.write(f"{'kept' if done else 'ran '} {name}", file=sys.stderr)

    def note(text):  # which checkpoint a group of cells goes on from
        tqdm.write(text, file=sys.stderr)

    try:
        table = run_sweep(
            args.scenario,
            grid,
            overrides,
            args.out,
            progress,
            engine=args.engine,
            max_batch=args.batch,
            force=args.force,
            bar=make_bar,
            report=args.report,
            command=shlex.join(["paramarket", *args.argv]),
            checkpoint_every=args.checkpoint_every,
            note=note,
            devices=devices,
            shard=args.shard,
        )
    finally:
        for bar in bars:
            bar.close()
    if not writer:
        print(f"process {jax_process()} of {jax_processes()}: done (process 0 writes)")
        return 0
    keys = [key for key, _ in grid]
    cols = ["market_accuracy", "siloed_accuracy", "welfare", "siloed_welfare", "mutual_gain",
            "trades", "revenue_of_sellers"]  # fmt: skip
    # a swept list value (model.widths=[8],[6]) is shown as its JSON text: hashable
    shown = table.assign(**{k: table[k].map(knob_text) for k in keys})
    print(shown.groupby(keys)[cols].mean().round(4).to_string())
    print(f"wrote {args.out}/sweep.parquet" + (" and report.html" if args.report else ""))
    return 0


def cmd_plot(args) -> int:
    from paramarket_jax.results.report import write_plots

    for path in write_plots(args.folder):
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from paramarket_jax.results.report import write_report

    print(f"wrote {write_report(args.folder)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command in ("run", "sweep"):
            from paramarket_jax.cli import processes

            if processes.is_multi(args):
                processes.check_processes(args.coordinator, args.num_processes, args.process_id)
                if not processes.is_worker():
                    return processes.supervise(argv, args)
                processes.initialize(
                    args.coordinator,
                    args.num_processes,
                    args.process_id,
                    timeout=args.connect_timeout,
                    heartbeat=args.heartbeat,
                )
        commands = {"run": cmd_run, "sweep": cmd_sweep, "scenarios": cmd_scenarios,
                    "plot": cmd_plot, "report": cmd_report}  # fmt: skip
        return commands[args.command](args)
    except ParamarketError as err:
        print(f"paramarket: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"paramarket: interrupted; {interrupted(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # out of memory (host or accelerator): one line, no traceback
        if not isinstance(err, MemoryError) and "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print("paramarket: error: out of memory; lower agents.n, train.rounds, the number "
              "of seeds or --batch", file=sys.stderr)  # fmt: skip
        return 2


def interrupted(args) -> str:
    """What an interrupt left behind: a run writes all or nothing (a checkpointed run
    keeps its checkpoints); a sweep keeps its finished cells (each written atomically) and
    resumes from them, and with ``--checkpoint-every`` from its running cells' checkpoints."""
    out = getattr(args, "checkpoint_out", None)
    if out is not None:
        return (
            f"the checkpoints so far are kept in {out}; go on with: paramarket run --resume "
            f"{shlex.quote(str(out))}"
        )
    if args.command != "sweep":
        return "nothing was written"
    done = sorted(p.parent.name for p in pathlib.Path(args.out).glob("*/summary.json"))
    saved = getattr(args, "checkpoint_every", None) and any(
        pathlib.Path(args.out).glob(".checkpoints/*/*")
    )
    if saved:
        kept = f"{len(done)} finished cell(s) and " if done else ""
        return (
            f"{kept}the checkpoints of the cells that were running are kept in {args.out}; "
            "run the same command again to go on from them"
        )
    if not done:
        return "no cell had finished, so no cell was written"
    return (
        f"{len(done)} finished cell(s) are kept in {args.out}; run the same command again "
        "to resume from them"
    )


if __name__ == "__main__":
    sys.exit(main())
