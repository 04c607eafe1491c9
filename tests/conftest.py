"""Shared test helpers: a compile counter and small fixtures.

The suite compiles with XLA's backend optimisation level 0 (appended to any XLA_FLAGS the
caller set): its shapes are tiny, so compiling dominates its time and optimised code buys
nothing. It changes how fast the compiled code runs, not what it computes (float rounding
aside, which the equality tests tolerate); benchmarks never set it.
"""

import contextlib
import os

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"])
)

import jax
import jax.monitoring
import pytest


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
