"""Shared test helpers: a compile counter and small fixtures.

The suite compiles with XLA's backend optimisation level 0 and its loop emitters
(``tests/levels.py``, appended to any XLA_FLAGS the caller set): its shapes are tiny, so
compiling dominates its time and optimised code buys nothing. It changes how fast the
compiled code runs and the last bits of some floats, not what the market does; the
bit-for-bit claims are checked again at the flags users get
(``tests/engines/test_user_level.py``); benchmarks never set it.

Every worker (pytest-xdist runs one per core) and every ``paramarket`` subprocess a test
starts share one persistent compilation cache, ``$PARAMARKET_CACHE_DIR`` if set, else the
``tests`` folder of the user's cache (``~/.cache/paramarket/tests``: apart from the
runs' cache, since these programs are compiled at another optimisation level), so a
program compiled by one worker is read by the others and by the next run of the suite.
"""

import contextlib
import os

from levels import TEST_FLAGS

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
