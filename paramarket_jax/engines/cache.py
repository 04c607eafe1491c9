"""JAX's persistent compilation cache, shared by every run, sweep, Mesa view and test.

A market compiles one large program (the scanned round) and a handful of small ones; on a
CPU that compilation is most of a short run. With the cache on, the compiled executables
are written to a folder and the next process that compiles the same program (the same
spec, shapes and JAX version: a run that differs only in traced knobs such as seeds,
prices, learning rates or ``d``) reads it instead of compiling.

The folder is, in order: the ``folder`` given to :func:`enable` (``--cache-dir``), the
environment variable ``PARAMARKET_CACHE_DIR``, ``$XDG_CACHE_HOME/paramarket``, or
``~/.cache/paramarket``. ``PARAMARKET_CACHE_DIR=off`` (or ``--no-cache``) turns it off.
JAX keys every entry by the program, its compile options, the devices and the JAX and
jaxlib versions, so a cache written by another version is never read; an entry that
cannot be read (a corrupt or truncated file) is compiled again with a warning, never a
crash (:func:`enable` sets ``jax_raise_persistent_cache_errors`` off).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from collections.abc import Callable

from paramarket_jax.errors import ParamarketError

ENV = "PARAMARKET_CACHE_DIR"
OFF = ("off", "none", "0", "false", "no")
# every program is worth caching: the small ones add up to about a second a run
MIN_COMPILE_SECONDS = 0.0
# what JAX warns, once per entry, when it cannot read one (and compiles the program again)
BAD_ENTRY = "Error reading persistent compilation cache entry"


def default_folder() -> pathlib.Path | None:
    """The cache folder when none is given: ``$PARAMARKET_CACHE_DIR`` (None when it says
    ``off``), else ``$XDG_CACHE_HOME/paramarket``, else ``~/.cache/paramarket``."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "paramarket"


def enable(folder: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turn the persistent compilation cache on in ``folder`` (default
    :func:`default_folder`); returns the folder, or None when the cache is off.

    A folder that cannot be created or written is a ParamarketError naming it (the
    command line turns it into one line and exit code 2).
    """
    path = pathlib.Path(folder).expanduser() if folder is not None else default_folder()
    if path is None:
        disable()
        return None
    if path.exists() and not path.is_dir():
        raise ParamarketError(
            f"cannot use {path} as the compilation cache: it is a file, not a folder; pass "
            f"--cache-dir DIR, set {ENV}, or turn it off with --no-cache"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParamarketError(
            f"cannot use {path} as the compilation cache ({err.strerror or err}); pass "
            f"--cache-dir DIR, set {ENV}, or turn it off with --no-cache"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ParamarketError(
            f"cannot write to the compilation cache {path}; pass --cache-dir DIR, set "
            f"{ENV}, or turn it off with --no-cache"
        )
    import jax  # deferred: JAX (the command line imports this module before it needs JAX)

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_raise_persistent_cache_errors", False)
    return path


def disable() -> None:
    """Turn the persistent compilation cache off (programs compile in every process)."""
    import jax  # deferred: JAX

    jax.config.update("jax_compilation_cache_dir", None)


def folder() -> pathlib.Path | None:
    """The folder the cache is using now, or None when it is off."""
    import jax  # deferred: JAX

    value = jax.config.jax_compilation_cache_dir
    return pathlib.Path(value) if value else None


@contextlib.contextmanager
def one_warning(note: Callable[[str], None]):
    """Inside the block, JAX's warnings about cache entries it could not read (one per
    entry, each compiled again) become one line, ``note(text)``, at the end; every other
    warning passes through as it would."""
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            bad = [w for w in caught if BAD_ENTRY in str(w.message)]
            for w in caught:
                if BAD_ENTRY not in str(w.message):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            if bad:
                removed = remove_unreadable()
                note(
                    f"{len(bad)} compilation cache entr{'y' if len(bad) == 1 else 'ies'} in "
                    f"{folder()} could not be read (corrupt, or cut short by a killed run) and "
                    f"{'was' if len(bad) == 1 else 'were'} compiled again; removed "
                    f"{removed} unreadable file(s), which the next run writes anew"
                )


def remove_unreadable() -> int:
    """Delete the cache's executables that do not decompress (JAX writes an entry in place,
    so a run killed while writing leaves it cut short, and JAX never replaces an existing
    entry): the next run compiles and writes them again. Returns how many went. (A saved
    program that does not load is replaced when it is saved again,
    :mod:`paramarket_jax.engines.programs`.)"""
    try:  # deferred: JAX (a private module: a JAX without it removes nothing)
        from jax._src import compilation_cache

        decompress = compilation_cache.decompress_executable
    except (ImportError, AttributeError):
        return 0
    path, removed = folder(), 0
    if path is None:
        return 0
    for entry in path.glob("*-cache"):
        try:
            decompress(entry.read_bytes())
        except OSError:
            continue
        except Exception:  # not a compressed executable: unreadable for JAX too
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def counted():
    """Count, inside the block, XLA compilations (``compiles``: every backend compile,
    cache hits included) and how many the persistent cache answered (``hits``):
    ``with counted() as c: ...`` then ``c["compiles"] - c["hits"]`` were compiled."""
    import jax.monitoring  # deferred: JAX

    counts = {"compiles": 0, "compile_s": 0.0, "hits": 0}

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1
            counts["compile_s"] += duration

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
