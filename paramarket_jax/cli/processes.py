"""Multi-process runs: each ``paramarket`` process works in a supervised child.

JAX's distributed runtime ends a process whose peer died (a missed heartbeat, an
unreachable coordinator) with ``abort()`` and a C++ stack trace, which no Python handler
can catch. So a process of a multi-process ``run`` or ``sweep`` (``--coordinator``,
``--num-processes``, ``--process-id``, or JAX's ``JAX_COORDINATOR_ADDRESS``) runs the
command in a child process and relays its output; if the child is ended by the runtime,
the parent prints one line saying which process was lost, and exits 2. Process 0 writes
results only at the end, atomically, so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from paramarket_jax.errors import ParamarketError

WORKER = "PARAMARKET_WORKER"
_MORE = 8  # plain lines after a runtime error line that still belong to its message
# the runtime's log lines (glog: severity, date, time), its stack trace, gloo's chatter
# (whose threads interleave their lines: a lone number is the end of one of them)
_NOISE = re.compile(rb"^([IWEF]\d{4} \d\d:\d\d:\d\d|\s+@\s|\*\*\* |\[Gloo\]|RPC: |\s*\d*\s*$)")
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # a new log line of the runtime
# a log line that starts right after a progress bar, on its line (the bar has no newline)
_LOG_AFTER_BAR = re.compile(rb"\r[^\n]*?([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ )")


def is_multi(args) -> bool:
    """This command joins a multi-process run."""
    given = (args.coordinator, args.num_processes, args.process_id)
    return any(v is not None for v in given) or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def is_worker() -> bool:
    return os.environ.get(WORKER) == "1"


def _reason(log: bytes, args) -> str:
    """What the runtime's fatal log says, in one clause."""
    text = log.decode(errors="replace")
    lost = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)", text)
    if lost:
        ids = ", ".join(x for x in re.split(r"[,\s]+", lost.group(1)) if x)
        return f"process {ids} stopped answering (killed, crashed or its host is gone)"
    if "RegisterTask" in text or "DEADLINE_EXCEEDED" in text or "Barrier" in text:
        where = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "?")
        return (
            f"not every process joined within {args.connect_timeout} s (coordinator {where}): "
            "start all of them, with the same --coordinator and --num-processes"
        )
    if "UNAVAILABLE" in text or "coordination service" in text.lower():
        return "the coordinator (process 0) stopped answering"
    return "the distributed runtime stopped this process"


class _Relay:
    """Copy a child's output stream to ours, leaving out the runtime's log lines (kept,
    for the reason of a fatal end; after a fatal line everything is the runtime's dump) and
    passing progress bars (``\r``) through at once."""

    def __init__(self, source, sink):
        self.source, self.sink = source, sink
        self.pending = b""
        self.log = bytearray()
        self.fatal = False
        self.more = 0  # plain lines still counted as part of the last error log line
        self.open_line = False  # the last thing written did not end a line (a bar)

    def _write(self, data: bytes) -> None:
        self.sink.write(data)
        self.open_line = not data.endswith(b"\n")

    def feed(self, chunk: bytes) -> None:
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            if not line and self.open_line and not self.fatal:  # the end of a bar's line
                self._write(b"\n")
                continue
            after_bar = _LOG_AFTER_BAR.match(line)
            if after_bar and not self.fatal:  # the bar (ended), then the log line
                self._write(line[: after_bar.start(1)] + b"\n")
                line = line[after_bar.start(1) :]
            noise = bool(_NOISE.match(line))
            if line.startswith(b"paramarket: "):  # our own line: never the runtime's
                self.more = 0
            elif noise and _LOG_LINE.match(line):  # an error log line's message may go on
                # over a few plain lines (a lone number among them, a list of processes)
                self.more = _MORE if line[:1] in b"EF" else 0
                self.fatal = self.fatal or line.startswith(b"F")
            elif noise and self.more:
                self.more -= 1
            elif self.more:
                self.more -= 1
                noise = True
            if noise or self.fatal:
                self.log.extend(line + b"\n")
            else:
                self._write(line + b"\n")
        bar = self.pending and b"\r" in self.pending and not _NOISE.match(self.pending)
        if bar and not self.fatal:
            self._write(self.pending)
            self.pending = b""
        self.sink.flush()

    def run(self) -> None:
        while chunk := os.read(self.source.fileno(), 65536):
            self.feed(chunk)
        if self.pending and not self.fatal and not _NOISE.match(self.pending):
            self._write(self.pending)
        self.sink.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that a
    terminated command cleans up exactly as an interrupted one (temporaries removed,
    checkpoints being saved finished or dropped) before it ends."""


def supervise(argv: list[str], args) -> int:
    """Run ``paramarket ARGV`` as a child worker; relay its output; turn a runtime abort into
    one line and exit code 2."""
    import threading

    env = dict(os.environ, **{WORKER: "1"})
    code = (
        "import sys; from paramarket_jax.cli.main import main; "
        "sys.exit(main(sys.argv[1:], process=True))"
    )
    child = subprocess.Popen([sys.executable, "-c", code, *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    relays = [_Relay(child.stdout, sys.stdout.buffer), _Relay(child.stderr, sys.stderr.buffer)]
    threads = [threading.Thread(target=r.run, daemon=True) for r in relays]
    for t in threads:
        t.start()
    while True:
        try:  # the child is interrupted too: wait for its own message and exit code
            rc = child.wait()
            for t in threads:
                t.join()
            break
        except KeyboardInterrupt as err:  # passed on (a Ctrl-C reached the child as well:
            # after its first signal, the child ignores any other)
            sig = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
            with contextlib.suppress(OSError):
                child.send_signal(sig)
            continue
    if rc in (0, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        return rc
    if rc in (-signal.SIGINT, -signal.SIGTERM):  # ended before it could clean up: it was
        # still starting (nothing written yet)
        what = "interrupted" if rc == -signal.SIGINT else "terminated"
        print(f"paramarket: {what}; nothing was written", file=sys.stderr)
        return 128 - rc
    if rc < 0 or rc == 128 + signal.SIGABRT:
        who = "" if args.process_id is None else f"process {args.process_id}: "
        log = bytes(relays[1].log + relays[0].log)
        if relays[1].open_line:
            print(file=sys.stderr)
        print(f"paramarket: error: {who}{_reason(log, args)}; this process stopped and "
              "nothing was written", file=sys.stderr)  # fmt: skip
        return 2
    return rc


# JAX's variables for a multi-process run, read when none of the options is given
ENV_COORDINATOR, ENV_PROCESSES, ENV_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
)  # fmt: skip


def _env_int(name: str, low: int) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = low - 1
    if value < low:
        what = "a positive integer" if low else "an integer >= 0"
        raise ParamarketError(
            f"{name} must be {what} ({ENV_COORDINATOR} is set: a multi-process run), got {text!r}"
        )
    return value


def resolve(args) -> None:
    """Check the multi-process options of ``args`` (ParamarketError, in one line, before
    anything starts); with none of them given, take them from JAX's variables
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), checked as
    strictly and named in the message. A variable left out is left to JAX's detection of
    a cluster launcher (SLURM, Open MPI, ...), which :func:`initialize` turns into one line
    when it finds none."""
    given = (args.coordinator, args.num_processes, args.process_id)
    args.processes_from = "options"
    if all(v is None for v in given) and os.environ.get(ENV_COORDINATOR):
        args.processes_from = "environment"
        args.coordinator = os.environ[ENV_COORDINATOR].strip()
        args.num_processes = _env_int(ENV_PROCESSES, 1)
        args.process_id = _env_int(ENV_ID, 0)
    check_processes(args.coordinator, args.num_processes, args.process_id,
                    env=args.processes_from == "environment")  # fmt: skip


def check_processes(coordinator: str | None, num_processes: int | None,
                    process_id: int | None, *, env: bool = False) -> None:  # fmt: skip
    """ParamarketError unless the multi-process options are all given and sane, or none
    (``env``: they come from JAX's variables, any but the address may be missing)."""
    names = (ENV_COORDINATOR, ENV_PROCESSES, ENV_ID) if env else (
        "--coordinator", "--num-processes", "--process-id"
    )  # fmt: skip
    given = [coordinator, num_processes, process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given) and not env:
        raise ParamarketError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes P "
            "and --process-id I (or none of them, and JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment)"
        )
    host, _, port = coordinator.rpartition(":")
    if (
        not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c.isspace() or not c.isprintable() for c in coordinator)
    ):
        raise ParamarketError(
            f"{names[0]} must be HOST:PORT (port 1 to 65535), got {coordinator[:100]!r}"
        )
    both = num_processes is not None and process_id is not None
    if both and not 0 <= process_id < num_processes:
        raise ParamarketError(
            f"{names[2]} must be between 0 and {num_processes - 1} ({names[1]} "
            f"{num_processes}), got {process_id}"
        )


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               *, timeout: int = 300, heartbeat: int = 60) -> None:  # fmt: skip
    """Join a multi-process run (``jax.distributed.initialize``), before any other JAX work.

    ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id``
    (checked by :func:`resolve`, which reads them from JAX's variables when no option is
    given); one that is None is left to JAX's detection of a cluster launcher (SLURM, ...),
    and a ParamarketError names what is missing when it finds none. ``timeout``: seconds
    to wait for every process to join; ``heartbeat``: seconds of silence after which a
    process counts as lost.
    """
    import jax  # deferred: JAX (the command line answers --help and usage errors without it)

    # JAX's preemption service takes SIGTERM for itself (a process would then go on, and
    # hang its peers); without it, SIGTERM ends the process as Ctrl-C does (exit 143)
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=heartbeat,
            shutdown_timeout_seconds=heartbeat,
        )
    except (ValueError, TypeError) as err:  # what no option or variable gave, and no
        # cluster launcher JAX knows told it
        missing = [name for name, v in ((ENV_PROCESSES, num_processes), (ENV_ID, process_id))
                   if v is None]  # fmt: skip
        if not missing:
            raise ParamarketError(f"cannot join the multi-process run: {err}") from None
        raise ParamarketError(
            f"{ENV_COORDINATOR} is set (a multi-process run), but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not, and no cluster launcher that JAX "
            "knows (SLURM, Open MPI, ...) gives the value; set the variables, give "
            "--coordinator, --num-processes and --process-id, or unset "
            f"{ENV_COORDINATOR} for a one-process run"
        ) from None
    except jax.errors.JaxRuntimeError as err:  # the runtime refused to start (not a lost peer)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "RPC server" in text:
            port = str(coordinator).rpartition(":")[2]
            raise ParamarketError(
                f"process 0 cannot serve as the coordinator on port {port} ({text}): the "
                "port is in use or not allowed here; choose another port in --coordinator "
                f"(or {ENV_COORDINATOR}) for every process"
            ) from None
        raise ParamarketError(f"cannot join the multi-process run: {text}") from None
