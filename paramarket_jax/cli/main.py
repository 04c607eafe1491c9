"""The ``paramarket`` command: ``run`` a scenario or a ``sweep`` of them, list the bundled
``scenarios``, ``plot`` and ``report`` a folder, ``viz`` a scenario live or a folder's replay
(options: :mod:`paramarket_jax.cli.parser`).

A command imports what computes (JAX, orbax, pandas, matplotlib) inside itself, once its
scenario is checked: ``--help``, ``scenarios`` and a bad scenario key answer without them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import shlex
import signal
import sys

from tqdm import tqdm

from paramarket_jax import scenario as sc
from paramarket_jax.cli import processes
from paramarket_jax.cli.parser import DEFAULT_SCENARIO, build_parser, parse_seeds
from paramarket_jax.cli.processes import Terminated
from paramarket_jax.engines import cache
from paramarket_jax.errors import ParamarketError


def jax_processes() -> int:
    import jax  # deferred: JAX

    return jax.process_count()


def jax_process() -> int:
    import jax  # deferred: JAX

    return jax.process_index()


def device_count(args) -> int:
    """``--devices`` checked against the devices JAX sees (default: 1, or every device
    of a multi-process run)."""
    from paramarket_jax.market import sharding  # deferred: JAX

    if args.devices is None:
        return sharding.available() if jax_processes() > 1 else 1
    return sharding.check_devices(args.devices)


def cmd_scenarios(args) -> int:
    """Names and descriptions, read from the files (validating them would import JAX)."""
    for name in sc.bundled():
        print(f"{name:<24} {sc.read_table(name).get('description', '')}")
    return 0


def use_cache(args) -> None:
    """Turn JAX's persistent compilation cache on (``--cache-dir``, or the default folder)
    or off (``--no-cache``) for this command, before anything compiles."""
    if args.no_cache:
        cache.disable()
    else:
        cache.enable(args.cache_dir)


def cmd_run(args) -> int:
    if args.resume is not None:
        return resume_run(args)
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={parse_seeds(args.seeds)}")
    scenario = sc.load(args.scenario or DEFAULT_SCENARIO, overrides)
    use_cache(args)
    # deferred: JAX, orbax and pandas, once the scenario is valid
    from paramarket_jax.engines import checkpoint
    from paramarket_jax.results.folders import check_out_dir, write_run
    from paramarket_jax.runs import CHECKPOINT_ENGINE, resolve_engine, run_scenario

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out if args.out is not None else f"runs/{scenario.name}-{stamp}")
    writer = jax_process() == 0  # in a multi-process run only process 0 writes
    if writer:
        check_out_dir(out)
    engine = resolve_engine(args.engine or "auto")
    devices = device_count(args)
    if args.checkpoint_every is not None:
        if engine != "batch":
            raise ParamarketError(CHECKPOINT_ENGINE)
        if jax_processes() > 1:
            raise ParamarketError(
                "--checkpoint-every works in one process only (each host would need the "
                "others' checkpoints); run the processes without it"
            )
        if devices != 1:
            raise ParamarketError(checkpoint.ONE_DEVICE)
        existed = out.exists()
        saved = checkpoint.start(out, scenario, engine=engine, every=args.checkpoint_every,
                                 max_batch=args.batch, report=args.report, devices=devices,
                                 shard=args.shard,
                                 command=shlex.join(["paramarket", *args.argv]))  # fmt: skip
        args.checkpoint_out = out
        try:
            result = run_checkpointed(args, out, saved, args.report, resume=False)
        except checkpoint.Kept:  # a file in the way of the finished run's: resumable
            raise
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
                note=bar.set_postfix_str,  # the batch path split into several calls
            )
        if not writer:
            print(f"process {jax_process()} of {jax_processes()}: done (process 0 writes)")
            return 0
        write_run(out, result.files(report=args.report))
    print_summary(scenario, result.summary)
    print(f"wrote {out}/" + (f" (open {out}/report.html)" if args.report else ""))
    return 0


def resume_run(args) -> int:
    """``run --resume DIR``: the scenario and options from DIR/run.json (checked key by
    key: :func:`paramarket_jax.engines.checkpoint.load`), then on from the newest usable
    checkpoint of that run in DIR/.checkpoints (round 0 without one); a run.json that no
    checkpoint is of, a file of another in the way or a folder that cannot be written
    is one line before any compute (:func:`~paramarket_jax.engines.checkpoint.check_resume`)."""
    from paramarket_jax.engines import checkpoint  # deferred: JAX and orbax

    others = {
        "SCENARIO": args.scenario,
        "--set": args.overrides,
        "--seeds": args.seeds,
        "--engine": args.engine,
        "--batch": args.batch,
        "--checkpoint-every": args.checkpoint_every,
        "--out": args.out,
        "--devices": args.devices is not None,
        "--shard": args.shard != "auto",
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
    if jax_processes() > 1:
        raise ParamarketError(
            "--resume works in one process only, as --checkpoint-every does; run it without "
            "--coordinator, --num-processes and --process-id"
        )
    if info["devices"] != 1:  # as a new run with --checkpoint-every (checkpoint.ONE_DEVICE)
        raise ParamarketError(
            f"--resume {out}: run.json 'devices' must be 1 (a run with checkpoints runs on "
            f"one device), got {info['devices']}"
        )
    use_cache(args)
    args.checkpoint_out = out
    report = info["report"] and args.report
    result = run_checkpointed(args, out, saved, report, resume=True)
    print_summary(saved.scenario, result.summary)
    print(f"wrote {out}/" + (f" (open {out}/report.html)" if report else ""))
    return 0


def run_checkpointed(args, out, saved, report: bool, *, resume: bool):
    """Run (or go on with) the checkpointed run ``saved`` (its ``run.json``:
    :class:`paramarket_jax.engines.checkpoint.Saved`) in ``out`` and write its files there.
    A resume is checked first (:func:`paramarket_jax.engines.checkpoint.check_resume`),
    with the folder locked and before any compute."""
    # deferred: JAX and orbax
    from paramarket_jax.engines import checkpoint
    from paramarket_jax.runs import run_scenario

    info, scenario = saved
    total = scenario.train.rounds * len(scenario.seeds)
    with checkpoint.lock(out):
        if resume:
            checkpoint.check_resume(out, saved)
        every, identity = info["checkpoint_every"], saved.identity()
        with (
            checkpoint.Checkpoints(out, every, resume=resume, identity=identity) as saves,
            tqdm(total=total, desc="rounds", disable=args.quiet, file=sys.stderr) as bar,
        ):
            saves.note = lambda text: bar.write(text, file=sys.stderr)
            result = run_scenario(
                scenario,
                engine="batch",
                max_batch=info["batch"],
                progress=bar.update,
                note=bar.set_postfix_str,
                checkpoints=saves,
                check=getattr(args, "check", False),
                devices=info["devices"],
                shard=info["shard"],
            )
        checkpoint.finish(out, result.files(report=report), info["scenario"])
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
    floors = [a for a in summary["agents"] if "loss_floor" in a]
    if floors:
        print("test loss (nats) against the lowest loss the agent's test rows allow:")
        for a in floors:
            print(
                f"  agent {a['agent']}: market {a['market_loss']:.3f}, siloed "
                f"{a['siloed_loss']:.3f}, floor {a['loss_floor']:.3f}"
            )
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
    if not args.grid:
        raise ParamarketError("sweep needs at least one --grid KEY=V1,V2")
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={parse_seeds(args.seeds)}")
    # the file, the overrides and the swept keys' names (the sweep checks every cell later)
    sc.check(args.scenario, overrides, [g.split("=", 1)[0].strip() for g in args.grid if "=" in g])
    use_cache(args)
    # deferred: JAX and pandas, once the scenario's keys are valid
    from paramarket_jax.results.folders import check_out_dir
    from paramarket_jax.results.tables import knob_text
    from paramarket_jax.sweep import check_grid, parse_grid, run_sweep

    grid = [parse_grid(g) for g in args.grid]
    if args.seeds is not None and any(key == "seeds" for key, _ in grid):
        raise ParamarketError("--seeds and --grid seeds=... both set the seeds; drop one")
    check_grid(grid, overrides)  # a key twice, or swept and --set: before any compute
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

    def note(text):  # which checkpoint a group of cells goes on from, how its runs split
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
    if table.attrs.get("unchanged"):
        print(f"nothing to run: every cell of {args.out}/ is complete; nothing was rewritten")
    else:
        print(f"wrote {args.out}/sweep.parquet" + (" and report.html" if args.report else ""))
    return 0


def cmd_plot(args) -> int:
    from paramarket_jax.results.report import write_plots  # deferred: matplotlib and pandas

    for path in write_plots(args.folder):
        print(f"wrote {path}")
    return 0


def cmd_viz(args) -> int:
    from paramarket_jax.viz.server import serve  # deferred: solara, JAX

    return serve(args.source, args.overrides, args.port)


def cmd_report(args) -> int:
    from paramarket_jax.results.report import write_report  # deferred: matplotlib and pandas

    print(f"wrote {write_report(args.folder)}")
    return 0


INTERRUPTED = 128 + signal.SIGINT  # exit code after Ctrl-C (130)
TERMINATED = 128 + signal.SIGTERM  # exit code after SIGTERM (143)


@contextlib.contextmanager
def signals_raise(whole: bool):
    """Inside the block SIGTERM raises :class:`Terminated` in the main thread (as Ctrl-C
    raises KeyboardInterrupt); the previous handler is back after it. With ``whole`` (the
    call is the whole process, which ends after it), the first SIGINT or SIGTERM also makes
    the process ignore the next ones, up to its end, so that a second Ctrl-C cannot cut
    the cleanup of the first short (a checkpoint half saved, a temporary left). A no-op
    outside the main thread, where no handler can be set."""

    def ignore_more() -> None:
        if whole:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        ignore_more()
        raise Terminated

    def on_sigint(signum, frame):
        ignore_more()
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        if whole:
            signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        if not whole:
            signal.signal(signal.SIGTERM, previous)


def exit_now(code: int) -> None:
    """End the process at once with ``code``, its output flushed, skipping the interpreter's
    shutdown. After an interrupt, XLA may still be running the compiled call that was
    interrupted (its threads calling back into Python); tearing the interpreter down under
    them crashes (exit 139) after waiting for it, so a process whose command has cleaned
    up after an interrupt is ended here instead."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, process: bool | None = None) -> int:
    """Run one ``paramarket`` command; its exit code: 0, 2 (bad input, one line), 130
    (Ctrl-C) or 143 (SIGTERM), each after one line saying what was kept.

    Args:
        argv: the arguments (default: the process's own, ``sys.argv[1:]``).
        process: this call is the whole process (default: when ``argv`` is None, as the
            ``paramarket`` script calls it): after an interrupt and its cleanup the process
            ends at once (:func:`exit_now`) instead of returning.
    """
    whole = argv is None if process is None else process
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    with signals_raise(whole):
        code = _command(args, argv)
    if whole and code in (INTERRUPTED, TERMINATED):
        exit_now(code)
    return code


def _command(args, argv: list[str]) -> int:
    try:
        if args.command in ("run", "sweep") and processes.is_multi(args):
            processes.resolve(args)  # before anything starts
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
                    "plot": cmd_plot, "report": cmd_report, "viz": cmd_viz}  # fmt: skip
        if args.command not in ("run", "sweep"):
            return commands[args.command](args)
        with cache.one_warning(lambda text: print(f"paramarket: warning: {text}", file=sys.stderr)):
            return commands[args.command](args)
    except ParamarketError as err:
        print(f"paramarket: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"paramarket: {what}; {interrupted(args)}", file=sys.stderr)
        return TERMINATED if isinstance(err, Terminated) else INTERRUPTED
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
    if args.command == "viz":
        return "the page's server stopped"
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
