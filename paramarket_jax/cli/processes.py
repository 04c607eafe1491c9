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
            noise = bool(_NOISE.match(line))
            if noise:  # an error log line's message may go on over a few plain lines
                self.more = _MORE if line[:1] in b"EF" else 0
                self.fatal = self.fatal or line.startswith(b"F")
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


def supervise(argv: list[str], args) -> int:
    """Run ``paramarket ARGV`` as a child worker; relay its output; turn a runtime abort into
    one line and exit code 2."""
    import threading

    env = dict(os.environ, **{WORKER: "1"})
    code = "import sys; from paramarket_jax.cli.main import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", code, *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    relays = [_Relay(child.stdout, sys.stdout.buffer), _Relay(child.stderr, sys.stderr.buffer)]
    threads = [threading.Thread(target=r.run, daemon=True) for r in relays]
    for t in threads:
        t.start()
    while True:
        try:  # a Ctrl-C reaches the child too: wait for its own message and exit code
            rc = child.wait()
            for t in threads:
                t.join()
            break
        except KeyboardInterrupt:
            continue
    if rc in (0, 2, 130):
        return rc
    if rc < 0 or rc == 128 + signal.SIGABRT:
        who = "" if args.process_id is None else f"process {args.process_id}: "
        log = bytes(relays[1].log + relays[0].log)
        if relays[1].open_line:
            print(file=sys.stderr)
        print(f"paramarket: error: {who}{_reason(log, args)}; this process stopped and "
              "nothing was written", file=sys.stderr)  # fmt: skip
        return 2
    return rc


def check_processes(coordinator: str | None, num_processes: int | None,
                    process_id: int | None) -> None:  # fmt: skip
    """ParamarketError unless the multi-process options are all given and sane, or none."""
    given = [coordinator, num_processes, process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise ParamarketError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes P "
            "and --process-id I (or none of them, and JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment)"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParamarketError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not 0 <= process_id < num_processes:
        raise ParamarketError(
            f"--process-id must be between 0 and {num_processes - 1} (--num-processes "
            f"{num_processes}), got {process_id}"
        )


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               *, timeout: int = 300, heartbeat: int = 60) -> None:  # fmt: skip
    """Join a multi-process run (``jax.distributed.initialize``), before any other JAX work.

    With ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id``
    given, those are used; with none of them, JAX reads its own environment variables
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or detects
    the cluster (SLURM, ...). ``timeout``: seconds to wait for every process to join;
    ``heartbeat``: seconds of silence after which a process counts as lost.
    """
    check_processes(coordinator, num_processes, process_id)
    import jax  # deferred: JAX (the command line answers --help and usage errors without it)

    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=heartbeat,
        shutdown_timeout_seconds=heartbeat,
    )
