"""Shared test helpers: a compile counter and small fixtures."""

import contextlib

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
