"""Shared test helpers: a compile counter and small fixtures.

The suite compiles with XLA's backend optimisation level 0 and its loop emitters (appended
to any XLA_FLAGS the caller set): its shapes are tiny, so compiling dominates its time and
optimised code buys nothing. It changes how fast the compiled code runs, not what it
computes (float rounding aside, which the equality tests tolerate); benchmarks never set
it.

Every worker (pytest-xdist runs one per core) and every ``paramarket`` subprocess a test
starts share one persistent compilation cache, ``$PARAMARKET_CACHE_DIR`` if set, else the
``tests`` folder of the user's cache (``~/.cache/paramarket/tests``: apart from the
runs' cache, since these programs are compiled at another optimisation level), so a
program compiled by one worker is read by the others and by the next run of the suite.
"""

import contextlib
import importlib.util
import mmap
import os
import pathlib


def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has the flag ``flag`` (an unknown flag in XLA_FLAGS aborts
    the process), read off its shared libraries without starting JAX."""
    spec = importlib.util.find_spec("jaxlib")
    for lib in pathlib.Path(spec.origin).parent.glob("*.so"):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(flag.encode() + b"\0") >= 0:
                return True
    return False


# XLA's older loop emitters, not its MLIR fusion emitters: at level 0 they compile the
# market's programs in half the time (where this XLA still has them)
TEST_FLAGS = ["--xla_backend_optimization_level=0"]
if xla_knows("xla_cpu_use_fusion_emitters"):
    TEST_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *TEST_FLAGS]))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.monitoring  # noqa: E402
import pytest  # noqa: E402

from paramarket_jax.engines import cache  # noqa: E402

if cache.ENV not in os.environ:
    os.environ[cache.ENV] = str(cache.default_folder() / "tests")
cache.enable()


@contextlib.contextmanager
def count_compiles():
    """Count XLA backend compilations inside the block: ``with count_compiles() as n: ...``."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def compiles():
    return count_compiles
